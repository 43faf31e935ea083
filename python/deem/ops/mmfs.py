"""`deem::mmfs_core`: the fused DEEM MMFS core (per-image locations broadcast over levels, in-kernel
softmax with a null slot, per-query image visibility, optional ignore token) as a custom op. The compiled
kernels of deem._C serve the CPU and CUDA (one call each way); the reference is the default elsewhere."""

from __future__ import annotations

import torch

from deem._native import Outputs, aligned, dl, host_index, lib, stream_of
from deem.ops._common import cast, location_dtype, register_kernels, require_finite, require_one_device, require_tensors
from deem.ops._strategy import get_grad_value_strategy
from deem.ops.reference import mmfs_core_reference


def _forward_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_logits: torch.Tensor,
    image_visible: torch.Tensor,
    ignore_token: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = mmfs_core_reference(value, host_index(spatial_shapes), host_index(level_start_index),
                                   sampling_locations, attention_logits, image_visible, ignore_token)
    return out, lse.to(sampling_locations.dtype)


def _forward_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_logits, image_visible,
                    ignore_token):
    value, ignore_token = aligned(value), aligned(ignore_token)
    outputs = Outputs(value.device)
    lib().mmfs_forward(dl(value), dl(host_index(spatial_shapes)), dl(host_index(level_start_index)),
                       dl(sampling_locations), dl(attention_logits), dl(image_visible), dl(ignore_token), outputs,
                       outputs, stream=stream_of(value), num_threads=torch.get_num_threads())
    out, lse = outputs.tensors
    N, Lq, M, D = out.shape
    return out.view(N, Lq, M * D), lse


_mmfs_core = torch.library.custom_op("deem::mmfs_core", _forward_reference, mutates_args=())
register_kernels(_mmfs_core, _forward_kernel, _forward_reference)


@_mmfs_core.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_logits, image_visible, ignore_token):
    require_one_device("mmfs_core", dict(value=value, spatial_shapes=spatial_shapes,
                                         level_start_index=level_start_index, sampling_locations=sampling_locations,
                                         attention_logits=attention_logits, image_visible=image_visible,
                                         ignore_token=ignore_token))
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    lse = sampling_locations.new_empty((N, Lq, M))
    return value.new_empty((N, Lq, M * D)), lse


def _backward_reference(
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
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_logits)]
        out, _ = mmfs_core_reference(inputs[0], host_index(spatial_shapes), host_index(level_start_index), inputs[1],
                                     inputs[2], image_visible, ignore_token)
        grads = torch.autograd.grad(out, inputs, grad_output.reshape(N, Lq, M * D).to(out.dtype), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))


def _backward_kernel(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_logits,
                     image_visible, ignore_token, lse):
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    grad_output = aligned(grad_output.reshape(N, Lq, M, D).to(value.dtype).contiguous())
    value, ignore_token = aligned(value), aligned(ignore_token)
    outputs = Outputs(value.device)
    lib().mmfs_backward(dl(value), dl(host_index(spatial_shapes)), dl(host_index(level_start_index)),
                        dl(sampling_locations), dl(attention_logits), dl(image_visible), dl(ignore_token), dl(lse),
                        dl(grad_output), outputs, outputs, outputs, strategy=get_grad_value_strategy(),
                        workspace=outputs, stream=stream_of(value), num_threads=torch.get_num_threads())
    grad_value, grad_loc, grad_logits = outputs.tensors[:3]
    return grad_value, grad_loc, grad_logits


_mmfs_core_backward = torch.library.custom_op("deem::mmfs_core_backward", _backward_reference, mutates_args=())
register_kernels(_mmfs_core_backward, _backward_kernel, _backward_reference)


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
        g = grad_output.reshape(N, Lq, M, ignore.shape[-1]).to(lse.dtype)  # explicit D: N or Lq may be 0
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
            A NaN or infinite location samples nothing (see `deem.ops.check_finite`).
        attention_logits: [N, Lq, I, M, L, P] raw logits; the softmax runs over the visible images'
            entries plus a null slot of logit 0.
        image_visible: [N, Lq, I] bool: which images each query may attend to.
        ignore_token: optional [M, D] (exactly): one vector per head, added with the null slot's weight.

    Every tensor lives on the device of `value` (the level tables may stay on the CPU) and is contiguous.

    Returns:
        [N, Lq, M*D] in the value dtype.
    """
    args = dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                sampling_locations=sampling_locations, attention_logits=attention_logits,
                image_visible=image_visible, ignore_token=ignore_token)
    require_tensors("mmfs_core", args, optional=("ignore_token",))
    require_one_device("mmfs_core", args)
    op_dtype = location_dtype(value.dtype)
    sampling_locations = cast("sampling_locations", sampling_locations, op_dtype)
    attention_logits = cast("attention_logits", attention_logits, op_dtype)
    image_visible = cast("image_visible", image_visible, torch.bool)
    if ignore_token is not None and value.dim() == 4:
        M, D = value.shape[2:]
        if tuple(ignore_token.shape) != (M, D):
            raise ValueError(f"ignore_token: expected M*D = {M * D} elements as shape [M, D] = [{M}, {D}] (one vector "
                             f"per head), got shape {tuple(ignore_token.shape)}")
        if value.dtype.is_floating_point:
            ignore_token = cast("ignore_token", ignore_token, value.dtype)
    require_finite("mmfs_core", "sampling_locations", sampling_locations)
    out, _ = _mmfs_core(value, spatial_shapes, level_start_index, sampling_locations, attention_logits,
                        image_visible, ignore_token)
    return out
