"""Foreign checkpoint formats: one pure key-remapping function per format (like timm's `checkpoint_filter_fn`)
and the loaders that pass its result to the one strict loader, :func:`deem.models.weights.load_weights`.

* a Hugging Face LLaMA/Vicuna directory (safetensors or `pytorch_model*.bin`, sharded or not):
  :func:`hf_llama_filter`, :func:`load_llama`;
* an original DEEM (RainBowLuoCS/DEEM, every stage) or MM-Interleaved (OpenGVLab/MM-Interleaved)
  `pytorch_model.bin`: :func:`original_checkpoint_filter`, :func:`load_original_checkpoint`, the key maps
  `ORIGINAL_KEY_MAP` and `MM_INTERLEAVED_KEY_MAP` (docs/model.md lists them);
* the open_clip ConvNeXt checkpoint: :func:`deem.models.vision.open_clip_convnext_filter`;
* a diffusers Stable Diffusion 2.1 directory: read by diffusers' own `from_pretrained` in its native layout
  (`DiffusionConfig.pretrained_path`), no key remapping.

`.bin` files are read with `torch.load(weights_only=True)`: nothing is unpickled beyond tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from deem.models.weights import CheckpointError, LoadReport, Remapped, load_weights, matches, read_state_dict

# CheckpointError, LoadReport and read_state_dict are re-exported: their home is deem.models.weights
__all__ = ["MM_INTERLEAVED_KEY_MAP", "ORIGINAL_KEY_MAP", "CheckpointError", "LoadReport", "OriginalLayout",
           "detect_original_layout", "hf_llama_filter", "load_llama", "load_original_checkpoint",
           "original_checkpoint_filter", "read_state_dict"]


def _check_rope(model, key: str, value: torch.Tensor, source: str) -> None:
    """A checkpoint's RoPE `inv_freq` buffer must equal the one the model recomputes (same base and head dim)."""
    ours = getattr(getattr(model.llm, "rotary_emb", None), "inv_freq", None)
    if ours is None or ours.is_meta:
        return
    if tuple(value.shape) != tuple(ours.shape) or not torch.allclose(value.float().cpu(), ours.float().cpu(),
                                                                      rtol=1e-3, atol=0.0):
        raise CheckpointError(
            f"{source}: {key} {tuple(value.shape)} differs from the model's rotary table {tuple(ours.shape)}: the "
            "checkpoint's LLM uses another RoPE base or head size than this configuration")


# ----------------------------------------------------------------------------------------------- LLaMA


def hf_llama_filter(state: Mapping[str, torch.Tensor], model, generator: torch.Generator | None = None,
                    source: str = "<state dict>") -> tuple[Remapped, torch.Tensor]:
    """A HF `LlamaForCausalLM` state dict -> `model.llm` keys, and the `lm_head` weight for the text head.

    `model.<k>` becomes `<k>`; the embedding grows from the checkpoint's vocabulary to `text_vocab_size` with
    new rows ~ N(0, initializer_range²) (spec/model.md §7.2); `rotary_emb.inv_freq` buffers (older
    transformers saved them) are checked against the model's and consumed; without `lm_head.weight` the
    embeddings are the head (tied)."""
    out = Remapped(kind="Hugging Face LLaMA causal LM")
    others = []
    for key, value in state.items():
        if key.startswith("model.") and key.endswith("rotary_emb.inv_freq"):
            _check_rope(model, key, value, source)
            out.ignored.append(key)
        elif key.startswith("model."):
            out.state[key[len("model."):]] = value
            out.origin[key[len("model."):]] = key
        elif key != "lm_head.weight":
            others.append(key)
    if not out.state:
        raise CheckpointError(f"{source}: no 'model.*' keys: not a LLaMA causal-LM checkpoint")
    if others:
        raise CheckpointError(f"{source}: {len(others)} keys are not part of a LLaMA causal LM: {sorted(others)[:8]}")
    if "embed_tokens.weight" not in out.state:
        raise CheckpointError(f"{source}: the LLaMA checkpoint lacks model.embed_tokens.weight")
    if out.ignored:
        out.notes.append(f"{len(out.ignored)} rotary_emb.inv_freq buffers: recomputed by the model (values checked)")
    cfg = model.config
    emb = out.state["embed_tokens.weight"]
    with torch.no_grad():
        grown = torch.empty(cfg.text_vocab_size, emb.shape[1], dtype=emb.dtype)
        grown.normal_(0.0, model.llm.config.initializer_range, generator=generator)
        n = min(emb.shape[0], cfg.text_vocab_size)
        grown[:n] = emb[:n]
    out.state["embed_tokens.weight"] = grown
    return out, state.get("lm_head.weight", emb)


