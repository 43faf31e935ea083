"""`deem::qformer_attention`: the Q-Former resampler's attention (spec/model.md §4) as one custom op: the
LayerNorm of q and k over the head dim (qk-norm, optional), the scores, the softmax over the visible keys, dropout
and P·V. Inputs are the projection outputs [B, L, H·d] as they are (strided views of a wider projection too), the
output is [B, Lq, H·d]: no head split, transpose or copy around it.

CUDA (16-bit, head dim 64, sizes of `cuda_fits`): one fused launch forward and one backward on tensor cores
(cpp/src/cuda/resampler_cuda.cu). Everywhere else: the PyTorch reference below, which is also the test oracle.

Dropout draws keep decisions from a counter hash of (seed, b, h, i, j) (`dropout_keep`), identical in the kernel
and the reference, so that a step is reproducible given the seed and the backward needs no stored mask.
A batch row whose keys are all masked attends uniformly to all its keys, as the original's additive
`(1 − m)·finfo.min` mask makes it."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from deem._native import Outputs, cuda_kernels_built, dl, lib, stream_of
from deem.ops._common import location_dtype, register_cuda_kernel, require_tensors

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """deem::qformer_mix32 (cpp/include/deem/resampler.h) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _keep_probability(p: float) -> tuple[int, float]:
    """(uint32 threshold, 1/(1 − p)) as the kernel computes them from p rounded to float32."""
    p32 = torch.tensor(p, dtype=torch.float32)
    threshold = min(int(p32.double().item() * 4294967296.0), _M32)
    return threshold, float(1.0 / (1.0 - p32))


def dropout_keep(seed: torch.Tensor, shape: tuple[int, int, int, int], p: float) -> torch.Tensor:
    """The keep decisions [B, H, Lq, Lk] (bool) of the op's dropout for an int64 `seed` [1]."""
    B, H, Lq, Lk = shape
    s = seed.reshape(1).to(torch.int64)
    key = _mix32((s & _M32) ^ _mix32((s >> 32) & _M32))
    flat = torch.arange(B * H * Lq * Lk, dtype=torch.int64, device=seed.device) & _M32
    threshold, _ = _keep_probability(p)
    return (_mix32((flat + key) & _M32) >= threshold).view(B, H, Lq, Lk)


