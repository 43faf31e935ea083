"""Reading every sample of a dataset once (`deem data inspect --all`): per-source counts of good samples and of
skipped ones by reason, from the same readers and the same checks as training."""

from __future__ import annotations

from typing import Any

import numpy as np

from deem.data.errors import BadSampleTracker, Counts, SampleError, snapshot
from deem.data.interleaved import InterleavedStream, MixedStream
from deem.data.records import RecordDataset
from deem.data.registry import MixtureDataset


def survey(ds: Any) -> dict[str, Counts]:
    """Read every record, document and image of `ds` (map-style reader, mixture or stream) once and return the
    counts per source ({source: {good, bad, reasons}}). Records dropped while parsing the annotation file count
    as skipped; the bad-fraction bound is lifted so that the whole dataset is read."""
    trackers: list[BadSampleTracker] = []
    _read_all(ds, trackers)
    return snapshot(trackers)


def _read_all(ds: Any, trackers: list[BadSampleTracker]) -> None:
    if isinstance(ds, MixtureDataset):
        for child in ds.datasets:
            _read_all(child, trackers)
    elif isinstance(ds, MixedStream):
        for stream in ds.streams:
            _read_all(stream, trackers)
    elif isinstance(ds, InterleavedStream):
        _read_stream(ds, _unbounded(ds.source.tracker, trackers))
    elif isinstance(ds, RecordDataset):
        _read_records(ds, _unbounded(ds.tracker, trackers))
    else:
        raise TypeError(f"cannot survey a {type(ds).__name__}")


def _unbounded(tracker: BadSampleTracker, trackers: list[BadSampleTracker]) -> BadSampleTracker:
    tracker.max_bad_fraction = 1.0
    trackers.append(tracker)
    return tracker


def _read_records(ds: RecordDataset, tracker: BadSampleTracker) -> None:
    tracker.good = 0  # the parsed records are counted again below, when their images load (or not)
    for i in range(len(ds)):
        try:
            ds.load_item(i, ds.rng(i))
        except SampleError as err:
            tracker.record_bad(err)
        else:
            tracker.record_good()


def _read_stream(stream: InterleavedStream, tracker: BadSampleTracker) -> None:
    source, rng = stream.source, np.random.default_rng(0)
    for shard in source.shards:
        for key, raw in source.records(shard):
            try:
                source.document(key, raw, rng)
            except SampleError as err:
                tracker.record_bad(err)
            else:
                tracker.record_good()


def format_table(rows: list[tuple[str, str, Counts]]) -> list[str]:
    """(split, source, counts) rows as an aligned table: samples read, good, skipped, skipped by reason."""
    head = ("split", "source", "read", "good", "skipped", "skipped by reason")
    body = [(split, name, str(c["good"] + c["bad"]), str(c["good"]), str(c["bad"]),
             ", ".join(f"{k}: {n}" for k, n in sorted(c["reasons"].items())) or "-") for split, name, c in rows]
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(5)]
    fmt = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) + \
        "  " + r[5]
    return [fmt(head), *(fmt(r) for r in body)]
