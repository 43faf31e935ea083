"""deem.ops.masked_mse: the fused masked-MSE loss (compiled CPU kernel; CUDA with -m cuda) against a float64
reference written from spec/model.md §8.5, its gradient (gradcheck), the model's `feedback_loss`, edge cases and bad
input."""

from __future__ import annotations

import pytest
import torch

from deem.models.diffusion import feedback_loss, latent_region_mask
from deem.ops import masked_mse, reference_kernels

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def spec_loss(pred, target, mask):
    """mean over (b, c, y, x) of (pred - target)² · m_b · h·w / (Σ m_b + 1e-8), in float64."""
    d = pred.double() - target.double()
    B, _, h, w = pred.shape
    m = torch.ones(B, 1, h, w, dtype=torch.float64) if mask is None else mask.double().reshape(B, 1, h, w)
    scale = (h * w) / (m.sum((1, 2, 3)) + 1e-8)
    return (d * d * m * scale.view(B, 1, 1, 1)).mean()


def problem(B=3, C=4, h=5, w=6, dtype=torch.float64, target_dtype=None, device="cpu", seed=0, p_inside=0.6):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    target = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    mask = torch.rand(B, 1, h, w, generator=g) < p_inside
    return (pred.to(device, dtype), target.to(device, target_dtype or dtype), mask.to(device))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [True, False])
def test_forward_and_gradient_match_the_float64_reference(dtype, with_mask):
    pred, target, mask = problem(dtype=dtype)
    mask = mask if with_mask else None
    p = pred.clone().requires_grad_()
    loss = masked_mse(p, target, mask)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    p64 = pred.double().requires_grad_()
    ref = spec_loss(p64, target, mask)
    torch.testing.assert_close(loss.double(), ref, rtol=TOL[dtype], atol=0)
    loss.backward()
    ref.backward()
    assert p.grad.dtype == dtype
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=TOL[dtype], atol=TOL[dtype] * p64.grad.abs().max())


def test_gradcheck_pred_and_target():
    pred, target, mask = problem(B=2, C=2, h=3, w=4)
    inputs = (pred.requires_grad_(), target.requires_grad_())
    assert torch.autograd.gradcheck(lambda p, t: masked_mse(p, t, mask), inputs)
    assert torch.autograd.gradcheck(lambda p, t: masked_mse(p, t, None), inputs)


def test_float32_target_with_16bit_pred():
    pred, target, mask = problem(dtype=torch.bfloat16, target_dtype=torch.float32)
    torch.testing.assert_close(masked_mse(pred, target, mask).double(), spec_loss(pred, target, mask),
                               rtol=1e-5, atol=0)


def test_kernel_equals_the_reference_path():
    pred, target, mask = problem(B=4, C=3, h=7, w=9, dtype=torch.float32)
    p = pred.clone().requires_grad_()
    loss = masked_mse(p, target, mask)
    loss.backward()
    with reference_kernels():
        q = pred.clone().requires_grad_()
        ref = masked_mse(q, target, mask)
        ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def test_equals_the_models_feedback_loss():
    """The op is a drop-in for diffusion.feedback_loss((pred - target)², region_mask) with a binarised latent mask."""
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    region = (torch.rand(3, 1, 32, 32, generator=g) > 0.5).float()
    region[0] = 0  # an image without region
    expected = feedback_loss((pred - target) ** 2, region)
    latent = latent_region_mask(region, (8, 8)) > 0
    torch.testing.assert_close(masked_mse(pred, target, latent), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(masked_mse(pred, target), feedback_loss((pred - target) ** 2), rtol=1e-6, atol=0)


def test_empty_masks_contribute_zero_and_get_zero_gradient():
    pred, target, mask = problem(B=3)
    mask[1] = False
    p = pred.clone().requires_grad_()
    loss = masked_mse(p, target, mask)
    loss.backward()
    torch.testing.assert_close(loss, spec_loss(pred, target, mask), rtol=1e-12, atol=0)
    assert torch.isfinite(loss) and torch.count_nonzero(p.grad[1]) == 0 and torch.count_nonzero(p.grad[0]) > 0
    outside = ~mask.expand_as(pred)
    assert torch.count_nonzero(p.grad[outside]) == 0
    all_empty = masked_mse(pred, target, torch.zeros_like(mask))
    assert all_empty.item() == 0.0


def test_empty_batch_is_a_mean_over_nothing():
    pred = torch.empty(0, 4, 5, 5, requires_grad=True)
    target = torch.empty(0, 4, 5, 5)
    loss = masked_mse(pred, target, torch.empty(0, 1, 5, 5, dtype=torch.bool))
    assert torch.isnan(loss)  # as torch.mean of an empty tensor (and the model's feedback_loss)
    loss.backward()
    assert pred.grad.shape == pred.shape


def test_result_is_deterministic_and_thread_independent():
    pred, target, mask = problem(B=9, C=4, h=16, w=16, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = masked_mse(pred, target, mask)
        torch.set_num_threads(2)
        b = masked_mse(pred, target, mask)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


def test_mask_layouts_and_uint8():
    pred, target, mask = problem()
    a = masked_mse(pred, target, mask)
    torch.testing.assert_close(masked_mse(pred, target, mask[:, 0]), a, rtol=0, atol=0)
    torch.testing.assert_close(masked_mse(pred, target, mask.to(torch.uint8) * 7), a, rtol=0, atol=0)


def test_compile_and_fake_tensors():
    pred, target, mask = problem(dtype=torch.float32)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fp, ft, fm = (mode.from_tensor(t) for t in (pred, target, mask))
        out = masked_mse(fp, ft, fm)
        assert out.shape == () and out.dtype == torch.float32
    torch.library.opcheck(torch.ops.deem.masked_mse.default,
                          (pred.reshape(3, 4, 30), target.reshape(3, 4, 30), mask.reshape(3, 30), 1e-8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target=torch.randn(3, 4, 5, 5)), r"target has shape \(3, 4, 5, 5\), pred \(3, 4, 5, 6\)"),
        (dict(mask=torch.ones(3, 1, 5, 6)), "mask must be bool or uint8"),
        (dict(mask=torch.ones(3, 2, 5, 6, dtype=torch.bool)), r"mask must be \[B, 1, \*spatial\]"),
        (dict(target=torch.randn(3, 4, 5, 6, dtype=torch.float16)), "target must be torch.float64 or"),
        (dict(pred=torch.randn(3)), r"pred must be \[B, C, \*spatial\]"),
        (dict(pred=torch.ones(3, 4, 5, 6, dtype=torch.long)), "pred must be floating point"),
        (dict(eps=0.0), "eps must be a positive finite number"),
        (dict(mask=torch.ones(3, 1, 5, 6, dtype=torch.bool, device="meta")), "mask is on meta"),
    ],
)
def test_bad_input_raises_a_clear_value_error(kwargs, match):
    pred, target, mask = problem()
    args = {**dict(pred=pred, target=target, mask=mask), **kwargs}
    with pytest.raises(ValueError, match=match):
        masked_mse(**args)


