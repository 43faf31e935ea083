"""MMFSNet (spec/model.md §8.2): the UNet-side side network. One deformable cross-attention block per UNet skip
tensor and one for the mid-block output attend to the image encoder's multi-scale features; zero-initialised 1x1
convolutions make the residuals exactly 0 at initialisation, as in ControlNet (a side network of its own that
`run_unet` adds to the UNet, like diffusers' `down_block_additional_residuals`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from deem.models.diffusion.fused_features import can_fuse, fused_mmfs_residuals
from deem.models.mmfs import MMFS
from deem.models.positions import get_abs_pos, sincos_pos_embed_2d


def _reference_points(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Pixel centres ((j + 0.5)/W, (i + 0.5)/H) of an H x W grid, row-major: [1, H*W, 1, 2]."""
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    ref = torch.stack([xs.repeat(height), ys.repeat_interleave(width)], dim=-1)
    return ref[None, :, None, :]


class MMFSFeatures(NamedTuple):
    """Packed multi-scale features: `flat` [B, n_img, S, C] (each image's levels flattened row-major
    and concatenated) and the per-level (H, W) of one image."""

    flat: torch.Tensor
    spatial_shapes: tuple[tuple[int, int], ...]

    def slice(self, start: int, stop: int) -> MMFSFeatures:
        return MMFSFeatures(self.flat[start:stop], self.spatial_shapes)

    def repeat(self, times: int) -> MMFSFeatures:
        """The batch repeated `times` times (classifier-free guidance: both halves see the features)."""
        return MMFSFeatures(torch.cat([self.flat] * times), self.spatial_shapes)


def pack_mmfs_features(features: Sequence[torch.Tensor] | MMFSFeatures) -> MMFSFeatures:
    """Pack per-level maps [B, n_img, C, H_l, W_l] into `MMFSFeatures` ([B, n_img, S, C])."""
    if isinstance(features, MMFSFeatures):
        return features
    if isinstance(features, torch.Tensor) or len(features) == 0:
        raise ValueError("mmfs_features must be a non-empty sequence of [B, n_img, C, H, W] maps or MMFSFeatures")
    lead = None
    flats, shapes = [], []
    for i, f in enumerate(features):
        if f.dim() != 5:
            raise ValueError(f"mmfs_features[{i}] must be [B, n_img, C, H, W], got shape {tuple(f.shape)}")
        if lead is None:
            lead = f.shape[:3]
        elif f.shape[:3] != lead:
            raise ValueError(f"mmfs_features[{i}] has [B, n_img, C] = {tuple(f.shape[:3])}, level 0 has {tuple(lead)}")
        shapes.append((int(f.shape[3]), int(f.shape[4])))
        flats.append(f.flatten(3).transpose(2, 3))
    return MMFSFeatures(torch.cat(flats, dim=2), tuple(shapes))


