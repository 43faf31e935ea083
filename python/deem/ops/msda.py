"""`deem::ms_deform_attn`: multi-scale deformable attention as a torch.library custom op with a
fake (meta) implementation and autograd, served by deem._C on the CPU and CUDA."""

from __future__ import annotations

import torch

from deem import _C
from deem._native import aligned, dl, host_index, stream_of, uses_kernels
from deem.ops._strategy import get_grad_value_strategy
from deem.ops.reference import ms_deform_attn_reference


def location_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """Sampling locations are float32 (float64 for float64 values) whatever the value dtype."""
    return torch.float64 if value_dtype == torch.float64 else torch.float32


@torch.library.custom_op("deem::ms_deform_attn", mutates_args=())
def _ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    shapes, starts = host_index(spatial_shapes), host_index(level_start_index)
    _C.msda_validate(dl(value), dl(shapes), dl(starts), dl(sampling_locations), dl(attention_weights))
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    if not uses_kernels(value):
        return ms_deform_attn_reference(value, shapes, starts, sampling_locations, attention_weights)
    value = aligned(value)
    out = value.new_empty((N, Lq, M, D))
    _C.msda_forward(
        dl(value), dl(shapes), dl(starts), dl(sampling_locations), dl(attention_weights), dl(out),
        stream=stream_of(value), num_threads=torch.get_num_threads(),
    )
    return out.view(N, Lq, M * D)


@_ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


@torch.library.custom_op("deem::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes, starts = host_index(spatial_shapes), host_index(level_start_index)
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    grad_output = aligned(grad_output.reshape(N, Lq, M, D).to(value.dtype).contiguous())
    value = aligned(value)
    if not uses_kernels(value):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_weights)]
            out = ms_deform_attn_reference(inputs[0], shapes, starts, inputs[1], inputs[2])
            grads = torch.autograd.grad(out, inputs, grad_output.view(N, Lq, M * D))
        return grads[0], grads[1], grads[2]
    grad_value = torch.empty_like(value)
    grad_loc = torch.empty_like(sampling_locations)
    grad_w = torch.empty_like(attention_weights)
    args = (dl(value), dl(shapes), dl(starts), dl(sampling_locations), dl(attention_weights))
    strategy = get_grad_value_strategy()
    accum = None
    if value.device.type == "cuda":
        strategy = _C.msda_grad_value_strategy(*args, requested=strategy)
        if strategy == 1 and value.dtype in (torch.float16, torch.bfloat16):
            accum = torch.empty(value.shape, dtype=torch.float32, device=value.device)
    _C.msda_backward(
        *args, dl(grad_output), dl(grad_value), dl(accum), dl(grad_loc), dl(grad_w),
        strategy=strategy, stream=stream_of(value), num_threads=torch.get_num_threads(),
    )
    return grad_value, grad_loc, grad_w


@_ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, shapes, starts, loc, weights = ctx.saved_tensors
    gv, gl, gw = _ms_deform_attn_backward(grad_output, value, shapes, starts, loc, weights)
    return gv, None, None, gl, gw


_ms_deform_attn.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (spec/kernels.md §1).

    Args:
        value: [N, S, M, D] in float32, float16, bfloat16 or float64, contiguous.
        spatial_shapes: [L, 2] integer (H, W) per level; keep it on the CPU (a CUDA tensor costs a sync).
        level_start_index: [L] integer first row of each level in `value`.
        sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y); computed in float32
            (float64 for float64 values), other dtypes are cast.
        attention_weights: [N, Lq, M, L, P] in the value dtype or float32.

    Returns:
        [N, Lq, M*D] in the value dtype.
    """
    loc_dtype = location_dtype(value.dtype)
    if sampling_locations.dtype != loc_dtype:
        sampling_locations = sampling_locations.to(loc_dtype)
    if value.dtype == torch.float64 and attention_weights.dtype != torch.float64:
        attention_weights = attention_weights.to(torch.float64)
    return _ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
