"""Decoding annotation bytes: UTF-8 only, a leading byte-order mark dropped, every failure naming the file, the
sample and the byte offset (never a bare `UnicodeDecodeError`)."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from deem.data.errors import DataError, SampleError
from deem.io import read_text

NON_UTF8 = "non-UTF-8 text"


def decode_utf8(raw: bytes, source: str, key: str, what: str = "text") -> str:
    """`raw` as UTF-8 text (a leading BOM dropped); invalid bytes raise `SampleError` naming source, key, offset."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise SampleError(source, key, f"{NON_UTF8}: {what} has invalid UTF-8 byte(s) {bad!r} at byte offset "
                          f"{exc.start}", kind=NON_UTF8) from None


def read_text_file(path: str | Path, what: str = "annotation file") -> str:
    """A whole UTF-8 file (BOM dropped); a missing file or invalid bytes raise `DataError` naming the file and the
    byte offset of the first invalid byte."""
    return read_text(path, what, DataError)


def jsonl_records(lines: Iterable[bytes], source: str, key_prefix: str = "line ") -> Iterator[tuple[str, Any] |
                                                                                             SampleError]:
    """Parse JSON lines given as bytes: yields (key, object) for good lines and a `SampleError` (non-UTF-8 or
    malformed JSON, naming `source` and the line) for bad ones, so the caller counts it and goes on. Blank lines
    are skipped; a BOM on the first line is dropped (the record is kept)."""
    for lineno, raw in enumerate(lines, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        key = f"{key_prefix}{lineno}"
        try:
            text = decode_utf8(raw, source, key, "line")
        except SampleError as err:
            yield err
            continue
        if not text.strip():
            continue
        try:
            yield key, json.loads(text)
        except json.JSONDecodeError as exc:
            yield SampleError(source, key, f"malformed record: {exc}")
