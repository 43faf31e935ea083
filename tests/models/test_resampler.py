"""deem.models.resampler: the Q-Former PerceiverResampler with qk-LayerNorm (spec §4)."""

import math

import pytest
import torch

import deem.models.resampler as resampler_module
from deem.models.resampler import PerceiverResampler, QFormerConfig, QKNormQFormerAttention

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# an eager reference, written out from the spec
# ------------------------------------------------------------------------------------------------


def _lin(x, m):
    return x @ m.weight.t() + m.bias


def _ln(x, m):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias


def eager_attention(att, x, kv, additive_mask, qk_norm):
    """scores = LN(Q)·LN(K)ᵀ/√d + mask; softmax; ·V (eval: no dropout)."""
    b, lq, _ = x.shape
    h = att.num_attention_heads
    d = x.shape[-1] // h

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, d).permute(0, 2, 1, 3)

    q, k, v = heads(_lin(x, att.query)), heads(_lin(kv, att.key)), heads(_lin(kv, att.value))
    if qk_norm:
        q, k = _ln(q, att.q_norm), _ln(k, att.k_norm)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return (probs @ v).permute(0, 2, 1, 3).reshape(b, lq, h * d)


def eager_resampler(model: PerceiverResampler, enc, mask=None):
    """Post-LN BLIP-2 Q-Former: LN(queries); per layer self-attn, cross-attn every f layers, query FFN."""
    c = model.config
    qf = model.blip2qformer
    add = None
    if mask is not None:
        add = ((1.0 - mask.to(enc.dtype)) * torch.finfo(enc.dtype).min)[:, None, None, :]
    h = _ln(model.queries.expand(enc.shape[0], -1, -1), qf.layernorm)
    for i, layer in enumerate(qf.encoder.layer):
        a = layer.attention
        h = _ln(_lin(eager_attention(a.attention, h, h, None, c.qk_norm), a.output.dense) + h, a.output.LayerNorm)
        if i % c.cross_attention_frequency == 0:
            x = layer.crossattention
            att = eager_attention(x.attention, h, enc, add, c.qk_norm)
            h = _ln(_lin(att, x.output.dense) + h, x.output.LayerNorm)
        mid = _lin(h, layer.intermediate_query.dense)
        mid = 0.5 * mid * (1.0 + torch.erf(mid / math.sqrt(2.0)))  # exact GELU
        h = _ln(_lin(mid, layer.output_query.dense) + h, layer.output_query.LayerNorm)
    return h


def perturbed(config: QFormerConfig, seed: int = 0, dtype=torch.float64) -> PerceiverResampler:
    """A resampler whose LayerNorm affines and biases are not at their init values."""
    torch.manual_seed(seed)
    m = PerceiverResampler(config).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


# ------------------------------------------------------------------------------------------------
# equivalence with the eager formulation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny_visual_tokenizer", "tiny_image_decoder"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_eager_formulation(preset, masked):
    cfg = getattr(QFormerConfig, preset)()
    m = perturbed(cfg)
    torch.manual_seed(1)
    enc = torch.randn(3, 9, cfg.encoder_width, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[0, 5:] = 0
        mask[2, :2] = 0
    out = m(enc, mask)
    assert out.shape == (3, cfg.num_queries, cfg.hidden) and out.dtype == torch.float64
    torch.testing.assert_close(out, eager_resampler(m, enc, mask), rtol=1e-10, atol=1e-10)


def test_attention_module_matches_eager_with_qk_norm():
    m = perturbed(QFormerConfig.tiny_visual_tokenizer())
    att = m.blip2qformer.encoder.layer[0].crossattention.attention
    assert isinstance(att, QKNormQFormerAttention)
    torch.manual_seed(2)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    kv = torch.randn(2, 7, 24, dtype=torch.float64)
    add = torch.zeros(2, 1, 1, 7, dtype=torch.float64)
    add[1, ..., 3:] = torch.finfo(torch.float64).min
    out, weights = att(x, encoder_hidden_states=kv, encoder_attention_mask=add)
    assert weights is None
    torch.testing.assert_close(out, eager_attention(att, x, kv, add, True), rtol=1e-10, atol=1e-10)
    # without the qk-norm the result is different (the norms are really applied)
    assert not torch.allclose(out, eager_attention(att, x, kv, add, False))
    # a boolean mask (True = attend) gives the same result
    out_bool, _ = att(x, encoder_hidden_states=kv, encoder_attention_mask=add == 0)
    torch.testing.assert_close(out_bool, out, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------


def test_encoder_mask_hides_masked_positions():
    cfg = QFormerConfig.tiny_image_decoder()
    m = perturbed(cfg)
    torch.manual_seed(3)
    enc = torch.randn(2, 8, cfg.encoder_width, dtype=torch.float64)
    mask = torch.ones(2, 8)
    mask[:, 6:] = 0
    out = m(enc, mask)
    changed = enc.clone()
    changed[:, 6:] = torch.randn(2, 2, cfg.encoder_width, dtype=torch.float64) * 10
    torch.testing.assert_close(m(changed, mask), out, rtol=0, atol=1e-12)
    # ... and equals running on the unmasked prefix alone
    torch.testing.assert_close(m(enc[:, :6]), out, rtol=1e-10, atol=1e-10)
    # the positions matter without the mask
    assert not torch.allclose(m(changed), m(enc))
    # an all-ones mask is no mask
    torch.testing.assert_close(m(enc, torch.ones(2, 8)), m(enc), rtol=0, atol=1e-12)


def test_fully_masked_row_is_finite_like_the_original():
    """(1 − m)·finfo.min makes an all-masked row attend uniformly (no NaN), as in the original."""
    cfg = QFormerConfig.tiny_image_decoder()
    m = perturbed(cfg)
    enc = torch.randn(2, 4, cfg.encoder_width, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]])
    out = m(enc, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, eager_resampler(m, enc, mask), rtol=1e-10, atol=1e-10)


