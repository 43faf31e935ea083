"""`DeemConfig`: one configuration class for every model size, with the 7B and tiny presets and the
training-stage presets (which modules train, which losses are on; spec/model.md §0, §8.7)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, PretrainedConfig

from deem.errors import ConfigError
from deem.models.diffusion import DiffusionConfig
from deem.models.llm import MMFSSettings
from deem.models.resampler import QFormerConfig
from deem.models.vision import ImageEncoderConfig
from deem.tokens import LLAMA_SPECIAL_TOKENS, TokenLayout

STAGES = ("pretrain_deem", "pretrain_baseline", "sft_caption", "sft_vqa", "sft_referring")


def _asdict(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, PretrainedConfig):
        return value.to_dict()
    raise TypeError(f"expected a dict or a config object, got {type(value).__name__}")


class DeemConfig(PretrainedConfig):
    """The whole DEEM model: LLM, MMFS cross-attention, image encoder, resamplers, diffusion feedback.

    Sub-configurations are plain dicts (JSON); the typed views (`llm_config`, `image_encoder_config`, ...)
    rebuild the component config objects. `diffusion=None` builds no Stable Diffusion (no feedback loss,
    no image generation: the sft_referring stage); `image_decoder_resampler=None` builds no image decoder.
    """

    model_type = "deem"

    def __init__(
        self,
        llm: dict | LlamaConfig | None = None,
        mmfs: dict | MMFSSettings | None = None,
        image_encoder: dict | ImageEncoderConfig | None = None,
        visual_tokenizer_resampler: dict | QFormerConfig | None = None,
        image_decoder_resampler: dict | QFormerConfig | None = None,
        diffusion: dict | DiffusionConfig | None = None,
        mask_pooling: dict | None = None,
        special_tokens: dict[str, int] | None = None,
        text_vocab_size: int = 32006,
        base_vocab_size: int = 32000,
        num_img_token: int = 77,
        context_seq_len: int = 2048,
        loss_txt_weight: float = 1.0,
        loss_img_weight: float = 5.0,
        loss_feedback_weight: float = 5.0,
        uncond_prob: float = 0.1,
        freeze_llm: bool = True,
        freeze_image_encoder: bool = False,
        freeze_unet: bool = True,
        freeze_text_head: bool = True,
        mask_align: bool = False,
        llm_gradient_checkpointing: bool = True,
        stage: str = "pretrain_deem",
        **kwargs: Any,
    ) -> None:
        self.llm = _asdict(llm) or {}
        self.mmfs = _asdict(mmfs) or dataclasses.asdict(MMFSSettings())
        self.image_encoder = _asdict(image_encoder) or dataclasses.asdict(ImageEncoderConfig.convnext_base())
        self.visual_tokenizer_resampler = (_asdict(visual_tokenizer_resampler)
                                           or dataclasses.asdict(QFormerConfig.visual_tokenizer_7b()))
        self.image_decoder_resampler = _asdict(image_decoder_resampler)
        self.diffusion = _asdict(diffusion)
        self.mask_pooling = _asdict(mask_pooling)
        self.special_tokens = dict(special_tokens or LLAMA_SPECIAL_TOKENS.as_dict())
        self.text_vocab_size = text_vocab_size
        self.base_vocab_size = base_vocab_size
        self.num_img_token = num_img_token
        self.context_seq_len = context_seq_len
        self.loss_txt_weight = loss_txt_weight
        self.loss_img_weight = loss_img_weight
        self.loss_feedback_weight = loss_feedback_weight
        self.uncond_prob = uncond_prob
        self.freeze_llm = freeze_llm
        self.freeze_image_encoder = freeze_image_encoder
        self.freeze_unet = freeze_unet
        self.freeze_text_head = freeze_text_head
        self.mask_align = mask_align
        self.llm_gradient_checkpointing = llm_gradient_checkpointing
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.stage = stage
        super().__init__(**kwargs)
        self._validate()

    # ---------------------------------------------------------------- typed views
    @property
    def llm_config(self) -> LlamaConfig:
        cfg = LlamaConfig(**{k: v for k, v in self.llm.items() if k not in ("architectures", "transformers_version")})
        cfg.vocab_size = self.text_vocab_size
        return cfg

    @property
    def mmfs_settings(self) -> MMFSSettings:
        return MMFSSettings(**{**self.mmfs, "spatial_shapes": tuple(self.mmfs["spatial_shapes"])})

    @property
    def image_encoder_config(self) -> ImageEncoderConfig:
        return ImageEncoderConfig(**self.image_encoder)

    @property
    def visual_tokenizer_resampler_config(self) -> QFormerConfig:
        return QFormerConfig(**self.visual_tokenizer_resampler)

    @property
    def image_decoder_resampler_config(self) -> QFormerConfig | None:
        return None if self.image_decoder_resampler is None else QFormerConfig(**self.image_decoder_resampler)

    @property
    def diffusion_config(self) -> DiffusionConfig | None:
        if self.diffusion is None:
            return None
        d = dict(self.diffusion)
        d["mmfs_spatial_shapes"] = tuple(d["mmfs_spatial_shapes"])
        return DiffusionConfig(**d)

    @property
    def has_image_decoder(self) -> bool:
        return self.diffusion is not None and self.image_decoder_resampler is not None

    def _validate(self) -> None:
        if not self.llm:
            return  # an empty config (transformers instantiates one to read defaults)
        hidden = self.llm["hidden_size"]
        if self.mmfs["vision_width"] != self.image_encoder["out_dim"]:
            raise ConfigError(
                f"mmfs.vision_width {self.mmfs['vision_width']} != image_encoder.out_dim "
                f"{self.image_encoder['out_dim']}"
            )
        if self.visual_tokenizer_resampler["encoder_width"] != self.image_encoder["out_dim"]:
            raise ConfigError("visual_tokenizer_resampler.encoder_width must equal image_encoder.out_dim")
        if self.visual_tokenizer_resampler["num_queries"] != self.num_img_token:
            raise ConfigError(
                f"visual_tokenizer_resampler.num_queries {self.visual_tokenizer_resampler['num_queries']} != "
                f"num_img_token {self.num_img_token}"
            )
        if self.image_decoder_resampler is not None and self.image_decoder_resampler["encoder_width"] != hidden:
            raise ConfigError("image_decoder_resampler.encoder_width must equal the LLM hidden size")
        if self.image_decoder_resampler is not None and self.diffusion is None:
            raise ConfigError("an image decoder needs the diffusion model (diffusion=None)")
        if self.base_vocab_size > self.text_vocab_size:
            raise ConfigError("base_vocab_size must not exceed text_vocab_size")


# ------------------------------------------------------------------------------------------ presets

Preset = Callable[..., DeemConfig]
PRESETS: dict[str, Preset] = {}
"""The model presets by name (`register_preset`); each takes `tokens` (a tokenizer's `TokenLayout`) and
`image_size` (the image encoder's resolution), both optional."""


def register_preset(fn: Preset) -> Preset:
    """Add a preset function to `PRESETS` under its own name (timm's `register_model`)."""
    PRESETS[fn.__name__] = fn
    return fn


def create_config(name: str, tokens: TokenLayout | None = None, image_size: int | None = None) -> DeemConfig:
    """The preset `name` built for a tokenizer's layout and an image size (both optional)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name](tokens=tokens, image_size=image_size)


def config_from_name(name: str, stage: str | None = None) -> DeemConfig:
    """A preset (`PRESETS`) or a saved config (a directory with config.json, or the JSON file)."""
    if name in PRESETS:
        cfg = create_config(name)
    else:
        path = Path(name)
        if not path.exists():
            raise ConfigError(f"unknown config {name!r}: not a preset ({', '.join(PRESETS)}) nor an existing path")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a saved deem model (no config.json)")
        file = path if path.is_file() else path / "config.json"
        try:
            cfg = DeemConfig.from_json_file(str(file))
        except ConfigError as err:
            raise ConfigError(f"{file}: {err}") from err
        except (OSError, ValueError) as err:  # transformers: not JSON / not readable
            raise ConfigError(f"{file}: not a deem config JSON ({err})") from err
    return with_stage(cfg, stage) if stage else cfg


def check_token_layout(cfg: DeemConfig, tokens: TokenLayout, what: str = "the model") -> None:
    """A model config must take a tokenizer's special ids, fit its vocabulary and read its image runs."""
    if cfg.special_tokens != tokens.special.as_dict():
        raise ConfigError(
            f"the model's special-token ids {cfg.special_tokens} differ from the tokenizer's "
            f"{tokens.special.as_dict()}: {what} needs a tokenizer with its id layout"
        )
    if tokens.vocab_size > cfg.text_vocab_size:
        raise ConfigError(f"the tokenizer has {tokens.vocab_size} ids, the model's embedding {cfg.text_vocab_size}")
    if cfg.num_img_token != tokens.num_img_token:
        raise ConfigError(
            f"the model takes {cfg.num_img_token} image tokens, the tokenizer writes {tokens.num_img_token}"
        )


def _llama(vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, max_positions: int,
           **extra: Any) -> LlamaConfig:
    """A LLaMA config with multi-head attention (as many key/value heads as heads) and RMSNorm eps 1e-5."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       rms_norm_eps=1e-5, max_position_embeddings=max_positions, **extra)


@register_preset
def deem_7b(tokens: TokenLayout | None = None, image_size: int | None = None,
            diffusion_path: str | None = None) -> DeemConfig:
    """The original DEEM 7B: Vicuna-7B, ConvNeXt-B image encoder at 256 px (`image_size`: 448 for the SFT stages),
    SD-2.1-base (spec/model.md §0). Its token layout is Vicuna's: `tokens` must match it."""
    llm = _llama(vocab_size=32000, hidden=4096, intermediate=11008, layers=32, heads=32, max_positions=4096,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    diffusion = DiffusionConfig.sd21_base(diffusion_path)
    cfg = DeemConfig(
        llm=llm,
        mmfs=MMFSSettings(),
        image_encoder=ImageEncoderConfig.convnext_base(),
        visual_tokenizer_resampler=QFormerConfig.visual_tokenizer_7b(),
        image_decoder_resampler=QFormerConfig.image_decoder_7b(),
        diffusion=diffusion,
        mask_pooling=None,
    )
    if image_size is not None:
        _set_image_size(cfg, image_size)
        cfg._validate()
    if tokens is not None:
        check_token_layout(cfg, tokens, "the deem_7b preset")
    return cfg


@register_preset
def tiny(tokens: TokenLayout | None = None, image_size: int | None = None) -> DeemConfig:
    """A model of a few hundred thousand parameters running every code path on a CPU in seconds.

    `tokens`: the tiny tokenizer's layout (deem.data.build_tiny_tokenizer: the six DEEM tokens are the last
    ids); None: a 518-id vocabulary laid out the same way, 4 image tokens. `image_size` is the image encoder and
    diffusion resolution (default 32)."""
    image_size = image_size or 32
    vocab_size = tokens.vocab_size if tokens is not None else 518
    num_img_token = tokens.num_img_token if tokens is not None else 4
    llm = _llama(vocab_size=vocab_size - 6, hidden=96, intermediate=192, layers=4, heads=4, max_positions=512)
    sides = tuple(image_size // s for s in (4, 8, 16, 32))
    image_encoder = ImageEncoderConfig.tiny(image_size=image_size, drop_path_rate=0.0)
    mmfs = MMFSSettings(
        vision_width=image_encoder.out_dim,
        cross_attention_frequency=2,
        spatial_shapes=sides[1:],
        base_spatial_shape=sides[2],
        n_heads=4,
        n_points=4,
        offset_init_magnitude=1.0,
        max_num_image_per_seq=20,
    )
    diffusion = DiffusionConfig.tiny(
        image_size=image_size,
        mmfs_spatial_shapes=sides,
        mmfs_heads=4,
        mmfs_points=4,
        mmfs_feature_dim=image_encoder.out_dim,
        mmfs_attn_dim=image_encoder.out_dim,
    )
    cross_dim = diffusion.unet_config["cross_attention_dim"]
    tokenizer_rs = dataclasses.replace(
        QFormerConfig.tiny_visual_tokenizer(),
        encoder_width=image_encoder.out_dim,
        num_queries=num_img_token,
        hidden=64,
        heads=4,
        num_layers=2,
        dropout=0.0,
        initializer_range=0.2,  # BLIP-2's 0.02 leaves the output almost independent of the image at this width
    )
    decoder_rs = dataclasses.replace(
        QFormerConfig.tiny_image_decoder(),
        encoder_width=llm.hidden_size,
        hidden=cross_dim,
        heads=2,
        num_queries=num_img_token,
    )
    if tokens is not None:
        special = tokens.special.as_dict()
    else:
        roles = ("soi", "image", "ref", "/ref", "box", "/box")
        special = {"bos": 1, "eos": 2, "pad": 3, **dict(zip(roles, range(vocab_size - 6, vocab_size)))}
    return DeemConfig(
        llm=llm,
        mmfs=mmfs,
        image_encoder=image_encoder,
        visual_tokenizer_resampler=tokenizer_rs,
        image_decoder_resampler=decoder_rs,
        diffusion=diffusion,
        special_tokens=special,
        text_vocab_size=vocab_size,
        base_vocab_size=vocab_size - 6,
        num_img_token=num_img_token,
        context_seq_len=512,
        llm_gradient_checkpointing=False,
    )


def with_stage(config: DeemConfig, stage: str, image_size: int | None = None) -> DeemConfig:
    """A copy of `config` set up for a training stage (spec/model.md §0.2, §8.7):

    * pretrain_deem: LLM and UNet frozen, image encoder trained, feedback loss on;
    * pretrain_baseline (MM-Interleaved): encoder trunk frozen, UNet trained, no feedback loss;
    * sft_caption: as pretrain_deem (low learning rates come from the training config);
    * sft_vqa: LLM trained, encoder trunk frozen, UNet frozen (448 px for the 7B model);
    * sft_referring: as sft_vqa with mask alignment and no diffusion model.
    `image_size` changes the image encoder resolution (and the feature sizes the MMFS layers expect)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGES}")
    cfg = DeemConfig.from_dict(config.to_dict())
    flags = {
        "pretrain_deem": dict(freeze_llm=True, freeze_image_encoder=False, freeze_unet=True,
                              loss_feedback_weight=5.0),
        "pretrain_baseline": dict(freeze_llm=True, freeze_image_encoder=True, freeze_unet=False,
                                  loss_feedback_weight=0.0),
        "sft_caption": dict(freeze_llm=True, freeze_image_encoder=False, freeze_unet=True),
        "sft_vqa": dict(freeze_llm=False, freeze_image_encoder=True, freeze_unet=True),
        "sft_referring": dict(freeze_llm=False, freeze_image_encoder=True, freeze_unet=True, mask_align=True),
    }[stage]
    for key, value in flags.items():
        setattr(cfg, key, value)
    cfg.stage = stage
    if stage == "sft_referring":
        cfg.diffusion = None
        cfg.image_decoder_resampler = None
        if cfg.mask_pooling is None:
            width = cfg.image_encoder["out_dim"]
            cfg.mask_pooling = {
                "feat_dim": width,
                "width": width,
                "hidden": width,
                "mask_size": 112 if width >= 1024 else 16,
            }
    if image_size is not None:
        _set_image_size(cfg, image_size)
    cfg._validate()
    return cfg


def _set_image_size(cfg: DeemConfig, image_size: int) -> None:
    """The image encoder's resolution and the feature sizes the LLM and UNet MMFS layers expect from it."""
    cfg.image_encoder["image_size"] = image_size
    sides = [image_size // s for s in (4, 8, 16, 32)]
    cfg.mmfs["spatial_shapes"] = sides[1:]
    if cfg.diffusion is not None:
        cfg.diffusion["mmfs_spatial_shapes"] = sides