def load_llama(model, path: str | Path, generator: torch.Generator | None = None) -> LoadReport:
    """A HF LLaMA/Vicuna checkpoint into `model.llm` and `model.text_head` (spec/model.md §7.2, §7.3): the text
    head starts from the checkpoint's `lm_head`. Only the MMFS cross-attention keys may be missing."""
    remapped, head = hf_llama_filter(read_state_dict(path), model, generator, str(path))
    report = load_weights(model.llm, remapped.state, source=str(path), allow_missing=("layers.*.llama_cross_attn.",),
                          origin=remapped.origin, hints={"missing": "the LLaMA checkpoint lacks them"})
    cfg = model.config
    if head.shape[0] < cfg.base_vocab_size:
        raise CheckpointError(
            f"{path}: lm_head has {head.shape[0]} rows, fewer than base_vocab_size={cfg.base_vocab_size}")
    model.text_head.init_from_lm_head(head)
    report.ignored, report.notes, report.kind = remapped.ignored, remapped.notes, remapped.kind
    report.loaded.append("lm_head.weight -> text_head")
    return report


# ------------------------------------------------------------------------------ original DEEM / MM-Interleaved

# (checkpoint key, our key) pairs, first match wins. An entry ending in "." maps a prefix (the rest of the key
# is kept), any other entry one exact key; None drops the keys on purpose (DROPPED says why). Written from the
# module trees of `MMInterleaved` in uni_interleaved/models/ (DEEM) and mm_interleaved/models/ (MM-Interleaved).
_CONVNEXT = "visual_tokenizer.sniffer.vision_model."  # CLIPVisionAdapterModel.vision_model
_SD_MODULES = ("unet", "vae", "mmfs_module")  # StableDiffusion's sub-modules (its noise scheduler has no weights)
_SAME_TOKENIZER = ("pos_proj.", "pos_ln.", "post_ln.", "perceiver_resampler.")


def _same(prefix: str, names: Sequence[str]) -> list[tuple[str, str]]:
    return [(prefix + n, prefix + n) for n in names]


_COMMON: list[tuple[str, str | None]] = [
    ("mm_decoder.", "llm."),
    ("text_decoder.head_new.", "text_head.head_new."),
    ("text_decoder.head.", "text_head.head."),
    # the image encoder's position table (a frozen Parameter there, a buffer here) and persistent buffers
    ("visual_tokenizer.pos_embed", "visual_tokenizer.image_encoder.pos_embed"),
    ("visual_tokenizer.clip_mean", "visual_tokenizer.image_encoder.clip_mean"),
    ("visual_tokenizer.clip_std", "visual_tokenizer.image_encoder.clip_std"),
    *_same("visual_tokenizer.", _SAME_TOKENIZER),
]
_TAIL: list[tuple[str, str | None]] = [
    *_same("image_decoder.", ("perceiver_resampler.", "neg_prompt_embeds")),
    ("context_feat_proj.", "context_feat_proj."),
    ("soi_token", "soi_token"),
]

ORIGINAL_KEY_MAP: list[tuple[str, str | None]] = [
    *_COMMON,
    (_CONVNEXT + "visual.trunk.", "visual_tokenizer.image_encoder.trunk."),
    (_CONVNEXT + "visual.head.", None),
    *((f"{_CONVNEXT}adapter_{n}.", f"visual_tokenizer.image_encoder.adapter_{n}.")
      for n in ("c2", "c3", "c4", "c5", "cls")),
    *_same("visual_tokenizer.", ("proj_t.", "proj_i.", "feature_extractor.mask_linear.",
                                 "feature_extractor.mask_feat_linear.")),
    *((f"visual_tokenizer.encoder.{m}.", f"diffusion.{m}.") for m in _SD_MODULES),
    # the ImageDecoder's negative prompt, also attached to the tokenizer: one tensor under two names
    ("visual_tokenizer.neg_prompt_embeds", "image_decoder.neg_prompt_embeds"),
    # DEEM's ImageDecoder does not store the SD; a checkpoint that also has it there (MM-Interleaved's place) must
    # hold the same tensors as visual_tokenizer.encoder.* (checked)
    *((f"image_decoder.decoder.{m}.", f"diffusion.{m}.") for m in _SD_MODULES),
    *_TAIL,
]
"""Original DEEM (every stage) -> deem. docs/model.md explains each line."""

