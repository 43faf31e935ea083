"""CUDA graphs of the decode step: one per bucket, captured on first use and replayed for every later step.

A graph is captured over the bucket's `DecodeInputs` (static input buffers and cache views); before each replay
the engine writes the new token, position and step into those buffers on the device. All graphs share one memory
pool (only one runs at a time). A graph is recaptured when the cache arena was reallocated (`version`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deem.infer.cache import Bucket
from deem.infer.forward import DecodeInputs


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: DecodeInputs
    output: torch.Tensor
    version: int


class StepGraphs:
    """Captured decode steps keyed by bucket; `fn(inputs) -> logits` must do device work only."""

    def __init__(self, fn: Callable[[DecodeInputs], torch.Tensor], warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self.pool = None
        self.graphs: dict[Bucket, _Captured] = {}
        self.capture_seconds = 0.0

    def run(self, inputs: DecodeInputs, version: int) -> torch.Tensor:
        entry = self.graphs.get(inputs.bucket)
        if entry is None or entry.version != version or entry.inputs is not inputs:
            entry = self.capture(inputs, version)
        entry.graph.replay()
        return entry.output

    def capture(self, inputs: DecodeInputs, version: int) -> _Captured:
        start = time.perf_counter()
        self.graphs.pop(inputs.bucket, None)
        # warm-up runs outside the graph (kernel selection, lazy initialisation), on a side stream as the
        # capture requires; they write the same cache column the real step writes, with the same values
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(inputs)
        entry = _Captured(graph, inputs, output, version)
        self.graphs[inputs.bucket] = entry
        torch.cuda.current_stream().synchronize()
        self.capture_seconds += time.perf_counter() - start
        return entry

    def clear(self) -> None:
        self.graphs.clear()
