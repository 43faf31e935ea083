"""Build the model a training config describes: preset or real components, the stage, explicit
`init_from` weights of a previous stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deem.data.tokenizer import DeemTokenizer
from deem.errors import ConfigError
from deem.models import PRESETS, STAGES, DeemConfig, DeemModel, create_config, with_stage
from deem.models.config import check_token_layout
from deem.models.weights import CheckpointError, load_weights, read_state_dict


def model_config(section, tokenizer: DeemTokenizer) -> DeemConfig:
    image_size = section.image_size
    if section.preset in PRESETS:
        cfg = create_config(section.preset, tokens=tokenizer.layout, image_size=image_size)
        image_size = None  # the preset is built at that size
    elif (Path(section.preset) / "config.json").is_file():  # a saved model's architecture (its weights: init_from)
        cfg = DeemConfig.from_pretrained(section.preset)
    else:
        raise ConfigError(
            f"model.preset must be one of {sorted(PRESETS)} or a saved model directory (with config.json), got "
            f"{section.preset!r}"
        )
    if section.stage not in STAGES:
        raise ConfigError(f"model.stage: unknown stage {section.stage!r}; expected one of {list(STAGES)}")
    cfg = with_stage(cfg, section.stage, image_size=image_size)
    for key, value in section.overrides.items():
        if not hasattr(cfg, key):
            raise ConfigError(f"model.overrides: DeemConfig has no attribute {key!r}")
        setattr(cfg, key, value)
    try:
        cfg._validate()
    except ConfigError as err:
        raise ConfigError(f"model.overrides {section.overrides}: {err}" if section.overrides else str(err)) from err
    check_token_layout(cfg, tokenizer.layout, f"the {section.preset} preset")
    return cfg


def init_from(model: DeemModel, spec) -> dict[str, Any]:
    """Load a previous stage's exported weights: every model key must come from the checkpoint unless listed
    in `allow_missing`; every checkpoint key must exist in the model unless listed in `drop` (prefixes)."""
    try:
        state = read_state_dict(spec.path)
    except CheckpointError as err:
        raise CheckpointError(f"init_from: {err}") from err
    report = load_weights(
        model, state, source=f"init_from {spec.path}", allow_missing=spec.allow_missing,
        drop=spec.drop, hints={"unexpected": "list their prefixes in init_from.drop to discard them",
                               "missing": "list their prefixes in init_from.allow_missing to keep them fresh"})
    return {"loaded": len(report.loaded), "dropped": len(report.ignored), "fresh": report.missing}


def build_model(train_cfg, tokenizer: DeemTokenizer) -> tuple[DeemModel, dict[str, Any]]:
    section = train_cfg.model
    cfg = model_config(section, tokenizer)
    if train_cfg.run.gradient_checkpointing is not None:
        cfg.llm_gradient_checkpointing = train_cfg.run.gradient_checkpointing
    report: dict[str, Any] = {}
    if section.components:
        unknown = set(section.components) - {"llm", "diffusion", "image_encoder"}
        if unknown:
            raise ConfigError(f"model.components: unknown keys {sorted(unknown)} (llm, diffusion, image_encoder)")
        for key, path in section.components.items():
            if not Path(path).exists():
                raise ConfigError(f"model.components.{key}: {path} does not exist")
        model, reports = DeemModel.from_components(
            cfg,
            llm_path=section.components.get("llm"),
            diffusion_path=section.components.get("diffusion"),
            image_encoder_checkpoint=section.components.get("image_encoder"),
        )
        report["components"] = [getattr(r, "summary", lambda r=r: str(r))() for r in reports]
    else:
        model = DeemModel(cfg)
    if train_cfg.init_from is not None:
        report["init_from"] = init_from(model, train_cfg.init_from)
    model.apply_stage()
    return model, report


FROZEN_INIT_FILE = "frozen_init.safetensors"


def generated_frozen(model: DeemModel, train_cfg, report: dict[str, Any]) -> list[str]:
    """Frozen parameters whose values come from random initialisation rather than from files (a model trained
    from scratch, or keys `init_from` left fresh): checkpoints hold trainable weights only, so the run keeps
    these once (`FROZEN_INIT_FILE`) for resuming and exporting on any device."""
    if train_cfg.model.components:
        return []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if train_cfg.init_from is None:
        return frozen
    fresh = set(report["init_from"]["fresh"])
    return [n for n in frozen if n in fresh]


def load_frozen_init(model: DeemModel, path) -> None:
    """Copy the weights of a run's `FROZEN_INIT_FILE` into `model` (a subset of its parameters)."""
    from safetensors.torch import load_file

    load_weights(model, load_file(str(path)), source=str(path), params_only=True, allow_missing=True)