MM_INTERLEAVED_KEY_MAP: list[tuple[str, str | None]] = [
    *_COMMON,
    ("visual_tokenizer.proj.", "visual_tokenizer.proj_t."),  # the resampler -> LLM projection
    *((f"image_decoder.decoder.{m}.", f"diffusion.{m}.") for m in _SD_MODULES),
    *_TAIL,
]
"""MM-Interleaved -> deem, for every module deem implements (its image encoder is refused: detect_original_layout)."""

DROPPED = {_CONVNEXT + "visual.head.": "the open_clip projection head, which DEEM never uses"}

# our prefixes of modules the original always creates but deem builds only with the diffusion model / image
# decoder: consumed, with a note, when the target configuration (sft_referring) does not build them
BUILT_WITH_DIFFUSION = {
    "visual_tokenizer.proj_i.": "the visual tokenizer's projection to the diffusion model",
    "context_feat_proj.": "the image decoder's context projection",
}
_VIT_SNIFFER = ("DEEM's CLIP-ViT + ViT-Adapter sniffer (the 'openai' sniffer path), which deem does not implement "
                "(deem's image encoder is the ConvNeXt)")
_VIT_ENCODER = ("MM-Interleaved's CLIP-ViT-L/14 + ViT-Adapter image encoder, which deem does not implement (deem's "
                "image encoder is the ConvNeXt)")
ROPE_KEY = "mm_decoder.layers.*.self_attn.rotary_emb.inv_freq"  # persistent in transformers 4.31's LLaMA


@dataclass(frozen=True)
class OriginalLayout:
    """What an original checkpoint is: its key map and the parts deem cannot load (prefix -> why)."""

    name: str
    description: str
    key_map: list[tuple[str, str | None]]
    unsupported: Mapping[str, str]


