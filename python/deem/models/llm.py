"""The language model: transformers' LLaMA with MMFS cross-attention after self-attention in every
`cross_attention_frequency`-th layer (spec/model.md §6), and DEEM's text head (§7.3).

Vision context reaches the cross-attention layers as a `vision_context=` keyword of the model's
forward, which transformers passes through to every decoder layer (and captures for the recomputation
of gradient checkpointing); `generate(..., vision_context=...)` forwards it at every step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, LlamaRMSNorm

from deem.models.mmfs import MMFS


@dataclass
class MMFSSettings:
    """Cross-attention settings of the LLM side (the original hard-codes heads/points/magnitude)."""

    vision_width: int = 1024
    cross_attention_frequency: int = 4
    spatial_shapes: Sequence[int] = (32, 16, 8)
    base_spatial_shape: int = 16
    n_heads: int = 16
    n_points: int = 8
    offset_init_magnitude: float = 3.0
    max_num_image_per_seq: int = 50


@dataclass
class VisionContext:
    """Packed image features and visibility for the cross-attention layers.

    features: [B, n_img, S, vision_width], each image's levels (`spatial_shapes`, fine to coarse) flattened
    and concatenated; visibility: [B, L, n_img] (1 = token may attend to image) or [B, n_img].
    """

    features: torch.Tensor
    spatial_shapes: list[tuple[int, int]]
    visibility: torch.Tensor

    def repeat_interleave(self, times: int) -> VisionContext:
        """Expanded for beam search / several returned sequences per sample."""
        if times == 1:
            return self
        return VisionContext(
            self.features.repeat_interleave(times, 0), self.spatial_shapes, self.visibility.repeat_interleave(times, 0)
        )


class MMFSCrossAttention(nn.Module):
    """`h + tanh(gate) * MMFS(RMSNorm(h), RMSNorm(vision))` minus the residual (returned separately).

    Parameter names follow the original `llama_cross_attn` (gate, attn.*, norm1, norm2)."""

    def __init__(self, config: LlamaConfig, settings: MMFSSettings) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.attn = MMFS(
            d_model=hidden,
            d_query=hidden,
            d_value=settings.vision_width,
            d_out=hidden,
            n_levels=len(settings.spatial_shapes),
            n_heads=settings.n_heads,
            n_points=settings.n_points,
            ratio=settings.vision_width / hidden,
            offset_init_magnitude=settings.offset_init_magnitude,
            spatial_shapes=tuple(settings.spatial_shapes),
            base_spatial_shape=settings.base_spatial_shape,
            max_num_image_per_seq=settings.max_num_image_per_seq,
            ignore_token_trainable=True,
        )
        self.norm1 = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm2 = LlamaRMSNorm(settings.vision_width, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, context: VisionContext) -> torch.Tensor:
        B, L, _ = hidden_states.shape
        if context.features.shape[0] != B:
            raise ValueError(
                f"vision context has batch {context.features.shape[0]} but the hidden states have {B} "
                "(expand the context for beam search with VisionContext.repeat_interleave)"
            )
        reference = hidden_states.new_full((1, L, 1, 2), 0.5)  # every text token looks at the image centre
        out = self.attn(
            self.norm1(hidden_states),
            reference,
            self.norm2(context.features),
            context.spatial_shapes,
            None,
            context.visibility,
        )
        return out * self.gate.tanh()

    # The same function in two halves, for an inference engine: the image half once per request, the query half
    # at every decoding step (`forward` equals `attend(h, image_values(features), ...)` with the full visibility).
    def image_values(self, features: torch.Tensor) -> torch.Tensor:
        """[B, n_img, S, vision_width] packed features -> the MMFS values [B, n_img*S, heads, head_dim]."""
        return self.attn.project_values(self.norm2(features))

    def attend(
        self,
        hidden_states: torch.Tensor,
        values: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        visible: torch.Tensor,
        terms: tuple[torch.Tensor, torch.Tensor] | None = None,
        logit_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The gated MMFS output for hidden states [B, L, C] over precomputed `values`; visible [B, L, n_img] bool;
        `terms` / `logit_rows` as in `MMFS.attend` (precomputed per request / per weights)."""
        L = hidden_states.shape[1]
        reference = hidden_states.new_full((1, L, 1, 2), 0.5)
        out = self.attn.attend(self.norm1(hidden_states), reference, values, spatial_shapes, visible, terms,
                               logit_rows)
        return out * self.gate.tanh()