def qformer_attention_reference(q, k, v, q_weight, q_bias, k_weight, k_bias, key_mask, seed, heads: int, eps: float,
                                scale: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The op in PyTorch: (out [B, Lq, H·d] in q's dtype, lse [B, H, Lq] in the accumulation dtype)."""
    B, Lq, width = q.shape
    Lk = k.shape[1]
    d = width // heads
    acc = location_dtype(q.dtype)
    qh, kh = q.view(B, Lq, heads, d), k.view(B, Lk, heads, d)
    if q_weight is not None:
        qh = F.layer_norm(qh, (d,), q_weight.to(q.dtype), q_bias.to(q.dtype), eps)
    if k_weight is not None:
        kh = F.layer_norm(kh, (d,), k_weight.to(k.dtype), k_bias.to(k.dtype), eps)
    s = torch.einsum("bihd,bjhd->bhij", qh.to(acc), kh.to(acc)) * scale
    visible = torch.ones(B, Lk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask != 0
    any_visible = visible.any(-1)  # rows without a visible key: equal scores over all keys
    s = torch.where(any_visible[:, None, None, None], s, torch.zeros_like(s))
    visible = visible | ~any_visible[:, None]
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    if dropout_p > 0:
        _, inv_keep = _keep_probability(dropout_p)
        p = p * dropout_keep(seed, (B, heads, Lq, Lk), dropout_p).to(acc) * inv_keep
    out = torch.einsum("bhij,bjhd->bihd", p, v.view(B, Lk, heads, d).to(acc))
    return out.reshape(B, Lq, width).to(q.dtype), lse


def _forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                       q_bias: torch.Tensor | None, k_weight: torch.Tensor | None, k_bias: torch.Tensor | None,
                       key_mask: torch.Tensor | None, seed: torch.Tensor | None, heads: int, eps: float, scale: float,
                       dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return qformer_attention_reference(q, k, v, q_weight, q_bias, k_weight, k_bias, key_mask, seed, heads, eps, scale,
                                       dropout_p)


@functools.cache
def _fits(queries: int, keys: int, head_dim: int, device: int) -> bool:
    return bool(lib().qformer_attention_fits(queries, keys, head_dim, device))


def cuda_fits(q: torch.Tensor, k: torch.Tensor, heads: int) -> bool:
    """Whether the compiled CUDA kernels serve this call (16-bit, head dim 64, sizes that fit one CTA)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or not cuda_kernels_built():
        return False
    return _fits(q.shape[1], k.shape[1], q.shape[2] // heads, q.device.index or 0)


def _forward_cuda(q, k, v, q_weight, q_bias, k_weight, k_bias, key_mask, seed, heads, eps, scale, dropout_p):
    if not cuda_fits(q, k, heads) or q.shape[0] == 0:
        return _forward_reference(q, k, v, q_weight, q_bias, k_weight, k_bias, key_mask, seed, heads, eps, scale,
                                  dropout_p)
    outputs = Outputs(q.device)
    lib().qformer_attention_forward(dl(q), dl(k), dl(v), dl(q_weight), dl(q_bias), dl(k_weight), dl(k_bias),
                                    dl(key_mask), dl(seed), heads, eps, scale, dropout_p, outputs,
                                    stream=stream_of(q))
    out, lse = outputs.tensors
    return out, lse


_qformer_attention = torch.library.custom_op("deem::qformer_attention", _forward_reference, mutates_args=())
register_cuda_kernel(_qformer_attention, _forward_cuda)


@_qformer_attention.register_fake
def _(q, k, v, q_weight, q_bias, k_weight, k_bias, key_mask, seed, heads, eps, scale, dropout_p):
    B, Lq, width = q.shape
    return q.new_empty((B, Lq, width)), q.new_empty((B, heads, Lq), dtype=location_dtype(q.dtype))


def _layer_norm_parts(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, x̂, rstd) of the head-dim LayerNorm in the accumulation dtype; y is rounded through x's dtype as the
    forward rounds it (x̂ and rstd are None without a norm)."""
    xa = x.to(dtype)
    if weight is None:
        return xa, None, None
    y = F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps).to(dtype)
    mean = xa.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((xa - mean) ** 2).mean(-1, keepdim=True) + eps)
    return y, (xa - mean) * rstd, rstd


def _layer_norm_backward(g: torch.Tensor, xhat: torch.Tensor | None, rstd: torch.Tensor | None,
                         weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, d weight, d bias) from the output gradient g [B, L, H, d] (the affine is shared by B, L and H)."""
    if weight is None:
        return g, None, None
    dxh = g * weight.to(g.dtype)
    dx = rstd * (dxh - dxh.mean(-1, keepdim=True) - xhat * (dxh * xhat).mean(-1, keepdim=True))
    return dx, (g * xhat).sum((0, 1, 2)), g.sum((0, 1, 2))


def _backward_reference(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        q_weight: torch.Tensor | None, q_bias: torch.Tensor | None, k_weight: torch.Tensor | None,
                        k_bias: torch.Tensor | None, key_mask: torch.Tensor | None, seed: torch.Tensor | None,
                        out: torch.Tensor, lse: torch.Tensor, heads: int, eps: float, scale: float,
                        dropout_p: float) -> list[torch.Tensor]:
    """Gradients of (q, k, v, q_weight, q_bias, k_weight, k_bias) in closed form (absent parameters: empty
    tensors): dV = P'ᵀ dO, dS = P ⊙ (dP − rowsum(P ⊙ dP)), then the LayerNorm backwards. Rows whose keys are all
    masked attend uniformly whatever the scores, so their scores get no gradient."""
    del out, lse
    B, Lq, width = q.shape
    Lk = k.shape[1]
    d = width // heads
    acc = location_dtype(q.dtype)
    qn, qxh, qrstd = _layer_norm_parts(q.view(B, Lq, heads, d), q_weight, q_bias, eps, acc)
    kn, kxh, krstd = _layer_norm_parts(k.view(B, Lk, heads, d), k_weight, k_bias, eps, acc)
    va = v.view(B, Lk, heads, d).to(acc)
    g = grad_out.reshape(B, Lq, heads, d).to(acc)
    visible = torch.ones(B, Lk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask != 0
    any_visible = visible.any(-1)
    s = torch.einsum("bihd,bjhd->bhij", qn, kn) * scale
    s = torch.where(any_visible[:, None, None, None], s, torch.zeros_like(s))
    s = s.masked_fill(~(visible | ~any_visible[:, None])[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    keep = torch.ones_like(p)
    if dropout_p > 0:
        _, inv_keep = _keep_probability(dropout_p)
        keep = dropout_keep(seed, (B, heads, Lq, Lk), dropout_p).to(acc) * inv_keep
    dv = torch.einsum("bhij,bihd->bjhd", p * keep, g)
    dp = torch.einsum("bihd,bjhd->bhij", g, va) * keep
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * any_visible[:, None, None, None].to(acc)
    dqn = torch.einsum("bhij,bjhd->bihd", ds, kn) * scale
    dkn = torch.einsum("bhij,bihd->bjhd", ds, qn) * scale
    dq, dqw, dqb = _layer_norm_backward(dqn, qxh, qrstd, q_weight)
    dk, dkw, dkb = _layer_norm_backward(dkn, kxh, krstd, k_weight)
    result = [dq.reshape(B, Lq, width).to(q.dtype), dk.reshape(B, Lk, width).to(k.dtype),
              dv.reshape(B, Lk, width).to(v.dtype)]
    for grad, t in ((dqw, q_weight), (dqb, q_bias), (dkw, k_weight), (dkb, k_bias)):
        result.append(q.new_empty(0) if t is None else grad.to(t.dtype))
    return result


def _backward_cuda(grad_out, q, k, v, q_weight, q_bias, k_weight, k_bias, key_mask, seed, out, lse, heads, eps, scale,
                   dropout_p):
    if not cuda_fits(q, k, heads) or q.shape[0] == 0 or lse.dtype != torch.float32:
        return _backward_reference(grad_out, q, k, v, q_weight, q_bias, k_weight, k_bias, key_mask, seed, out, lse,
                                   heads, eps, scale, dropout_p)
    outputs = Outputs(q.device)
    lib().qformer_attention_backward(dl(grad_out.contiguous()), dl(q), dl(k), dl(v), dl(q_weight), dl(q_bias),
                                     dl(k_weight), dl(k_bias), dl(key_mask), dl(seed), dl(out), dl(lse), heads, eps,
                                     scale, dropout_p, outputs, stream=stream_of(q))
    gq, gk, gv = outputs.tensors[:3]
    result = [gq, gk, gv]
    partials = outputs.tensors[3].sum(1) if len(outputs.tensors) > 3 else None  # [4, 64] float32
    for i, t in enumerate((q_weight, q_bias, k_weight, k_bias)):
        result.append(q.new_empty(0) if t is None else partials[i].to(t.dtype))
    return result


_qformer_attention_backward = torch.library.custom_op("deem::qformer_attention_backward", _backward_reference,
                                                      mutates_args=())
register_cuda_kernel(_qformer_attention_backward, _backward_cuda)


@_qformer_attention_backward.register_fake
def _(grad_out, q, k, v, q_weight, q_bias, k_weight, k_bias, key_mask, seed, out, lse, heads, eps, scale, dropout_p):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] + [
        q.new_empty(0) if t is None else torch.empty_like(t) for t in (q_weight, q_bias, k_weight, k_bias)]


def _setup_context(ctx, inputs, output):
    q, k, v, qw, qb, kw, kb, key_mask, seed, heads, eps, scale, dropout_p = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, qw, qb, kw, kb, key_mask, seed, out, lse)
    ctx.hyper = (heads, eps, scale, dropout_p)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, qw, qb, kw, kb, key_mask, seed, out, lse = ctx.saved_tensors
    grads = _qformer_attention_backward(grad_out, q, k, v, qw, qb, kw, kb, key_mask, seed, out, lse, *ctx.hyper)
    result = list(grads[:3])
    for g, t in zip(grads[3:], (qw, qb, kw, kb)):
        result.append(None if t is None else g)
    return (*result, None, None, None, None, None, None)


_qformer_attention.register_autograd(_backward, setup_context=_setup_context)


def qformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                      q_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
                      k_norm: tuple[torch.Tensor, torch.Tensor] | None = None, key_mask: torch.Tensor | None = None,
                      eps: float = 1e-12, scale: float | None = None, dropout_p: float = 0.0,
                      seed: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of the Q-Former with optional qk-LayerNorm.

    Args:
        q: [B, Lq, H·d] query projection; k, v: [B, Lk, H·d] key/value projections (the last dim contiguous).
        heads: H.
        q_norm, k_norm: (weight [d], bias [d]) of the LayerNorm over the head dim (shared by the heads), or None.
        key_mask: [B, Lk] bool/uint8, True = attend; None: every key.
        eps: the LayerNorms' epsilon. scale: of the scores (default d^-0.5).
        dropout_p: attention-probability dropout; needs `seed` (int64 [1] on q's device; drawn from torch's
            generator when None).

    Returns:
        [B, Lq, H·d] in q's dtype.
    """
    require_tensors("qformer_attention", dict(q=q, k=k, v=v, key_mask=key_mask, seed=seed),
                    optional=("key_mask", "seed"))
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"qformer_attention: q, k, v must be [B, L, H*d], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, _, width = q.shape
    if not isinstance(heads, int) or heads < 1 or width % heads != 0:
        raise ValueError(f"qformer_attention: heads={heads!r} must be a positive divisor of the width {width}")
    if k.shape[0] != B or k.shape[2] != width or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"qformer_attention: k and v must be [B, Lk, {width}] with B = {B}, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"qformer_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    for name, t in (("k", k), ("v", v), ("key_mask", key_mask), ("seed", seed)):
        if t is not None and t.device != q.device:
            raise ValueError(f"qformer_attention: {name} is on {t.device}, q on {q.device}")
    d = width // heads
    norms = []
    for name, pair in (("q_norm", q_norm), ("k_norm", k_norm)):
        if pair is None:
            norms += [None, None]
            continue
        w, b = pair
        require_tensors("qformer_attention", {f"{name} weight": w, f"{name} bias": b})
        if tuple(w.shape) != (d,) or tuple(b.shape) != (d,) or w.device != q.device or b.device != q.device:
            raise ValueError(f"qformer_attention: {name} must be (weight [{d}], bias [{d}]) on {q.device}, got "
                             f"{tuple(w.shape)} on {w.device} and {tuple(b.shape)} on {b.device}")
        if not (w.dtype == b.dtype and w.dtype in (torch.float32, q.dtype)):
            raise ValueError(f"qformer_attention: {name} parameters must both be float32 or {q.dtype}")
        norms += [w, b]
    if key_mask is not None:
        if key_mask.dtype not in (torch.bool, torch.uint8) or tuple(key_mask.shape) != (B, k.shape[1]):
            raise ValueError(f"qformer_attention: key_mask must be bool/uint8 [B, Lk] = [{B}, {k.shape[1]}], got "
                             f"{key_mask.dtype} {tuple(key_mask.shape)}")
        key_mask = key_mask.contiguous()
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"qformer_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if not (isinstance(eps, float) and eps > 0):
        raise ValueError(f"qformer_attention: eps must be a positive float, got {eps!r}")
    if dropout_p > 0:
        if seed is None:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
        elif seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"qformer_attention: seed must be one int64, got {seed.dtype} {tuple(seed.shape)}")
        seed = seed.reshape(1)
    else:
        seed = None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"qformer_attention: {name} needs a contiguous last dimension, got strides {t.stride()}")
    scale = d**-0.5 if scale is None else float(scale)
    out, _ = _qformer_attention(q, k, v, *norms, key_mask, seed, heads, float(eps), scale, float(dropout_p))
    return out
