"""How to build the diffusion side (spec/model.md §8): the published Stable Diffusion 2.1-base configs, the
feature sizes the image encoder hands to the MMFSNet, and `DiffusionConfig` with its 7B and tiny presets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

IMAGE_ENCODER_STRIDES = (4, 8, 16, 32)


def image_encoder_feature_shapes(encoder_image_size: int,
                                 strides: Sequence[int] = IMAGE_ENCODER_STRIDES) -> tuple[int, ...]:
    """Side lengths of the image encoder's multi-scale maps (ConvNeXt strides 4/8/16/32): 256 px ->
    (64, 32, 16, 8), 448 px -> (112, 56, 28, 14)."""
    for s in strides:
        if encoder_image_size % s:
            raise ValueError(f"encoder_image_size {encoder_image_size} is not divisible by the stride {s}")
    return tuple(encoder_image_size // s for s in strides)


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
    mmfs_feature_dim: int = 1024  # channels of the image encoder feature maps (feat_dim / d_value)
    mmfs_attn_dim: int = 1024  # MMFS d_model (value width = attn_dim * deform_ratio)
    mmfs_heads: int = 16
    mmfs_points: int = 8
    mmfs_levels: int = 4
    mmfs_deform_ratio: float = 1.0
    mmfs_offset_init_magnitude: float = 1.0
    mmfs_max_num_image_per_seq: int = 10
    mmfs_spatial_shapes: tuple[int, ...] = field(default_factory=lambda: image_encoder_feature_shapes(256))
    mmfs_gradient_checkpointing: bool = True
    mmfs_fused_features: bool = False  # MMFSNet's fused feature path (fused_features.py); same function and params

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
    def sd21_base(cls, path: str | Path | None = None, *, encoder_image_size: int = 256,
                  **overrides: Any) -> DiffusionConfig:
        """Stable Diffusion 2.1-base at 512 px with the DEEM MMFSNet. `path`: a local diffusers
        directory (weights loaded offline); None: the published configs, randomly initialised."""
        kw: dict[str, Any] = dict(image_size=512, mmfs_spatial_shapes=image_encoder_feature_shapes(encoder_image_size))
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
        a 2-block UNet, 32-channel image-encoder features of sides (8, 4, 2, 1)."""
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
            image_size=32, mmfs_feature_dim=32, mmfs_attn_dim=32, mmfs_spatial_shapes=image_encoder_feature_shapes(32),
            vae_batch_size=2, generation_batch_size=4)
        kw.update(overrides)
        return cls(**kw)

