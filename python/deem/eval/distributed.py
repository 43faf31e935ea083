"""The ranks of an evaluation: rank r of W takes the samples r, r+W, ...; under torchrun the process group carries
the records to rank 0 and the barriers; shards started separately with explicit `rank`/`world_size` meet through
the output directory instead."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from deem.eval.errors import EvalError


@dataclass
class Ranks:
    """This process's place among the evaluation ranks."""

    rank: int
    world_size: int
    distributed: bool  # torch.distributed carries the records / barriers

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def ranks_for(rank: int | None, world_size: int | None, device: torch.device | None) -> Ranks:
    """Explicit `rank`/`world_size` (a shard run on its own, no process group), else an initialised process group,
    else torchrun's environment (the group is initialised here: NCCL on CUDA, gloo otherwise), else one rank."""
    if rank is not None or world_size is not None:
        rank, world_size = int(rank or 0), int(world_size or 1)
        if not 0 <= rank < world_size:
            raise EvalError(f"rank {rank} outside world of size {world_size}")
        return Ranks(rank, world_size, False)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), dist.get_world_size() > 1)
    ws = int(os.environ.get("WORLD_SIZE", 1))
    if ws > 1:
        if not dist.is_available() or "MASTER_ADDR" not in os.environ:
            raise EvalError("WORLD_SIZE > 1 but no torch.distributed rendezvous (launch with torchrun, or pass "
                            "explicit rank/world_size to run shards separately)")
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        return Ranks(dist.get_rank(), dist.get_world_size(), True)
    return Ranks(0, 1, False)
