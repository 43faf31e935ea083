"""The training loop: one process per device (torchrun / the deepspeed launcher / plain python), through
accelerate (mixed precision, DDP, DeepSpeed ZeRO 1/2/3), with deem's own atomic checkpoints, exact resume
(weights, optimizer, schedule, RNG, data position), non-finite-loss skipping and logging."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

from deem.io import atomic_write_text
from deem.models import LOSS_KEYS, DeemModel
from deem.models.multimodal import num_text_targets
from deem.models.weights import load_weights
from deem.train.build import FROZEN_INIT_FILE, build_model, generated_frozen, load_frozen_init
from deem.train.checkpoint import CheckpointManager, set_rng_state
from deem.train.config import TrainConfig
from deem.train.data import TrainData
from deem.train.metrics import LOG_FILE, Progress, RunLog, StepWindow
from deem.train.optim import build_optimizer, warmup_cosine
from deem.train.parallel import build_accelerator

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.acc, self.deepspeed = build_accelerator(cfg)
        set_seed(cfg.run.seed)
        self.out = Path(cfg.output_dir)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()

        self.data = TrainData(
            cfg.data.config,
            cfg.data.dataset,
            cfg.data.root,
            cfg.data.batch_size,
            cfg.data.num_workers,
            cfg.data.seed,
            self.acc.process_index,
            self.acc.num_processes,
        )
        # randomly initialised weights are drawn on the device (minutes on the CPU for the 7B model); components
        # read from disk are loaded on the CPU and moved by prepare()
        with torch.device("cpu" if cfg.model.components else self.acc.device):
            model, self.build_report = build_model(cfg, self.data.tokenizer)
        if cfg.run.frozen_dtype:
            self._cast_frozen(model, DTYPES[cfg.run.frozen_dtype])
        self._keep_generated_frozen(model)
        # every rank runs every module on every step (ZeRO-3 gathers, DDP buckets); one process needs no dummies
        model.rank_uniform = self.acc.num_processes > 1
        optimizer, self.groups = build_optimizer(model, cfg)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, cfg.schedule.warmup_steps, cfg.schedule.max_steps)
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ckpt = CheckpointManager(
            self.out / "checkpoints", cfg.checkpoint.keep, self.acc.process_index, self.acc.num_processes
        )
        self.step = 0
        self.nonfinite = 0
        self.log: RunLog | None = None
        self._resume_or_start(resume)

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _cast_frozen(model: DeemModel, dtype: torch.dtype) -> None:
        """Store frozen floating-point weights in `dtype`. The cast goes through the modules' own `_apply`, so a
        module that pins its dtype (the diffusion feedback keeps its VAE in fp32) keeps it."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            frozen = isinstance(t, torch.nn.Parameter) and not t.requires_grad and t.is_floating_point()
            return t.to(dtype) if frozen else t

        model._apply(cast)

    def _keep_generated_frozen(self, model: DeemModel) -> None:
        """Randomly initialised frozen weights: written once by a new run, read back by a resumed one."""
        path = self.out / FROZEN_INIT_FILE
        existed = path.exists()
        self.acc.wait_for_everyone()  # every rank looks before the main one writes
        if existed:
            load_frozen_init(model, path)
            return
        names = generated_frozen(model, self.cfg, self.build_report)
        if names and self.acc.is_main_process:
            from safetensors.torch import save_file

            params = dict(model.named_parameters())
            tmp = path.with_name(path.name + ".tmp")
            save_file({n: params[n].detach().contiguous().cpu() for n in names}, str(tmp))
            tmp.replace(path)
        self.acc.wait_for_everyone()

    def _resume_or_start(self, resume: bool) -> None:
        config_file = self.out / "train_config.yaml"
        latest = self.ckpt.resume_point(self.acc.wait_for_everyone, self.print) if resume else None
        if resume and latest is None:
            self.print(f"--resume: no checkpoint under {self.ckpt.root}; starting from step 0")
        if latest is not None:
            saved = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
            if saved is not None and saved != self.cfg.raw:
                self.print("warning: the training config differs from the one the run started with")
            self._restore(latest)
            self.print(f"resumed from {latest} at step {self.step}")
        elif self.acc.is_main_process:
            if (self.out / LOG_FILE).exists() and not resume:
                raise FileExistsError(f"{self.out} already holds a run ({LOG_FILE}); use --resume or another "
                                      "output_dir")
            atomic_write_text(config_file, yaml.safe_dump(self.cfg.raw, sort_keys=False))
        self.log = RunLog(self.out, self.step, self.acc.is_main_process, self.cfg.log.tensorboard, self.print)

    def _restore(self, path: Path) -> None:
        state = self.ckpt.load(path)
        unwrapped = self.acc.unwrap_model(self.model)
        # every saved weight must be a parameter of this model; DeepSpeed's engine checkpoint restores them itself
        load_weights(unwrapped, state["weights"], source=str(path), params_only=True, allow_missing=True,
                     check_only=self.deepspeed)
        if self.deepspeed:  # the engine checkpoint restores the weights too (partitioned under ZeRO-3)
            self.model.load_checkpoint(
                str(path / "deepspeed"),
                tag="engine",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        else:
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = int(state["trainer"]["step"])
        self.nonfinite = int(state["trainer"].get("nonfinite", 0))

    def print(self, *args: Any) -> None:
        if self.acc.is_main_process:
            print(*args, flush=True)

    # ---------------------------------------------------------------- saving
    def save(self) -> Path:
        unwrapped = self.acc.unwrap_model(self.model)
        trainable = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
        if self.deepspeed and getattr(self.acc.state.deepspeed_plugin, "zero_stage", 0) == 3:
            full = self.acc.get_state_dict(self.model)  # gathered on every rank, returned on the main one only
            weights = {n: full[n] for n in trainable} if self.acc.is_main_process else {}
        else:
            params = dict(unwrapped.named_parameters())
            weights = {n: params[n] for n in trainable}

        def engine_state(tmp: Path) -> None:
            if self.deepspeed:
                self.model.save_checkpoint(str(tmp / "deepspeed"), tag="engine", exclude_frozen_parameters=True)

        return self.ckpt.save(
            self.step,
            weights,
            None if self.deepspeed else self.optimizer.state_dict(),
            self.scheduler.state_dict(),
            self.data.state_dict(),
            {"nonfinite": self.nonfinite, "epoch": self.data.epoch, "time": time.time()},
            barrier=self.acc.wait_for_everyone,
            extra_writer=engine_state,
        )

    # ---------------------------------------------------------------- the loop
    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, reduction="min")
        return bool(flag.item() > 0)

    def _text_loss_denominator(self, micro_batches: list[dict[str, Any]]) -> float:
        """Every text target of the step weighs the same, however the global batch is split over ranks and
        micro-batches: each micro-batch's loss is its target sum / (all targets of the step / (ranks x
        micro-batches)), which the gradient averaging over ranks and the 1/micro-batches scaling turn into the
        global token mean. The targets are counted here, from the labels (torchtitan's `global_valid_tokens`)."""
        # a micro-batch that trains no text (text weight 0) has no targets that count
        local = sum(num_text_targets(b["gt_text_ids"]) for b in micro_batches
                    if b.get("loss_txt_weight") is None or float(b["loss_txt_weight"]) != 0)
        total = torch.tensor([float(local)], device=self.acc.device, dtype=torch.float64)
        if self.acc.num_processes > 1:
            total = self.acc.reduce(total, reduction="sum")
        return max(float(total.item()), 1.0) / (self.acc.num_processes * len(micro_batches))

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `run.grad_accum` micro-batches (each a dict of model inputs); returns the
        step's losses (mean over the micro-batches that had each), throughput counts, grad norm and `skipped`."""
        self.model.train()
        accum = self.cfg.run.grad_accum
        sums: dict[str, float] = defaultdict(float)
        seen: dict[str, int] = defaultdict(int)  # micro-batches that had each loss
        skipped = False
        micro_batches = [next(batches) for _ in range(accum)]
        denominator = self._text_loss_denominator(micro_batches)
        # DeepSpeed's engine divides by its gradient-accumulation steps itself
        backward_scale = 1.0 if self.deepspeed else 1.0 / accum
        for micro, inputs in enumerate(micro_batches):
            sums["samples"] += inputs["text_ids"].shape[0]
            sums["tokens"] += float(inputs["attention_mask"].sum()) if inputs.get("attention_mask") is not None else 0.0
            if inputs.get("image_tensors") is not None:
                sums["images"] += inputs["image_tensors"].shape[0]
            last = micro == accum - 1
            sync = contextlib.nullcontext() if (last or self.deepspeed) else self.acc.no_sync(self.model)
            with sync:
                with self.acc.autocast():
                    out = self.model(**inputs, text_loss_denominator=denominator)
                if not self._all_finite(out.loss):
                    skipped = True
                    continue
                self.acc.backward(out.loss * backward_scale)
            for name in LOSS_KEYS:
                value = getattr(out, name)
                if value is not None:
                    sums[name] += float(value.detach())
                    seen[name] += 1
        for name, n in seen.items():  # the step's mean over the micro-batches that had the loss
            sums[name] /= n
        grad_norm = None
        if not skipped:
            norm = self.acc.clip_grad_norm_(self.params, self.cfg.run.max_grad_norm)
            grad_norm = float(norm) if norm is not None else None
            if grad_norm is not None and not torch.isfinite(torch.tensor(grad_norm)):
                skipped = True
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite += 1
            if self.nonfinite > self.cfg.run.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite} steps had a non-finite loss or gradient (run.max_nonfinite="
                    f"{self.cfg.run.max_nonfinite}); the run is diverging: lower the learning rate or use fp32/bf16"
                )
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.acc.num_processes > 1:  # log the mean over ranks (a loss may be missing on some ranks)
            keys = LOSS_KEYS
            local = [sums.get(k, 0.0) for k in keys] + [float(k in sums) for k in keys]
            total = self.acc.reduce(torch.tensor(local, device=self.acc.device, dtype=torch.float64), "sum").tolist()
            for i, k in enumerate(keys):
                if total[len(keys) + i] > 0:
                    sums[k] = total[i] / total[len(keys) + i]
        sums["grad_norm"] = grad_norm if grad_norm is not None else float("nan")
        sums["skipped"] = float(skipped)
        return dict(sums)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        batches = self.data.batches(self.acc.device)
        window = StepWindow()
        progress = Progress(cfg.schedule.max_steps, self.step, enabled=cfg.log.progress and self.acc.is_main_process)
        record: dict[str, Any] = {}
        try:
            while self.step < cfg.schedule.max_steps:
                stats = self.train_step(batches)
                self.step += 1
                window.add(stats)
                if self.step % cfg.log.every == 0 or self.step == cfg.schedule.max_steps:
                    record = self._record(stats, window)
                    self.log.log(record)
                    progress.update(self.step, record)
                    window.clear()
                else:
                    progress.update(self.step, None)
                last = self.step == cfg.schedule.max_steps
                # before the checkpoint: a run killed mid-evaluation redoes it after resuming
                if cfg.eval.every and (self.step % cfg.eval.every == 0 or last):
                    self.evaluate()
                if self.step % cfg.checkpoint.every == 0 or last:
                    self.save()
        finally:
            progress.close()
            self.log.close()
        return record

    def _record(self, stats: dict[str, float], window: StepWindow) -> dict[str, Any]:
        """The log record of this step: each loss's mean over the window's steps that had it, the last step's grad
        norm, skip and bad-sample counts (summed over ranks: a collective), throughput and peak GPU memory."""
        record = {
            "step": self.step,
            "epoch": self.data.epoch,
            "lr": self.scheduler.get_last_lr()[0],
            **window.loss_means(),
            "grad_norm": stats["grad_norm"],
            "skipped": int(stats["skipped"]),
            "nonfinite_total": self.nonfinite,
            "bad_samples": self.data.bad_sample_totals(),
            **window.rates(),
        }
        if self.acc.device.type == "cuda":
            record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
        return record

    def evaluate(self) -> dict[str, Any]:
        """The current model on the benchmarks of `eval.config` through deem's evaluation engine (sharded over
        the ranks); predictions under `<output_dir>/eval/step-N/`, metrics appended to `eval.jsonl` and
        TensorBoard."""
        from deem.eval import evaluate

        cfg = self.cfg.eval
        out = self.out / "eval" / f"step-{self.step:08d}"
        with self.acc.autocast():
            scored = evaluate(cfg.config, self.acc.unwrap_model(self.model), out, benchmarks=cfg.benchmarks or None,
                              root=cfg.root or self.cfg.data.root, tokenizer=self.data.tokenizer, overwrite=True)
        self.log.log_eval(self.step, scored)
        if self.acc.is_main_process:
            summary = "; ".join(
                f"{b} " + " ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float))
                for b, m in scored.items()
            )
            self.print(f"step {self.step} eval: {summary}")
        return scored
