"""Training checkpoints, written atomically: every file goes into `<dir>/.tmp-step-N/`, which is renamed to
`step-N` only when complete, and `latest` is replaced atomically afterwards. A crash mid-save leaves the
previous checkpoint and `latest` intact. Contents: trainable weights (safetensors), optimizer, scheduler,
per-rank RNG states and data positions, and the trainer state."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deem.models.loading import CheckpointError

STATE_FILE = "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (temp file + fsync + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Checkpoints under `root` (`step-N` directories and a `latest` pointer), the last `keep` kept."""

    def __init__(self, root: str | Path, keep: int, rank: int = 0, world_size: int = 1) -> None:
        self.root = Path(root)
        self.keep = keep
        self.rank, self.world_size = rank, world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path

    def save(
        self,
        step: int,
        weights: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any] | None,
        scheduler_state: dict[str, Any],
        data_state: dict[str, Any],
        trainer_state: dict[str, Any],
        barrier=lambda: None,
        extra_writer=None,
    ) -> Path:
        """Write checkpoint `step-<step>`; `extra_writer(tmp_dir)` adds engine state (all ranks call it)."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        write_atomic(tmp / f"data-rank{self.rank}.json", json.dumps(data_state))
        if extra_writer is not None:
            extra_writer(tmp)
        if self.is_main:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            write_atomic(tmp / "scheduler.json", json.dumps(scheduler_state))
        barrier()
        if self.is_main:
            write_atomic(tmp / STATE_FILE, json.dumps({**trainer_state, "step": step, "world_size": self.world_size}))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            write_atomic(self.root / "latest", final.name)
            self._rotate()
        barrier()
        return final

    def _rotate(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).exists())
        for old in done[: -self.keep]:
            shutil.rmtree(old)
        for stale in self.root.glob(".tmp-step-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale)

    def load(self, path: Path) -> dict[str, Any]:
        """Everything this rank needs to resume from `path`."""
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("world_size") != self.world_size:
            raise CheckpointError(
                f"{path} was written by {state.get('world_size')} ranks; resuming with "
                f"{self.world_size} would change the data order"
            )
        optimizer = None
        if (path / "optimizer.pt").exists():
            optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        return {
            "trainer": state,
            "weights": load_file(str(path / "weights.safetensors")),
            "optimizer": optimizer,
            "scheduler": json.loads((path / "scheduler.json").read_text()),
            "rng": torch.load(path / f"rng-rank{self.rank}.pt", weights_only=True),
            "data": json.loads((path / f"data-rank{self.rank}.json").read_text()),
        }
