"""Who reads what: ranks x DataLoader workers ("consumers"), deterministic shard assignment and shuffling."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def default_rank_world() -> tuple[int, int]:
    """The process's (rank, world size): torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def consumer_of(rank: int, world_size: int) -> tuple[int, int, int, int]:
    """(consumer id, number of consumers, worker id, number of workers) for the calling DataLoader worker."""
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return rank * num_workers + worker, world_size * num_workers, worker, num_workers


def shuffled(items: Sequence[T], seed: Sequence[int]) -> list[T]:
    order = np.random.default_rng(list(seed)).permutation(len(items))
    return [items[i] for i in order]


def split_shards(shards: Sequence[T], consumer: int, num_consumers: int) -> tuple[list[T], bool]:
    """Shards of this consumer. With at least one shard per consumer, whole shards are split (returns
    (own shards, False)); otherwise every consumer reads every shard and must keep only its samples
    (returns (all shards, True): see `split_samples`)."""
    if len(shards) >= num_consumers:
        return [s for i, s in enumerate(shards) if i % num_consumers == consumer], False
    return list(shards), True


def split_samples(samples: Iterable[T], consumer: int, num_consumers: int) -> Iterator[T]:
    for i, s in enumerate(samples):
        if i % num_consumers == consumer:
            yield s


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Seeded streaming shuffle with a bounded buffer (deterministic for a given rng)."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


class EvalShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation sampler: rank r of `world_size` gets indices r, r+W, r+2W, ... with no padding, so no sample
    is evaluated twice (the original's padded distributed sampling counted duplicates, spec §5.18)."""

    def __init__(self, length: int, rank: int | None = None, world_size: int | None = None):
        if rank is None or world_size is None:
            rank, world_size = default_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
