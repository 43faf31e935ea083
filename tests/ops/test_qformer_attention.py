"""deem.ops.qformer_attention: the fused Q-Former attention (qk-LayerNorm, masked softmax, hash dropout, P·V) against
an independent float64 formulation, its closed-form backward (gradcheck), dropout, edge cases and bad input; the CUDA
kernels (-m cuda) against the reference at the visual tokenizer's shapes and under CUDA-graph capture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deem.ops import qformer_attention, qformer_attention_reference
from deem.ops.resampler import _keep_probability, dropout_keep

pytestmark = pytest.mark.usefixtures("one_thread")


def eager(q, k, v, heads, q_norm=None, k_norm=None, key_mask=None, eps=1e-12, keep=None, p=0.0):
    """The original's formulation in float64: LN over the head dim, additive finfo.min mask, softmax, dropout, ·V."""
    B, Lq, W = q.shape
    Lk, d = k.shape[1], W // heads

    def heads_of(t, L):
        return t.double().reshape(B, L, heads, d).permute(0, 2, 1, 3)

    qh, kh, vh = heads_of(q, Lq), heads_of(k, Lk), heads_of(v, Lk)
    if q_norm is not None:
        qh = F.layer_norm(qh, (d,), q_norm[0].double(), q_norm[1].double(), eps)
    if k_norm is not None:
        kh = F.layer_norm(kh, (d,), k_norm[0].double(), k_norm[1].double(), eps)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        s = s + (~key_mask.bool()).double()[:, None, None, :] * torch.finfo(torch.float64).min
    prob = torch.softmax(s, -1)
    if keep is not None:
        prob = prob * keep.double() / (1 - p)
    return (prob @ vh).permute(0, 2, 1, 3).reshape(B, Lq, W)


def problem(B=2, Lq=5, Lk=7, heads=2, d=8, dtype=torch.float64, device="cpu", seed=0, norm=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device, dtype)

    q, k, v = r(B, Lq, heads * d), r(B, Lk, heads * d), r(B, Lk, heads * d)
    norms = dict(q_norm=(1 + r(d, s=0.3), r(d, s=0.3)), k_norm=(1 + r(d, s=0.3), r(d, s=0.3))) if norm else {}
    return q, k, v, norms


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_the_original_formulation(norm, masked):
    q, k, v, norms = problem(norm=norm)
    mask = None
    if masked:
        mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0] * 7], dtype=torch.bool)  # row 1: nothing visible
    out = qformer_attention(q, k, v, 2, key_mask=mask, **norms)
    torch.testing.assert_close(out, eager(q, k, v, 2, key_mask=mask, **norms), rtol=1e-12, atol=1e-12)
    if masked:  # an all-masked row attends uniformly, as the additive finfo.min mask makes it
        torch.testing.assert_close(out[1], v[1].reshape(7, 2, 8).mean(0).reshape(1, 16).expand(5, 16))


def test_gradcheck_with_norms_mask_and_dropout():
    q, k, v, norms = problem(B=2, Lq=3, Lk=4)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    seed = torch.tensor([987654321123], dtype=torch.int64)
    leaves = [t.requires_grad_() for t in (q, k, v, *norms["q_norm"], *norms["k_norm"])]
    for kwargs in (dict(), dict(key_mask=mask), dict(key_mask=mask, dropout_p=0.4, seed=seed)):
        def f(q, k, v, qw, qb, kw, kb, kwargs=kwargs):
            return qformer_attention(q, k, v, 2, q_norm=(qw, qb), k_norm=(kw, kb), **kwargs)

        assert torch.autograd.gradcheck(f, leaves)


