"""How the CUDA backward accumulates d(value): 'auto', 'atomic' (fp32 vector atomics), 'owner' (slice ownership
in shared memory) or 'tensor' (d(value) = Wt . dO on tensor cores; float16/bfloat16 values, D = 32, 64 or 128).
'auto' runs the strategy measured fastest on the nearest benchmarked case (cpp/src/cuda/strategy_table.h)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from deem._native import GRAD_VALUE_STRATEGIES

_strategy = os.environ.get("DEEM_GRAD_VALUE_STRATEGY", "auto")


def _check(name: str) -> str:
    if name not in GRAD_VALUE_STRATEGIES:
        raise ValueError(f"grad_value strategy must be one of {sorted(GRAD_VALUE_STRATEGIES)}, got {name!r}")
    return name


def get_grad_value_strategy() -> int:
    """The current strategy as the binding's integer code."""
    return GRAD_VALUE_STRATEGIES[_check(_strategy)]


def set_grad_value_strategy(name: str) -> None:
    """Select the d(value) algorithm of the CUDA backward for later calls."""
    global _strategy
    _strategy = _check(name)


@contextlib.contextmanager
def grad_value_strategy(name: str) -> Iterator[None]:
    """Temporarily select the d(value) algorithm of the CUDA backward."""
    global _strategy
    previous, _strategy = _strategy, _check(name)
    try:
        yield
    finally:
        _strategy = previous
