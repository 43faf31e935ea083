"""Random problem generators shared by the op tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def level_tensors(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial[:, 0] * spatial[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial, starts


@dataclass
class MsdaProblem:
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor

    def args(self):
        return (self.value, self.spatial_shapes, self.level_start_index, self.sampling_locations,
                self.attention_weights)


def msda_problem(N, Lq, M, D, shapes, P, dtype=torch.float64, device="cpu", spread=(-0.1, 1.1), seed=0,
                 weight_dtype=None) -> MsdaProblem:
    g = torch.Generator().manual_seed(seed)
    spatial, starts = level_tensors(shapes)
    S = int((spatial[:, 0] * spatial[:, 1]).sum())
    L = len(shapes)
    lo, hi = spread
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    w = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    w = w / w.sum((-1, -2), keepdim=True)
    loc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return MsdaProblem(
        value.to(device=device, dtype=dtype),
        spatial,
        starts,
        loc.to(device=device, dtype=loc_dtype),
        w.to(device=device, dtype=weight_dtype or dtype),
    )


@dataclass
class MmfsProblem:
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_logits: torch.Tensor
    image_visible: torch.Tensor
    ignore_token: torch.Tensor | None

    def args(self):
        return (self.value, self.spatial_shapes, self.level_start_index, self.sampling_locations,
                self.attention_logits, self.image_visible, self.ignore_token)


def mmfs_problem(N, Lq, n_img, M, D, shapes, P, dtype=torch.float64, device="cpu", seed=0, visible_p=0.6,
                 ignore=True) -> MmfsProblem:
    g = torch.Generator().manual_seed(seed)
    spatial, starts = level_tensors(shapes)
    S = int((spatial[:, 0] * spatial[:, 1]).sum())
    L = len(shapes)
    value = torch.randn(N, n_img * S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Lq, n_img, M, P, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    logits = torch.randn(N, Lq, n_img, M, L, P, generator=g, dtype=torch.float64) * 2
    visible = torch.rand(N, Lq, n_img, generator=g) < visible_p
    visible[0, 0] = False  # a query that sees no image
    if Lq > 1:
        visible[0, 1] = True
    ign = torch.randn(M, D, generator=g, dtype=torch.float64) if ignore else None
    op = torch.float64 if dtype == torch.float64 else torch.float32
    return MmfsProblem(
        value.to(device=device, dtype=dtype),
        spatial,
        starts,
        loc.to(device=device, dtype=op),
        logits.to(device=device, dtype=op),
        visible.to(device),
        None if ign is None else ign.to(device=device, dtype=dtype),
    )
