"""Data configs: a YAML file (or dict) with an optional `root` (base of relative paths; default: the current
directory), a `tokenizer` entry (see `load_tokenizer`), an optional `max_image_pixels` (the default pixel limit of
its datasets) and `train` / `eval` entries, each one dataset config or a list. Read with the config mechanism of
`deem.config`, used by `deem data inspect`, the trainer and the weight export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deem.config import read_yaml
from deem.data.errors import DataError
from deem.data.registry import resolve_paths


def load_data_config(config: str | Path | dict[str, Any], root: str | Path | None = None) -> dict[str, Any]:
    """Read a data config (YAML path or dict) and resolve its relative paths against `root`
    (argument, else the config's `root` key, else the current directory)."""
    cfg = dict(config) if isinstance(config, dict) else read_yaml(config, "data config", DataError)
    base = Path(root if root is not None else cfg.get("root", "."))
    cfg = resolve_paths({k: v for k, v in cfg.items() if k != "root"}, base)
    if "max_image_pixels" in cfg:  # the default of every dataset that does not set its own
        for split in ("train", "eval"):
            value = cfg.get(split)
            if isinstance(value, list):
                cfg[split] = [_with_limit(e, cfg["max_image_pixels"]) for e in value]
            elif isinstance(value, dict):
                cfg[split] = _with_limit(value, cfg["max_image_pixels"])
    return cfg


def _with_limit(entry: Any, limit: Any) -> Any:
    return {**entry, "max_image_pixels": limit} if isinstance(entry, dict) and "max_image_pixels" not in entry \
        else entry
