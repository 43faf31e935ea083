"""MMFS: multi-image multi-scale feature synchroniser (DEEM / MM-Interleaved cross-attention).

Parameters and their names follow the original module, so original checkpoints load unchanged.
The forward computes the original function (spec/model.md §5.3) in a cheaper form:

* `dynamic_offset_mask` runs once per query, not once per (query, image): by linearity
  Lin(q) + relpos_emb is split into a per-query term and a per-image table of at most
  `max_num_image_per_seq` rows, for the offsets and the logits alike;
* the softmax with the null slot, the per-query image mask, the skipping of invisible images,
  the ignore token and the broadcast of one location over the levels of an image all happen in
  the fused `deem::mmfs_core` kernel; no ignore-token tensor is materialised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deem.ops import mmfs_core, mmfs_softmax, ms_deform_attn
from deem.ops.msda import location_dtype


def _as_shape_list(shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(shapes, torch.Tensor):
        shapes = shapes.tolist()
    return [(int(h), int(w)) for h, w in shapes]


def image_relpos(visible: torch.Tensor) -> torch.Tensor:
    """Relative image position per query: 1 for the most recent visible image, 2 for the one
    before it, ..., 0 for invisible images. visible [N, Lq, I] bool -> int64 [N, Lq, I]."""
    a = visible.long()
    total = a.sum(-1, keepdim=True)
    return (total + 1 - a.cumsum(-1)) * a


class MMFS(nn.Module):
    """Deformable cross-attention from text (or UNet) queries to the multi-scale features of
    several images.

    Args:
        d_model: model width; the value width is ``int(d_model * ratio)``.
        d_query, d_value, d_out: query, input-feature and output widths (default d_model).
        n_levels: feature levels per image.
        n_heads, n_points: attention heads and sampling points per (image, head).
        ratio: value width relative to d_model.
        offset_init_magnitude: sampling-offset biases start uniform in [-m, m].
        spatial_shapes: the level sizes the offsets are scaled for (s_l / base_spatial_shape).
        base_spatial_shape: offsets are in units of one cell of this grid.
        max_num_image_per_seq: rows of the relative-image-position embedding.
        ignore_token_trainable: whether the null slot's ignore token learns (LLM side in DEEM).
    """

    def __init__(
        self,
        d_model: int = 256,
        d_query: int | None = None,
        d_value: int | None = None,
        d_out: int | None = None,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        ratio: float = 1.0,
        offset_init_magnitude: float = 3.0,
        spatial_shapes: Sequence[int] = (32, 16, 8),
        base_spatial_shape: int = 16,
        max_num_image_per_seq: int = 50,
        ignore_token_trainable: bool = False,
    ) -> None:
        super().__init__()
        d_query = d_query or d_model
        d_value = d_value or d_model
        d_out = d_out or d_model
        d_inner = int(d_model * ratio)
        if d_inner % n_heads != 0:
            raise ValueError(f"MMFS: value width {d_inner} (d_model * ratio) must be divisible by n_heads={n_heads}")
        if len(spatial_shapes) != n_levels:
            raise ValueError(f"MMFS: spatial_shapes has {len(spatial_shapes)} entries for n_levels={n_levels}")
        self.d_query, self.d_value, self.d_out, self.d_inner = d_query, d_value, d_out, d_inner
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.head_dim = d_inner // n_heads
        self.offset_init_magnitude = offset_init_magnitude
        self.base_spatial_shape = base_spatial_shape
        self.max_num_image_per_seq = max_num_image_per_seq
        # Python floats, not a buffer: reading them never syncs with (or copies from) the GPU.
        self.scale_ratios = tuple(s / base_spatial_shape for s in spatial_shapes)
        self.sampling_offsets = nn.Linear(d_query, n_heads * n_points * 2)
        self.dynamic_offset_mask = nn.Linear(d_query, d_query)
        self.attention_weights = nn.Linear(d_query, n_heads * n_levels * (n_points + 1))
        self.value_proj = nn.Linear(d_value, d_inner)
        self.output_proj = nn.Linear(d_inner, d_out)
        self.query_relpos = nn.Embedding(max_num_image_per_seq, d_query)
        self.ignore_token = nn.Parameter(torch.zeros(1, 1, 1, d_inner), requires_grad=ignore_token_trainable)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original initialisation (spec/model.md §5.2)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        m = self.offset_init_magnitude
        bias = torch.empty(self.n_heads, 1, self.n_points, 2).uniform_(-m, m)
        self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)
        nn.init.zeros_(self.dynamic_offset_mask.bias)
        nn.init.trunc_normal_(self.query_relpos.weight, std=0.02)

    def _logit_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias rows of `attention_weights` without the null slot (whose logit the
        original overwrites with a constant, so it never influences the output)."""
        H, L, P = self.n_heads, self.n_levels, self.n_points
        w = self.attention_weights.weight.view(H, L, P + 1, -1)[:, :, :P].reshape(H * L * P, -1)
        b = self.attention_weights.bias.view(H, L, P + 1)[:, :, :P].reshape(H * L * P)
        return w, b

    def _level_factors(self, shapes: list[tuple[int, int]]) -> tuple[list[float], list[float]]:
        ratios = self.scale_ratios
        return [r / w for r, (_, w) in zip(ratios, shapes)], [r / h for r, (h, _) in zip(ratios, shapes)]

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
        input_level_start_index: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, d_query].
            reference_points: [1 or N, Lq, 1, 2] normalised (x, y).
            input_flatten: [N, I, S, d_value], each image's levels flattened and concatenated.
            input_spatial_shapes: (H, W) of the levels of one image ([L, 2]) or repeated for every
                image ([I*L, 2], the original layout).
            input_level_start_index: ignored (implied by the shapes); kept for the original signature.
            attention_mask: [N, I] or [N, Lq', I] image visibility (1 = visible). With Lq' != Lq
                only its last row is used (incremental decoding). None: every image is visible.

        Returns:
            [N, Lq, d_out].
        """
        del input_level_start_index
        N, Lq, _ = query.shape
        n_img = input_flatten.shape[1]
        shapes = self.check_features(input_flatten, input_spatial_shapes)
        visible = self._visibility(attention_mask, N, Lq, n_img, query.device)
        return self.attend(query, reference_points, self.project_values(input_flatten), shapes, visible)

    def check_features(
        self, input_flatten: torch.Tensor, input_spatial_shapes: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[tuple[int, int]]:
        """Validate the image features [N, I, S, d_value] against the level shapes; returns one image's levels."""
        _, n_img, S, _ = input_flatten.shape
        L = self.n_levels
        shapes = _as_shape_list(input_spatial_shapes)
        if len(shapes) == n_img * L and n_img > 1:
            if any(shapes[i] != shapes[i % L] for i in range(len(shapes))):
                raise ValueError(f"MMFS: input_spatial_shapes must repeat one image's {L} levels, got {shapes}")
            shapes = shapes[:L]
        if len(shapes) != L:
            raise ValueError(f"MMFS: expected {L} levels per image in input_spatial_shapes, got {len(shapes)}")
        if sum(h * w for h, w in shapes) != S:
            raise ValueError(f"MMFS: input_flatten has {S} rows per image but the levels {shapes} hold "
                             f"{sum(h * w for h, w in shapes)}")
        if n_img > self.max_num_image_per_seq - 1:
            raise ValueError(f"MMFS: {n_img} images exceed max_num_image_per_seq={self.max_num_image_per_seq} - 1")
        return shapes

    def project_values(self, input_flatten: torch.Tensor) -> torch.Tensor:
        """The per-image half of the layer: [N, I, S, d_value] features -> [N, I*S, n_heads, head_dim] values.
        It does not depend on the queries, so an inference engine computes it once per request."""
        N, n_img, S, _ = input_flatten.shape
        return self.value_proj(input_flatten).reshape(N, n_img * S, self.n_heads, self.head_dim)

    def relpos_terms(
        self, visible: torch.Tensor, logit_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-image table rows added to the offsets and logits of each query ([N, Lq, I, H*P*2] and
        [N, Lq, I, H*L*P]): they depend only on the visibility, so they are constant over decoding steps."""
        relpos = image_relpos(visible)
        w_rows, _ = logit_rows if logit_rows is not None else self._logit_rows()
        off = F.embedding(relpos, F.linear(self.query_relpos.weight, self.sampling_offsets.weight))
        return off, F.embedding(relpos, F.linear(self.query_relpos.weight, w_rows))

    def attend(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        shapes: list[tuple[int, int]],
        visible: torch.Tensor,
        terms: tuple[torch.Tensor, torch.Tensor] | None = None,
        logit_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The per-query half: queries [N, Lq, d_query] over projected values ([N, I*S, H, dh], `project_values`)
        with visibility [N, Lq, I] (bool). `terms` (`relpos_terms`) and `logit_rows` (`_logit_rows`) may be
        precomputed; they broadcast over Lq."""
        N, Lq, _ = query.shape
        n_img = visible.shape[-1]
        H, L, P = self.n_heads, self.n_levels, self.n_points
        w_rows, b_rows = logit_rows if logit_rows is not None else self._logit_rows()
        off_term, logit_term = terms if terms is not None else self.relpos_terms(visible, (w_rows, b_rows))
        q = self.dynamic_offset_mask(query)
        # Offsets and logits: per-query term + per-image table row (linearity of the Linear).
        off = self.sampling_offsets(q)[:, :, None] + off_term
        logits = F.linear(q, w_rows, b_rows)[:, :, None] + logit_term
        op_dtype = location_dtype(value.dtype)
        off = off.to(op_dtype).view(N, Lq, n_img, H, P, 2)
        logits = logits.to(op_dtype).view(N, Lq, n_img, H, L, P)
        ref = reference_points.to(op_dtype).reshape(-1, Lq, 1, 1, 1, 2)

        fx, fy = self._level_factors(shapes)
        spatial = torch.tensor(shapes, dtype=torch.int64)
        starts = torch.tensor([0, *[h * w for h, w in shapes][:-1]], dtype=torch.int64).cumsum(0)
        ignore = self.ignore_token.view(H, self.head_dim)
        if self.level_invariant(shapes):
            # Python scalars, not a device tensor: no host-to-device copy (CUDA-graph capturable)
            if fx[0] == fy[0]:
                loc = ref + off * fx[0]
            else:
                loc = ref + torch.cat([off[..., :1] * fx[0], off[..., 1:] * fy[0]], dim=-1)
            out = mmfs_core(value.contiguous(), spatial, starts, loc.contiguous(), logits.contiguous(), visible,
                            ignore)
        else:
            out = self._forward_per_level(value, spatial, ref, off, logits, visible, ignore, fx, fy)
        return self.output_proj(out.to(value.dtype))

    def level_invariant(self, shapes: list[tuple[int, int]]) -> bool:
        """Whether one location scale serves every level (the fused core; else the per-level path, which copies
        a scale table to the device and cannot be captured in a CUDA graph)."""
        fx, fy = self._level_factors(shapes)
        return all(math.isclose(f, fx[0], rel_tol=1e-6) for f in fx) and all(
            math.isclose(f, fy[0], rel_tol=1e-6) for f in fy)

    @staticmethod
    def _visibility(mask: torch.Tensor | None, N: int, Lq: int, n_img: int, device: torch.device) -> torch.Tensor:
        if mask is None:
            return torch.ones(N, Lq, n_img, dtype=torch.bool, device=device)
        if mask.dim() == 2:
            mask = mask[:, None, :].expand(N, Lq, n_img)
        elif mask.dim() == 3 and mask.shape[1] != Lq:
            mask = mask[:, -1:, :].expand(N, Lq, n_img)
        if tuple(mask.shape) != (N, Lq, n_img):
            raise ValueError(f"MMFS: attention_mask must be [N, I] or [N, Lq, I] = [{N}, {Lq}, {n_img}], "
                             f"got {tuple(mask.shape)}")
        return (mask > 0).contiguous()

    def _forward_per_level(self, value, spatial, ref, off, logits, visible, ignore, fx, fy) -> torch.Tensor:
        """Level-dependent location scaling (maps whose size is not proportional to their
        spatial_shapes entry): the generic op with per-level locations."""
        N, Lq, n_img, H, P, _ = off.shape
        L = self.n_levels
        scale = torch.tensor(list(zip(fx, fy)), dtype=off.dtype, device=off.device)  # [L, 2]
        loc = ref[:, :, :, :, None] + off[:, :, :, :, None] * scale[:, None, :]  # [N, Lq, I, H, L, P, 2]
        weights, lse = mmfs_softmax(logits, visible)
        loc = loc.permute(0, 1, 3, 2, 4, 5, 6).reshape(N, Lq, H, n_img * L, P, 2)
        weights = weights.permute(0, 1, 3, 2, 4, 5).reshape(N, Lq, H, n_img * L, P)
        shapes = spatial.repeat(n_img, 1)
        sizes = (shapes[:, 0] * shapes[:, 1])
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        out = ms_deform_attn(value.contiguous(), shapes, starts, loc.contiguous(), weights.to(value.dtype).contiguous())
        sink = torch.exp(-lse)[..., None] * ignore.to(lse.dtype)
        return out + sink.reshape(N, Lq, H * self.head_dim).to(out.dtype)
