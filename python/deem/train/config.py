"""Training configuration: a YAML file with `key=value` overrides (dotted keys), validated into
`TrainConfig`. See configs/train/ and docs/train.md."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from deem.config import apply_overrides, check_keys, from_mapping, parse_override, read_yaml
from deem.configs import SYNTH_DATA
from deem.errors import ConfigError

__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "parse_override"]


@dataclass
class ModelSection:
    preset: str = "tiny"  # deem_7b | tiny | a saved model directory
    stage: str = "pretrain_deem"
    image_size: int | None = None
    components: dict[str, str] = field(default_factory=dict)  # llm / diffusion / image_encoder paths (first stage)
    overrides: dict[str, Any] = field(default_factory=dict)  # DeemConfig attributes


@dataclass
class InitFrom:
    """Explicit stage chaining: weights of a previous stage's exported model. Keys the new model does not
    have must be listed in `drop`, keys it has but the checkpoint lacks in `allow_missing` (prefixes)."""

    path: str
    drop: list[str] = field(default_factory=list)
    allow_missing: list[str] = field(default_factory=list)


def _init_from(init: Any) -> InitFrom:
    if not isinstance(init, dict) or "path" not in init:
        raise ConfigError(f"init_from: expected a path or a mapping with `path` (and `drop`, `allow_missing`), "
                          f"got {init!r}")
    return from_mapping(InitFrom, init, "init_from")


@dataclass
class DataSection:
    config: str = str(SYNTH_DATA)  # a data config; default: the synthetic world's, shipped with the package
    root: str | None = None
    dataset: str = ""  # the `name` of an entry of the data config's `train` list
    batch_size: int = 8  # map-style datasets; streams batch themselves
    num_workers: int = 0
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    groups: list[dict[str, Any]] = field(default_factory=list)  # [{pattern, lr, weight_decay}] first match wins


@dataclass
class ScheduleSection:
    warmup_steps: int = 0
    max_steps: int = 100


@dataclass
class RunSection:
    precision: str = "fp32"  # fp32 | bf16 | fp16
    frozen_dtype: str | None = None  # e.g. bf16: store frozen weights in bf16 (trainable stay fp32)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool | None = None  # None: the model config's choice
    seed: int = 32
    max_nonfinite: int = 10
    deepspeed: str | None = None  # a DeepSpeed JSON config (ZeRO 1/2/3)


@dataclass
class CheckpointSection:
    every: int = 100
    keep: int = 3


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class EvalSection:
    config: str | None = None  # an eval config (configs/eval/*.yaml)
    every: int = 0  # evaluate every N steps and after the last one; 0: never
    benchmarks: list[str] = field(default_factory=list)  # names in the eval config; empty: all
    root: str | None = None  # the eval config's data root; default: data.root


@dataclass
class TrainConfig:
    output_dir: str
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: RunSection = field(default_factory=RunSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    init_from: InitFrom | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ModelSection,
        "data": DataSection,
        "optim": OptimSection,
        "schedule": ScheduleSection,
        "run": RunSection,
        "checkpoint": CheckpointSection,
        "log": LogSection,
        "eval": EvalSection,
    }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"a training config is a mapping of sections, got {type(raw).__name__}")
        raw = copy.deepcopy(raw)
        check_keys(raw, [*cls.SECTIONS, "output_dir", "init_from"], "training config")
        if not raw.get("output_dir"):
            raise ConfigError("output_dir is required")
        kwargs: dict[str, Any] = {"output_dir": str(raw["output_dir"]), "raw": copy.deepcopy(raw)}
        for name, section in cls.SECTIONS.items():
            kwargs[name] = from_mapping(section, raw.get(name) or {}, name)
        if raw.get("init_from"):
            init = raw["init_from"]
            kwargs["init_from"] = InitFrom(path=init) if isinstance(init, str) else _init_from(init)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such training config" + (" (a directory)" if path.is_dir() else ""))
        raw = read_yaml(path, "training config", ConfigError)
        raw = apply_overrides(raw, overrides or [])
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def validate(self) -> None:
        if self.run.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"run.precision must be fp32, bf16 or fp16, got {self.run.precision!r}")
        if self.run.grad_accum < 1:
            raise ConfigError("run.grad_accum must be >= 1")
        if self.schedule.max_steps < 1 or self.schedule.warmup_steps < 0:
            raise ConfigError("schedule: max_steps >= 1 and warmup_steps >= 0")
        if not self.data.dataset:
            raise ConfigError("data.dataset: name the entry of the data config's `train` list to train on")
        for group in self.optim.groups:
            if "pattern" not in group:
                raise ConfigError(f"optim.groups entry {group} has no 'pattern'")
        if self.checkpoint.keep < 1:
            raise ConfigError("checkpoint.keep must be >= 1")
        if self.eval.every < 0 or (self.eval.every > 0 and not self.eval.config):
            raise ConfigError("eval: `every` >= 0, and `config` (an eval config) when every > 0")