def test_input_validation():
    m = PerceiverResampler(QFormerConfig.tiny_visual_tokenizer())
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B, L, 24\]"):
        m(torch.randn(2, 5, 23))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B, L, 24\]"):
        m(torch.randn(5, 24))
    with pytest.raises(ValueError, match=r"encoder_attention_mask must be \[B, L\] = \[2, 5\]"):
        m(torch.randn(2, 5, 24), torch.ones(2, 4))


def test_batch_rows_are_independent():
    cfg = QFormerConfig.tiny_visual_tokenizer()
    m = perturbed(cfg)
    enc = torch.randn(3, 6, cfg.encoder_width, dtype=torch.float64)
    full = m(enc)
    for b in range(3):
        torch.testing.assert_close(m(enc[b : b + 1])[0], full[b], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# structure, names, init, counts
# ------------------------------------------------------------------------------------------------


def test_parameter_names_follow_the_original():
    names = set(dict(PerceiverResampler(QFormerConfig.tiny_visual_tokenizer()).named_parameters()))
    p = "blip2qformer.encoder.layer"
    assert "queries" in names and "blip2qformer.layernorm.weight" in names
    for i in range(3):
        for n in ("query", "key", "value", "q_norm", "k_norm"):
            assert f"{p}.{i}.attention.attention.{n}.weight" in names
        assert f"{p}.{i}.attention.output.LayerNorm.weight" in names
        assert f"{p}.{i}.intermediate_query.dense.weight" in names
        assert f"{p}.{i}.output_query.LayerNorm.bias" in names
        has_cross = any(n.startswith(f"{p}.{i}.crossattention.") for n in names)
        assert has_cross == (i % 2 == 0)
    assert f"{p}.0.crossattention.attention.k_norm.bias" in names
    assert not any(".intermediate." in n or n.startswith(f"{p}.0.output.") for n in names)  # no text FFN
    no_qk = set(dict(PerceiverResampler(QFormerConfig.tiny_image_decoder()).named_parameters()))
    assert not any("q_norm" in n or "k_norm" in n for n in no_qk)


def test_hf_blip2_initialisation():
    torch.manual_seed(0)
    cfg = QFormerConfig.tiny_visual_tokenizer(hidden=256, heads=4, encoder_width=256, intermediate=512)
    m = PerceiverResampler(cfg)
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    w = torch.cat([lin.weight.flatten() for lin in linears])
    assert w.std().item() == pytest.approx(0.02, rel=0.03)  # not PyTorch's default kaiming-uniform
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in linears)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert all(torch.all(n.weight == 1) and torch.count_nonzero(n.bias) == 0 for n in norms)
    assert all(n.eps == 1e-12 for n in norms)
    assert m.queries.shape == (1, 5, 256) and m.queries.std().item() == pytest.approx(0.02, rel=0.25)
    for layer in m.blip2qformer.encoder.layer:
        assert type(layer.attention.attention) is QKNormQFormerAttention
    # reset_parameters re-applies the same scheme
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(3.0)
    m.reset_parameters()
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in linears)
    assert torch.cat([lin.weight.flatten() for lin in linears]).std().item() == pytest.approx(0.02, rel=0.03)
    assert all(torch.all(n.weight == 1) for n in norms)


