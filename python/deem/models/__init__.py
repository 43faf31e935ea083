"""DEEM model components and the whole model."""

from deem.models.config import STAGES, DeemConfig, deem_7b, tiny, with_stage
from deem.models.deem import LOSS_KEYS, DeemModel, DeemOutput
from deem.models.mmfs import MMFS

PRESETS = {"deem_7b": deem_7b, "tiny": tiny}


def config_from_name(name: str, stage: str | None = None) -> DeemConfig:
    """A preset ('deem_7b', 'tiny') or a saved config (a directory with config.json, or the JSON file)."""
    from pathlib import Path

    if name in PRESETS:
        cfg = PRESETS[name]()
    else:
        path = Path(name)
        if not path.exists():
            raise ValueError(f"unknown config {name!r}: not a preset ({', '.join(PRESETS)}) nor an existing path")
        cfg = DeemConfig.from_json_file(str(path)) if path.is_file() else DeemConfig.from_pretrained(str(path))
    return with_stage(cfg, stage) if stage else cfg


__all__ = ["LOSS_KEYS", "MMFS", "PRESETS", "STAGES", "DeemConfig", "DeemModel", "DeemOutput", "config_from_name",
           "deem_7b", "tiny", "with_stage"]
