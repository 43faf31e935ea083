"""The diffusion side of DEEM (spec/model.md §8, §9.3-9.4), laid out the way diffusers separates models,
schedulers and pipelines:

* `config`: `DiffusionConfig` and the published SD 2.1-base configs;
* `mmfs_net`: `MMFSNet`, the side network of deformable cross-attention from the UNet to the image features;
* `unet`: `run_unet`, the UNet's own sub-modules plus the MMFSNet residuals;
* `feedback`: `DiffusionFeedback`, the frozen SD (UNet, VAE, DDPM scheduler) with the MMFSNet, and its
  per-pixel denoising error;
* `losses`: the feedback loss and the image-generation loss over that error;
* `sampling`: `sample_images`, classifier-free-guided DDPM sampling (a pipeline over the models);
* `loading`: the diffusers directory and the negative-prompt embedding of the SD text encoder.
"""

from deem.models.diffusion.config import (
    SD21_BASE_SCHEDULER_CONFIG,
    SD21_BASE_UNET_CONFIG,
    SD21_BASE_VAE_CONFIG,
    DiffusionConfig,
    image_encoder_feature_shapes,
)
from deem.models.diffusion.feedback import DiffusionFeedback
from deem.models.diffusion.loading import negative_prompt_embedding
from deem.models.diffusion.losses import feedback_loss, generation_loss, latent_region_mask, remap_feedback_timesteps
from deem.models.diffusion.mmfs_net import MMFSBlock, MMFSFeatures, MMFSNet, mmfs_block_layout, pack_mmfs_features
from deem.models.diffusion.sampling import sample_images
from deem.models.diffusion.unet import run_unet

__all__ = [
    "SD21_BASE_SCHEDULER_CONFIG",
    "SD21_BASE_UNET_CONFIG",
    "SD21_BASE_VAE_CONFIG",
    "DiffusionConfig",
    "DiffusionFeedback",
    "MMFSBlock",
    "MMFSFeatures",
    "MMFSNet",
    "feedback_loss",
    "generation_loss",
    "image_encoder_feature_shapes",
    "latent_region_mask",
    "mmfs_block_layout",
    "negative_prompt_embedding",
    "pack_mmfs_features",
    "remap_feedback_timesteps",
    "run_unet",
    "sample_images",
]
