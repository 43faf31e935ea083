"""The fused MMFSNet feature path (issue 16): every MMFSBlock reads the SAME multi-scale features, so

* the features are LayerNorm-normalised once (no affine) and each block's `feat_norm` affine is folded into its
  `value_proj` (W_k diag(g_k), W_k beta_k + c_k), which turns the per-block LayerNorm + Linear pairs into ONE
  batched GEMM with the bias in its epilogue (`torch.baddbmm`), giving every block a contiguous
  [N, I*S, heads, head_dim] value tensor by a view;
* each block then runs its own MMFS core (`MMFS.attend`, output projection included);
* the zero-initialised 1x1 conv, its bias, the [B, HW, C] -> [B, C, H, W] transpose and the residual add are one
  `baddbmm` per block (the residual is the GEMM's accumulator).

Same parameters as the per-block path (no parameter of its own: checkpoints load unchanged), the same function up
to floating-point rounding; selected by `MMFSNet.fused_features` (`DiffusionConfig.mmfs_fused_features`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from deem.models.positions import get_abs_pos

if TYPE_CHECKING:
    from deem.models.diffusion.mmfs_net import MMFSBlock, MMFSFeatures


def can_fuse(blocks: Sequence[MMFSBlock]) -> bool:
    """Whether the blocks share what the batched value projection needs (feature width, value width, heads,
    LayerNorm eps, parameter dtype)."""
    first = blocks[0]
    key = (first.feat_dim, first.mmfs.d_inner, first.mmfs.n_heads, first.feat_norm.eps, first.feat_norm.weight.dtype)
    return all((b.feat_dim, b.mmfs.d_inner, b.mmfs.n_heads, b.feat_norm.eps, b.feat_norm.weight.dtype) == key
               for b in blocks)


def fused_values(blocks: Sequence[MMFSBlock], flat: torch.Tensor) -> torch.Tensor:
    """[N, I, S, feat_dim] features -> [n_blocks, N*I*S, d_inner]: every block's `value_proj(feat_norm(x))` from one
    normalisation and one batched GEMM."""
    first = blocks[0]
    dtype = first.feat_norm.weight.dtype
    x = flat.to(dtype)
    xhat = F.layer_norm(x, (first.feat_dim,), eps=first.feat_norm.eps).reshape(-1, first.feat_dim)
    weight = torch.stack([b.mmfs.value_proj.weight * b.feat_norm.weight for b in blocks])  # [K, d_inner, feat_dim]
    bias = torch.stack([b.mmfs.value_proj.bias + b.mmfs.value_proj.weight @ b.feat_norm.bias for b in blocks])
    return torch.baddbmm(bias[:, None, :], xhat.expand(len(blocks), -1, -1), weight.transpose(1, 2))


def _block_output(block: MMFSBlock, sample: torch.Tensor, value: torch.Tensor, shapes: list[tuple[int, int]],
                  mask: torch.Tensor) -> torch.Tensor:
    """sample + block(sample), given the block's projected values [N, I*S, heads, head_dim]."""
    from deem.models.diffusion.mmfs_net import _reference_points

    B, C, H, W = sample.shape
    mmfs = block.mmfs
    query = block.query_norm(sample.flatten(2).transpose(1, 2).to(block.query_norm.weight.dtype))
    query = query + get_abs_pos(block.pos_embed, H * W).to(query.dtype)
    visible = mmfs._visibility(mask, B, H * W, mask.shape[1], sample.device)
    out = mmfs.attend(query, _reference_points(H, W, sample.device), value, shapes, visible)  # [B, HW, C]
    conv_w = block.conv.weight.view(C, C).to(out.dtype)
    acc = sample.flatten(2).to(out.dtype) + block.conv.bias.to(out.dtype)[:, None]
    res = torch.baddbmm(acc, conv_w.expand(B, C, C), out.transpose(1, 2))  # residual in the GEMM's accumulator
    return res.view(B, C, H, W).to(sample.dtype)


def _fused_forward(blocks: Sequence[MMFSBlock], samples: Sequence[torch.Tensor], flat: torch.Tensor,
                   spatial_shapes: tuple[tuple[int, int], ...], mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    N, n_img, S, _ = flat.shape
    mmfs = blocks[0].mmfs
    shapes = mmfs.check_features(flat, spatial_shapes)
    values = fused_values(blocks, flat).view(len(blocks), N, n_img * S, mmfs.n_heads, mmfs.head_dim)
    return tuple(_block_output(b, s, values[k], shapes, mask) for k, (b, s) in enumerate(zip(blocks, samples)))


def fused_mmfs_residuals(blocks: Sequence[MMFSBlock], samples: Sequence[torch.Tensor], features: MMFSFeatures,
                         mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """samples[k] + blocks[k](samples[k]) for every block, through the fused path. With gradient checkpointing on
    (any block) the whole fused extraction is recomputed in the backward, like the per-block path's blocks."""
    for b, s in zip(blocks, samples):
        if s.dim() != 4 or s.shape[1] != b.query_dim or s.shape[2] != s.shape[3]:
            raise ValueError(f"MMFSBlock: sample must be square [B, {b.query_dim}, H, H], got {tuple(s.shape)}")
    if any(b.gradient_checkpointing for b in blocks) and blocks[0].training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            _fused_forward, blocks, samples, features.flat, features.spatial_shapes, mask, use_reentrant=False)
    return _fused_forward(blocks, samples, features.flat, features.spatial_shapes, mask)