class MMFSDecoderLayer(LlamaDecoderLayer):
    """LLaMA decoder layer with an optional MMFS block between self-attention and the MLP."""

    def __init__(self, config: LlamaConfig, layer_idx: int, settings: MMFSSettings) -> None:
        super().__init__(config, layer_idx)
        use_cross = layer_idx % settings.cross_attention_frequency == 0
        self.llama_cross_attn = MMFSCrossAttention(config, settings) if use_cross else None

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        vision_context: VisionContext | None = None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        if self.llama_cross_attn is not None and vision_context is not None:
            hidden_states = hidden_states + self.llama_cross_attn(hidden_states, vision_context)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class DeemLlamaModel(LlamaModel):
    """transformers' `LlamaModel` whose layers carry MMFS cross-attention."""

    def __init__(self, config: LlamaConfig, settings: MMFSSettings | None = None) -> None:
        settings = settings or MMFSSettings()
        layers = config.num_hidden_layers
        stem = copy.deepcopy(config)
        stem.num_hidden_layers = 0  # the parent builds embeddings, norm and rotary embedding only
        super().__init__(stem)
        self.config.num_hidden_layers = layers  # the config as transformers prepared it (attention backend)
        config = self.config
        self.settings = settings
        self.layers = nn.ModuleList([MMFSDecoderLayer(config, i, settings) for i in range(config.num_hidden_layers)])
        self.post_init()
        self.reset_cross_attention()

    @torch.no_grad()
    def reset_cross_attention(self) -> None:
        """The original re-runs MMFS's own initialisation after the LLM init (spec/model.md §5.2)."""
        for layer in self.layers:
            if layer.llama_cross_attn is not None:
                layer.llama_cross_attn.attn.reset_parameters()
                layer.llama_cross_attn.gate.zero_()
                layer.llama_cross_attn.norm1.weight.fill_(1.0)
                layer.llama_cross_attn.norm2.weight.fill_(1.0)

    def cross_attention_layers(self) -> list[MMFSCrossAttention]:
        return [layer.llama_cross_attn for layer in self.layers if layer.llama_cross_attn is not None]


class TextHead(nn.Module):
    """DEEM's LM head (spec/model.md §7.3): a frozen `head` over the whole vocabulary plus a trainable
    `head_new` added to the logits of the tokens appended to the base vocabulary."""

    def __init__(self, hidden_size: int, vocab_size: int, base_vocab_size: int) -> None:
        super().__init__()
        if not 0 < base_vocab_size <= vocab_size:
            raise ValueError(f"base vocabulary {base_vocab_size} must be in (0, vocab_size={vocab_size}]")
        self.base_vocab_size = base_vocab_size
        self.head = nn.Linear(hidden_size, vocab_size)
        self.head_new = nn.Linear(hidden_size, vocab_size - base_vocab_size)

    @torch.no_grad()
    def init_from_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Rows of the LLM's head for the base vocabulary, zeros and a -100 bias for the new tokens, and a
        head_new of zero weights and bias 95: new-token logits start at -5."""
        base = self.base_vocab_size
        self.head.weight.zero_()
        self.head.weight[:base].copy_(lm_head_weight[:base])
        self.head.bias.zero_()
        self.head.bias[base:] = -100.0
        self.head_new.weight.zero_()
        self.head_new.bias.fill_(95.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden_states)
        if self.head_new.out_features == 0:
            return logits
        base = self.base_vocab_size
        return torch.cat([logits[..., :base], logits[..., base:] + self.head_new(hidden_states)], dim=-1)
