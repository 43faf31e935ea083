"""Timing shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this file is importable as
`timing`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timer(device: torch.device, fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn` (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
