"""`deem export-weights RUN OUT`: a full `DeemModel.from_pretrained` directory (with its tokenizer) from a
training run: the model rebuilt as the run built it, with a checkpoint's trained weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from deem.data import load_tokenizer
from deem.data.config import load_data_config
from deem.models.weights import CheckpointError, load_weights
from deem.train.build import FROZEN_INIT_FILE, build_model, load_frozen_init
from deem.train.checkpoint import CheckpointManager
from deem.train.config import TrainConfig


def export_weights(run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None) -> Path:
    """Write `out_dir` from run `run_dir` (its latest checkpoint, or the `step-N` directory `checkpoint`)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / "train_config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a training run directory (no train_config.yaml; give the "
                              "output_dir of a `deem train` run)")
    cfg = TrainConfig.from_dict(yaml.safe_load((run_dir / "train_config.yaml").read_text()))
    ckpt = CheckpointManager(run_dir / "checkpoints", keep=1)
    path = run_dir / "checkpoints" / checkpoint if checkpoint else ckpt.latest()
    if path is None or not (path / "weights.safetensors").exists():
        raise CheckpointError(f"{path or run_dir / 'checkpoints'}: no checkpoint to export (expected a "
                              "step-N directory with weights.safetensors, written by `deem train`)")
    tokenizer = load_tokenizer(load_data_config(cfg.data.config, cfg.data.root)["tokenizer"])
    model, _ = build_model(cfg, tokenizer)
    if (run_dir / FROZEN_INIT_FILE).exists():
        load_frozen_init(model, run_dir / FROZEN_INIT_FILE)
    weights = path / "weights.safetensors"
    load_weights(model, load_file(str(weights)), source=str(weights), params_only=True, allow_missing=True)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.hf.save_pretrained(tmp / "tokenizer")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir
