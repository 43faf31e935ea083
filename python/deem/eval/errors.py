"""The evaluation layer's error."""

from __future__ import annotations

from deem.errors import UserError


class EvalError(UserError, RuntimeError):
    """A configuration or data problem that stops an evaluation (the message names the benchmark/file)."""
