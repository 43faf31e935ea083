"""The DEEM image encoder (the original's "sniffer"): a ConvNeXt trunk with per-stage adapters (spec/model.md §2).

The trunk is timm's :class:`timm.models.convnext.ConvNeXt`, built directly (no open_clip wrapper and no
unused projection head). Four Linear adapters, applied channels-last, map the stage outputs to a common
width; a fifth maps the pooled + LayerNorm'ed last stage to a CLS vector. A frozen 2-D sin-cos table
(row code first) gives the positions, resized bicubically for inputs other than the table's resolution.

Parameter names (relative to the image encoder) and the original checkpoint's names:

=========================  ==========================================================================
ours                       original (``MMInterleaved`` state dict)
=========================  ==========================================================================
``trunk.<k>``              ``visual_tokenizer.sniffer.vision_model.visual.trunk.<k>``
``adapter_c2..adapter_c5`` ``visual_tokenizer.sniffer.vision_model.adapter_c2..adapter_c5``
``adapter_cls``            ``visual_tokenizer.sniffer.vision_model.adapter_cls``
``pos_embed`` (buffer)     ``visual_tokenizer.pos_embed`` (a frozen Parameter there)
``clip_mean``/``clip_std`` ``visual_tokenizer.clip_mean`` / ``visual_tokenizer.clip_std`` (buffers)
(dropped)                  ``visual_tokenizer.sniffer.vision_model.visual.head.*`` (never used)
=========================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import DropPath
from timm.models.convnext import ConvNeXt
from torch import nn
from transformers.utils import ModelOutput

from deem.models.positions import get_abs_pos, sincos_pos_embed_2d
from deem.models.weights import LoadReport, Remapped, load_weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The stage whose adapted map forms the token sequence (stride 16: 16x16 tokens at 256 px).
TOKEN_STAGE = 2
TOKEN_STRIDE = 16
# Input sides must be multiples of the trunk's total stride so every stage map is whole.
TRUNK_STRIDE = 32


# ------------------------------------------------------------------------------------------------
# Config and module
# ------------------------------------------------------------------------------------------------


@dataclass
class ImageEncoderConfig:
    """Hyper-parameters of :class:`ImageEncoder`.

    Args:
        depths, dims: ConvNeXt blocks and widths per stage (4 stages).
        out_dim: width of every adapted map and of the tokens (``image_embed_dim``).
        drop_path_rate: stochastic-depth maximum, linear over all blocks (timm schedule).
        pos_grid: side of the sin-cos table's grid (16 for DEEM at every resolution: at 448 px the
            16-grid table is resized bicubically to the 28-grid, as in the original; spec §2.4).
        image_size: the input side the model is configured for (a multiple of 32).
        norm_eps: eps of every trunk LayerNorm.
        ls_init_value: initial layer-scale γ of the blocks (timm default).
        clip_mean, clip_std: input normalisation applied to [0, 1] pixels.
    """

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (128, 256, 512, 1024)
    out_dim: int = 1024
    drop_path_rate: float = 0.1
    pos_grid: int = 16
    image_size: int = 256
    norm_eps: float = 1e-6
    ls_init_value: float = 1e-6
    clip_mean: tuple[float, float, float] = field(default=CLIP_MEAN)
    clip_std: tuple[float, float, float] = field(default=CLIP_STD)

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        self.dims = tuple(int(d) for d in self.dims)
        self.clip_mean = tuple(float(v) for v in self.clip_mean)
        self.clip_std = tuple(float(v) for v in self.clip_std)
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"ImageEncoderConfig: depths {self.depths} and dims {self.dims} must have 4 stages each")
        if self.out_dim % 4 != 0:
            raise ValueError(f"ImageEncoderConfig: out_dim={self.out_dim} must be divisible by 4 (2-D sin-cos table)")
        if self.image_size % (2 * TOKEN_STRIDE) != 0:
            raise ValueError(f"ImageEncoderConfig: image_size={self.image_size} must be a multiple of "
                             f"{2 * TOKEN_STRIDE}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"ImageEncoderConfig: drop_path_rate={self.drop_path_rate} must be in [0, 1)")

    @classmethod
    def convnext_base(cls, **overrides: object) -> ImageEncoderConfig:
        """ConvNeXt-B as in open_clip ``convnext_base_w_320`` (the DEEM 7B image encoder)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def tiny(cls, image_size: int = 64, **overrides: object) -> ImageEncoderConfig:
        """A ~70K-parameter image encoder (out_dim 32) running the same code in milliseconds;
        pos_grid = image_size // 16."""
        base = cls(
            depths=(1, 1, 1, 1),
            dims=(8, 16, 32, 64),
            out_dim=32,
            pos_grid=image_size // TOKEN_STRIDE,
            image_size=image_size,
        )
        return dataclasses.replace(base, **overrides)


