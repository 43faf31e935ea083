"""What the demo shows while it runs: a rich progress bar per step on a terminal, plain lines elsewhere, and
every line also in `<out>/demo.log`."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path


class Console:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.tty = sys.stdout.isatty()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def say(self, text: str) -> None:
        print(text, flush=True)
        self._log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self._log.flush()

    @contextmanager
    def task(self, name: str, total: int):
        """A progress bar (terminal) for a loop of `total` steps; yields `advance(loss)`."""
        start = time.time()
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn(f"{name} {{task.completed}}/{{task.total}}"), BarColumn(),
                           TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            task = bar.add_task(name, total=total, info="")
            bar.start()

            def advance(loss: float | None = None) -> None:
                bar.update(task, advance=1, info="" if loss is None else f"loss {loss:.4f}")

            try:
                yield advance
            finally:
                bar.stop()
        else:
            yield lambda loss=None: None
        self.say(f"{name}: {total} steps in {time.time() - start:.0f} s")

    def close(self) -> None:
        self._log.close()
