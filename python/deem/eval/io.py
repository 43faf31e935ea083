"""Crash-safe files of the evaluation engine: atomic JSON writes and per-rank prediction parts.

Layout of an output directory:
    <out>/<benchmark>/parts/rank<r>-<seq>.json   predictions flushed while a rank runs (each file atomic)
    <out>/<benchmark>/predictions.json           merged, de-duplicated, in dataset order (after finalising)
    <out>/<benchmark>/run.json                   what produced the predictions (checkpoint, generation, data)
    <out>/<benchmark>/metrics.json               the benchmark's metrics
    <out>/metrics.json, <out>/results.md         every benchmark scored in this directory
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deem.eval.benchmarks import EvalError

_PART_RE = re.compile(r"^rank(\d+)-(\d+)\.json$")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file in the same directory, fsync it, then `os.replace` it over `path`:
    readers see the old or the new content, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by the engine; a damaged one is an error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path} is not valid JSON ({exc}); delete it to recompute what it held") from None


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
            data = read_json(p)
        except FileNotFoundError:  # merged and removed by rank 0 meanwhile (its records are in predictions.json)
            continue
        files.append(p)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise EvalError(f"{p} is not a prediction part file")
        records.extend(data["records"])
        failed.extend(str(i) for i in data.get("failed", []))
    return records, failed, files
