"""The visual tokenizer (spec/model.md §3): image encoder → position-augmented tokens (patches outside a region mask
zeroed) → Q-Former → image embeddings for the LLM (`proj_t`) and conditioning for the diffusion model (`proj_i`),
plus the DEEM feedback loss: the diffusion model's denoising error when conditioned on the image encoder's view.

Training (`forward(..., feedback_loss=True)`) and test-time adaptation both compute that loss with
`VisualTokenizer.feedback_loss` on the output of `VisualTokenizer.encode`, so both see the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from deem.models.diffusion import DiffusionFeedback, MMFSFeatures, pack_mmfs_features
from deem.models.mask_pooling import MaskPooling, binary_mask_like
from deem.models.resampler import PerceiverResampler, QFormerConfig
from deem.models.vision import ImageEncoder, ImageEncoderConfig


@dataclass
class VisualTokens(ModelOutput):
    embeds: torch.Tensor  # [B_I, n_tokens, llm_hidden]
    multiscale: list[torch.Tensor] | None = None  # 4 pos-augmented maps [B_I, C, H_l, W_l] (unmasked)
    loss_feedback: torch.Tensor | None = None  # scalar, when computed


@dataclass
class EncodedImages:
    """What `VisualTokenizer.encode` returns: the Q-Former outputs [B_I, n_tokens, hidden] and the image encoder's
    4 pos-augmented maps (unmasked), together with the region masks they were computed with."""

    queries: torch.Tensor
    multiscale: list[torch.Tensor]
    masks: torch.Tensor | None


class VisualTokenizer(nn.Module):
    def __init__(
        self,
        image_encoder: ImageEncoderConfig,
        resampler: QFormerConfig,
        llm_hidden: int,
        diffusion_context_dim: int | None,
        mask_pooling: dict | None = None,
    ) -> None:
        super().__init__()
        width = image_encoder.out_dim
        self.image_encoder = ImageEncoder(image_encoder)
        self.pos_proj = nn.Linear(width, width)
        self.pos_ln = nn.LayerNorm(width, eps=1e-6)
        self.post_ln = nn.LayerNorm(width, eps=1e-6)
        self.perceiver_resampler = PerceiverResampler(resampler)
        self.proj_t = nn.Linear(resampler.hidden, llm_hidden)
        self.proj_i = nn.Linear(resampler.hidden, diffusion_context_dim) if diffusion_context_dim else None
        self.feature_extractor = MaskPooling(**mask_pooling) if mask_pooling else None
        self.reset_head()

    @torch.no_grad()
    def reset_head(self) -> None:
        """proj_t / proj_i ~ N(0, 1e-3²) with zero bias (spec §3, §12)."""
        for proj in (self.proj_t, self.proj_i):
            if proj is not None:
                nn.init.normal_(proj.weight, std=1e-3)
                nn.init.zeros_(proj.bias)

    def encode(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> EncodedImages:
        """images [B_I, 3, R, R] in [0, 1]; masks [B_I, 1, R, R] region masks (None: whole images). The patch
        tokens outside a region are zeroed before the Q-Former; with mask pooling its region tokens lead."""
        out = self.image_encoder(images)
        tokens = self.pos_ln(self.pos_proj(out.tokens)) + out.token_pos
        if masks is not None:
            g = out.grid
            grid_mask = binary_mask_like(tokens.new_zeros(tokens.shape[0], 1, g, g), masks)  # [B, 1, g, g]
            patches = tokens[:, 1:] * grid_mask.flatten(2).transpose(1, 2).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], patches], dim=1)
        tokens = self.post_ln(tokens)
        if self.feature_extractor is not None:
            region = masks if masks is not None else images.new_ones(images.shape[0], 1, *images.shape[-2:])
            tokens = torch.cat([self.feature_extractor(out.multiscale, region).to(tokens.dtype), tokens], dim=1)
        return EncodedImages(self.perceiver_resampler(tokens), out.multiscale, masks)

    def feedback_loss(
        self,
        encoded: EncodedImages,
        images_dec: torch.Tensor | None,
        diffusion: DiffusionFeedback | None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The DEEM loss (spec/model.md §8.5): the diffusion model's masked denoising error on the diffusion view
        `images_dec` [B_I, 3, 512, 512], conditioned on `proj_i` of the queries and (through the MMFSNet) on the
        region-masked maps. `timesteps` [B_I] before the feedback remap; None: drawn uniformly."""
        if diffusion is None or self.proj_i is None or images_dec is None:
            raise ValueError("the feedback loss needs the diffusion model, proj_i and the diffusion view images_dec")
        feats = self.diffusion_features(encoded.multiscale, encoded.masks)
        n = encoded.queries.shape[0]
        ones = torch.ones(n, 1, device=encoded.queries.device, dtype=torch.long)
        return diffusion.feedback_loss(images_dec, self.proj_i(encoded.queries), feats, ones, encoded.masks,
                                       timesteps=timesteps, generator=generator)

    def forward(
        self,
        images: torch.Tensor,
        images_dec: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        diffusion: DiffusionFeedback | None = None,
        feedback_loss: bool = False,
        generator: torch.Generator | None = None,
    ) -> VisualTokens:
        """The image embeddings of `encode`; with `feedback_loss` also the loss of `feedback_loss`."""
        encoded = self.encode(images, masks)
        loss = self.feedback_loss(encoded, images_dec, diffusion, generator=generator) if feedback_loss else None
        return VisualTokens(self.proj_t(encoded.queries), encoded.multiscale, loss)

    @staticmethod
    def diffusion_features(multiscale: list[torch.Tensor], masks: torch.Tensor | None) -> MMFSFeatures:
        """The SD-side MMFS values: every level times its binarised resized region mask, one image each."""
        levels = multiscale if masks is None else [MaskPooling.extract_region(f, masks) for f in multiscale]
        return pack_mmfs_features([f[:, None] for f in levels])

    def set_trainable(self, freeze_trunk: bool) -> None:
        self.requires_grad_(True)
        self.image_encoder.set_trunk_frozen(freeze_trunk)
