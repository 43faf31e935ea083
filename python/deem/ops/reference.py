"""Pure-PyTorch references for every deem op: the test oracle and the fallback where no compiled
kernel serves a device. They follow the definitions in spec/kernels.md §1 literally."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention through `F.grid_sample` (Deformable-DETR semantics).

    value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] (x, y in [0, 1]),
    attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D].
    """
    del level_start_index  # implied by spatial_shapes
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    levels = value.split(sizes, dim=1)
    grids = 2 * sampling_locations.to(value.dtype) - 1
    sampled = []
    for lid, (h, w) in enumerate(spatial_shapes.tolist()):
        v = levels[lid].flatten(2).transpose(1, 2).reshape(N * M, D, int(h), int(w))
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


def mmfs_softmax(attention_logits: torch.Tensor, image_visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DEEM's softmax with a null slot of logit 0 over the visible images.

    attention_logits [N, Lq, I, M, L, P], image_visible [N, Lq, I] ->
    weights [N, Lq, I, M, L, P] (0 for invisible images) and lse [N, Lq, M] = log(1 + sum exp z).
    """
    vis = image_visible.bool()[:, :, :, None, None, None]
    z = attention_logits.masked_fill(~vis, float("-inf"))
    per_head = z.permute(0, 1, 3, 2, 4, 5).flatten(3)  # [N, Lq, M, I*L*P]
    null = torch.zeros_like(per_head[..., :1])
    lse = torch.logsumexp(torch.cat([per_head, null], dim=-1), dim=-1)
    weights = torch.exp(z - lse[:, :, None, :, None, None])
    return weights, lse


def mmfs_core_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_logits: torch.Tensor,
    image_visible: torch.Tensor,
    ignore_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused MMFS core in plain PyTorch (see deem/mmfs.h).

    value [N, I*S_img, M, D], spatial_shapes [L, 2] of one image, sampling_locations
    [N, Lq, I, M, P, 2] shared by the levels of an image, attention_logits [N, Lq, I, M, L, P],
    image_visible [N, Lq, I], ignore_token [M, D] or None -> (out [N, Lq, M*D], lse [N, Lq, M]).
    """
    N, Lq, n_img, M, P, _ = sampling_locations.shape
    L = spatial_shapes.shape[0]
    D = value.shape[-1]
    weights, lse = mmfs_softmax(attention_logits, image_visible)
    shapes = spatial_shapes.repeat(n_img, 1)
    sizes = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).repeat(n_img)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    loc = sampling_locations.permute(0, 1, 3, 2, 4, 5)[:, :, :, :, None]  # [N, Lq, M, I, 1, P, 2]
    loc = loc.expand(N, Lq, M, n_img, L, P, 2).reshape(N, Lq, M, n_img * L, P, 2)
    w = weights.permute(0, 1, 3, 2, 4, 5).reshape(N, Lq, M, n_img * L, P)
    out = ms_deform_attn_reference(value, shapes, starts, loc, w)
    if ignore_token is not None:
        sink = torch.exp(-lse).to(value.dtype)
        out = out + (sink[..., None] * ignore_token.to(value.dtype)).reshape(N, Lq, M * D)
    return out, lse
