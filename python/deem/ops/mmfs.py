"""`deem::mmfs_core`: the fused DEEM MMFS core (per-image locations broadcast over levels, in-kernel
softmax with a null slot, per-query image visibility, optional ignore token) as a custom op."""

from __future__ import annotations

import torch

from deem import _C
from deem._native import aligned, dl, host_index, stream_of, uses_kernels
from deem.ops._strategy import get_grad_value_strategy
from deem.ops.msda import location_dtype
from deem.ops.reference import mmfs_core_reference


@torch.library.custom_op("deem::mmfs_core", mutates_args=())
def _mmfs_core(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_logits: torch.Tensor,
    image_visible: torch.Tensor,
    ignore_token: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes, starts = host_index(spatial_shapes), host_index(level_start_index)
    value, ignore_token = aligned(value), aligned(ignore_token)
    args = (dl(value), dl(shapes), dl(starts), dl(sampling_locations), dl(attention_logits), dl(image_visible),
            dl(ignore_token))
    _C.mmfs_validate(*args)
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    if not uses_kernels(value):
        out, lse = mmfs_core_reference(value, shapes, starts, sampling_locations, attention_logits, image_visible,
                                       ignore_token)
        return out, lse.to(sampling_locations.dtype)
    out = value.new_empty((N, Lq, M, D))
    lse = torch.empty((N, Lq, M), dtype=sampling_locations.dtype, device=value.device)
    _C.mmfs_forward(*args, dl(out), dl(lse), stream=stream_of(value), num_threads=torch.get_num_threads())
    return out.view(N, Lq, M * D), lse


@_mmfs_core.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_logits, image_visible, ignore_token):
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    lse = sampling_locations.new_empty((N, Lq, M))
    return value.new_empty((N, Lq, M * D)), lse


@torch.library.custom_op("deem::mmfs_core_backward", mutates_args=())
def _mmfs_core_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_logits: torch.Tensor,
    image_visible: torch.Tensor,
    ignore_token: torch.Tensor | None,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes, starts = host_index(spatial_shapes), host_index(level_start_index)
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    grad_output = aligned(grad_output.reshape(N, Lq, M, D).to(value.dtype).contiguous())
    value, ignore_token = aligned(value), aligned(ignore_token)
    if not uses_kernels(value):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_logits)]
            out, _ = mmfs_core_reference(inputs[0], shapes, starts, inputs[1], inputs[2], image_visible, ignore_token)
            grads = torch.autograd.grad(out, inputs, grad_output.view(N, Lq, M * D))
        return grads[0], grads[1], grads[2]
    grad_value = torch.empty_like(value)
    grad_loc = torch.empty_like(sampling_locations)
    grad_logits = torch.empty_like(attention_logits)
    args = (dl(value), dl(shapes), dl(starts), dl(sampling_locations), dl(attention_logits), dl(image_visible),
            dl(ignore_token))
    strategy = get_grad_value_strategy()
    accum = None
    if value.device.type == "cuda":
        strategy = _C.mmfs_grad_value_strategy(*args, requested=strategy)
        if strategy == 1 and value.dtype in (torch.float16, torch.bfloat16):
            accum = torch.empty(value.shape, dtype=torch.float32, device=value.device)
    _C.mmfs_backward(
        *args, dl(lse), dl(grad_output), dl(grad_value), dl(accum), dl(grad_loc), dl(grad_logits),
        strategy=strategy, stream=stream_of(value), num_threads=torch.get_num_threads(),
    )
    return grad_value, grad_loc, grad_logits


@_mmfs_core_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_logits, image_visible,
      ignore_token, lse):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_logits)


def _setup_context(ctx, inputs, output):
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*inputs, lse)


def _backward(ctx, grad_output, _grad_lse):
    value, shapes, starts, loc, logits, visible, ignore, lse = ctx.saved_tensors
    gv, gl, gz = _mmfs_core_backward(grad_output, value, shapes, starts, loc, logits, visible, ignore, lse)
    grad_ignore = None
    if ignore is not None and ctx.needs_input_grad[6]:
        N, Lq, M = lse.shape
        sink = torch.exp(-lse)  # float32 (float64 for float64 values)
        g = grad_output.reshape(N, Lq, M, -1).to(lse.dtype)
        grad_ignore = torch.einsum("nqm,nqmd->md", sink, g).to(ignore.dtype)
    return gv, None, None, gl, gz, None, grad_ignore


_mmfs_core.register_autograd(_backward, setup_context=_setup_context)


def mmfs_core(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_logits: torch.Tensor,
    image_visible: torch.Tensor,
    ignore_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused MMFS core of DEEM.

    Args:
        value: [N, I*S_img, M, D]: I images, each with the levels of `spatial_shapes`.
        spatial_shapes: [L, 2] (H, W) of the levels of one image (CPU tensor preferred).
        level_start_index: [L] first row of each level within one image.
        sampling_locations: [N, Lq, I, M, P, 2] normalised (x, y), shared by the levels of an image.
        attention_logits: [N, Lq, I, M, L, P] raw logits; the softmax runs over the visible images'
            entries plus a null slot of logit 0.
        image_visible: [N, Lq, I] bool: which images each query may attend to.
        ignore_token: optional [M, D] vector added with the null slot's weight.

    Returns:
        [N, Lq, M*D] in the value dtype.
    """
    op_dtype = location_dtype(value.dtype)
    if sampling_locations.dtype != op_dtype:
        sampling_locations = sampling_locations.to(op_dtype)
    if attention_logits.dtype != op_dtype:
        attention_logits = attention_logits.to(op_dtype)
    if image_visible.dtype != torch.bool:
        image_visible = image_visible.bool()
    if ignore_token is not None:
        if value.dim() != 4 or ignore_token.numel() != value.shape[2] * value.shape[3]:
            raise ValueError(f"ignore_token: expected M*D = {value.shape[2:] if value.dim() == 4 else '?'} "
                             f"elements (one vector per head), got shape {tuple(ignore_token.shape)}")
        ignore_token = ignore_token.reshape(value.shape[2], value.shape[3]).to(value.dtype)
    out, _ = _mmfs_core(value, spatial_shapes, level_start_index, sampling_locations, attention_logits,
                        image_visible, ignore_token)
    return out