def _analytic_count(c: QFormerConfig) -> int:
    h, e, i = c.hidden, c.encoder_width, c.intermediate
    qk = 4 * (h // c.heads) if c.qk_norm else 0

    def attention(kv):
        return (h * h + h) + 2 * (kv * h + h) + qk + (h * h + h) + 2 * h

    total = 2 * h + c.num_queries * h
    for layer in range(c.num_layers):
        total += attention(h) + (h * i + i) + (i * h + h) + 2 * h
        if layer % c.cross_attention_frequency == 0:
            total += attention(e)
    return total


@pytest.mark.parametrize(("preset", "millions"), [("visual_tokenizer_7b", 101.66), ("image_decoder_7b", 21.07)])
def test_7b_parameter_counts_on_meta(preset, millions):
    cfg = getattr(QFormerConfig, preset)()
    with torch.device("meta"):
        m = PerceiverResampler(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert n == _analytic_count(cfg)
    assert round(n / 1e6, 2) == millions  # spec §13


def test_7b_presets():
    s = QFormerConfig.visual_tokenizer_7b()
    assert (s.num_layers, s.hidden, s.heads, s.cross_attention_frequency, s.encoder_width) == (12, 768, 12, 2, 1024)
    assert s.qk_norm and s.dropout == 0.1 and s.attn_dropout == 0.1 and s.num_queries == 77
    assert s.intermediate == 3072 and s.layer_norm_eps == 1e-12 and s.initializer_range == 0.02
    d = QFormerConfig.image_decoder_7b()
    assert (d.num_layers, d.hidden, d.heads, d.cross_attention_frequency, d.encoder_width) == (1, 1024, 16, 1, 4096)
    assert not d.qk_norm and d.dropout == 0.0 and d.attn_dropout == 0.0 and d.intermediate == 3072
    hf = s.to_hf()
    assert hf.hidden_dropout_prob == 0.1 and hf.attention_probs_dropout_prob == 0.1 and hf.hidden_act == "gelu"
    with pytest.raises(ValueError, match="divisible"):
        QFormerConfig(hidden=30, heads=4)


# ------------------------------------------------------------------------------------------------
# training behaviour
# ------------------------------------------------------------------------------------------------


def test_dropout_in_training_only():
    enc = torch.randn(2, 6, 24)
    m = PerceiverResampler(QFormerConfig.tiny_visual_tokenizer(dropout=0.0, attention_dropout=0.5))
    ref = m.eval()(enc)
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(enc), ref)  # attention-probability dropout reaches SDPA
    m_none = PerceiverResampler(QFormerConfig.tiny_image_decoder()).train()
    assert torch.equal(m_none(torch.ones(2, 3, 48)), m_none.eval()(torch.ones(2, 3, 48)))


def test_gradients_reach_every_parameter():
    m = perturbed(QFormerConfig.tiny_visual_tokenizer(dropout=0.0), dtype=torch.float32).train()
    enc = torch.randn(2, 6, 24, requires_grad=True)
    m(enc, torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert enc.grad[0, 4:].abs().sum() == 0 and enc.grad[0, :4].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    m = perturbed(QFormerConfig.tiny_visual_tokenizer(dropout=0.0), dtype=torch.float32).train()
    enc = torch.randn(2, 6, 24)
    m(enc).sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_gradient_checkpointing(True)
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*a, **k)

    monkeypatch.setattr(resampler_module, "checkpoint", counting)
    m(enc).sum().backward()
    assert len(calls) == 3  # one per layer
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)
    m.set_gradient_checkpointing(False)
    assert not m.gradient_checkpointing


