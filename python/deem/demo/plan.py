"""What `deem demo` runs: the sizes and steps of every stage, and the demo model's configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from deem.models import DeemConfig

ENCODER_SIZE = 64  # the image encoder's input side (the data config's `resolution`)
DIFFUSION_SIZE = 16  # the diffusion view's side (`resolution_dec`)


@dataclass
class DemoPlan:
    """Steps and sizes of every stage (the default fits 10 minutes on 2 CPU cores)."""

    num_train_images: int = 1000
    num_test_images: int = 100
    pretraining_images: int = 10000  # fresh scenes the stand-ins for the pretrained components are fitted on
    vae_steps: int = 300
    unet_steps: int = 600
    encoder_steps: int = 1200
    components_steps: int = 300
    stage1_steps: int = 150
    stage2_steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    generated_images: int = 40  # test captions drawn by each variant's image decoder (colour check)
    extra: dict[str, Any] = field(default_factory=dict)

    STEP_FIELDS = ("vae_steps", "unet_steps", "encoder_steps", "components_steps", "stage1_steps", "stage2_steps")

    @classmethod
    def quick(cls) -> DemoPlan:
        """A few steps of everything (CI): checks the pipeline, not the results."""
        return cls(num_train_images=60, num_test_images=8, pretraining_images=64, vae_steps=3, unet_steps=3,
                   encoder_steps=3, components_steps=4, stage1_steps=3, stage2_steps=4, batch_size=4,
                   generated_images=4)

    def scaled(self, factor: float) -> DemoPlan:
        """Every stage's steps times `factor` (at least one)."""
        return dataclasses.replace(self, **{k: max(1, round(getattr(self, k) * factor)) for k in self.STEP_FIELDS})

    def with_seed(self, seed: int) -> DemoPlan:
        return dataclasses.replace(self, seed=seed)


def demo_model_config(tiny_config: DeemConfig) -> DeemConfig:
    """The demo's model: the tiny preset (its tokenizer's ids, 64 px image encoder) with a diffusion side that can
    learn to draw the world in CPU seconds: 16 px images (the data config's `resolution_dec`), a 2-block VAE
    (8 x 8 x 4 latents), a [16, 32]-channel UNet with 32-wide cross-attention, and an image-decoder Q-Former
    of that width."""
    cfg = DeemConfig.from_dict(tiny_config.to_dict())
    # the tiny preset's 8-channel stem cannot tell the world's five shape kinds apart at 64 px (the visual
    # tokens carried a shape's kind in 34 % of test scenes after the pre-fit); twice its widths: 65 %
    cfg.image_encoder = {**cfg.image_encoder, "dims": [16, 32, 64, 128]}
    d = dict(cfg.diffusion)
    d["image_size"] = DIFFUSION_SIZE
    d["vae_config"] = {**d["vae_config"], "block_out_channels": [16, 32], "sample_size": DIFFUSION_SIZE}
    d["unet_config"] = {
        **d["unet_config"], "sample_size": DIFFUSION_SIZE // 2, "block_out_channels": [16, 32],
        "cross_attention_dim": 32, "attention_head_dim": 4,
    }
    d["vae_batch_size"] = 64
    d["generation_batch_size"] = 64
    d["unet_gradient_checkpointing"] = False
    d["mmfs_gradient_checkpointing"] = False
    cfg.diffusion = d
    # BLIP-2's 0.02 initialisation leaves this narrow Q-Former's output almost independent of the LLM context it
    # reads (the drawn image ignored its caption); 0.2, as the tiny visual tokenizer's Q-Former uses
    cfg.image_decoder_resampler = {**cfg.image_decoder_resampler, "hidden": 32, "heads": 4, "intermediate": 64,
                                   "initializer_range": 0.2}
    cfg._validate()
    return cfg
