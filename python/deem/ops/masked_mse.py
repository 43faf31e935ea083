"""`deem::masked_mse`: DEEM's masked diffusion-feedback loss (spec/model.md §8.5, spec/kernels.md §7.2) fused
into one op: the squared error, the latent mask, the per-image renormalisation and the mean in one forward, the
gradient in one element-wise backward,

    loss = mean_{b,c,p} (pred - target)² · m[b,p] · P / (Σ_p m[b,p] + eps),

the mean over images of per-image masked means (P = h·w pixels, the mask broadcast over the channels; without a
mask it is the plain MSE up to the factor P / (P + eps)). The compiled kernels serve the CPU and CUDA (two launches
forward, one backward, deterministic, CUDA-graph capturable); the PyTorch reference is the default elsewhere."""

from __future__ import annotations

import math

import torch

from deem._native import Outputs, dl, lib, stream_of
from deem.ops._common import location_dtype, register_kernels, require_tensors

EPS = 1e-8  # the original's renormalisation epsilon


def masked_mse_reference(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                         eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target [B, C, P]; mask [B, P] (nonzero = inside) or None -> (loss [], scale [B]) in the accumulation
    dtype (float64 for float64 pred, else float32). An empty problem gives a NaN loss (a mean over nothing)."""
    acc = location_dtype(pred.dtype)
    B, C, P = pred.shape
    d = pred.to(acc) - target.to(acc)
    m = torch.ones(B, P, dtype=acc, device=pred.device) if mask is None else (mask != 0).to(acc)
    scale = P / (m.sum(1) + eps)
    se = (d * d * m[:, None]).sum((1, 2))
    return (scale * se).sum() / (B * C * P), scale


def _backward_math(grad_loss, pred, target, mask, scale):
    acc = location_dtype(pred.dtype)
    B, C, P = pred.shape
    m = torch.ones(B, P, dtype=acc, device=pred.device) if mask is None else (mask != 0).to(acc)
    d = pred.to(acc) - target.to(acc)
    k = grad_loss.to(acc) * 2.0 / max(B * C * P, 1)
    return (k * scale[:, None, None] * m[:, None] * d).to(pred.dtype)


def _forward_kernel(pred, target, mask, eps):
    if pred.numel() == 0:
        return masked_mse_reference(pred, target, mask, eps)
    outputs = Outputs(pred.device)
    lib().masked_mse_forward(dl(pred), dl(target), dl(mask), eps, outputs, stream=stream_of(pred),
                             num_threads=torch.get_num_threads())
    loss, scale = outputs.tensors[:2]
    return loss, scale


def _forward_reference(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return masked_mse_reference(pred, target, mask, eps)


_masked_mse = torch.library.custom_op("deem::masked_mse", _forward_reference, mutates_args=())
register_kernels(_masked_mse, _forward_kernel, _forward_reference)


@_masked_mse.register_fake
def _(pred, target, mask, eps):
    acc = location_dtype(pred.dtype)
    return pred.new_empty((), dtype=acc), pred.new_empty((pred.shape[0],), dtype=acc)


def _backward_reference(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                        mask: torch.Tensor | None, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _backward_math(grad_loss, pred, target, mask, scale)


def _backward_kernel(grad_loss, pred, target, mask, scale, eps):
    if pred.numel() == 0:
        return torch.empty_like(pred)
    outputs = Outputs(pred.device)
    lib().masked_mse_backward(dl(grad_loss.contiguous()), dl(pred), dl(target), dl(mask), dl(scale), eps, outputs,
                              stream=stream_of(pred), num_threads=torch.get_num_threads())
    return outputs.tensors[0]


_masked_mse_backward = torch.library.custom_op("deem::masked_mse_backward", _backward_reference, mutates_args=())
register_kernels(_masked_mse_backward, _backward_kernel, _backward_reference)


@_masked_mse_backward.register_fake
def _(grad_loss, pred, target, mask, scale, eps):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    pred, target, mask, eps = inputs
    _, scale = output
    ctx.mark_non_differentiable(scale)
    ctx.save_for_backward(pred, target, mask, scale)
    ctx.eps = eps


def _backward(ctx, grad_loss, _grad_scale):
    pred, target, mask, scale = ctx.saved_tensors
    acc = location_dtype(pred.dtype)
    grad_pred = _masked_mse_backward(grad_loss.to(acc), pred, target, mask, scale, ctx.eps)
    grad_target = -grad_pred.to(target.dtype) if ctx.needs_input_grad[1] else None
    return (grad_pred if ctx.needs_input_grad[0] else None), grad_target, None, None


_masked_mse.register_autograd(_backward, setup_context=_setup_context)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               eps: float = EPS) -> torch.Tensor:
    """DEEM's masked MSE: the mean over images of each image's mean squared error inside its mask.

    Args:
        pred: [B, C, *spatial] prediction (float64/32/16 or bfloat16), e.g. the UNet's epsilon [B, 4, 64, 64].
        target: the same shape, in pred's dtype or its accumulation dtype (float32; float64 for float64 pred).
        mask: [B, 1, *spatial] or [B, *spatial] bool/uint8 (True = inside), shared by the channels; None: every
            pixel. A floating mask is refused (binarise it first, e.g. `latent_mask > 0`).
        eps: added to each image's mask area (the original's 1e-8).

    Returns:
        The loss, a scalar in float32 (float64 for float64 pred); NaN when the batch is empty. An image with an
        empty mask contributes 0 and gets a zero gradient.
    """
    require_tensors("masked_mse", dict(pred=pred, target=target, mask=mask), optional=("mask",))
    if pred.dim() < 2:
        raise ValueError(f"masked_mse: pred must be [B, C, *spatial], got shape {tuple(pred.shape)}")
    if not pred.dtype.is_floating_point:
        raise ValueError(f"masked_mse: pred must be floating point, got {pred.dtype}")
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"masked_mse: target has shape {tuple(target.shape)}, pred {tuple(pred.shape)}")
    acc = location_dtype(pred.dtype)
    if target.dtype not in (pred.dtype, acc):
        raise ValueError(f"masked_mse: target must be {pred.dtype} or {acc} (pred is {pred.dtype}), got {target.dtype}")
    for name, t in (("target", target), ("mask", mask)):
        if t is not None and t.device != pred.device:
            raise ValueError(f"masked_mse: {name} is on {t.device}, pred on {pred.device}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"masked_mse: eps must be a positive finite number, got {eps!r}")
    B, C, spatial = pred.shape[0], pred.shape[1], tuple(pred.shape[2:])
    P = math.prod(spatial)
    if mask is not None:
        if mask.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"masked_mse: mask must be bool or uint8 (True = inside), got {mask.dtype}; "
                             "binarise a soft mask first (mask > 0)")
        if tuple(mask.shape) not in ((B, 1, *spatial), (B, *spatial)):
            raise ValueError(f"masked_mse: mask must be [B, 1, *spatial] = {[B, 1, *spatial]} or [B, *spatial], "
                             f"got shape {tuple(mask.shape)}")
        mask = mask.reshape(B, P).contiguous()
    loss, _ = _masked_mse(pred.reshape(B, C, P).contiguous(), target.reshape(B, C, P).contiguous(), mask, float(eps))
    return loss