def test_low_precision_and_autocast_with_mask():
    torch.manual_seed(0)
    m = PerceiverResampler(QFormerConfig.tiny_image_decoder()).eval()
    enc = torch.randn(2, 5, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ref = m(enc, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(enc, mask)  # q/k/v in bf16, the additive mask built in bf16 too
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out16 = m.to(torch.bfloat16)(enc.bfloat16(), mask)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    torch.testing.assert_close(out16.float(), ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------------------
# attention implementations and the fused-projection path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny_visual_tokenizer", "tiny_image_decoder"])
def test_fused_projections_equal_hf_layers_and_eager_with_gradients(preset):
    """The default path (one GEMM for all cross-attention K/V, one per self-attention QKV) computes the same
    outputs and gradients as HF's layer code with SDPA and with the eager baseline attention."""
    cfg = getattr(QFormerConfig, preset)(dropout=0.0)
    m = perturbed(cfg).train()
    torch.manual_seed(3)
    enc = torch.randn(3, 7, cfg.encoder_width, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    grad = torch.randn(3, cfg.num_queries, cfg.hidden, dtype=torch.float64)
    results = {}
    for impl in ("sdpa", "eager"):
        resampler_module.set_attention_implementation(m, impl)
        assert m.uses_fused_projections() == (impl == "sdpa")  # the eager baseline keeps HF's layer code
        for fused in ((True, False) if impl == "sdpa" else (False,)):
            x = enc.clone().requires_grad_()
            m.fused_projections = fused  # False: the HF layer loop over the same modules
            out = m(x, mask)
            out.backward(grad)
            results[(impl, fused)] = (out.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()})
            m.zero_grad()
        m.fused_projections = True
    ref_out, ref_x, ref_p = results[("eager", False)]
    torch.testing.assert_close(ref_out, eager_resampler(m.eval(), enc, mask), rtol=1e-10, atol=1e-10)
    for key, (out, gx, gp) in results.items():
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=str(key))
        torch.testing.assert_close(gx, ref_x, rtol=1e-9, atol=1e-10, msg=str(key))
        for n, g in gp.items():
            torch.testing.assert_close(g, ref_p[n], rtol=1e-9, atol=1e-10, msg=f"{key} {n}")


def test_unknown_attention_implementation():
    m = PerceiverResampler(QFormerConfig.tiny_visual_tokenizer())
    with pytest.raises(ValueError, match="unknown Q-Former attention implementation 'flash'"):
        resampler_module.set_attention_implementation(m, "flash")
    assert resampler_module.set_attention_implementation(m, "eager") == 3 + 2  # 3 self + 2 cross
    assert isinstance(m.blip2qformer.encoder.layer[0].attention.attention, resampler_module.EagerQFormerAttention)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_path_matches_eager_at_the_sniffer_shape(cuda_device, dtype):
    cfg = QFormerConfig.visual_tokenizer_7b(num_layers=4, dropout=0.0)
    torch.manual_seed(0)
    m = PerceiverResampler(cfg).to(cuda_device, dtype).train()
    enc = torch.randn(8, 257, 1024, device=cuda_device, dtype=dtype)
    grad = torch.randn(8, 77, 768, device=cuda_device, dtype=dtype)
    outs = {}
    for impl in ("sdpa", "eager"):
        resampler_module.set_attention_implementation(m, impl)
        x = enc.clone().requires_grad_()
        out = m(x)
        out.backward(grad)
        outs[impl] = (out.float(), x.grad.float())
    for a, b in zip(outs["sdpa"], outs["eager"]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("preset", ["tiny_visual_tokenizer", "tiny_image_decoder"])
def test_fused_op_path_equals_the_eager_module(preset, monkeypatch):
    """With the fused op (its reference on the CPU) the module computes the eager formulation, gradients included."""
    monkeypatch.setattr(QKNormQFormerAttention, "op_on_cpu", True)
    monkeypatch.setattr(QKNormQFormerAttention, "fused_op", True)
    calls = []
    original = resampler_module.qformer_attention

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(resampler_module, "qformer_attention", counting)
    cfg = getattr(QFormerConfig, preset)(dropout=0.0)
    m = perturbed(cfg).train()
    torch.manual_seed(4)
    enc = torch.randn(3, 7, cfg.encoder_width, dtype=torch.float64, requires_grad=True)
    empty = torch.tensor([[1] * 7, [0] * 7, [1, 1, 0, 0, 1, 1, 1]])  # row 1: nothing visible (uniform attention)
    torch.testing.assert_close(m(enc, empty), eager_resampler(m, enc, empty), rtol=1e-10, atol=1e-10)
    calls.clear()
    mask = torch.tensor([[1] * 7, [1, 0, 1, 0, 1, 1, 1], [1, 1, 0, 0, 1, 1, 1]])
    out = m(enc, mask)
    assert len(calls) == cfg.num_layers + len(range(0, cfg.num_layers, cfg.cross_attention_frequency))
    torch.testing.assert_close(out, eager_resampler(m, enc, mask), rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    leaves = [enc, *m.parameters()]
    ours = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    monkeypatch.setattr(QKNormQFormerAttention, "op_on_cpu", False)
    resampler_module.set_attention_implementation(m, "eager")
    ref = torch.autograd.grad(m(enc, mask), leaves, grad, allow_unused=True)
    for name, a, b in zip(["enc", *dict(m.named_parameters())], ours, ref):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
