"""What a training run reports: the losses and throughput of the steps since the last record (`StepWindow`), the records
themselves in `log.jsonl` / `eval.jsonl` and TensorBoard (`RunLog`, main process only), and the progress bar."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from deem.io import atomic_write_text
from deem.models import LOSS_KEYS

LOG_FILE = "log.jsonl"
EVAL_FILE = "eval.jsonl"


class LossWindow:
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


class StepWindow:
    """The steps since the last log record: their losses (`LossWindow`) and their throughput (samples, images and
    tokens per second of wall time)."""

    COUNTS = ("samples", "images", "tokens")

    def __init__(self) -> None:
        self.losses = LossWindow()
        self.counts: dict[str, float] = defaultdict(float)
        self.start = time.time()

    def add(self, stats: dict[str, float]) -> None:
        for k in self.COUNTS:
            self.counts[k] += stats.get(k, 0.0)
        self.losses.add(stats)

    def loss_means(self) -> dict[str, float]:
        return self.losses.means()

    def rates(self) -> dict[str, float]:
        elapsed = max(time.time() - self.start, 1e-9)
        return {f"{k}_per_s": self.counts[k] / elapsed for k in self.COUNTS}

    def clear(self) -> None:
        self.losses.clear()
        self.counts.clear()
        self.start = time.time()


class RunLog:
    """`log.jsonl` (one record per log step), `eval.jsonl` (one per evaluation) and TensorBoard scalars under
    `<out>/tensorboard`. Only the main process writes; every method is a no-op elsewhere."""

    def __init__(self, out: Path, step: int, main: bool, tensorboard: bool, print_fn=print) -> None:
        self.out, self.main, self.writer = Path(out), main, None
        if not main:
            return
        truncate_logs(self.out, step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=step + 1)
            except ImportError:
                print_fn("tensorboard is not installed: logging to log.jsonl only")

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def log_eval(self, step: int, scored: dict[str, dict[str, Any]]) -> None:
        if not self.main:
            return
        with open(self.out / EVAL_FILE, "a") as f:
            f.write(json.dumps({"step": step, **scored}) + "\n")
        for bench, metrics in scored.items():
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and self.writer is not None:
                    self.writer.add_scalar(f"eval/{bench}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_logs(out: Path, step: int) -> None:
    """A run killed after its last checkpoint logged (and evaluated) steps that the resumed run will redo."""
    for log in (out / LOG_FILE, out / EVAL_FILE):
        if log.exists():
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            atomic_write_text(log, "".join(f"{line}\n" for line in kept))


class Progress:
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
            parts = [f"{k.replace('loss_', '')} {record[k]:.4f}" for k in LOSS_KEYS if k in record]
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
