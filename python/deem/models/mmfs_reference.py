"""MMFS in the original formulation, written from spec/model.md §5.3: the query repeated per image
before `dynamic_offset_mask`, a softmax over n_levels*(P+1) entries with every null slot set to
-ln(n_levels) and -10000 for invisible images, and a materialised ignore-token term.

It is the oracle for `deem.models.MMFS` (same parameter names, so one state dict drives both) and
the baseline of benchmarks/msda.py. `core="reference"` samples with grid_sample;
`core="deem"` with deem's generic kernel (the original module around a fast op)."""

import math

import torch
import torch.nn.functional as F

from deem.models import MMFS
from deem.ops import ms_deform_attn, ms_deform_attn_reference


class OriginalMMFS(MMFS):
    """The original MMFS computation over deem.models.MMFS parameters (see the module docstring)."""

    def __init__(self, *args, core: str = "reference", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if core not in ("reference", "deem"):
            raise ValueError(f"core must be 'reference' or 'deem', got {core!r}")
        self.core = core

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index=None,
                attention_mask=None):
        N, Lq, _ = query.shape
        _, n, S, _ = input_flatten.shape
        H, Lv, P, dh = self.n_heads, self.n_levels, self.n_points, self.head_dim
        shapes = torch.as_tensor(input_spatial_shapes).reshape(-1, 2)  # [n*Lv, 2] (repeated per image)
        nl = shapes.shape[0]
        assert nl == n * Lv
        mask = attention_mask.to(query.dtype)
        if mask.dim() == 2:
            mask = mask[:, None, :].expand(N, Lq, n)
        elif mask.shape[1] != Lq:
            mask = mask[:, -1:, :].expand(N, Lq, n)
        a = mask.long()
        relpos = (a.sum(-1, keepdim=True) + 1 - a.cumsum(-1)) * a  # [N, Lq, n]
        value = self.value_proj(input_flatten).reshape(N, n * S, H, dh)
        q_rep = query[:, None].repeat(1, n, 1, 1)  # [N, n, Lq, dq]
        q_n = self.dynamic_offset_mask(q_rep) + self.query_relpos(relpos.permute(0, 2, 1))
        off = self.sampling_offsets(q_n).view(N, n, Lq, H, 1, P, 2).permute(0, 2, 3, 1, 4, 5, 6)
        off = off * torch.tensor(self.scale_ratios).to(off).view(1, 1, 1, 1, Lv, 1, 1)  # [N, Lq, H, n, Lv, P, 2]
        off = off.flatten(3, 4)
        logits = self.attention_weights(q_n).view(N, n, Lq, H, Lv, P + 1).permute(0, 2, 3, 1, 4, 5)
        logits = logits + (1 - mask)[:, :, None, :, None, None] * -10000.0
        logits = logits.clone()
        logits[..., -1] = -math.log(nl)
        weights = F.softmax(logits.flatten(3), -1).view(N, Lq, H, nl, P + 1)
        w_ignore, weights = weights[..., -1], weights[..., :P]
        normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(off)
        loc = reference_points.reshape(-1, Lq, 1, 1, 1, 2) + off / normalizer[None, None, None, :, None, :]
        sizes = shapes[:, 0] * shapes[:, 1]
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        op = ms_deform_attn_reference if self.core == "reference" else ms_deform_attn
        out = op(value, shapes, starts, loc.contiguous(), weights.to(value.dtype).contiguous())
        ignore = self.ignore_token.reshape(1, 1, 1, H * dh).repeat(N, Lq, nl, 1).view(N, Lq, nl, H, dh)
        out = out + (w_ignore.permute(0, 1, 3, 2)[..., None] * ignore).sum(2).reshape(N, Lq, H * dh)
        return self.output_proj(out)
