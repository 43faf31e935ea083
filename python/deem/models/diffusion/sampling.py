"""Image sampling with the diffusion side (spec/model.md §9.4): ancestral DDPM with classifier-free guidance, a
pipeline over `DiffusionFeedback`'s models the way diffusers' Stable Diffusion pipeline runs over its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from deem.models.diffusion.feedback import DiffusionFeedback, check_batch
from deem.models.diffusion.mmfs_net import MMFSFeatures, pack_mmfs_features
from deem.models.diffusion.unet import run_unet


def _check_inputs(model: DiffusionFeedback, cond: torch.Tensor, negative_cond: torch.Tensor | None,
                  num_inference_steps: int) -> None:
    B = cond.shape[0]
    ctx = model.unet.config.cross_attention_dim
    if cond.dim() != 3 or cond.shape[2] != ctx:
        raise ValueError(f"cond must be [B, L, {ctx}], got {tuple(cond.shape)}")
    if negative_cond is not None and (negative_cond.dim() != 3 or negative_cond.shape[0] not in (1, B)
                                      or negative_cond.shape[1:] != cond.shape[1:]):
        raise ValueError(f"negative_cond must be [1 or {B}, {cond.shape[1]}, {ctx}], "
                         f"got {tuple(negative_cond.shape)}")
    if not 0 < num_inference_steps <= model.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {model.num_train_timesteps}]")


@torch.no_grad()
def sample_images(
    model: DiffusionFeedback,
    cond: torch.Tensor,
    negative_cond: torch.Tensor | None = None,
    mmfs_features: Sequence[torch.Tensor] | MMFSFeatures | None = None,
    mmfs_mask: torch.Tensor | None = None,
    num_inference_steps: int = 250,
    guidance_scale: float = 3.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling ("leading" spacing from the scheduler config) with classifier-free guidance
    ε = ε_u + s(ε_c − ε_u); returns images [B, 3, H, W] in [0, 1] (fp32).

    `cond` [B, L, D] is the UNet conditioning; `negative_cond` [1 or B, L, D] the learnable negative prompt
    (None: no guidance, the conditional prediction only). The MMFS context is the same for both halves.
    Deterministic for a given `generator` (which draws the initial latents and each step's noise, mini-batch
    after mini-batch of `config.generation_batch_size`). The model's own scheduler is not changed.
    """
    # 1. inputs
    _check_inputs(model, cond, negative_cond, num_inference_steps)
    B = cond.shape[0]
    if negative_cond is not None:
        negative_cond = negative_cond.expand(B, -1, -1)
    if mmfs_features is not None:
        mmfs_features = pack_mmfs_features(mmfs_features)
        check_batch("mmfs_features", mmfs_features.flat, B)
        if mmfs_mask is None:
            mmfs_mask = torch.ones(B, mmfs_features.flat.shape[1], dtype=torch.long, device=cond.device)

    # 2. timesteps, on a scheduler of this call's own
    with torch.device("cpu"):
        scheduler = DDPMScheduler.from_config(model.scheduler.config)
    device, dtype = cond.device, model.unet.dtype
    scheduler.set_timesteps(num_inference_steps, device=device)
    shape_tail = (model.unet.config.in_channels, model.latent_size, model.latent_size)
    guided = negative_cond is not None

    bs = max(1, model.config.generation_batch_size)
    images = []
    for s in range(0, B, bs):
        # 3. this mini-batch's conditioning: [negative; positive] under guidance, the same visual context twice
        c = cond[s:s + bs].to(dtype)
        n = c.shape[0]
        feats = mask = None
        if mmfs_features is not None:
            feats, mask = mmfs_features.slice(s, s + n), mmfs_mask[s:s + n]
        if guided:
            c = torch.cat([negative_cond[s:s + n].to(dtype), c])
            if feats is not None:
                feats, mask = feats.repeat(2), torch.cat([mask, mask])
        # 4. initial latents
        latents = randn_tensor((n, *shape_tail), generator=generator, device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        # 5. denoising loop
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t)
            eps = run_unet(model.unet, x.to(dtype), t, c, model.mmfs_module, feats, mask).float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
        # 6. decode
        images.append(model.decode_latents(latents))
    return torch.cat(images)
