"""`DeemModel`: the whole DEEM model (spec/model.md §1): visual tokenizer with the diffusion-feedback
loss, LLaMA with MMFS cross-attention, text head, and the interleaved image decoder.

The forward returns the text, image-generation and feedback losses and their weighted total. The
model follows the transformers conventions (`DeemConfig`, `save_pretrained` / `from_pretrained` with
safetensors); `from_components` builds it from the real component checkpoints (HF LLaMA/Vicuna
directory, diffusers SD 2.1 directory, open_clip ConvNeXt file) and `load_original_checkpoint` reads an
original DEEM / MM-Interleaved `pytorch_model.bin` through a documented key map. Generation
(:mod:`deem.models.generation`) and test-time adaptation (:mod:`deem.models.adaptation`) are mixins
of their own modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from deem.models.adaptation import AdaptationMethods
from deem.models.config import DeemConfig
from deem.models.diffusion import DiffusionFeedback, generation_loss, pack_mmfs_features
from deem.models.generation import GenerationMethods
from deem.models.llm import DeemLlamaModel, TextHead, VisionContext
from deem.models.loading import CheckpointError
from deem.models.multimodal import (
    add_soi_embedding,
    cross_attention_visibility,
    image_context,
    pack_image_features,
    previous_image_features,
    scatter_image_embeddings,
    text_loss,
)
from deem.models.positions import sincos_pos_embed_1d
from deem.models.resampler import PerceiverResampler, QFormerConfig
from deem.models.visual_tokenizer import VisualTokenizer, VisualTokens


@dataclass
class DeemOutput(ModelOutput):
    """A ModelOutput (a dict underneath) so that DeepSpeed ZeRO-3 finds the tensors and hooks their backward."""

    loss: torch.Tensor
    loss_txt: torch.Tensor | None = None
    loss_img: torch.Tensor | None = None
    loss_feedback: torch.Tensor | None = None
    logits: torch.Tensor | None = None


LOSS_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DeemOutput) if f.name.startswith("loss"))


class ImageDecoder(nn.Module):
    """Conditioning of the diffusion model on the LLM context of an image (spec/model.md §9): a 1-layer
    Q-Former over the (reversed, position-coded) context and a learnable negative prompt for
    classifier-free guidance."""

    def __init__(self, resampler: QFormerConfig) -> None:
        super().__init__()
        self.perceiver_resampler = PerceiverResampler(resampler)
        self.neg_prompt_embeds = nn.Parameter(torch.zeros(1, resampler.num_queries, resampler.hidden))

    def forward(self, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.perceiver_resampler(context, mask)


class DeemPreTrainedModel(PreTrainedModel):
    config_class = DeemConfig
    base_model_prefix = "deem"
    supports_gradient_checkpointing = True
    main_input_name = "text_ids"

    def _init_weights(self, module: nn.Module) -> None:
        """Every component initialises itself as the original does (spec/model.md §12)."""


class DeemModel(DeemPreTrainedModel, GenerationMethods, AdaptationMethods):
    def __init__(self, config: DeemConfig) -> None:
        super().__init__(config)
        llm_cfg = config.llm_config
        hidden = llm_cfg.hidden_size
        self.llm = DeemLlamaModel(llm_cfg, config.mmfs_settings)
        self.text_head = TextHead(hidden, config.text_vocab_size, config.base_vocab_size)
        with torch.no_grad():
            self.text_head.init_from_lm_head(torch.randn(config.text_vocab_size, hidden) * llm_cfg.initializer_range)
        diffusion_cfg = config.diffusion_config
        self.diffusion = DiffusionFeedback(diffusion_cfg) if diffusion_cfg is not None else None
        context_dim = self.diffusion.unet.config.cross_attention_dim if self.diffusion is not None else None
        self.visual_tokenizer = VisualTokenizer(
            config.image_encoder_config, config.visual_tokenizer_resampler_config, hidden, context_dim,
            config.mask_pooling,
        )
        decoder_cfg = config.image_decoder_resampler_config
        self.image_decoder = ImageDecoder(decoder_cfg) if config.has_image_decoder else None
        self.context_feat_proj = nn.Linear(hidden, hidden) if config.has_image_decoder else None
        self.soi_token = nn.Parameter(torch.zeros(1, hidden))
        self.post_init()
        self.apply_stage()
        if config.llm_gradient_checkpointing:
            self.enable_llm_checkpointing()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> DeemModel:
        """transformers' loading (safetensors, strict key check), then the configured stage's trainable set."""
        from safetensors import SafetensorError

        try:
            model = super().from_pretrained(*args, **kwargs)
        except (OSError, SafetensorError) as exc:  # no weights file, an unreadable or truncated one
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise CheckpointError(f"{source}: not a loadable deem checkpoint: {exc}") from exc
        model.apply_stage()
        return model

    def enable_llm_checkpointing(self) -> None:
        """Recompute the LLM's decoder layers in the backward (non-reentrant)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------ stages
    def apply_stage(self) -> None:
        """Trainable parameters of the configured stage (spec/model.md §8.7)."""
        cfg = self.config
        self.requires_grad_(False)
        self.llm.requires_grad_(not cfg.freeze_llm)
        for cross in self.llm.cross_attention_layers():
            cross.requires_grad_(True)
        # the base rows come from the pretrained LLM's lm_head and stay frozen (a model trained from scratch, like
        # the demo's, pre-fits them with freeze_text_head=False)
        self.text_head.head.requires_grad_(not cfg.freeze_text_head)
        self.text_head.head_new.requires_grad_(True)
        self.visual_tokenizer.set_trainable(freeze_trunk=cfg.freeze_image_encoder)
        if self.visual_tokenizer.proj_i is not None and cfg.loss_feedback_weight == 0:
            self.visual_tokenizer.proj_i.requires_grad_(False)  # only the feedback loss uses it
        if self.diffusion is not None:
            self.diffusion.set_trainable(freeze_unet=cfg.freeze_unet)
        for module in (self.image_decoder, self.context_feat_proj):
            if module is not None:
                module.requires_grad_(True)
        self.soi_token.requires_grad_(True)

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ helpers
    @property
    def special(self) -> dict[str, int]:
        return self.config.special_tokens

    def _llm_vision_context(
        self, multiscale: list[torch.Tensor], text_ids: torch.Tensor, num_image_per_seq: torch.Tensor
    ) -> VisionContext | None:
        if int(num_image_per_seq.max()) == 0:
            return None
        sides = set(self.config.mmfs_settings.spatial_shapes)
        levels = [m for m in multiscale if m.shape[-1] in sides]
        if len(levels) != len(sides):
            raise ValueError(
                f"the image encoder's maps have sides {[m.shape[-1] for m in multiscale]}; the LLM MMFS layers "
                f"expect {sorted(sides, reverse=True)} (config.mmfs.spatial_shapes; check the image size)"
            )
        features = pack_image_features(levels, num_image_per_seq)
        visibility = cross_attention_visibility(text_ids, num_image_per_seq, self.special["soi"], self.special["bos"])
        return VisionContext(features, [(m.shape[-2], m.shape[-1]) for m in levels], visibility.to(features.dtype))

    def _embed(
        self,
        text_ids,
        image_tensors,
        image_tensors_dec,
        image_tensors_mask,
        num_image_per_seq,
        feedback_loss: bool,
        generator=None,
        visual: VisualTokens | None = None,
    ):
        """Token embeddings with the images inserted, the visual tokens, and the LLM's vision context.
        `visual` reuses visual tokens computed before (one image repeated over several sequences)."""
        embeds = self.llm.embed_tokens(text_ids)
        if visual is None and (image_tensors is None or image_tensors.shape[0] == 0):
            return embeds, None, None
        if num_image_per_seq is None:
            raise ValueError("num_image_per_seq is required with images")
        vis = visual or self.visual_tokenizer(
            image_tensors, image_tensors_dec, image_tensors_mask, self.diffusion, feedback_loss, generator
        )
        embeds = scatter_image_embeddings(embeds, text_ids, vis.embeds, self.special["image"])
        embeds = add_soi_embedding(embeds, text_ids, self.soi_token, self.special["soi"])
        return embeds, vis, self._llm_vision_context(vis.multiscale, text_ids, num_image_per_seq)

    def _context_features(self, hidden, text_ids, nearest_bos_idxs):
        ctx, mask, _ = image_context(hidden, text_ids, self.special["soi"], nearest_bos_idxs)
        if ctx.shape[1] > self.config.context_seq_len:
            raise ValueError(
                f"an image's context has {ctx.shape[1]} tokens, more than context_seq_len={self.config.context_seq_len}"
            )
        pos = sincos_pos_embed_1d(ctx.shape[-1], torch.arange(ctx.shape[1]), ctx.dtype).to(ctx.device)
        return self.context_feat_proj(ctx) + pos[None], mask

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        text_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_tensors: torch.Tensor | None = None,
        image_tensors_dec: torch.Tensor | None = None,
        image_tensors_mask: torch.Tensor | None = None,
        num_image_per_seq: torch.Tensor | None = None,
        gt_text_ids: torch.Tensor | None = None,
        nearest_bos_idxs: torch.Tensor | None = None,
        loss_txt_weight: float | torch.Tensor | None = None,
        loss_img_weight: float | torch.Tensor | None = None,
        image_loss_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        text_loss_denominator: float | torch.Tensor | None = None,
    ) -> DeemOutput:
        """Losses of one batch in the collators' format (spec/model.md §1). The text loss scores `gt_text_ids`,
        the labels of `deem.data.labels.build_labels` (the one label rule); without them (inference) it is not
        computed, and in training that is an error. `text_loss_denominator` replaces the text loss's per-batch
        token mean by sum / denominator."""
        cfg = self.config
        w_txt = cfg.loss_txt_weight if loss_txt_weight is None else float(loss_txt_weight)
        w_img = cfg.loss_img_weight if loss_img_weight is None else float(loss_img_weight)
        want_feedback = self.training and self.diffusion is not None and cfg.loss_feedback_weight > 0
        embeds, vis, context = self._embed(
            text_ids, image_tensors, image_tensors_dec, image_tensors_mask, num_image_per_seq, want_feedback, generator
        )
        hidden = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, vision_context=context).last_hidden_state
        logits = self.text_head(hidden)
        # a batch whose text weight is 0 (text-to-image pairs) trains no text: its text loss is neither computed
        # nor reported (reported, it read as a text loss of ~11 on every such step: targets nothing trains)
        loss_txt = None
        total = hidden.sum() * 0.0
        if w_txt != 0 and gt_text_ids is not None:
            loss_txt = text_loss(logits, gt_text_ids, text_loss_denominator)
            total = total + w_txt * loss_txt
        elif w_txt != 0 and self.training:
            raise ValueError("the text loss needs gt_text_ids (the collators' labels, deem.data.labels.build_labels)")
        loss_feedback = vis.loss_feedback if vis is not None else None
        if loss_feedback is not None:
            total = total + cfg.loss_feedback_weight * loss_feedback
        loss_img = None
        if self.image_decoder is not None and w_img != 0 and vis is not None:
            loss_img = self._image_loss(
                hidden, text_ids, vis.multiscale, image_tensors_dec, nearest_bos_idxs, image_loss_mask, generator
            )
            total = total + w_img * loss_img
        if self.training and self.rank_uniform and vis is None:
            total = total + self._dummy_visual_path(hidden, want_feedback, generator)
        return DeemOutput(total, loss_txt, loss_img, loss_feedback, logits)

    # set by the trainer on several ranks: a batch without images still runs the image modules (on one blank image,
    # weighted 0), so that ZeRO-3's parameter gathers and DDP's gradient buckets are the same on every rank
    rank_uniform: bool = False

    def _dummy_visual_path(self, hidden: torch.Tensor, feedback: bool, generator=None) -> torch.Tensor:
        """0 x (the visual tokenizer, its feedback loss and the image decoder on one blank image): exactly zero loss
        and zero gradient, but every one of those modules runs (and its parameters join the graph)."""
        side = self.config.image_encoder_config.image_size
        image = hidden.new_zeros(1, 3, side, side)
        image_dec = None
        if feedback:
            dec_side = self.diffusion.config.image_size
            image_dec = hidden.new_zeros(1, 3, dec_side, dec_side)
        vis = self.visual_tokenizer(image, image_dec, None, self.diffusion, feedback, generator)
        dummy = vis.embeds.sum() + sum(m.sum() for m in vis.multiscale) + self.soi_token.sum()
        if vis.loss_feedback is not None:
            dummy = dummy + vis.loss_feedback
        sides = set(self.config.mmfs_settings.spatial_shapes)
        levels = [m for m in vis.multiscale if m.shape[-1] in sides]
        context = VisionContext(pack_image_features(levels, torch.ones(1, dtype=torch.long, device=hidden.device)),
                                [(m.shape[-2], m.shape[-1]) for m in levels], hidden.new_ones(1, 1))
        for cross in self.llm.cross_attention_layers():  # the MMFS cross-attention a text-only batch skips
            dummy = dummy + cross(hidden[:1].detach(), context).sum()
        if self.image_decoder is not None:
            ctx = self.context_feat_proj(hidden[:1, :2])
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)
            dummy = dummy + self.image_decoder(ctx, mask).sum()
            dummy = dummy + self.image_decoder.neg_prompt_embeds.sum()
        return dummy * 0.0

    def _image_loss(self, hidden, text_ids, multiscale, images_dec, nearest_bos_idxs, image_loss_mask, generator):
        if images_dec is None:
            raise ValueError("the image-generation loss needs image_tensors_dec (the diffusion view)")
        context, mask = self._context_features(hidden, text_ids, nearest_bos_idxs)
        cond = self.image_decoder(context, mask)
        if self.training and self.config.uncond_prob > 0:
            drop = torch.rand(cond.shape[0], device=cond.device, generator=generator) < self.config.uncond_prob
            cond = torch.where(drop[:, None, None], self.image_decoder.neg_prompt_embeds.to(cond.dtype), cond)
        prev, prev_mask = previous_image_features(multiscale, text_ids, self.special["soi"], nearest_bos_idxs)
        per_pixel = self.diffusion.loss(
            images_dec, cond, pack_mmfs_features(prev), prev_mask, mode="generation", generator=generator
        )
        sample_mask = (mask.sum(1) > 2).float()  # more context than <s><soi>
        if image_loss_mask is not None:
            sample_mask = sample_mask * image_loss_mask.float().to(sample_mask.device)
        return generation_loss(per_pixel, sample_mask)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_components(
        cls,
        config: DeemConfig,
        llm_path: str | Path | None = None,
        diffusion_path: str | Path | None = None,
        image_encoder_checkpoint: str | Path | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[DeemModel, list]:
        """Build the model from the real component checkpoints (offline, local paths): a HF LLaMA/Vicuna
        directory, a diffusers SD 2.1 directory, an open_clip ConvNeXt checkpoint. Returns the model and the
        load reports. The saved config then describes the architecture only (no paths)."""
        from deem.models.diffusion import negative_prompt_embedding
        from deem.models.loading import load_llama

        cfg = DeemConfig.from_dict(config.to_dict())
        if diffusion_path is not None:
            if cfg.diffusion is None:
                raise ValueError("diffusion_path given but the config has no diffusion model")
            cfg.diffusion = {
                **cfg.diffusion,
                "pretrained_path": str(diffusion_path),
                "unet_config": None,
                "vae_config": None,
                "scheduler_config": None,
            }
        model = cls(cfg)
        reports = []
        if llm_path is not None:
            reports.append(load_llama(model, llm_path, generator))
        if image_encoder_checkpoint is not None:
            reports.append(model.visual_tokenizer.image_encoder.load_open_clip(image_encoder_checkpoint))
        has_text_encoder = diffusion_path is not None and (Path(diffusion_path) / "text_encoder").is_dir()
        if has_text_encoder and model.image_decoder is not None:
            neg_param = model.image_decoder.neg_prompt_embeds
            with torch.no_grad():
                neg_param.copy_(negative_prompt_embedding(diffusion_path)[:, : neg_param.shape[1]])
        model.config = architecture_only(cfg, model)
        return model, reports

    def load_original_checkpoint(self, path: str | Path):
        """Weights of an original DEEM / MM-Interleaved `pytorch_model.bin` (see loading.ORIGINAL_KEY_MAP)."""
        from deem.models.loading import load_original_checkpoint

        return load_original_checkpoint(self, path)

    # ------------------------------------------------------------------ reporting
    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Total and trainable parameters per top-level component."""
        out = {}
        for name, module in self.named_children():
            params = list(module.parameters())
            out[name] = {
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        out["soi_token"] = {
            "total": self.soi_token.numel(),
            "trainable": int(self.soi_token.requires_grad) * self.soi_token.numel(),
        }
        return out


def architecture_only(config: DeemConfig, model: DeemModel) -> DeemConfig:
    """The config with component paths replaced by the loaded components' architectures, so a saved model
    is self-contained (no reference to the SD directory it was built from)."""
    cfg = DeemConfig.from_dict(config.to_dict())
    if model.diffusion is not None and cfg.diffusion is not None:
        d = dict(cfg.diffusion)
        d.update(
            pretrained_path=None,
            variant=None,
            unet_config=dict(model.diffusion.unet.config),
            vae_config=dict(model.diffusion.vae.config),
            scheduler_config=dict(model.diffusion.scheduler.config),
        )
        cfg.diffusion = json_ready(d)
    return cfg


def json_ready(value):
    """Config dicts from diffusers/dataclasses as plain JSON types (tuples -> lists, frozendicts -> dicts)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if dataclasses.is_dataclass(value):
        return json_ready(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    return value
