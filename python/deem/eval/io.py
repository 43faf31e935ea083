"""Crash-safe files of the evaluation engine: per-rank prediction parts (written with `deem.io`).

Layout of an output directory:
    <out>/<benchmark>/parts/rank<r>-<seq>.json   predictions flushed while a rank runs (each file atomic)
    <out>/<benchmark>/predictions.json           merged, de-duplicated, in dataset order (after finalising)
    <out>/<benchmark>/run.json                   what produced the predictions (checkpoint, generation, data)
    <out>/<benchmark>/metrics.json               the benchmark's metrics
    <out>/metrics.json, <out>/results.md         every benchmark scored in this directory
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deem.eval.errors import EvalError
from deem.io import atomic_write_json, read_json

_PART_RE = re.compile(r"^rank(\d+)-(\d+)\.json$")


def read_output(path: str | Path) -> Any:
    """Read a JSON file the engine wrote; a damaged one is an error naming it."""
    return read_json(path, "output file", EvalError, "; delete it to recompute what it held")


class PartWriter:
    """Appends prediction records of one rank as numbered part files (one atomic file per flush)."""

    def __init__(self, parts_dir: Path, rank: int):
        self.dir, self.rank = Path(parts_dir), int(rank)
        self.dir.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(2)) for p in self.dir.iterdir() if (m := _PART_RE.match(p.name))
                 and int(m.group(1)) == self.rank]
        self.seq = max(taken, default=-1) + 1
        self.pending: list[dict[str, Any]] = []
        self.failed: list[str] = []

    def add(self, records: Iterable[dict[str, Any]], failed: Iterable[str] = ()) -> None:
        self.pending.extend(records)
        self.failed.extend(failed)

    def flush(self) -> Path | None:
        if not self.pending and not self.failed:
            return None
        path = self.dir / f"rank{self.rank:05d}-{self.seq:06d}.json"
        atomic_write_json(path, {"rank": self.rank, "records": self.pending, "failed": self.failed})
        self.seq += 1
        self.pending, self.failed = [], []
        return path


def part_files(parts_dir: Path) -> list[Path]:
    """Part files in (rank, seq) order; temporary files of interrupted writes are ignored."""
    if not Path(parts_dir).is_dir():
        return []
    found = [(int(m.group(1)), int(m.group(2)), p) for p in Path(parts_dir).iterdir() if (m := _PART_RE.match(p.name))]
    return [p for _, _, p in sorted(found)]


def read_parts(parts_dir: Path) -> tuple[list[dict[str, Any]], list[str], list[Path]]:
    """All records and failed ids of the parts under `parts_dir`, and the files read."""
    records, failed, files = [], [], []
    for p in part_files(parts_dir):
        try:
            data = read_output(p)
        except EvalError:
            if not p.exists():  # merged and removed by rank 0 meanwhile (its records are in predictions.json)
                continue
            raise
        files.append(p)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise EvalError(f"{p} is not a prediction part file")
        records.extend(data["records"])
        failed.extend(str(i) for i in data.get("failed", []))
    return records, failed, files
