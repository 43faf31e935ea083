"""The diffusion side of DEEM (spec/model.md §8, §9.3-9.4).

* `DiffusionConfig`: how to build the frozen Stable Diffusion 2.1-base parts (from a local diffusers
  directory, or from config dicts for tiny test models) and the MMFSNet settings.
* `MMFSBlock` / `MMFSNet`: deformable cross-attention from every UNet skip tensor (and the mid-block
  output) to the multi-scale image features; zero-initialised 1x1 convolutions make the residuals
  exactly 0 at initialisation, like ControlNet.
* `run_unet`: executes a diffusers `UNet2DConditionModel`'s own sub-modules and adds the MMFSNet
  residuals where the original adds them (after the mid block, before the up path). No monkey patches.
* `DiffusionFeedback`: the "StableDiffusion" wrapper: VAE latents (fp32), noising, the per-pixel
  eps-prediction loss, the masked sniffer loss and classifier-free-guided DDPM generation.

Written against diffusers 0.42 (`UNet2DConditionModel`, `AutoencoderKL`, `DDPMScheduler`). The test
suite checks `run_unet` against the UNet's own `forward`, which guards against diffusers drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from deem.models.mmfs import MMFS
from deem.models.vision import get_abs_pos, sincos_pos_embed_2d

__all__ = [
    "SD21_BASE_SCHEDULER_CONFIG",
    "SD21_BASE_UNET_CONFIG",
    "SD21_BASE_VAE_CONFIG",
    "DiffusionConfig",
    "DiffusionFeedback",
    "MMFSBlock",
    "MMFSFeatures",
    "MMFSNet",
    "image_generation_loss",
    "mmfs_block_layout",
    "negative_prompt_embedding",
    "pack_mmfs_features",
    "remap_encoder_timesteps",
    "run_unet",
    "sniffer_loss",
]

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

# The published diffusers configs of stabilityai/stable-diffusion-2-1-base (unet/, vae/, scheduler/).
SD21_BASE_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
SD21_BASE_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# SD-2.1 ships a PNDM config; DEEM reads it into a DDPMScheduler (DDPM defaults for the other keys:
# "leading" timestep spacing, fixed_small variance).
SD21_BASE_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "trained_betas": None,
}

SNIFFER_STRIDES = (4, 8, 16, 32)


def sniffer_feature_shapes(sniffer_image_size: int, strides: Sequence[int] = SNIFFER_STRIDES) -> tuple[int, ...]:
    """Side lengths of the sniffer's multi-scale maps (ConvNeXt strides 4/8/16/32): 256 px ->
    (64, 32, 16, 8), 448 px -> (112, 56, 28, 14)."""
    for s in strides:
        if sniffer_image_size % s:
            raise ValueError(f"sniffer_image_size {sniffer_image_size} is not divisible by the stride {s}")
    return tuple(sniffer_image_size // s for s in strides)


@dataclass
class DiffusionConfig:
    """Everything needed to build `DiffusionFeedback`.

    Either `pretrained_path` (a local diffusers Stable Diffusion directory with `unet/`, `vae/` and
    `scheduler/` subfolders, loaded offline from safetensors) or the three config dicts (random
    initialisation; tiny test models, meta-device construction).

    `mmfs_spatial_shapes` are the side lengths of the feature maps the MMFSNet will actually receive
    (the original hard-codes (64, 32, 16, 8), spec §14 bug 7); they set the MMFS offset scale ratios.
    """

    pretrained_path: str | None = None
    variant: str | None = None  # e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors
    unet_config: dict[str, Any] | None = None
    vae_config: dict[str, Any] | None = None
    scheduler_config: dict[str, Any] | None = None
    image_size: int = 512
    unet_gradient_checkpointing: bool = True
    vae_batch_size: int = 32  # VAE encode/decode mini-batch
    generation_batch_size: int = 32
    # MMFSNet
    mmfs_feature_dim: int = 1024  # channels of the sniffer feature maps (feat_dim / d_value)
    mmfs_attn_dim: int = 1024  # MMFS d_model (value width = attn_dim * deform_ratio)
    mmfs_heads: int = 16
    mmfs_points: int = 8
    mmfs_levels: int = 4
    mmfs_deform_ratio: float = 1.0
    mmfs_offset_init_magnitude: float = 1.0
    mmfs_max_num_image_per_seq: int = 10
    mmfs_spatial_shapes: tuple[int, ...] = field(default_factory=lambda: sniffer_feature_shapes(256))
    mmfs_gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        dicts = (self.unet_config, self.vae_config, self.scheduler_config)
        if self.pretrained_path is not None and any(d is not None for d in dicts):
            raise ValueError("DiffusionConfig: give either pretrained_path or the unet/vae/scheduler config dicts")
        if self.pretrained_path is None and any(d is None for d in dicts):
            raise ValueError("DiffusionConfig: without pretrained_path, unet_config, vae_config and scheduler_config "
                             "are all required")
        self.mmfs_spatial_shapes = tuple(int(s) for s in self.mmfs_spatial_shapes)
        if len(self.mmfs_spatial_shapes) != self.mmfs_levels:
            raise ValueError(f"DiffusionConfig: mmfs_spatial_shapes {self.mmfs_spatial_shapes} must have "
                             f"mmfs_levels={self.mmfs_levels} entries")

    @classmethod
    def sd21_base(cls, path: str | Path | None = None, *, sniffer_image_size: int = 256,
                  **overrides: Any) -> DiffusionConfig:
        """Stable Diffusion 2.1-base at 512 px with the DEEM MMFSNet. `path`: a local diffusers
        directory (weights loaded offline); None: the published configs, randomly initialised."""
        kw: dict[str, Any] = dict(image_size=512, mmfs_spatial_shapes=sniffer_feature_shapes(sniffer_image_size))
        if path is None:
            kw.update(unet_config=dict(SD21_BASE_UNET_CONFIG), vae_config=dict(SD21_BASE_VAE_CONFIG),
                      scheduler_config=dict(SD21_BASE_SCHEDULER_CONFIG))
        else:
            kw.update(pretrained_path=str(path))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides: Any) -> DiffusionConfig:
        """A CPU-sized model with the same structure: 32 px images, a 2-block VAE (16x16 latents),
        a 2-block UNet, 32-channel sniffer features of sides (8, 4, 2, 1)."""
        kw: dict[str, Any] = dict(
            unet_config=dict(
                sample_size=16, in_channels=4, out_channels=4, block_out_channels=[8, 16], layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16,
                norm_num_groups=4, attention_head_dim=2, use_linear_projection=True),
            vae_config=dict(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                norm_num_groups=4, sample_size=32),
            scheduler_config=dict(SD21_BASE_SCHEDULER_CONFIG),
            image_size=32, mmfs_feature_dim=32, mmfs_attn_dim=32, mmfs_spatial_shapes=sniffer_feature_shapes(32),
            vae_batch_size=2, generation_batch_size=4)
        kw.update(overrides)
        return cls(**kw)


# --------------------------------------------------------------------------------------------------
# MMFSNet
# --------------------------------------------------------------------------------------------------

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
    values the LayerNorm'ed sniffer features; output through a zero-initialised 1x1 conv.
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
        attn_dim: int = 1024,
        num_heads: int = 16,
        n_points: int = 8,
        n_levels: int = 4,
        deform_ratio: float = 1.0,
        offset_init_magnitude: float = 1.0,
        max_num_image_per_seq: int = 10,
        spatial_shapes: Sequence[int] = (64, 32, 16, 8),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.spatial_shapes = tuple(int(s) for s in spatial_shapes)
        skips, (mid_ch, mid_side) = mmfs_block_layout(block_out_channels, layers_per_block, latent_size)
        self.layout = [*skips, (mid_ch, mid_side)]

        def block(ch: int, side: int) -> MMFSBlock:
            return MMFSBlock(
                query_dim=ch, feat_dim=feat_dim, attn_dim=attn_dim, num_heads=num_heads, n_points=n_points,
                n_levels=n_levels, deform_ratio=deform_ratio, grid_size=latent_size,
                offset_init_magnitude=offset_init_magnitude, max_num_image_per_seq=max_num_image_per_seq,
                spatial_shapes=self.spatial_shapes, base_spatial_shape=side,
                gradient_checkpointing=gradient_checkpointing)

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
                f"sniffer's actual feature sizes")
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
        new_res = tuple(r + blk(r, feats, mask) for r, blk in zip(down_block_res_samples, self.mmfs_down_blocks))
        return new_res, mid_sample + self.mmfs_mid_block(mid_sample, feats, mask)


# --------------------------------------------------------------------------------------------------
# UNet execution
# --------------------------------------------------------------------------------------------------

def _check_unet_supported(unet: UNet2DConditionModel) -> None:
    cfg = unet.config
    unsupported = {
        "class_embed_type / num_class_embeds": unet.class_embedding is not None,
        "addition_embed_type": cfg.addition_embed_type is not None,
        "encoder_hid_dim_type": getattr(unet, "encoder_hid_proj", None) is not None,
        "time_cond_proj_dim": cfg.time_cond_proj_dim is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"run_unet supports text-conditioned UNets (SD 1.x/2.x); this UNet uses {', '.join(bad)}")


def _timestep_tensor(timesteps: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(timesteps):
        dtype = torch.float64 if isinstance(timesteps, float) else torch.int64
        if sample.device.type == "mps" and dtype == torch.float64:
            dtype = torch.float32
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif timesteps.dim() == 0:
        timesteps = timesteps[None].to(sample.device)
    return timesteps.expand(sample.shape[0])


def run_unet(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    mmfs: MMFSNet | None = None,
    mmfs_features: Sequence[torch.Tensor] | MMFSFeatures | None = None,
    mmfs_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's prediction for `sample` [B, C, h, w] at `timesteps`, computed with the UNet's own
    sub-modules; the MMFSNet residuals are added to the skip tensors and the mid-block output after
    the mid block, before the up path (exactly like ControlNet residuals). With `mmfs` or
    `mmfs_features` None no residual is added and the result equals `unet(...).sample`."""
    _check_unet_supported(unet)
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    t_emb = unet.time_proj(_timestep_tensor(timesteps, sample)).to(dtype=sample.dtype)
    emb = unet.time_embedding(t_emb)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    h = unet.conv_in(sample)
    skips: list[torch.Tensor] = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)

    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = unet.mid_block(h, emb)

    if mmfs is not None and mmfs_features is not None:
        new_skips, h = mmfs(skips, h, mmfs_features, mmfs_mask)
        skips = list(new_skips)

    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        upsample_size = skips[-1].shape[2:] if (forward_upsample_size and i < len(unet.up_blocks) - 1) else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                      encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------

