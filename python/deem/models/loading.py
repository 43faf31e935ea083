"""Loading weights offline from the formats users have (spec/model.md, DESIGN.md):

* a Hugging Face LLaMA/Vicuna directory (safetensors or `pytorch_model*.bin`, sharded or not);
* a diffusers Stable Diffusion 2.1 directory (through `DiffusionConfig.pretrained_path`);
* the open_clip ConvNeXt checkpoint (`open_clip_pytorch_model.bin`);
* an original DEEM / MM-Interleaved `pytorch_model.bin`, through `ORIGINAL_KEY_MAP`.

`.bin` files are read with `torch.load(weights_only=True)`: nothing is unpickled beyond tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deem.errors import UserError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model: names the file and the offending keys."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.source}: {len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"
        )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or of a directory holding one (sharded checkpoints included)."""
    path = Path(path)
    if path.is_file():
        return _read_file(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    for index_name in INDEX_FILES:
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_file(path / shard))
            return state
    for name in WEIGHT_FILES:
        if (path / name).exists():
            return _read_file(path / name)
    raise CheckpointError(f"{path}: no weights found (expected one of {WEIGHT_FILES + INDEX_FILES})")


def assign(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy `state` into `module` (keys relative to it); shape mismatches and unknown keys are errors,
    keys the checkpoint lacks are reported as missing."""
    own = module.state_dict()
    report = LoadReport(source)
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        raise CheckpointError(f"{source}: shape mismatch for {len(bad_shapes)} tensors: " + "; ".join(bad_shapes[:5]))
    report.unexpected = sorted(k for k in state if k not in own)
    if report.unexpected:
        raise CheckpointError(
            f"{source}: {len(report.unexpected)} keys the model does not have: {report.unexpected[:8]}"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    report.loaded = sorted(state)
    report.missing = sorted(k for k in own if k not in state)
    return report


# ----------------------------------------------------------------------------------------- LLaMA


def load_llama(model, path: str | Path, generator: torch.Generator | None = None) -> LoadReport:
    """A HF LLaMA/Vicuna checkpoint into `model.llm` and `model.text_head` (spec/model.md §7.2, §7.3):
    the vocabulary grows from the checkpoint's to `text_vocab_size` with new rows ~ N(0, 0.02²), the text
    head starts from the checkpoint's `lm_head`. MMFS cross-attention keys are expected to be missing."""
    state = read_state_dict(path)
    llm_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not llm_state:
        raise CheckpointError(f"{path}: no 'model.*' keys: not a LLaMA causal-LM checkpoint")
    ignored = [k for k in llm_state if k.endswith("rotary_emb.inv_freq")]
    for k in ignored:
        llm_state.pop(k)
    cfg = model.config
    emb = llm_state.pop("embed_tokens.weight")
    std = model.llm.config.initializer_range
    with torch.no_grad():
        grown = torch.empty(cfg.text_vocab_size, emb.shape[1], dtype=emb.dtype)
        grown.normal_(0.0, std, generator=generator)
        n = min(emb.shape[0], cfg.text_vocab_size)
        grown[:n] = emb[:n]
    llm_state["embed_tokens.weight"] = grown
    report = assign(model.llm, llm_state, str(path))
    unexpected_missing = [k for k in report.missing if "llama_cross_attn" not in k]
    if unexpected_missing:
        raise CheckpointError(f"{path}: the LLaMA checkpoint lacks {unexpected_missing[:8]}")
    head = state.get("lm_head.weight", emb)  # tied embeddings if no lm_head
    if head.shape[0] < cfg.base_vocab_size:
        raise CheckpointError(
            f"{path}: lm_head has {head.shape[0]} rows, fewer than base_vocab_size={cfg.base_vocab_size}"
        )
    model.text_head.init_from_lm_head(head)
    report.ignored = ignored
    report.loaded.append("lm_head.weight -> text_head")
    return report


# --------------------------------------------------------------------------- original checkpoint

# (original prefix, our prefix); None drops the keys. First match wins.
ORIGINAL_KEY_MAP: list[tuple[str, str | None]] = [
    ("mm_decoder.", "llm."),
    ("text_decoder.head_new.", "text_head.head_new."),
    ("text_decoder.head.", "text_head.head."),
    ("visual_tokenizer.sniffer.vision_model.visual.trunk.", "visual_tokenizer.sniffer.trunk."),
    ("visual_tokenizer.sniffer.vision_model.visual.", None),  # the unused open_clip projection head
    ("visual_tokenizer.sniffer.vision_model.adapter_", "visual_tokenizer.sniffer.adapter_"),
    ("visual_tokenizer.sniffer.vision_model.post_layernorm.", None),  # identity in the original
    ("visual_tokenizer.pos_embed", "visual_tokenizer.sniffer.pos_embed"),
    ("visual_tokenizer.encoder.", "diffusion."),
    ("visual_tokenizer.neg_prompt_embeds", "image_decoder.neg_prompt_embeds"),
    ("visual_tokenizer.", "visual_tokenizer."),
    ("image_decoder.decoder.", None),  # the same SD instance as visual_tokenizer.encoder
    ("image_decoder.", "image_decoder."),
    ("context_feat_proj.", "context_feat_proj."),
    ("soi_token", "soi_token"),
]


def map_original_key(key: str) -> str | None:
    for old, new in ORIGINAL_KEY_MAP:
        if key.startswith(old):
            return None if new is None else new + key[len(old) :]
    raise CheckpointError(f"original checkpoint key {key!r} matches no entry of ORIGINAL_KEY_MAP")


def load_original_checkpoint(model, path: str | Path) -> LoadReport:
    """An original DEEM / MM-Interleaved checkpoint (`pytorch_model.bin`, or safetensors) through
    `ORIGINAL_KEY_MAP`. Keys of modules this configuration does not build are errors; parameters the
    checkpoint lacks are reported (e.g. the diffusion model of an sft_referring checkpoint)."""
    state = read_state_dict(path)
    mapped: dict[str, torch.Tensor] = {}
    ignored = []
    for key, value in state.items():
        new = map_original_key(key)
        if new is None:
            ignored.append(key)
            continue
        if new in mapped and not torch.equal(mapped[new], value):
            raise CheckpointError(f"{path}: two original keys map to {new} with different values")
        mapped[new] = value
    report = assign(model, mapped, str(path))
    report.ignored = sorted(ignored)
    return report
