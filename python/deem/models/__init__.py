"""DEEM model components and the whole model."""

from deem.models.config import (
    PRESETS,
    STAGES,
    DeemConfig,
    config_from_name,
    create_config,
    deem_7b,
    register_preset,
    tiny,
    with_stage,
)
from deem.models.deem import LOSS_KEYS, DeemModel, DeemOutput
from deem.models.mmfs import MMFS

__all__ = ["LOSS_KEYS", "MMFS", "PRESETS", "STAGES", "DeemConfig", "DeemModel", "DeemOutput", "config_from_name",
           "create_config", "deem_7b", "register_preset", "tiny", "with_stage"]