def remap_encoder_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """The "encoder"-mode remap t -> round(0.6 (t - 500) + 500), round half to even, as int64:
    [0, 999] -> [200, 799]. Integer inputs are mapped exactly (500 + 3(t-500)/5 is never a tie for
    integer t); floating inputs are rounded half-to-even."""
    if timesteps.is_floating_point():
        t = timesteps.double()
        return torch.round(500.0 + 3.0 * (t - 500.0) / 5.0).long()
    d = timesteps.long() - 500
    return 500 + torch.div(6 * d + 5, 10, rounding_mode="floor")


def latent_region_mask(region_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Image-space region mask [B, 1, H, W] -> binary latent mask [B, 1, h, w] (bilinear resize,
    align_corners=False, then > 0), float32."""
    if region_mask.dim() != 4 or region_mask.shape[1] != 1:
        raise ValueError(f"region_mask must be [B, 1, H, W], got {tuple(region_mask.shape)}")
    resized = F.interpolate(region_mask.float(), size=size, mode="bilinear", align_corners=False)
    return (resized > 0).float()


def sniffer_loss(per_pixel_mse: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The DEEM (sniffer) loss of spec §8.5: mean over (b, c, y, x) of ℓ · M_b · h·w / (Σ M_b + 1e-8),
    i.e. the mean of per-image masked means. `per_pixel_mse` [B, C, h, w]; `region_mask` [B, 1, H, W]
    in image space (None: the whole image, a plain mean)."""
    if per_pixel_mse.dim() != 4:
        raise ValueError(f"per_pixel_mse must be [B, C, h, w], got {tuple(per_pixel_mse.shape)}")
    loss = per_pixel_mse.float()
    if region_mask is None:
        return loss.mean()
    B, _, h, w = loss.shape
    if region_mask.shape[0] != B:
        raise ValueError(f"region_mask batch {region_mask.shape[0]} != per_pixel_mse batch {B}")
    m = latent_region_mask(region_mask.to(loss.device), (h, w))
    scale = (h * w) / (m.sum(dim=(1, 2, 3)) + 1e-8)
    return (loss * m * scale.view(B, 1, 1, 1)).mean()


def image_generation_loss(per_pixel_mse: torch.Tensor, sample_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spec §8.6: ℓ · mask_b, mean over all elements (not renormalised: masked-out images dilute the
    mean, as in the original). `sample_mask` [B] (is_cond · image_loss_mask)."""
    loss = per_pixel_mse.float()
    if sample_mask is None:
        return loss.mean()
    if sample_mask.shape != (loss.shape[0],):
        raise ValueError(f"sample_mask must be [{loss.shape[0]}], got {tuple(sample_mask.shape)}")
    return (loss * sample_mask.to(loss).view(-1, 1, 1, 1)).mean()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def _check_diffusers_dir(path: Path, variant: str | None) -> None:
    hint = "expected a diffusers Stable Diffusion directory with unet/, vae/ and scheduler/ subfolders"
    if not path.is_dir():
        raise FileNotFoundError(f"Stable Diffusion directory {path} does not exist ({hint})")
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    for sub in ("unet", "vae"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path}: missing subfolder {sub}/ ({hint})")
        if not (path / sub / "config.json").is_file():
            raise FileNotFoundError(f"{path}: missing {sub}/config.json ({hint})")
        weights = [path / sub / f"{stem}.safetensors", path / sub / f"{stem}.safetensors.index.json"]
        if not any(w.is_file() for w in weights):
            pickled = list((path / sub).glob("*.bin"))
            extra = (f"; found only pickled weights ({pickled[0].name}), which are not loaded: convert them to "
                     f"safetensors") if pickled else ""
            raise FileNotFoundError(f"{path}: missing {sub}/{stem}.safetensors{extra}")
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{path}: missing scheduler/scheduler_config.json ({hint})")


def _load_components(config: DiffusionConfig) -> tuple[UNet2DConditionModel, AutoencoderKL, DDPMScheduler]:
    if config.pretrained_path is None:
        unet = UNet2DConditionModel.from_config(config.unet_config)
        vae = AutoencoderKL.from_config(config.vae_config)
        with torch.device("cpu"):  # the schedule is plain data, also under a meta-device construction
            scheduler = DDPMScheduler.from_config(config.scheduler_config)
        return unet, vae.float(), scheduler
    path = Path(config.pretrained_path)
    _check_diffusers_dir(path, config.variant)
    common = dict(local_files_only=True, use_safetensors=True, variant=config.variant)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **common)
    with torch.device("cpu"):
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return unet, vae.float(), scheduler


@torch.no_grad()
def negative_prompt_embedding(path: str | Path, prompt: str = "", device: torch.device | str | None = None,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The SD text encoder's `last_hidden_state` for `prompt` (default the empty prompt), padded to
    the tokenizer's max length: the initial value of the learnable negative prompt embedding
    (spec §9.3, §12), [1, 77, 1024] for SD-2.1. Reads `tokenizer/` and `text_encoder/` of a local
    diffusers directory offline; the text encoder is not kept."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    for sub, needed in (("tokenizer", "tokenizer_config.json"), ("text_encoder", "config.json"),
                        ("text_encoder", "model.safetensors")):
        if not (path / sub / needed).is_file():
            raise FileNotFoundError(f"{path}: missing {sub}/{needed} (needed for the negative prompt embedding)")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                            use_safetensors=True).eval()
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    if device is not None:
        encoder.to(device)
    out = encoder(ids.to(encoder.device)).last_hidden_state
    return out.to(dtype).detach()


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------

def _check_batch(name: str, t: torch.Tensor, batch: int) -> None:
    if t.shape[0] != batch:
        raise ValueError(f"{name} has batch {t.shape[0]}, expected {batch}")


class DiffusionFeedback(nn.Module):
    """Frozen Stable Diffusion (UNet + VAE + DDPM schedule) with a trainable MMFSNet.

    Sub-modules: `unet` (diffusers UNet2DConditionModel; frozen unless `set_trainable(freeze_unet=False)`),
    `vae` (AutoencoderKL, always frozen and always fp32, also under `.to(dtype)`/`.half()`),
    `mmfs_module` (MMFSNet; `mmfs_net` is an alias). `scheduler` is the DDPMScheduler and
    `alphas_cumprod` its fp32 CPU schedule (neither is module state, so meta-device construction plus
    `to_empty` and a state-dict load leave them intact; `MMFSNet.reset_parameters` restores the
    sin-cos tables).
    """

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        unet, vae, scheduler = _load_components(config)
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if config.image_size % self.vae_scale_factor:
            raise ValueError(f"image_size {config.image_size} is not divisible by the VAE factor "
                             f"{self.vae_scale_factor}")
        self.latent_size = config.image_size // self.vae_scale_factor
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"UNet in_channels {unet.config.in_channels} != VAE latent_channels "
                             f"{vae.config.latent_channels}")
        _check_unet_supported(unet)
        self.mmfs_module = MMFSNet.for_unet(
            unet.config, self.latent_size, feat_dim=config.mmfs_feature_dim, attn_dim=config.mmfs_attn_dim,
            num_heads=config.mmfs_heads, n_points=config.mmfs_points, n_levels=config.mmfs_levels,
            deform_ratio=config.mmfs_deform_ratio, offset_init_magnitude=config.mmfs_offset_init_magnitude,
            max_num_image_per_seq=config.mmfs_max_num_image_per_seq, spatial_shapes=config.mmfs_spatial_shapes,
            gradient_checkpointing=config.mmfs_gradient_checkpointing)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self._schedule_cache: dict[torch.device, torch.Tensor] = {}
        if config.unet_gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.set_trainable()
        self.train()  # from_pretrained leaves its models in eval mode; one mode for all sub-modules

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> DiffusionFeedback:
        """Load SD 2.1-base from a local diffusers directory (`DiffusionConfig.sd21_base(path, ...)`)."""
        return cls(DiffusionConfig.sd21_base(path, **overrides))

    @property
    def mmfs_net(self) -> MMFSNet:
        return self.mmfs_module

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # ---------------------------------------------------------------- freezing / dtype
    def set_trainable(self, freeze_unet: bool = True) -> None:
        """VAE frozen; UNet frozen iff `freeze_unet` (the model's flag: `DeemConfig.freeze_dm`); MMFSNet
        trainable (except its frozen sin-cos tables and ignore tokens)."""
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(not freeze_unet)
        self.mmfs_module.set_trainable()

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._schedule_cache:
            self._schedule_cache[device] = self.alphas_cumprod.to(device)
        return self._schedule_cache[device]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Like nn.Module._apply, but dtype conversions skip the VAE: it stays fp32 (device moves
        still apply)."""

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        if recurse:
            for name, child in self.named_children():
                child._apply(keep_dtype if name == "vae" else fn)
        return super()._apply(fn, recurse=False)

    # ---------------------------------------------------------------- latents
    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}] in [0, 1], got {tuple(images.shape)}")

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents [B, 4, h, w] fp32: 2x - 1 (out of place), VAE in
        fp32 in mini-batches, a posterior sample times the VAE scaling factor."""
        self._check_images(images)
        if next(self.vae.parameters()).dtype != torch.float32:
            raise RuntimeError("DiffusionFeedback: the VAE must stay in float32 (it was cast to "
                               f"{next(self.vae.parameters()).dtype} outside DiffusionFeedback)")
        x = images.float() * 2.0 - 1.0
        bs = max(1, self.config.vae_batch_size)
        latents = [self.vae.encode(x[i:i + bs]).latent_dist.sample(generator) for i in range(0, x.shape[0], bs)]
        return torch.cat(latents) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (VAE in fp32, clamp(x/2 + 0.5))."""
        z = latents.float() / self.vae.config.scaling_factor
        bs = max(1, self.config.vae_batch_size)
        x = torch.cat([self.vae.decode(z[i:i + bs]).sample for i in range(0, z.shape[0], bs)])
        return (x / 2 + 0.5).clamp(0, 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε, in fp32."""
        ac = self._alphas_cumprod_on(timesteps.device)[timesteps].view(-1, 1, 1, 1)
        return ac.sqrt() * latents.float() + (1 - ac).sqrt() * noise.float()

    # ---------------------------------------------------------------- training loss
    def loss(
        self,
        images: torch.Tensor,
        cond: torch.Tensor,
        mmfs_features: Sequence[torch.Tensor] | MMFSFeatures | None = None,
        mmfs_mask: torch.Tensor | None = None,
        mode: str = "encoder",
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Element-wise diffusion loss [B, 4, h, w] in fp32 (spec §8.1).

        Args:
            images: [B, 3, image_size, image_size] in [0, 1] (not modified).
            cond: [B, L, cross_attention_dim] UNet cross-attention conditioning.
            mmfs_features, mmfs_mask: MMFSNet context ([B, n_img, C, H_l, W_l] per level or packed,
                and [B, n_img]); features None: no MMFS residuals.
            mode: "encoder" (sniffer loss: t remapped into [200, 799]) or "decoder" (image generation).
            timesteps: [B] int; None: uniform in [0, num_train_timesteps).
            generator: draws, in order, the VAE posterior samples, the noise and the timesteps.
        """
        if mode not in ("encoder", "decoder"):
            raise ValueError(f"mode must be 'encoder' or 'decoder', got {mode!r}")
        B = images.shape[0]
        ctx = self.unet.config.cross_attention_dim
        if cond.dim() != 3 or cond.shape[0] != B or cond.shape[2] != ctx:
            raise ValueError(f"cond must be [{B}, L, {ctx}], got {tuple(cond.shape)}")
        latents = self.encode_latents(images, generator)
        device = latents.device
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=torch.float32)
        if timesteps is None:
            gen_device = generator.device if generator is not None else device
            timesteps = torch.randint(0, self.num_train_timesteps, (B,), generator=generator, device=gen_device)
        else:
            if timesteps.dim() == 0:
                timesteps = timesteps.expand(B)
            if timesteps.shape != (B,):
                raise ValueError(f"timesteps must be [{B}], got {tuple(timesteps.shape)}")
            if timesteps.min() < 0 or timesteps.max() >= self.num_train_timesteps:
                raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps})")
        timesteps = timesteps.to(device)
        timesteps = remap_encoder_timesteps(timesteps) if mode == "encoder" else timesteps.long()
        noisy = self.add_noise(latents, noise, timesteps)

        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            ac = self._alphas_cumprod_on(timesteps.device)[timesteps].view(-1, 1, 1, 1)
            target = ac.sqrt() * noise - (1 - ac).sqrt() * latents
        else:
            raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")

        dtype = self.unet.dtype
        if mmfs_features is not None:
            mmfs_features = pack_mmfs_features(mmfs_features)
            _check_batch("mmfs_features", mmfs_features.flat, B)
        pred = run_unet(self.unet, noisy.to(dtype), timesteps, cond.to(dtype), self.mmfs_module, mmfs_features,
                        mmfs_mask)
        return (pred.float() - target.float()) ** 2

    forward = loss

    @staticmethod
    def sniffer_loss(per_pixel_mse: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
        """See module-level `sniffer_loss`."""
        return sniffer_loss(per_pixel_mse, region_mask)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        cond: torch.Tensor,
        negative_cond: torch.Tensor | None = None,
        mmfs_features: Sequence[torch.Tensor] | MMFSFeatures | None = None,
        mmfs_mask: torch.Tensor | None = None,
        num_inference_steps: int = 250,
        guidance_scale: float = 3.5,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral DDPM sampling ("leading" spacing from the scheduler config) with classifier-free
        guidance ε = ε_u + s(ε_c − ε_u); returns images [B, 3, H, W] in [0, 1] (fp32).

        `negative_cond` [1 or B, L, D] (the learnable negative prompt); None: no guidance, the
        conditional prediction only. The MMFS context is the same for both halves. Deterministic
        for a given `generator` (which draws the initial latents and each step's noise, mini-batch
        after mini-batch).
        """
        B = cond.shape[0]
        ctx = self.unet.config.cross_attention_dim
        if cond.dim() != 3 or cond.shape[2] != ctx:
            raise ValueError(f"cond must be [B, L, {ctx}], got {tuple(cond.shape)}")
        if negative_cond is not None:
            if negative_cond.dim() != 3 or negative_cond.shape[0] not in (1, B) or \
                    negative_cond.shape[1:] != cond.shape[1:]:
                raise ValueError(f"negative_cond must be [1 or {B}, {cond.shape[1]}, {ctx}], "
                                 f"got {tuple(negative_cond.shape)}")
            negative_cond = negative_cond.expand(B, -1, -1)
        if mmfs_features is not None:
            mmfs_features = pack_mmfs_features(mmfs_features)
            _check_batch("mmfs_features", mmfs_features.flat, B)
            if mmfs_mask is None:
                mmfs_mask = torch.ones(B, mmfs_features.flat.shape[1], dtype=torch.long, device=cond.device)
        if not 0 < num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}]")

        with torch.device("cpu"):
            scheduler = DDPMScheduler.from_config(self.scheduler.config)  # own state per call
        device, dtype = cond.device, self.unet.dtype
        scheduler.set_timesteps(num_inference_steps, device=device)
        shape_tail = (self.unet.config.in_channels, self.latent_size, self.latent_size)
        bs = max(1, self.config.generation_batch_size)
        images = []
        for s in range(0, B, bs):
            c = cond[s:s + bs].to(dtype)
            n = c.shape[0]
            feats = mask = None
            if mmfs_features is not None:
                feats, mask = mmfs_features.slice(s, s + n), mmfs_mask[s:s + n]
            if negative_cond is not None:
                c = torch.cat([negative_cond[s:s + n].to(dtype), c])
                if feats is not None:
                    feats, mask = feats.repeat(2), torch.cat([mask, mask])
            latents = randn_tensor((n, *shape_tail), generator=generator, device=device, dtype=torch.float32)
            latents = latents * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x = torch.cat([latents, latents]) if negative_cond is not None else latents
                x = scheduler.scale_model_input(x, t)
                eps = run_unet(self.unet, x.to(dtype), t, c, self.mmfs_module, feats, mask).float()
                if negative_cond is not None:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
            images.append(self.decode_latents(latents))
        return torch.cat(images)
