"""Files every layer writes and reads: atomic, durable writes and UTF-8 JSON/text reading whose errors name the file.

    atomic_write_json(out / "metrics.json", metrics, indent=2)   # readers see the old or the new file, never half
    data = read_json(path, what="annotation file", error=DataError)

Imports nothing of deem but `deem.errors`, so the lowest layer can use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from deem.errors import UserError


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by path (a directory's entries are made durable the same way)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably: a temporary file in the same directory (created with its
    parents), fsynced, `os.replace`d over `path`, then the directory fsynced. Readers see the old or the new
    content, never a partial file; a crash leaves no half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    """`obj` as strict JSON (no NaN), UTF-8, one trailing newline, written with `atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def read_text(path: str | Path, what: str = "file", error: type[Exception] = UserError) -> str:
    """A whole UTF-8 file (a leading BOM dropped). A missing file or invalid bytes raise `error` naming `what`, the
    file and the byte offset (and line) of the first invalid byte."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(f"{what} {path} is not UTF-8: invalid byte(s) {raw[exc.start:exc.start + 4]!r} at byte "
                    f"offset {exc.start} (line {line})") from None


def read_json(path: str | Path, what: str = "JSON file", error: type[Exception] = UserError, hint: str = "") -> Any:
    """Parse a UTF-8 JSON file (see `read_text`); invalid JSON raises `error` naming the file, followed by `hint`
    (what the user can do about it)."""
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON: {exc}{hint}") from None
