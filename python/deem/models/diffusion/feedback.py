"""`DiffusionFeedback` (spec/model.md §8): the frozen Stable Diffusion 2.1 (UNet + VAE + DDPM schedule) with the
trainable MMFSNet; VAE latents in fp32, noising with the scheduler, and the per-pixel denoising error that both
the feedback loss and the image-generation loss reduce (:mod:`deem.models.diffusion.losses`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from deem.models.diffusion.config import DiffusionConfig
from deem.models.diffusion.loading import load_components
from deem.models.diffusion.losses import masked_feedback_loss, remap_feedback_timesteps
from deem.models.diffusion.mmfs_net import MMFSFeatures, MMFSNet, pack_mmfs_features
from deem.models.diffusion.unet import check_unet_supported, run_unet


def check_batch(name: str, t: torch.Tensor, batch: int) -> None:
    if t.shape[0] != batch:
        raise ValueError(f"{name} has batch {t.shape[0]}, expected {batch}")


class DiffusionFeedback(nn.Module):
    """Frozen Stable Diffusion (UNet + VAE + DDPM schedule) with a trainable MMFSNet.

    Sub-modules: `unet` (diffusers UNet2DConditionModel; frozen unless `set_trainable(freeze_unet=False)`),
    `vae` (AutoencoderKL, always frozen and always fp32, also under `.to(dtype)`/`.half()`),
    `mmfs_module` (MMFSNet). `scheduler` is the DDPMScheduler, built on the CPU: it is not module state, so
    meta-device construction plus `to_empty` and a state-dict load leave it intact
    (`MMFSNet.reset_parameters` restores the sin-cos tables). Sampling lives in
    :func:`deem.models.diffusion.sampling.sample_images`, as diffusers keeps it in pipelines.
    """

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        unet, vae, scheduler = load_components(config)
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
        check_unet_supported(unet)
        self.mmfs_module = MMFSNet.for_unet(
            unet.config, self.latent_size, feat_dim=config.mmfs_feature_dim, attn_dim=config.mmfs_attn_dim,
            num_heads=config.mmfs_heads, n_points=config.mmfs_points, n_levels=config.mmfs_levels,
            deform_ratio=config.mmfs_deform_ratio, offset_init_magnitude=config.mmfs_offset_init_magnitude,
            max_num_image_per_seq=config.mmfs_max_num_image_per_seq, spatial_shapes=config.mmfs_spatial_shapes,
            gradient_checkpointing=config.mmfs_gradient_checkpointing, fused_features=config.mmfs_fused_features)
        if config.unet_gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.set_trainable()
        self.train()  # from_pretrained leaves its models in eval mode; one mode for all sub-modules

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> DiffusionFeedback:
        """Load SD 2.1-base from a local diffusers directory (`DiffusionConfig.sd21_base(path, ...)`)."""
        return cls(DiffusionConfig.sd21_base(path, **overrides))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The schedule's ᾱ_t [num_train_timesteps], fp32 on the CPU."""
        return self.scheduler.alphas_cumprod.to("cpu", torch.float32)

    # ---------------------------------------------------------------- freezing / dtype
    def set_trainable(self, freeze_unet: bool = True) -> None:
        """VAE frozen; UNet frozen iff `freeze_unet` (the model's flag: `DeemConfig.freeze_unet`); MMFSNet
        trainable (except its frozen sin-cos tables and ignore tokens)."""
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(not freeze_unet)
        self.mmfs_module.set_trainable()

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

    # ---------------------------------------------------------------- training loss
    def loss(
        self,
        images: torch.Tensor,
        cond: torch.Tensor,
        mmfs_features: Sequence[torch.Tensor] | MMFSFeatures | None = None,
        mmfs_mask: torch.Tensor | None = None,
        mode: str = "feedback",
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Element-wise diffusion loss [B, 4, h, w] in fp32 (spec §8.1); arguments as `prediction`."""
        pred, target = self.prediction(images, cond, mmfs_features, mmfs_mask, mode, timesteps, generator)
        return (pred.float() - target.float()) ** 2

    def feedback_loss(
        self,
        images: torch.Tensor,
        cond: torch.Tensor,
        mmfs_features: Sequence[torch.Tensor] | MMFSFeatures | None = None,
        mmfs_mask: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The feedback loss of spec §8.5 (a float32 scalar): the region-masked, area-renormalised denoising MSE
        through the fused `deem::masked_mse`, never materialising the per-pixel loss. `region_mask`
        [B, 1, H, W] in image space (None: the whole image); the other arguments as `prediction`, mode "feedback"."""
        pred, target = self.prediction(images, cond, mmfs_features, mmfs_mask, "feedback", timesteps, generator)
        return masked_feedback_loss(pred, target, region_mask).float()

    def prediction(
        self,
        images: torch.Tensor,
        cond: torch.Tensor,
        mmfs_features: Sequence[torch.Tensor] | MMFSFeatures | None = None,
        mmfs_mask: torch.Tensor | None = None,
        mode: str = "feedback",
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's prediction (in the UNet dtype) and its fp32 target, [B, 4, h, w] each (spec §8.1); the VAE
        encodes each image once.

        Args:
            images: [B, 3, image_size, image_size] in [0, 1] (not modified).
            cond: [B, L, cross_attention_dim] UNet cross-attention conditioning.
            mmfs_features, mmfs_mask: MMFSNet context ([B, n_img, C, H_l, W_l] per level or packed,
                and [B, n_img]); features None: no MMFS residuals.
            mode: "feedback" (the feedback loss: t remapped into [200, 799]) or "generation" (image generation).
            timesteps: [B] int; None: uniform in [0, num_train_timesteps).
            generator: draws, in order, the VAE posterior samples, the noise and the timesteps.
        """
        if mode not in ("feedback", "generation"):
            raise ValueError(f"mode must be 'feedback' or 'generation', got {mode!r}")
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
        timesteps = remap_feedback_timesteps(timesteps) if mode == "feedback" else timesteps.long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)  # z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε

        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")

        dtype = self.unet.dtype
        if mmfs_features is not None:
            mmfs_features = pack_mmfs_features(mmfs_features)
            check_batch("mmfs_features", mmfs_features.flat, B)
        pred = run_unet(self.unet, noisy.to(dtype), timesteps, cond.to(dtype), self.mmfs_module, mmfs_features,
                        mmfs_mask)
        return pred, target
