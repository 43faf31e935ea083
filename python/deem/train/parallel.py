"""The accelerate set-up of a run: mixed precision, DDP (CPU processes over gloo included) or DeepSpeed ZeRO 1/2/3
from the run's DeepSpeed JSON, with the per-device batch deem's data layer builds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deem.errors import ConfigError
from deem.train.config import TrainConfig

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def build_accelerator(cfg: TrainConfig) -> tuple[Any, bool]:
    """The run's `accelerate.Accelerator` and whether DeepSpeed drives it."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    plugin = None
    if cfg.run.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        if not torch.cuda.is_available():  # accelerate's CPU mode drops the DeepSpeed plugin
            raise ConfigError(f"run.deepspeed={cfg.run.deepspeed}: DeepSpeed training needs CUDA devices and "
                               "none is visible; drop run.deepspeed to train on the CPU")
        ds_config = json.loads(Path(cfg.run.deepspeed).read_text())
        # batches are built by deem's data layer, not by a prepared DataLoader: give DeepSpeed the per-device
        # batch explicitly (streams batch themselves; the value only feeds DeepSpeed's throughput accounting)
        if cfg.eval.every and ds_config.get("zero_optimization", {}).get("stage") == 3:
            raise ConfigError("eval.every with ZeRO-3: generation runs different modules on each rank, which "
                             "partitioned weights cannot follow; evaluate the exported weights with deem eval")
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds_config.pop("train_batch_size", None)
        plugin = DeepSpeedPlugin(
            hf_ds_config=ds_config,
            gradient_accumulation_steps=cfg.run.grad_accum,
            gradient_clipping=cfg.run.max_grad_norm,
        )
    acc = Accelerator(
        mixed_precision=PRECISION[cfg.run.precision],
        deepspeed_plugin=plugin,
        cpu=not torch.cuda.is_available(),  # several CPU processes (torchrun, gloo) need accelerate's CPU mode
        # which losses a batch has (image generation, feedback) varies: some trainable modules sit out a step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    return acc, plugin is not None
