"""DEEM model components and the whole model."""

from deem.errors import ConfigError
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


__all__ = ["LOSS_KEYS", "MMFS", "PRESETS", "STAGES", "DeemConfig", "DeemModel", "DeemOutput", "config_from_name",
           "deem_7b", "tiny", "with_stage"]