def mmfs_block_layout(block_out_channels: Sequence[int], layers_per_block: int | Sequence[int],
                      latent_size: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(channels, side) of every skip tensor a diffusers UNet2DConditionModel hands to its up path
    (conv_in output, then per down block its resnets and, except for the last block, its
    downsampler) and of the mid-block output. SD-2.1 at 64x64 latents: 12 skips + mid."""
    n = len(block_out_channels)
    per_block = [layers_per_block] * n if isinstance(layers_per_block, int) else list(layers_per_block)
    if len(per_block) != n:
        raise ValueError(f"layers_per_block {layers_per_block} does not match {n} down blocks")
    side = latent_size
    skips = [(block_out_channels[0], side)]
    for i, ch in enumerate(block_out_channels):
        skips += [(ch, side)] * per_block[i]
        if i < n - 1:
            side = (side + 1) // 2  # stride-2 conv, padding 1
            skips.append((ch, side))
    return skips, (block_out_channels[-1], side)


class MMFSBlock(nn.Module):
    """One UNet-side MMFS: queries are the (LayerNorm'ed, position-coded) pixels of a skip tensor,
    values the LayerNorm'ed image-encoder features; output through a zero-initialised 1x1 conv.
    `forward` returns the residual, not the sum."""

    def __init__(
        self,
        query_dim: int,
        feat_dim: int = 1024,
        attn_dim: int = 1024,
        num_heads: int = 16,
        n_points: int = 8,
        n_levels: int = 4,
        deform_ratio: float = 1.0,
        grid_size: int = 64,
        offset_init_magnitude: float = 1.0,
        max_num_image_per_seq: int = 10,
        spatial_shapes: Sequence[int] = (64, 32, 16, 8),
        base_spatial_shape: int = 64,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.query_dim, self.feat_dim = query_dim, feat_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.spatial_shapes = tuple(int(s) for s in spatial_shapes)
        self.base_spatial_shape = base_spatial_shape
        self.query_norm = nn.LayerNorm(query_dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(feat_dim, eps=1e-6)
        self.mmfs = MMFS(
            d_model=attn_dim, d_query=query_dim, d_value=feat_dim, d_out=query_dim, n_levels=n_levels,
            n_heads=num_heads, n_points=n_points, ratio=deform_ratio, offset_init_magnitude=offset_init_magnitude,
            spatial_shapes=self.spatial_shapes, base_spatial_shape=base_spatial_shape,
            max_num_image_per_seq=max_num_image_per_seq)
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(torch.empty(grid_size * grid_size, query_dim), requires_grad=False)
        self.conv = nn.Conv2d(query_dim, query_dim, kernel_size=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Spec §12: LayerNorms (1, 0), MMFS §5.2, 1x1 conv all zeros, the sin-cos table (also after
        a meta-device construction and `to_empty`)."""
        with torch.device("cpu"):
            table = sincos_pos_embed_2d(self.query_dim, self.grid_size)
        self.pos_embed.copy_(table)
        self.query_norm.reset_parameters()
        self.feat_norm.reset_parameters()
        self.mmfs.reset_parameters()
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def _residual(self, sample: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  spatial_shapes: tuple[tuple[int, int], ...]) -> torch.Tensor:
        B, C, H, W = sample.shape
        query = self.query_norm(sample.flatten(2).transpose(1, 2).to(self.query_norm.weight.dtype))
        query = query + get_abs_pos(self.pos_embed, H * W).to(query.dtype)
        values = self.feat_norm(values.to(self.feat_norm.weight.dtype))
        ref = _reference_points(H, W, sample.device)
        out = self.mmfs(query, ref, values, spatial_shapes, None, mask)
        out = out.transpose(1, 2).reshape(B, C, H, W)
        return self.conv(out).to(sample.dtype)

    def forward(self, sample: torch.Tensor, features: MMFSFeatures, mask: torch.Tensor) -> torch.Tensor:
        """sample [B, C, H, W], features.flat [B, n_img, S, feat_dim], mask [B, n_img] -> residual [B, C, H, W]."""
        if sample.dim() != 4 or sample.shape[1] != self.query_dim or sample.shape[2] != sample.shape[3]:
            raise ValueError(f"MMFSBlock: sample must be square [B, {self.query_dim}, H, H], got {tuple(sample.shape)}")
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._residual, sample, features.flat, mask, features.spatial_shapes, use_reentrant=False)
        return self._residual(sample, features.flat, mask, features.spatial_shapes)


class MMFSNet(nn.Module):
    """One `MMFSBlock` per UNet skip tensor (`mmfs_down_blocks`) plus one for the mid block
    (`mmfs_mid_block`); the block list follows the UNet's `block_out_channels`/`layers_per_block`,
    the base spatial shape of each block is its skip tensor's side and the sin-cos tables cover
    the full latent grid (spec §8.2). Parameter names match the original checkpoint's
    `mmfs_module.*` keys."""

    def __init__(
        self,
        block_out_channels: Sequence[int],
        layers_per_block: int | Sequence[int],
        latent_size: int,
        feat_dim: int = 1024,
        spatial_shapes: Sequence[int] = (64, 32, 16, 8),
        fused_features: bool = False,
        **block_options: Any,
    ) -> None:
        """`block_options`: the other `MMFSBlock` arguments, the same for every block (attn_dim, num_heads,
        n_points, n_levels, deform_ratio, offset_init_magnitude, max_num_image_per_seq, gradient_checkpointing).
        `fused_features`: run the blocks through the fused path of :mod:`deem.models.diffusion.fused_features`."""
        super().__init__()
        self.feat_dim = feat_dim
        self.fused_features = fused_features
        self.spatial_shapes = tuple(int(s) for s in spatial_shapes)
        skips, (mid_ch, mid_side) = mmfs_block_layout(block_out_channels, layers_per_block, latent_size)
        self.layout = [*skips, (mid_ch, mid_side)]

        def block(ch: int, side: int) -> MMFSBlock:
            return MMFSBlock(query_dim=ch, feat_dim=feat_dim, grid_size=latent_size, spatial_shapes=self.spatial_shapes,
                             base_spatial_shape=side, **block_options)

        self.mmfs_down_blocks = nn.ModuleList([block(ch, side) for ch, side in skips])
        self.mmfs_mid_block = block(mid_ch, mid_side)

    @classmethod
    def for_unet(cls, unet_config: Any, latent_size: int, **kwargs: Any) -> MMFSNet:
        """Build for a UNet config (a diffusers FrozenDict or a plain dict)."""
        get = unet_config.get if isinstance(unet_config, dict) else lambda k: getattr(unet_config, k)
        return cls(get("block_out_channels"), get("layers_per_block"), latent_size, **kwargs)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for b in self.blocks():
            b.gradient_checkpointing = enabled

    def blocks(self) -> list[MMFSBlock]:
        return [*self.mmfs_down_blocks, self.mmfs_mid_block]

    def reset_parameters(self) -> None:
        for b in self.blocks():
            b.reset_parameters()

    def frozen_parameter_names(self) -> list[str]:
        """The sin-cos tables and the MMFS ignore tokens: stored, never trained."""
        return [n for n, _ in self.named_parameters() if n.endswith(("pos_embed", "ignore_token"))]

    def set_trainable(self) -> None:
        """Everything learnable trains; pos tables and ignore tokens stay frozen."""
        frozen = set(self.frozen_parameter_names())
        for n, p in self.named_parameters():
            p.requires_grad_(n not in frozen)

    def _check_inputs(self, feats: MMFSFeatures, mask: torch.Tensor | None) -> torch.Tensor:
        B, n_img, _, channels = feats.flat.shape
        if channels != self.feat_dim:
            raise ValueError(f"MMFSNet: features have {channels} channels, expected feat_dim={self.feat_dim}")
        got = [h for h, _ in feats.spatial_shapes]
        if any(h != w for h, w in feats.spatial_shapes) or tuple(got) != self.spatial_shapes:
            raise ValueError(
                f"MMFSNet: feature levels are {list(feats.spatial_shapes)} but the MMFS offsets were built for "
                f"square maps of sides {self.spatial_shapes}; set DiffusionConfig.mmfs_spatial_shapes to the "
                f"image encoder's actual feature sizes")
        if mask is None:
            return torch.ones(B, n_img, dtype=torch.long, device=feats.flat.device)
        if tuple(mask.shape) != (B, n_img):
            raise ValueError(f"MMFSNet: mmfs_mask must be [B, n_img] = [{B}, {n_img}], got {tuple(mask.shape)}")
        return mask

    def forward(
        self,
        down_block_res_samples: Sequence[torch.Tensor],
        mid_sample: torch.Tensor,
        features: Sequence[torch.Tensor] | MMFSFeatures,
        mask: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """skip_k <- skip_k + Block_k(skip_k), mid <- mid + Block_mid(mid).

        Args:
            down_block_res_samples: the UNet's skip tensors, [B, C_k, H_k, W_k] each.
            mid_sample: the mid-block output.
            features: per-level maps [B, n_img, feat_dim, H_l, W_l] or packed `MMFSFeatures`.
            mask: [B, n_img] image visibility (1 = visible); None: all visible.
        """
        if len(down_block_res_samples) != len(self.mmfs_down_blocks):
            raise ValueError(f"MMFSNet: got {len(down_block_res_samples)} skip tensors, built for "
                             f"{len(self.mmfs_down_blocks)}")
        feats = pack_mmfs_features(features)
        if feats.flat.shape[0] != mid_sample.shape[0]:
            raise ValueError(f"MMFSNet: features batch {feats.flat.shape[0]} != UNet batch {mid_sample.shape[0]}")
        mask = self._check_inputs(feats, mask)
        if self.fused_features and can_fuse(self.blocks()):
            *new_res, new_mid = fused_mmfs_residuals(self.blocks(), [*down_block_res_samples, mid_sample], feats, mask)
            return tuple(new_res), new_mid
        new_res = tuple(r + blk(r, feats, mask) for r, blk in zip(down_block_res_samples, self.mmfs_down_blocks))
        return new_res, mid_sample + self.mmfs_mid_block(mid_sample, feats, mask)

