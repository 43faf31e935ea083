"""`deem::ms_deform_attn`: multi-scale deformable attention as a torch.library custom op with a fake (meta)
implementation and autograd. The compiled kernels of deem._C serve the CPU and CUDA (one call each way);
the PyTorch reference is the op's default for every other device."""

from __future__ import annotations

import torch

from deem._native import Outputs, aligned, dl, host_index, lib, stream_of
from deem.ops._common import cast, location_dtype, register_kernels, require_finite, require_one_device, require_tensors
from deem.ops._strategy import get_grad_value_strategy
from deem.ops.reference import ms_deform_attn_reference

__all__ = ["location_dtype", "ms_deform_attn"]


def _forward_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    return ms_deform_attn_reference(value, host_index(spatial_shapes), host_index(level_start_index),
                                    sampling_locations, attention_weights)


def _forward_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    value = aligned(value)
    outputs = Outputs(value.device)
    lib().msda_forward(dl(value), dl(host_index(spatial_shapes)), dl(host_index(level_start_index)),
                       dl(sampling_locations), dl(attention_weights), outputs, stream=stream_of(value),
                       num_threads=torch.get_num_threads())
    out = outputs.tensors[0]
    N, Lq, M, D = out.shape
    return out.view(N, Lq, M * D)


_ms_deform_attn = torch.library.custom_op("deem::ms_deform_attn", _forward_reference, mutates_args=())
register_kernels(_ms_deform_attn, _forward_kernel, _forward_reference)


@_ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    require_one_device("ms_deform_attn", dict(value=value, spatial_shapes=spatial_shapes,
                                              level_start_index=level_start_index,
                                              sampling_locations=sampling_locations,
                                              attention_weights=attention_weights))
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


def _backward_reference(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_weights)]
        out = ms_deform_attn_reference(inputs[0], host_index(spatial_shapes), host_index(level_start_index),
                                       inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_output.reshape(N, Lq, M * D).to(out.dtype), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))


def _backward_kernel(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    grad_output = aligned(grad_output.reshape(N, Lq, M, D).to(value.dtype).contiguous())
    value = aligned(value)
    outputs = Outputs(value.device)
    lib().msda_backward(dl(value), dl(host_index(spatial_shapes)), dl(host_index(level_start_index)),
                        dl(sampling_locations), dl(attention_weights), dl(grad_output), outputs, outputs, outputs,
                        strategy=get_grad_value_strategy(), workspace=outputs, stream=stream_of(value),
                        num_threads=torch.get_num_threads())
    grad_value, grad_loc, grad_w = outputs.tensors[:3]
    return grad_value, grad_loc, grad_w


_ms_deform_attn_backward = torch.library.custom_op("deem::ms_deform_attn_backward", _backward_reference,
                                                   mutates_args=())
register_kernels(_ms_deform_attn_backward, _backward_kernel, _backward_reference)


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
            (float64 for float64 values), other dtypes are cast. A NaN or infinite location samples
            nothing (see `deem.ops.check_finite`).
        attention_weights: [N, Lq, M, L, P] in the value dtype or float32.

    Every tensor lives on the device of `value` (the level tables may stay on the CPU) and is contiguous.

    Returns:
        [N, Lq, M*D] in the value dtype.
    """
    args = dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                sampling_locations=sampling_locations, attention_weights=attention_weights)
    require_tensors("ms_deform_attn", args)
    require_one_device("ms_deform_attn", args)
    sampling_locations = cast("sampling_locations", sampling_locations, location_dtype(value.dtype))
    if value.dtype == torch.float64:
        attention_weights = cast("attention_weights", attention_weights, torch.float64)
    require_finite("ms_deform_attn", "sampling_locations", sampling_locations)
    return _ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