@dataclass
class ImageEncoderOutput(ModelOutput):
    """What :meth:`ImageEncoder.forward` returns.

    Attributes:
        tokens: ``T = [cls; flattened adapted stage-2 map]`` ``[B, 1 + g², D]`` **without** positions:
            the visual-tokenizer head computes ``pos_ln(pos_proj(T)) + token_pos`` (spec §3 step 3),
            i.e. the positions are added after the projection, not to ``T``.
        token_pos: ``get_abs_pos(pos_embed, 1 + g²)`` ``[1 + g², D]`` (CLS row zero), for that step.
        multiscale: the 4 adapted maps ``[B, D, H_l, W_l]`` (strides 4, 8, 16, 32), each with
            ``get_abs_pos(pos_embed[1:], H_l·W_l)`` added (spec §3 step 2): the LLM/SD MMFS inputs.
        cls: the adapted CLS vector ``[B, D]`` (``tokens[:, 0]``; the original's pooler output).
    """

    tokens: torch.Tensor
    token_pos: torch.Tensor | None = None
    multiscale: list[torch.Tensor] | None = None
    cls: torch.Tensor | None = None

    @property
    def grid(self) -> int:
        """Side g of the token grid (16 at 256 px, 28 at 448 px)."""
        return math.isqrt(self.tokens.shape[1] - 1)


