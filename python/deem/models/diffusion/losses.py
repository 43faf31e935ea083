"""The diffusion-feedback losses (spec/model.md §8.4-8.6): the timestep remap of the feedback loss, its
region-masked mean over latent pixels, and the image-generation loss's mean over the trained images."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deem.ops import location_dtype, masked_mse
from deem.ops.masked_mse import EPS


def remap_feedback_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """The feedback-mode remap t -> round(0.6 (t - 500) + 500), round half to even, as int64:
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


def feedback_loss(per_pixel_mse: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The DEEM feedback loss of spec §8.5: mean over (b, c, y, x) of ℓ · M_b · h·w / (Σ M_b + 1e-8),
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


def masked_feedback_loss(pred: torch.Tensor, target: torch.Tensor,
                         region_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The feedback loss of spec §8.5 from the prediction and the target through the fused `deem::masked_mse` (one
    op forward and backward, no per-pixel loss tensor): the same value as `feedback_loss((pred - target)²,
    region_mask)`. `pred` [B, C, h, w] (its grad is in its dtype), `target` likewise; `region_mask` [B, 1, H, W]
    in image space (None: the whole image, a plain mean). float32 result (float64 for float64 pred)."""
    if pred.dim() != 4:
        raise ValueError(f"pred must be [B, C, h, w], got {tuple(pred.shape)}")
    B, _, h, w = pred.shape
    if region_mask is None:  # the op scales a maskless mean by P / (P + eps): undo it, a plain mean as before
        return masked_mse(pred, target.to(location_dtype(pred.dtype)), None) * ((h * w + EPS) / (h * w))
    if region_mask.shape[0] != B:
        raise ValueError(f"region_mask batch {region_mask.shape[0]} != pred batch {B}")
    mask = latent_region_mask(region_mask.to(pred.device), (h, w)) > 0
    return masked_mse(pred, target.to(location_dtype(pred.dtype)), mask)


def generation_loss(per_pixel_mse: torch.Tensor, sample_mask: torch.Tensor) -> torch.Tensor:
    """The image-generation loss (spec/model.md §8.6): each image's mean over (c, y, x), averaged over the images
    `sample_mask` [B] trains on (is_cond · image_loss_mask). The original averages over all images after masking,
    so masked-out images dilute it (spec/model.md §14, bug 6); here they do not."""
    if per_pixel_mse.dim() != 4:
        raise ValueError(f"per_pixel_mse must be [B, C, h, w], got {tuple(per_pixel_mse.shape)}")
    if sample_mask.shape != (per_pixel_mse.shape[0],):
        raise ValueError(f"sample_mask must be [{per_pixel_mse.shape[0]}], got {tuple(sample_mask.shape)}")
    per_image = per_pixel_mse.float().mean(dim=(1, 2, 3))
    return (per_image * sample_mask).sum() / sample_mask.sum().clamp_min(1.0)
