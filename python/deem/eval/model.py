"""What an evaluation runs: the device and dtype, the tokenizer and the model (a checkpoint directory or an
in-memory `DeemModel`), checked against each other and the benchmarks, and the checkpoint's fingerprint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deem.data.errors import DataError
from deem.data.tokenizer import DeemTokenizer, load_tokenizer
from deem.eval.config import BenchmarkConfig, EvalConfig
from deem.eval.errors import EvalError


def resolve_device(name: str) -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK) if there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise EvalError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from exc


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        dt = getattr(torch, name)
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype):
        raise EvalError(f"unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return dt


def checkpoint_fingerprint(checkpoint: Any) -> dict[str, Any]:
    """What identifies a checkpoint in `run.json`: its resolved path and its files' names, sizes and mtimes."""
    if checkpoint is None:
        return {"checkpoint": None}
    if not isinstance(checkpoint, (str, Path)):
        return {"checkpoint": "in-memory model"}
    path = Path(checkpoint).resolve()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json")) if path.is_dir() else []
    return {"checkpoint": str(path),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _load_model(checkpoint: Any, device: torch.device, dtype: torch.dtype):
    from deem.models import DeemModel

    if isinstance(checkpoint, torch.nn.Module):
        return checkpoint.eval()
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise EvalError(f"checkpoint {path} is not a deem checkpoint directory (no config.json; save one with "
                        "DeemModel.save_pretrained)")
    model = DeemModel.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def check_compatible(model: Any, tok: DeemTokenizer, benches: Sequence[BenchmarkConfig]) -> None:
    """The tokenizer's special ids, vocabulary and image-token count, and the benchmarks' image size, must fit
    the checkpoint."""
    cfg = model.config
    sp_tok = tok.special.as_dict()
    bad = {k: (v, sp_tok[k]) for k, v in cfg.special_tokens.items() if k in sp_tok and sp_tok[k] != v}
    if bad:
        raise EvalError(f"tokenizer and checkpoint disagree on special token ids (model, tokenizer): {bad}")
    if len(tok.hf) > cfg.text_vocab_size:
        raise EvalError(f"tokenizer has {len(tok.hf)} tokens, the checkpoint's vocabulary {cfg.text_vocab_size}")
    if tok.num_img_token != cfg.num_img_token:
        raise EvalError(f"tokenizer num_img_token {tok.num_img_token} != checkpoint num_img_token "
                        f"{cfg.num_img_token} (set tokenizer.num_img_token in the eval config)")
    size = (getattr(cfg, "image_encoder", None) or {}).get("image_size")
    for b in benches:
        res = (b.dataset.get("transform") or {}).get("resolution")
        if size is not None and res is not None and int(res) != int(size):
            raise EvalError(f"{b.name}: images are resized to {res} px but the checkpoint's image encoder expects "
                            f"{size} (set `resolution:` in the eval config or --resolution)")


def load_for_eval(cfg: EvalConfig, selected: Sequence[BenchmarkConfig], checkpoint: Any, tokenizer: Any,
                  dev: torch.device, dtype: str | None, score_only: bool
                  ) -> tuple[DeemTokenizer | None, Any, torch.device, torch.dtype]:
    """Tokenizer and model (none of them with `score_only`); an in-memory model keeps its device and dtype."""
    dt = resolve_dtype(dtype or cfg.dtype, dev)
    if score_only:
        return None, None, dev, dt
    if isinstance(tokenizer, DeemTokenizer):
        tok = tokenizer
    else:
        tok_cfg = tokenizer if tokenizer is not None else cfg.tokenizer
        if tok_cfg is None:
            raise EvalError(f"{cfg.source}: no tokenizer configured (set `tokenizer:` or pass --tokenizer)")
        try:
            tok = load_tokenizer(tok_cfg)
        except DataError as exc:
            raise EvalError(f"tokenizer: {exc}") from exc
    if isinstance(checkpoint, torch.nn.Module):
        tensor = next(iter(checkpoint.parameters()), None)
        if tensor is not None:
            dev, dt = tensor.device, tensor.dtype
    model = _load_model(checkpoint, dev, dt)
    check_compatible(model, tok, selected)
    return tok, model, dev, dt
