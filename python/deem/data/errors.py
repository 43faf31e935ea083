"""Errors raised by the data layer and the bounded bad-sample counter.

Readers never swallow a problem silently: a sample that cannot be used raises `SampleError` (naming the
file, the key and what is wrong); the reader skips it, logs it and counts it in a `BadSampleTracker`, which
raises `TooManyBadSamples` once the bad fraction exceeds the configured bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from deem.errors import UserError

logger = logging.getLogger("deem.data")


class DataError(UserError, RuntimeError):
    """A data problem that stops the run (bad config, unreadable annotation file, ...)."""


class SampleError(DataError):
    """One sample (record, image, document) cannot be used; readers skip it and count it."""

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source} [{key}]: {reason}")


class TooManyBadSamples(DataError):
    """The fraction of skipped samples exceeded `max_bad_fraction`."""


@dataclass
class BadSampleTracker:
    """Counts good and bad samples of one dataset (per process) and enforces a bound on the bad fraction.

    The bound is only checked once `min_samples` samples have been seen, so that one early bad sample
    does not abort a run; `max_bad_fraction=1.0` disables the check.
    """

    name: str
    max_bad_fraction: float = 0.05
    min_samples: int = 20
    good: int = 0
    bad: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    last_errors: list[str] = field(default_factory=list)

    def record_good(self, n: int = 1) -> None:
        self.good += n

    def record_bad(self, error: SampleError) -> None:
        self.bad += 1
        self.reasons[error.reason.split(":")[0]] = self.reasons.get(error.reason.split(":")[0], 0) + 1
        self.last_errors = [*self.last_errors[-9:], str(error)]
        logger.warning("dataset %s: skipped sample: %s", self.name, error)
        self.check()

    @property
    def seen(self) -> int:
        return self.good + self.bad

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def check(self) -> None:
        if self.seen >= self.min_samples and self.bad_fraction > self.max_bad_fraction:
            raise TooManyBadSamples(
                f"dataset {self.name}: {self.bad} of {self.seen} samples were bad "
                f"({self.bad_fraction:.1%} > max_bad_fraction {self.max_bad_fraction:.1%}); "
                f"last errors: {'; '.join(self.last_errors[-3:])}"
            )

    def summary(self) -> dict[str, object]:
        return {"good": self.good, "bad": self.bad, "reasons": dict(self.reasons)}