def detect_original_layout(keys, source: str = "<state dict>") -> OriginalLayout:
    """Tell an original DEEM checkpoint (and its stage's layout) from an MM-Interleaved one by its keys."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(_CONVNEXT + "visual.trunk."):
        parts = ["ConvNeXt image encoder"]
        parts.append("SD feedback" if has("visual_tokenizer.encoder.") else "no diffusion model")
        if has("image_decoder."):
            parts.append("image decoder")
        if has("visual_tokenizer.feature_extractor."):
            return OriginalLayout("deem_mask", f"original DEEM-MASK checkpoint (sft_referring: mask pooling, "
                                  f"{', '.join(parts)})", ORIGINAL_KEY_MAP, {})
        stages = "pretrain / sft_caption / sft_grounding / sft_vqa" if has("visual_tokenizer.encoder.") else "custom"
        return OriginalLayout("deem", f"original DEEM checkpoint ({stages}: {', '.join(parts)})", ORIGINAL_KEY_MAP, {})
    if has("visual_tokenizer.sniffer."):
        return OriginalLayout("deem_vit", "original DEEM checkpoint with the CLIP-ViT sniffer", ORIGINAL_KEY_MAP,
                              {"visual_tokenizer.sniffer.": _VIT_SNIFFER})
    if has("visual_tokenizer.encoder.vision_model.") or has("visual_tokenizer.proj.") or has("image_decoder.decoder."):
        return OriginalLayout("mm_interleaved", "MM-Interleaved checkpoint (CLIP-ViT-L/14 + ViT-Adapter encoder, SD "
                              "inside the image decoder)", MM_INTERLEAVED_KEY_MAP,
                              {"visual_tokenizer.encoder.": _VIT_ENCODER})
    if has("mm_decoder."):
        raise CheckpointError(f"{source}: cannot tell DEEM from MM-Interleaved: neither visual_tokenizer.sniffer.* "
                              "(DEEM) nor visual_tokenizer.encoder.vision_model.* / visual_tokenizer.proj.* "
                              "(MM-Interleaved) keys")
    raise CheckpointError(f"{source}: not an original DEEM / MM-Interleaved checkpoint (no mm_decoder.* keys; "
                          f"e.g. {keys[:5]})")


def _rule(key: str, key_map: list[tuple[str, str | None]]) -> tuple[str, str | None] | None:
    for old, new in key_map:
        if key.startswith(old) if old.endswith(".") else key == old:
            return old, new
    return None


def map_original_key(key: str, key_map: list[tuple[str, str | None]] = ORIGINAL_KEY_MAP) -> str | None:
    """Our name for one original checkpoint key (None: dropped on purpose)."""
    rule = _rule(key, key_map)
    if rule is None:
        raise CheckpointError(f"original checkpoint key {key!r} matches no entry of the key map")
    old, new = rule
    return None if new is None else new + key[len(old):]


def original_checkpoint_filter(state: Mapping[str, torch.Tensor], model, drop: Sequence[str] = (),
                               source: str = "<state dict>") -> Remapped:
    """An original DEEM / MM-Interleaved state dict under `model`'s key names.

    Every key is mapped, deliberately consumed (RoPE buffers, checked; the unused open_clip head; the
    projections of modules this configuration does not build), dropped because `drop` names it, or an error:
    keys of modules deem does not implement are refused with the reason, keys no map entry covers are named."""
    layout = detect_original_layout(state, source)
    out = Remapped(kind=layout.description)
    own = list(model.state_dict())
    reasons: dict[str, list[str]] = {}
    unsupported: dict[str, list[str]] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        if matches(key, drop):
            reasons.setdefault("discarded by drop=", []).append(key)
            continue
        bad = next((p for p in layout.unsupported if key.startswith(p)), None)
        if bad is not None:
            unsupported.setdefault(bad, []).append(key)
            continue
        if fnmatchcase(key, ROPE_KEY):
            _check_rope(model, key, value, source)
            reasons.setdefault("rotary_emb.inv_freq buffers: recomputed by the model (values checked)", []).append(key)
            continue
        rule = _rule(key, layout.key_map)
        if rule is None:
            unmatched.append(key)
            continue
        old, new = rule
        if new is None:
            reasons.setdefault(f"{old}*: {DROPPED[old]}", []).append(key)
            continue
        target = new + key[len(old):]
        unbuilt = next((p for p in BUILT_WITH_DIFFUSION if target.startswith(p)), None)
        if unbuilt is not None and not any(k.startswith(unbuilt) for k in own):
            reasons.setdefault(f"{old}*: {BUILT_WITH_DIFFUSION[unbuilt]}, which this configuration (stage "
                               f"{getattr(model.config, 'stage', '?')}) does not build", []).append(key)
            continue
        if target in out.state:
            if not torch.equal(out.state[target], value):
                raise CheckpointError(f"{source}: {out.origin[target]} and {key} both map to {target} but differ")
            star = "*" if old.endswith(".") else ""
            reasons.setdefault(f"a second copy of what is loaded as {new}{star} (checked equal)", []).append(key)
            continue
        out.state[target] = value
        out.origin[target] = key
    if unsupported:
        parts = [f"{p}* ({len(ks)} keys, e.g. {ks[0]}) is {layout.unsupported[p]}" for p, ks in unsupported.items()]
        raise CheckpointError(
            f"{source}: {layout.description}: " + "; ".join(parts) + ". Nothing was loaded; to load the other "
            f"modules anyway, pass drop={sorted(unsupported)} (those modules keep their own weights)")
    if unmatched:
        raise CheckpointError(f"{source}: {layout.description}: {len(unmatched)} keys match no entry of the key "
                              f"map: {sorted(unmatched)[:8]}")
    for why, keys in reasons.items():
        out.ignored.extend(keys)
        out.notes.append(f"{len(keys)} keys ignored: {why}")
    out.ignored.sort()
    return out


def load_original_checkpoint(model, path: str | Path, *, drop: Sequence[str] = (),
                             allow_missing: bool | Sequence[str] = True) -> LoadReport:
    """An original DEEM (any stage) or MM-Interleaved checkpoint (`pytorch_model.bin`, sharded `.bin`, or
    safetensors) into `model`, through :func:`original_checkpoint_filter`.

    `drop` lists checkpoint prefixes to discard (e.g. MM-Interleaved's `visual_tokenizer.encoder.`, which deem
    cannot load). Checkpoint keys of modules this configuration does not build are errors; model keys the
    checkpoint lacks are reported (e.g. the diffusion model of a DEEM-MASK checkpoint), or errors where
    `allow_missing` does not cover them."""
    remapped = original_checkpoint_filter(read_state_dict(path), model, drop=drop, source=str(path))
    stage = getattr(model.config, "stage", "?")
    report = load_weights(model, remapped.state, source=str(path), allow_missing=allow_missing, origin=remapped.origin,
                          hints={"unexpected": f"this configuration (stage {stage}) does not build their modules: "
                                               "load into the matching stage, or discard them with drop=[prefix]"})
    report.ignored, report.notes, report.kind = remapped.ignored, remapped.notes, remapped.kind
    return report
