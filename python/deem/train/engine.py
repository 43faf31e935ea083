"""The training loop: one process per device (torchrun / the deepspeed launcher / plain python), through
accelerate (mixed precision, DDP, DeepSpeed ZeRO 1/2/3), with deem's own atomic checkpoints, exact resume
(weights, optimizer, schedule, RNG, data position), non-finite-loss skipping and logging."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

from deem.errors import ConfigError
from deem.models import LOSS_KEYS, DeemModel
from deem.models.multimodal import num_text_targets
from deem.models.weights import CheckpointError, load_weights
from deem.train.build import FROZEN_INIT_FILE, build_model, generated_frozen, load_frozen_init
from deem.train.checkpoint import CheckpointManager, set_rng_state, write_atomic
from deem.train.config import TrainConfig
from deem.train.data import TrainData
from deem.train.optim import build_optimizer, warmup_cosine

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.cfg = cfg
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
        self.acc = Accelerator(
            mixed_precision=PRECISION[cfg.run.precision],
            deepspeed_plugin=plugin,
            cpu=not torch.cuda.is_available(),  # several CPU processes (torchrun, gloo) need accelerate's CPU mode
            # which losses a batch has (image generation, feedback) varies: some trainable modules sit out a step
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.deepspeed = plugin is not None
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
        self.writer = None
        self._resume_or_start(resume)

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _cast_frozen(model, dtype: torch.dtype) -> None:
        vae = model.diffusion.vae if model.diffusion is not None else None
        vae_params = {id(p) for p in vae.parameters()} if vae is not None else set()
        for p in model.parameters():
            if not p.requires_grad and id(p) not in vae_params and p.is_floating_point():
                p.data = p.data.to(dtype)

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
            if (self.out / "log.jsonl").exists() and not resume:
                raise FileExistsError(f"{self.out} already holds a run (log.jsonl); use --resume or another output_dir")
            write_atomic(config_file, yaml.safe_dump(self.cfg.raw, sort_keys=False))
        if self.acc.is_main_process:
            self._truncate_log(self.step)
            if self.cfg.log.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)
                except ImportError:
                    self.print("tensorboard is not installed: logging to log.jsonl only")

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

    def _truncate_log(self, step: int) -> None:
        """A run killed after its last checkpoint logged (and evaluated) steps that the resumed run will redo."""
        for log in (self.out / "log.jsonl", self.out / "eval.jsonl"):
            if log.exists():
                kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
                write_atomic(log, "".join(f"{line}\n" for line in kept))

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
        global token mean."""
        # a micro-batch that trains no text (text weight 0) has no targets that count
        local = sum(num_text_targets(b["gt_text_ids"]) for b in micro_batches
                    if b.get("loss_txt_weight") is None or float(b["loss_txt_weight"]) != 0)
        total = torch.tensor([float(local)], device=self.acc.device, dtype=torch.float64)
        if self.acc.num_processes > 1:
            total = self.acc.reduce(total, reduction="sum")
        return max(float(total.item()), 1.0) / (self.acc.num_processes * len(micro_batches))

    def train_step(self, batches) -> dict[str, float]:
        self.model.train()
        accum = self.cfg.run.grad_accum
        sums: dict[str, float] = defaultdict(float)
        seen: dict[str, int] = defaultdict(int)  # micro-batches that had each loss
        skipped = False
        micro_batches = [next(batches) for _ in range(accum)]
        denominator = self._text_loss_denominator(micro_batches)
        # DeepSpeed's engine divides by its gradient-accumulation steps itself
        backward_scale = 1.0 if self.deepspeed else 1.0 / accum
        for micro, batch in enumerate(micro_batches):
            batch["text_loss_denominator"] = denominator
            sums["samples"] += batch["text_ids"].shape[0]
            sums["tokens"] += float(batch["attention_mask"].sum()) if batch.get("attention_mask") is not None else 0.0
            if batch.get("image_tensors") is not None:
                sums["images"] += batch["image_tensors"].shape[0]
            last = micro == accum - 1
            sync = contextlib.nullcontext() if (last or self.deepspeed) else self.acc.no_sync(self.model)
            with sync:
                with self.acc.autocast():
                    out = self.model(**batch)
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
        log_every, last_log = cfg.log.every, time.time()
        window: dict[str, float] = defaultdict(float)
        losses = _LossWindow()
        progress = _Progress(cfg.schedule.max_steps, self.step, enabled=cfg.log.progress and self.acc.is_main_process)
        record: dict[str, Any] = {}
        try:
            while self.step < cfg.schedule.max_steps:
                stats = self.train_step(batches)
                self.step += 1
                for k in ("samples", "images", "tokens"):
                    window[k] += stats.get(k, 0.0)
                losses.add(stats)
                if self.step % log_every == 0 or self.step == cfg.schedule.max_steps:
                    elapsed = max(time.time() - last_log, 1e-9)
                    record = {
                        "step": self.step,
                        "epoch": self.data.epoch,
                        "lr": self.scheduler.get_last_lr()[0],
                        **losses.means(),  # each loss: its mean over the window's steps that had it
                        "grad_norm": stats["grad_norm"],
                        "skipped": int(stats["skipped"]),
                        "nonfinite_total": self.nonfinite,
                        "bad_samples": self.data.bad_sample_totals(),  # per source, summed over ranks
                        **{f"{k}_per_s": window[k] / elapsed for k in ("samples", "images", "tokens")},
                    }
                    if self.acc.device.type == "cuda":
                        record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
                    self._log(record)
                    progress.update(self.step, record)
                    window.clear()
                    losses.clear()
                    last_log = time.time()
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
            if self.writer is not None:
                self.writer.close()
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
        if self.acc.is_main_process:
            with open(self.out / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **scored}) + "\n")
            for bench, metrics in scored.items():
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and self.writer is not None:
                        self.writer.add_scalar(f"eval/{bench}/{k}", v, self.step)
            summary = "; ".join(
                f"{b} " + " ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float))
                for b, m in scored.items()
            )
            self.print(f"step {self.step} eval: {summary}")
        return scored

    def _log(self, record: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, record["step"])


class _LossWindow:
    """Losses of the steps since the last log record: a batch without a loss (a text-to-image batch has no text
    loss, a VQA batch no image loss) does not pull that loss's mean towards zero or towards one noisy step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, stats: dict[str, float]) -> None:
        if stats.get("skipped"):
            return
        for k in LOSS_KEYS:
            if k in stats:
                self.sums[k] += stats[k]
                self.counts[k] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in LOSS_KEYS if self.counts.get(k)}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()


class _Progress:
    """A rich progress bar on a terminal, one printed line per log step elsewhere (CI logs)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if not self.enabled:
            return
        info = ""
        if record is not None:
            parts = [
                f"{k.replace('loss_', '')} {record[k]:.4f}"
                for k in LOSS_KEYS
                if k in record
            ]
            info = (
                " ".join(parts) + f" lr {record['lr']:.2e} {record['images_per_s']:.1f} img/s "
                f"{record['tokens_per_s']:.0f} tok/s"
            )
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))
        elif record is not None:
            print(f"step {step}: {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def export_weights(run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None) -> Path:
    """A full `DeemModel.from_pretrained` directory from a run: the model rebuilt as the run built it, with
    the checkpoint's trained weights."""
    from safetensors.torch import load_file

    from deem.data import load_tokenizer
    from deem.data.cli import load_data_config

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
