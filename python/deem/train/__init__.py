"""Training: `deem train CONFIG` (see docs/train.md)."""

from deem.train.config import ConfigError, TrainConfig
from deem.train.engine import Trainer
from deem.train.export import export_weights

__all__ = ["ConfigError", "TrainConfig", "Trainer", "export_weights"]
