"""Errors raised by the data layer and the bounded bad-sample counter.

Readers never swallow a problem silently: a sample that cannot be used raises `SampleError` (naming the
file, the key and what is wrong); the reader skips it, logs it and counts it in a `BadSampleTracker`, which
raises `TooManyBadSamples` once the bad fraction exceeds the configured bound. `CountDeltas` carries the counts
of the process (or DataLoader worker) that read the samples to the training loop, one batch at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deem.errors import UserError

logger = logging.getLogger("deem.data")


class DataError(UserError, RuntimeError):
    """A data problem that stops the run (bad config, unreadable annotation file, ...)."""


class SampleError(DataError):
    """One sample (record, image, document) cannot be used; readers skip it and count it.

    `kind` is the short category the counters group by ("corrupt image", "non-UTF-8 text", ...); by default the
    part of `reason` before its first colon."""

    def __init__(self, source: str, key: str, reason: str, kind: str | None = None):
        self.source, self.key, self.reason = source, key, reason
        self.kind = kind or reason.split(":")[0]
        super().__init__(f"{source} [{key}]: {reason}")

    def __reduce__(self):  # picklable across DataLoader workers despite the custom signature
        return SampleError, (self.source, self.key, self.reason, self.kind)


class TooManyBadSamples(DataError):
    """The fraction of skipped samples exceeded `max_bad_fraction`."""


class NoValidSamples(DataError):
    """A whole pass over a source produced no usable sample (every shard or sample unreadable)."""


Counts = dict[str, Any]  # {"good": int, "bad": int, "reasons": {kind: int}}


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
        self.reasons[error.kind] = self.reasons.get(error.kind, 0) + 1
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

    def summary(self) -> Counts:
        return {"good": self.good, "bad": self.bad, "reasons": dict(self.reasons)}


def merge_counts(*parts: Mapping[str, Counts]) -> dict[str, Counts]:
    """Sum per-source counts ({source: {good, bad, reasons}}) of several batches, workers or ranks."""
    out: dict[str, Counts] = {}
    for part in parts:
        for name, c in part.items():
            mine = out.setdefault(name, {"good": 0, "bad": 0, "reasons": {}})
            mine["good"] += int(c.get("good", 0))
            mine["bad"] += int(c.get("bad", 0))
            for kind, n in c.get("reasons", {}).items():
                mine["reasons"][kind] = mine["reasons"].get(kind, 0) + int(n)
    return out


def snapshot(trackers: Iterable[BadSampleTracker]) -> dict[str, Counts]:
    """The current counts of `trackers`, per tracker name (trackers of the same name summed)."""
    return merge_counts(*({t.name: t.summary()} for t in {id(t): t for t in trackers}.values()))


class CountDeltas:
    """What `trackers` counted since the last `take()` / `reset()`, per source.

    Lives with the dataset in the process that reads it (main process or DataLoader worker), so that each batch
    can carry the counts of the reading that produced it back to the training loop."""

    def __init__(self, trackers: Iterable[BadSampleTracker]):
        self.trackers = list({id(t): t for t in trackers}.values())
        self.last = snapshot(self.trackers)

    def reset(self) -> None:
        self.last = snapshot(self.trackers)

    def take(self) -> dict[str, Counts]:
        now = snapshot(self.trackers)
        delta: dict[str, Counts] = {}
        for name, c in now.items():
            before = self.last.get(name, {"good": 0, "bad": 0, "reasons": {}})
            reasons = {k: n - before["reasons"].get(k, 0) for k, n in c["reasons"].items()}
            d = {"good": c["good"] - before["good"], "bad": c["bad"] - before["bad"],
                 "reasons": {k: n for k, n in reasons.items() if n}}
            if d["good"] or d["bad"]:
                delta[name] = d
        self.last = now
        return delta