def test_non_tensor_is_a_type_error():
    with pytest.raises(TypeError, match=r"pred must be a torch\.Tensor"):
        masked_mse([1.0], torch.ones(1, 1, 1))


def test_binding_validates_on_its_own():
    """The compiled entry point refuses bad calls with ValueError too (never a crash), even without the wrapper."""
    from deem._native import Outputs, dl, lib

    pred = torch.randn(2, 3, 4)
    out = Outputs(pred.device)
    with pytest.raises(ValueError, match=r"mask: expected shape \[2, 4\]"):
        lib().masked_mse_forward(dl(pred), dl(pred), dl(torch.ones(2, 5, dtype=torch.bool)), 1e-8, out)
    with pytest.raises(ValueError, match=r"pred: expected"):
        lib().masked_mse_forward(dl(pred[0]), dl(pred[0]), None, 1e-8, out)
    with pytest.raises(ValueError, match="target: expected dtype float32"):
        lib().masked_mse_forward(dl(pred), dl(pred.double()), None, 1e-8, out)
    with pytest.raises(ValueError, match="mask: expected a bool or uint8"):
        lib().masked_mse_forward(dl(pred), dl(pred), dl(torch.ones(2, 4)), 1e-8, out)
    with pytest.raises(ValueError, match="scale: expected shape"):
        lib().masked_mse_backward(dl(torch.ones(())), dl(pred), dl(pred), None, dl(torch.ones(3)), 1e-8, out)


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B", [1, 5, 64])
def test_cuda_matches_the_float64_reference(cuda_device, dtype, B):
    pred, target, mask = problem(B=B, C=4, h=64, w=64, dtype=dtype, target_dtype=torch.float32
                                 if dtype != torch.float64 else None, device=cuda_device, seed=B)
    mask[0] = False  # one empty mask
    p = pred.clone().requires_grad_()
    loss = masked_mse(p, target, mask)
    loss.backward()
    p64 = pred.double().cpu().requires_grad_()
    ref = spec_loss(p64, target.cpu(), mask.cpu())
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=max(TOL[dtype], 1e-5), atol=0)
    torch.testing.assert_close(p.grad.double().cpu(), p64.grad, rtol=TOL[dtype], atol=TOL[dtype] * p64.grad.abs().max())
    assert torch.equal(masked_mse(pred, target, mask), masked_mse(pred, target, mask))  # deterministic
    torch.testing.assert_close(masked_mse(pred, target, None).double().cpu(), spec_loss(pred.cpu(), target.cpu(), None),
                               rtol=max(TOL[dtype], 1e-5), atol=0)


@pytest.mark.cuda
def test_cuda_graph_capture(cuda_device):
    pred, target, mask = problem(B=16, C=4, h=64, w=64, dtype=torch.bfloat16, target_dtype=torch.float32,
                                 device=cuda_device)
    p = pred.clone().requires_grad_()
    static_grad = torch.zeros_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up outside the graph
            masked_mse(p, target, mask).backward()
            p.grad = None
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = masked_mse(p, target, mask)
        (g,) = torch.autograd.grad(loss, p)
        static_grad.copy_(g)
    with torch.no_grad():
        p.copy_(pred * 2)
    graph.replay()
    torch.cuda.synchronize()
    p64 = (pred * 2).double().cpu().requires_grad_()
    ref = spec_loss(p64, target.cpu(), mask.cpu())
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(static_grad.double().cpu(), p64.grad, rtol=1e-2, atol=1e-2 * p64.grad.abs().max())


@pytest.mark.cuda
def test_cuda_bad_input(cuda_device):
    pred = torch.randn(2, 4, 8, 8, device=cuda_device)
    with pytest.raises(ValueError, match="mask is on cpu"):
        masked_mse(pred, pred, torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="target is on cpu"):
        masked_mse(pred, pred.cpu())
