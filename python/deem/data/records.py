"""Map-style datasets over parsed annotation records, with per-item seeded randomness and bad-sample handling."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from deem import io
from deem.data.errors import BadSampleTracker, DataError, SampleError
from deem.data.images import DEFAULT_MAX_IMAGE_PIXELS, DualViewTransform, load_image
from deem.data.text import jsonl_records


@dataclass
class ImageViews:
    """One image slot of a sequence: encoder view (3,R,R), diffusion view (3,Rd,Rd), optional mask (1,R,R)."""

    enc: torch.Tensor
    dec: torch.Tensor
    mask: torch.Tensor | None = None


def read_json(path: str | Path) -> Any:
    """Load a UTF-8 JSON annotation file (a BOM is dropped); a missing, non-UTF-8 or invalid file raises `DataError`
    naming it (and the byte offset of the first invalid byte)."""
    return io.read_json(path, "annotation file", DataError)


def read_jsonl(path: str | Path, tracker: BadSampleTracker) -> list[tuple[str, Any]]:
    """Load a JSON-lines file as (line key, object) pairs; malformed or non-UTF-8 lines are skipped and counted
    (naming the file and the line); a BOM on the first line is dropped, its record kept."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    out = []
    with path.open("rb") as f:
        for item in jsonl_records(f, str(path)):
            if isinstance(item, SampleError):
                tracker.record_bad(item)
            else:
                out.append(item)
    return out


def parse_records(
    items: Iterable[tuple[str, Any]], parse: Callable[[str, Any], Any], tracker: BadSampleTracker, source: str
) -> list[Any]:
    """Apply `parse(key, raw)` to each item; a missing field or wrong type skips the record (counted, logged).

    `parse` may return one record, a list of records (e.g. one per conversation round) or None (filtered out
    on purpose, not counted as bad)."""
    records: list[Any] = []
    for key, raw in items:
        try:
            rec = parse(key, raw)
        except SampleError as err:
            tracker.record_bad(err)
            continue
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            tracker.record_bad(SampleError(source, key, f"malformed record: {type(exc).__name__}: {exc}"))
            continue
        if rec is None:
            continue
        if isinstance(rec, list):
            records.extend(rec)
            tracker.record_good(len(rec))
        else:
            records.append(rec)
            tracker.record_good()
    if not records:
        raise DataError(f"{source}: no usable records")
    return records


class RecordDataset(Dataset):
    """Base of the map-style readers: holds parsed records, loads one item per index.

    Randomness (question choice, answer choice, augmentation) comes from a generator seeded with
    (seed, epoch, index): identical in every worker and rank, different per epoch (`set_epoch`).
    A sample that fails to load is logged and counted; training sets then serve the next index instead,
    evaluation sets (`eval_mode=True`) return None (eval collators drop it, so no prediction is duplicated).
    Images larger than `max_image_pixels` (set from the config by the registry) are refused before decoding.
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(
        self,
        name: str,
        records: list[Any],
        transform: DualViewTransform,
        tracker: BadSampleTracker,
        seed: int = 0,
        eval_mode: bool = False,
        max_retries: int = 20,
    ):
        self.name = name
        self.records = records
        self.transform = transform
        self.tracker = tracker
        self.seed = int(seed)
        self.epoch = 0
        self.eval_mode = eval_mode
        self.replace_bad = not eval_mode
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} items")
        for attempt in range(self.max_retries if self.replace_bad else 1):
            i = (index + attempt) % len(self)
            try:
                item = self.load_item(i, self.rng(i))
            except SampleError as err:
                self.tracker.record_bad(err)
                continue
            self.tracker.record_good()
            item.setdefault("dataset", self.name)
            item["index"] = i
            item["seed"] = (self.seed, self.epoch, i)
            return item
        if self.replace_bad:
            raise DataError(f"{self.name}: {self.max_retries} consecutive bad samples from index {index}")
        return None

    # helpers shared by the readers
    def open_image(self, path: str | Path, key: str):
        """The RGB image at `path` (a `SampleError` naming this dataset and `key` if it cannot be used)."""
        return load_image(path, self.name, key, max_pixels=self.max_image_pixels)

    def image_views(self, path: str | Path, key: str, rng: np.random.Generator) -> tuple[ImageViews, Any]:
        image = self.open_image(path, key)
        enc, dec, params = self.transform(image, rng)
        return ImageViews(enc, dec), params