class ImageEncoder(nn.Module):
    """ConvNeXt trunk + stage adapters + frozen sin-cos positions (spec §2).

    ``pos_embed`` is a **persistent buffer** ``[1 + pos_grid², out_dim]`` (not a Parameter): it is
    saved and loaded with the state dict (so meta-device construction followed by loading restores
    it) but never appears in ``parameters()``. ``clip_mean``/``clip_std`` are persistent buffers too.
    """

    def __init__(self, config: ImageEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ImageEncoderConfig.convnext_base()
        self.trunk = ConvNeXt(
            num_classes=0,
            depths=config.depths,
            dims=config.dims,
            ls_init_value=config.ls_init_value,
            norm_eps=config.norm_eps,
            drop_path_rate=config.drop_path_rate,
        )
        d = config.out_dim
        self.adapter_c2 = nn.Linear(config.dims[0], d)
        self.adapter_c3 = nn.Linear(config.dims[1], d)
        self.adapter_c4 = nn.Linear(config.dims[2], d)
        self.adapter_c5 = nn.Linear(config.dims[3], d)
        self.adapter_cls = nn.Linear(config.dims[3], d)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, config.pos_grid, cls_token=True))
        self.register_buffer("clip_mean", torch.tensor(config.clip_mean).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(config.clip_std).view(1, 3, 1, 1))
        self._drop_path_schedule = [float(m.drop_prob) for m in self._drop_path_modules()]
        self.trunk_frozen = False

    def _drop_path_modules(self) -> list[DropPath]:
        return [m for m in self.trunk.modules() if isinstance(m, DropPath)]

    @property
    def adapters(self) -> list[nn.Linear]:
        """The four stage adapters, fine to coarse."""
        return [self.adapter_c2, self.adapter_c3, self.adapter_c4, self.adapter_c5]

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the sin-cos table and CLIP constants (e.g. after building on the meta device)."""
        c = self.config
        dev = self.adapter_cls.weight.device
        self.pos_embed = sincos_pos_embed_2d(c.out_dim, c.pos_grid, cls_token=True).to(dev, self.pos_embed.dtype)
        self.clip_mean = torch.tensor(c.clip_mean, device=dev, dtype=self.clip_mean.dtype).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(c.clip_std, device=dev, dtype=self.clip_std.dtype).view(1, 3, 1, 1)

    # -- freezing ------------------------------------------------------------------------------

    def set_trunk_frozen(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the ConvNeXt trunk, head LayerNorm included; adapters stay trainable.

        Freezing also sets every stochastic-depth rate to 0, so a frozen trunk is deterministic in
        train mode (the original kept drop path active there, spec §14 bug 4); unfreezing restores
        the configured schedule.
        """
        self.trunk.requires_grad_(not frozen)
        for module, rate in zip(self._drop_path_modules(), self._drop_path_schedule):
            module.drop_prob = 0.0 if frozen else rate
        self.trunk_frozen = frozen

    def drop_path_rates(self) -> list[float]:
        """Current stochastic-depth rate of every trunk block that has one (0 when frozen)."""
        return [float(m.drop_prob) for m in self._drop_path_modules()]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the trunk stages (timm's per-stage switch)."""
        self.trunk.set_grad_checkpointing(enable)

    # -- forward -------------------------------------------------------------------------------

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"ImageEncoder: pixels must be [B, 3, R, R], got shape {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h != w or h % TRUNK_STRIDE != 0:
            raise ValueError(
                f"ImageEncoder: pixels must be square with a side divisible by {TRUNK_STRIDE} "
                f"(e.g. 256 or 448), got {h}x{w}"
            )

    def map_pos(self, h: int, w: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Position map ``[D, h, w]`` added to an ``h``×``w`` feature map (square maps only)."""
        if h != w:
            raise ValueError(f"ImageEncoder.map_pos: maps are square, got {h}x{w}")
        pos = get_abs_pos(self.pos_embed[1:], h * w)
        pos = pos.t().reshape(-1, h, w)  # "(h w) c -> c h w"
        return pos if dtype is None else pos.to(dtype)

    def forward(self, pixels: torch.Tensor) -> ImageEncoderOutput:
        """pixels ``[B, 3, R, R]`` in [0, 1] (R a multiple of 32) -> :class:`ImageEncoderOutput`."""
        self._check_pixels(pixels)
        x = (pixels - self.clip_mean) / self.clip_std
        x = self.trunk.stem(x.to(self.trunk.stem[0].weight.dtype))
        maps: list[torch.Tensor] = []
        for stage, adapter in zip(self.trunk.stages, self.adapters):
            x = stage(x)
            maps.append(adapter(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        x = self.trunk.norm_pre(x)
        cls = self.adapter_cls(self.trunk.forward_head(x, pre_logits=True))

        token_map = maps[TOKEN_STAGE]
        tokens = torch.cat([cls[:, None], token_map.flatten(2).transpose(1, 2)], dim=1)
        token_pos = get_abs_pos(self.pos_embed, tokens.shape[1]).to(tokens.dtype)
        multiscale = [m + self.map_pos(m.shape[-2], m.shape[-1], m.dtype) for m in maps]
        return ImageEncoderOutput(tokens=tokens, token_pos=token_pos, multiscale=multiscale, cls=cls)

    # -- loading -------------------------------------------------------------------------------

    def load_open_clip(self, source: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True) -> LoadReport:
        """Load the trunk from an open_clip checkpoint; see :func:`load_open_clip_convnext`."""
        return load_open_clip_convnext(self, source, strict=strict)


# ------------------------------------------------------------------------------------------------
# open_clip checkpoint loading
# ------------------------------------------------------------------------------------------------

OPEN_CLIP_TRUNK_PREFIX = "visual.trunk."
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        for name in OPEN_CLIP_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"open_clip checkpoint: none of {list(OPEN_CLIP_FILES)} in directory {path}")
    if not path.is_file():
        raise FileNotFoundError(f"open_clip checkpoint: no such file {path}")
    return path


def _read_open_clip_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Trunk tensors (open_clip names) and the names of all other keys of a checkpoint file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            trunk = {k: f.get_tensor(k) for k in keys if k.startswith(OPEN_CLIP_TRUNK_PREFIX)}
        return trunk, [k for k in keys if not k.startswith(OPEN_CLIP_TRUNK_PREFIX)]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or a corrupt file: name the file
        raise ValueError(f"open_clip checkpoint {path}: cannot be read as a weights-only torch file ({e})") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"open_clip checkpoint {path}: expected a state dict, got {type(obj).__name__}")
    state = _unwrap_state_dict(obj)
    trunk = {k: v for k, v in state.items() if k.startswith(OPEN_CLIP_TRUNK_PREFIX)}
    return trunk, [k for k in state if not k.startswith(OPEN_CLIP_TRUNK_PREFIX)]


def _unwrap_state_dict(obj: Mapping[str, object]) -> dict[str, object]:
    """Accept training checkpoints ({"state_dict": ...}) and DDP ("module.") prefixes, as open_clip does."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    keys = list(obj)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def open_clip_convnext_filter(trunk_state: Mapping[str, torch.Tensor], trunk: ConvNeXt,
                              ignored: list[str] | None = None) -> Remapped:
    """open_clip ``visual.trunk.<k>`` keys -> timm ConvNeXt keys ``<k>`` (the key-remapping step of loading).

    timm's own ``convnext.checkpoint_filter_fn`` recognises the open_clip layout (by ``visual.trunk.stem.0.weight``)
    and strips the prefix; it is given the trunk keys only, so that it does not turn the CLIP projection head
    into a classifier (DEEM's trunk has none). `ignored` are the checkpoint's other keys (text tower, head)."""
    from timm.models.convnext import checkpoint_filter_fn

    trunk_state = {k: v for k, v in trunk_state.items() if k.startswith(OPEN_CLIP_TRUNK_PREFIX)}
    if OPEN_CLIP_TRUNK_PREFIX + "stem.0.weight" in trunk_state:
        state = dict(checkpoint_filter_fn(trunk_state, trunk))
    else:  # no stem: timm would take it for a Facebook checkpoint; strip the prefix so the gap is reported
        state = {k[len(OPEN_CLIP_TRUNK_PREFIX) :]: v for k, v in trunk_state.items()}
    out = Remapped(state=state, origin={k: OPEN_CLIP_TRUNK_PREFIX + k for k in state}, kind="open_clip ConvNeXt")
    out.ignored = list(ignored or [])
    if out.ignored:
        out.notes.append(f"{len(out.ignored)} keys outside {OPEN_CLIP_TRUNK_PREFIX}* ignored (text tower, "
                         "projection head: unused by DEEM)")
    return out


def load_open_clip_convnext(
    target: ImageEncoder | ConvNeXt,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
) -> LoadReport:
    """Load the ``visual.trunk.*`` weights of an open_clip ConvNeXt checkpoint into a timm trunk.

    Args:
        target: a :class:`ImageEncoder` (its ``trunk`` is loaded) or a timm ``ConvNeXt``.
        source: ``open_clip_pytorch_model.bin`` (read with ``weights_only=True``), a ``.safetensors``
            file (only the trunk tensors are read), a directory holding one of them, or a state dict.
        strict: raise if trunk keys are missing or unexpected (they are always reported).

    Only ``visual.trunk.<k>`` keys are used, as trunk key ``<k>`` (:func:`open_clip_convnext_filter`); the text
    tower, ``visual.head.*`` (the projection head, unused by DEEM) and everything else are reported as
    ``ignored``. The report's key names are the trunk's (without ``visual.trunk.``). Raises ``ValueError``
    naming the source and the keys when no trunk key exists or shapes disagree.
    """
    trunk_module = target.trunk if isinstance(target, ImageEncoder) else target
    if isinstance(source, Mapping):
        name = "<state dict>"
        state = _unwrap_state_dict(source)
        ckpt = {k: v for k, v in state.items() if k.startswith(OPEN_CLIP_TRUNK_PREFIX)}
        ignored = [k for k in state if not k.startswith(OPEN_CLIP_TRUNK_PREFIX)]
    else:
        path = _resolve_checkpoint(Path(source))
        name = str(path)
        ckpt, ignored = _read_open_clip_state_dict(path)
    if not ckpt:
        sample = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        raise ValueError(
            f"open_clip checkpoint {name}: no '{OPEN_CLIP_TRUNK_PREFIX}*' key (not an open_clip timm/ConvNeXt "
            f"vision tower?); {len(ignored)} keys found: {sample or 'none'}"
        )
    remapped = open_clip_convnext_filter(ckpt, trunk_module, ignored)
    report = load_weights(
        trunk_module, remapped.state, source=f"open_clip checkpoint {name}", strict=strict, origin=remapped.origin,
        hints={"shape": "wrong model size?", "unexpected": "pass strict=False to load the rest",
               "missing": "pass strict=False to load the rest"},
    )
    report.source, report.ignored, report.notes, report.kind = name, remapped.ignored, remapped.notes, remapped.kind
    return report