def test_gradients_match_autograd_of_the_original_formulation():
    q, k, v, norms = problem(B=3, Lq=6, Lk=9, heads=3, d=4)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 4:] = False
    leaves = [t.requires_grad_() for t in (q, k, v, *norms["q_norm"], *norms["k_norm"])]
    g = torch.randn(3, 6, 12, dtype=torch.float64)
    ours = torch.autograd.grad(qformer_attention(q, k, v, 3, key_mask=mask, **norms), leaves, g)
    ref = torch.autograd.grad(eager(q, k, v, 3, key_mask=mask, **norms), leaves, g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dropout_is_a_seeded_bernoulli_mask():
    q, k, v, norms = problem(B=2, Lq=40, Lk=50, heads=2, d=8)
    seed = torch.tensor([42], dtype=torch.int64)
    keep = dropout_keep(seed, (2, 2, 40, 50), 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.02
    out = qformer_attention(q, k, v, 2, dropout_p=0.25, seed=seed, **norms)
    _, inv_keep = _keep_probability(0.25)  # 1 / (1 - p) in float32, as the kernel computes it
    torch.testing.assert_close(out, eager(q, k, v, 2, keep=keep, p=1 - 1 / inv_keep, **norms), rtol=1e-12,
                               atol=1e-12)
    assert torch.equal(out, qformer_attention(q, k, v, 2, dropout_p=0.25, seed=seed, **norms))
    other = qformer_attention(q, k, v, 2, dropout_p=0.25, seed=torch.tensor([43]), **norms)
    assert not torch.allclose(out, other)


def test_dropout_hash_equals_the_c_definition():
    """deem/resampler.h: x = mix32(flat + mix32(lo ^ mix32(hi))) (mod 2^32), keep iff x >= p * 2^32."""
    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed = (7 << 32) + 123456789
    key = mix32((seed & 0xFFFFFFFF) ^ mix32(seed >> 32))
    threshold, inv = _keep_probability(0.1)
    keep = dropout_keep(torch.tensor([seed]), (1, 2, 3, 5), 0.1).flatten()
    for flat in range(30):
        assert bool(keep[flat]) == (mix32((flat + key) & 0xFFFFFFFF) >= threshold)
    assert inv == pytest.approx(1 / 0.9)


def test_strided_views_and_low_precision():
    """q, k, v as views of one wide projection (no copies), float32 and bfloat16."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        wide = torch.randn(2, 7, 3 * 16, dtype=torch.float64)
        q, k, v = wide.to(dtype).split(16, dim=-1)
        assert not q.is_contiguous()
        norms = dict(q_norm=(torch.ones(8), torch.zeros(8)), k_norm=(torch.ones(8) * 0.5, torch.zeros(8)))
        out = qformer_attention(q, k, v, 2, **norms)
        assert out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out.double(), eager(q, k, v, 2, **norms), rtol=tol, atol=tol)


def test_empty_batch():
    q, k, v, norms = problem(B=0)
    q.requires_grad_()
    out = qformer_attention(q, k, v, 2, **norms)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_fake_tensors_and_opcheck():
    q, k, v, norms = problem(dtype=torch.float32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    args = (q, k, v, *norms["q_norm"], *norms["k_norm"], mask, None, 2, 1e-12, 8**-0.5, 0.0)
    torch.library.opcheck(torch.ops.deem.qformer_attention.default, args)
    out, lse = qformer_attention_reference(*args)
    assert out.shape == q.shape and lse.shape == (2, 2, 5) and lse.dtype == torch.float32


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(heads=3), "heads=3 must be a positive divisor"),
        (dict(k=torch.randn(2, 7, 12, dtype=torch.float64)), r"k and v must be \[B, Lk, 16\]"),
        (dict(v=torch.randn(2, 7, 16)), "q, k, v must share one floating dtype"),
        (dict(key_mask=torch.ones(2, 6, dtype=torch.bool)), r"key_mask must be bool/uint8 \[B, Lk\]"),
        (dict(key_mask=torch.ones(2, 7)), r"key_mask must be bool/uint8 \[B, Lk\]"),
        (dict(q_norm=(torch.ones(7, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))),
         r"q_norm must be \(weight \[8\], bias \[8\]\)"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=0.1, seed=torch.tensor([1.0])), "seed must be one int64"),
        (dict(q=torch.randn(2, 5), k=torch.randn(2, 7), v=torch.randn(2, 7)), r"must be \[B, L, H\*d\]"),
        (dict(key_mask=torch.ones(2, 7, dtype=torch.bool, device="meta")), "key_mask is on meta"),
    ],
)
def test_bad_input_raises_a_clear_value_error(change, match):
    q, k, v, _ = problem()
    args = {**dict(q=q, k=k, v=v, heads=2), **change}
    with pytest.raises(ValueError, match=match):
        qformer_attention(**args)


# ------------------------------------------------------------------------------------------------ CUDA


def _cuda_case(device, dtype, B, Lq, Lk, masked, p, seed=0):
    q, k, v, norms = problem(B=B, Lq=Lq, Lk=Lk, heads=12, d=64, dtype=dtype, device=device, seed=seed)
    mask = None
    if masked:
        mask = torch.rand(B, Lk, generator=torch.Generator().manual_seed(seed)) > 0.3
        mask[0] = False  # one image with every key masked
        mask = mask.to(device)
    s = torch.tensor([1234567 + seed], dtype=torch.int64, device=device) if p > 0 else None
    return q, k, v, norms, mask, s


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("Lq", "Lk", "masked", "p"), [(77, 257, False, 0.0), (77, 77, False, 0.1),
                                                       (77, 257, True, 0.1), (5, 9, True, 0.0), (33, 130, False, 0.5)])
def test_cuda_kernels_match_the_reference(cuda_device, dtype, Lq, Lk, masked, p):
    from deem.ops.resampler import cuda_fits

    q, k, v, norms, mask, seed = _cuda_case(cuda_device, dtype, 4, Lq, Lk, masked, p)
    assert cuda_fits(q, k, 12)
    leaves = [t.requires_grad_() for t in (q, k, v, *norms["q_norm"], *norms["k_norm"])]
    g = torch.randn(4, Lq, 768, device=cuda_device, dtype=dtype)
    out = qformer_attention(q, k, v, 12, key_mask=mask, dropout_p=p, seed=seed, **norms)
    grads = torch.autograd.grad(out, leaves, g)
    # the reference in float64 on the CPU, from the same 16-bit inputs
    cpu = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref = qformer_attention(*cpu[:3], 12, q_norm=(cpu[3], cpu[4]), k_norm=(cpu[5], cpu[6]),
                            key_mask=None if mask is None else mask.cpu(), dropout_p=p,
                            seed=None if seed is None else seed.cpu())
    ref_grads = torch.autograd.grad(ref, cpu, g.cpu().double())

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-30)).item()

    assert rel(out, ref) < 2e-2
    for name, a, b in zip(("q", "k", "v", "qw", "qb", "kw"), grads, ref_grads):
        assert rel(a, b) < 3e-2, name
    # d k_bias is exactly 0 (a shift of every key moves each score row by a constant): only rounding noise is left
    assert (grads[6].double().cpu() - ref_grads[6]).abs().max() < 5e-2 * ref_grads[5].abs().max()
    assert torch.equal(out, qformer_attention(q, k, v, 12, key_mask=mask, dropout_p=p, seed=seed, **norms))


@pytest.mark.cuda
def test_cuda_graph_capture(cuda_device):
    q, k, v, norms, mask, seed = _cuda_case(cuda_device, torch.bfloat16, 8, 77, 257, True, 0.1)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def run():
        out = qformer_attention(q, k, v, 12, key_mask=mask, dropout_p=0.1, seed=seed, **norms)
        return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager_results = run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager_results):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_unsupported_sizes_fall_back_and_bad_input(cuda_device):
    from deem._native import Outputs, dl, lib
    from deem.ops.resampler import cuda_fits

    q, k, v, norms, _, _ = _cuda_case(cuda_device, torch.bfloat16, 2, 77, 2048, False, 0.0)
    assert not cuda_fits(q, k, 12)  # the image decoder's long contexts: the reference serves them
    out = qformer_attention(q, k, v, 12, **norms)
    assert out.shape == q.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="check qformer_attention_fits first"):
        lib().qformer_attention_forward(dl(q), dl(k), dl(v), None, None, None, None, None, None, 12, 1e-12, 0.125,
                                        0.0, Outputs(q.device))
    qs, ks, vs, _, _, _ = _cuda_case(cuda_device, torch.bfloat16, 2, 5, 9, False, 0.0)
    with pytest.raises(ValueError, match="seed: dropout needs an int64 seed"):
        lib().qformer_attention_forward(dl(qs), dl(ks), dl(vs), None, None, None, None, None, None, 12, 1e-12,
                                        0.125, 0.1, Outputs(q.device))
    with pytest.raises(ValueError, match="q: expected float16 or bfloat16"):
        lib().qformer_attention_forward(dl(qs.float()), dl(ks.float()), dl(vs.float()), None, None, None, None, None,
                                        None, 12, 1e-12, 0.125, 0.0, Outputs(q.device))
