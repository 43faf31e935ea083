"""Training data from a data config (configs/data/*.yaml): a resumable, rank-sharded, epoch-looping batch
iterator over either a map-style dataset + collator or a pre-training stream, with the bad-sample counts of
the batches it delivered (per source, kept in the checkpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from deem.data import build_collator, build_dataset, load_tokenizer
from deem.data.collators import split_batch
from deem.data.config import load_data_config
from deem.data.errors import BadSampleTracker, CountDeltas, Counts, DataError, merge_counts, snapshot
from deem.data.registry import trackers_of
from deem.data.tokenizer import DeemTokenizer
from deem.errors import ConfigError


class ResumableSampler(Sampler[int]):
    """This rank's share of a seeded permutation per epoch, starting after `start` samples."""

    def __init__(self, size: int, seed: int, rank: int, world_size: int, batch_size: int) -> None:
        self.size, self.seed, self.rank, self.world_size, self.batch_size = size, seed, rank, world_size, batch_size
        self.per_rank = (size // world_size // batch_size) * batch_size  # full batches only, equal on every rank
        if self.per_rank == 0:
            raise ConfigError(f"data.batch_size: a dataset of {size} samples gives no full batch of {batch_size} "
                              f"on {world_size} ranks")
        self.epoch = 0
        self.start = 0

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        return perm[self.rank :: self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


class _CountingCollate:
    """The collator, run where the items were read (main process or DataLoader worker), returning the batch and
    what the dataset's trackers counted while reading its items."""

    def __init__(self, collate: Any, trackers: list[BadSampleTracker]) -> None:
        self.collate = collate
        self.counts = CountDeltas(trackers)

    def __call__(self, items: list[Any]) -> tuple[dict[str, Any] | None, dict[str, Counts]]:
        batch = self.collate(items)
        return batch, self.counts.take()


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return value


class TrainData:
    """Infinite iterator of batches, each a dict of `DeemModel.forward` inputs only (the collators' metadata is
    consumed here), with `state_dict`/`load_state_dict`."""

    def __init__(
        self,
        config_path: str,
        dataset_name: str,
        root: str | None,
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.config_path = config_path
        try:
            cfg = load_data_config(config_path, root)
        except DataError as err:
            missing_relative = not Path(config_path).is_absolute() and not Path(config_path).exists()
            cwd = f" (relative to the current directory {Path.cwd()})" if missing_relative else ""
            raise ConfigError(f"data.config: {err}{cwd}") from err
        train = cfg.get("train") or []
        entries = {e.get("name"): e for e in (train if isinstance(train, list) else [train]) if isinstance(e, dict)}
        if dataset_name not in entries:
            raise ConfigError(
                f"data.dataset: {config_path} has no train dataset named {dataset_name!r} "
                f"(have {sorted(map(str, entries))})"
            )
        if "tokenizer" not in cfg:
            raise ConfigError(f"data.config: {config_path} has no `tokenizer` entry")
        self.tokenizer: DeemTokenizer = load_tokenizer(cfg["tokenizer"])
        entry = entries[dataset_name]
        self.dataset = build_dataset(entry, self.tokenizer, rank=rank, world_size=world_size)
        self.num_workers = num_workers
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.batches_consumed = 0
        self.skipped_empty = 0
        trackers = trackers_of(self.dataset)
        # bad records found while parsing the annotation files count once; good ones count when they load
        self.bad_samples: dict[str, Counts] = {n: {**c, "good": 0} for n, c in snapshot(trackers).items()}
        if isinstance(self.dataset, IterableDataset):
            self.stream = self.dataset
            self.sampler = None
            self.collate = None
        else:
            if "collator" not in entry:
                raise ConfigError(f"{config_path}: train dataset {dataset_name!r} has no collator")
            self.stream = None
            self.collate = _CountingCollate(build_collator(entry["collator"], self.tokenizer), trackers)
            self.sampler = ResumableSampler(len(self.dataset), seed, rank, world_size, batch_size)
            self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        # A private generator: creating a DataLoader iterator draws its workers' base seed from it, and from the
        # global torch RNG without one, which would shift the model's random numbers after a resume.
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        if self.stream is not None:
            return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, generator=generator)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=True,
            generator=generator,
        )

    @property
    def epoch(self) -> int:
        return self.stream.epoch if self.stream is not None else self.sampler.epoch

    def _next_epoch(self) -> None:
        if self.stream is not None:
            self.stream.set_epoch(self.stream.epoch + 1)
        else:
            self.sampler.epoch += 1
            self.sampler.start = 0

    def batches(self, device: torch.device) -> Iterator[dict[str, Any]]:
        while True:
            produced = False
            for batch in self._loader():
                if self.stream is None:
                    batch, counts = batch
                else:
                    counts = batch["meta"].pop("bad_samples", {})
                self.bad_samples = merge_counts(self.bad_samples, counts)
                if batch is None:  # every item of the batch failed to load (counted by the data layer)
                    self.skipped_empty += 1
                    self._advance(None)
                    continue
                produced = True
                self._advance(batch)
                inputs, _ = split_batch(batch)  # the metadata stays here (its counts are taken above)
                yield {k: _to_device(v, device) for k, v in inputs.items()}
            if not produced and self.epoch > 1000:
                raise DataError(f"{self.config_path}: the training data yields no batches")
            self._next_epoch()

    def _advance(self, batch: dict[str, Any] | None) -> None:
        self.batches_consumed += 1
        if self.stream is not None:
            if batch is not None:
                self.stream.note_batch(batch)
        else:
            self.sampler.start += self.batch_size

    def bad_sample_totals(self) -> dict[str, Counts]:
        """Good and skipped samples per source of every batch delivered so far, summed over the ranks (a
        collective: every rank calls it at the same step)."""
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(parts, self.bad_samples)
            return merge_counts(*parts)
        return merge_counts(self.bad_samples)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"batches_consumed": self.batches_consumed, "skipped_empty": self.skipped_empty,
                                 "bad_samples": self.bad_samples}
        if self.stream is not None:
            state["stream"] = self.stream.state_dict()
        else:
            state["sampler"] = {"epoch": self.sampler.epoch, "start": self.sampler.start}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_consumed = int(state["batches_consumed"])
        self.skipped_empty = int(state.get("skipped_empty", 0))
        if "bad_samples" in state:  # counts continue across a resume
            self.bad_samples = merge_counts(state["bad_samples"])
        if self.stream is not None:
            self.stream.load_state_dict(state["stream"])
        else:
            self.sampler.epoch = int(state["sampler"]["epoch"])
            self.sampler.start = int(state["sampler"]["start"])
