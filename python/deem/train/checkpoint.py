"""Training checkpoints, written atomically and durably: every file goes into `<dir>/.tmp-step-N/`; once
complete, a manifest (size and SHA-256 of each file) is added, every file and directory is fsynced, the
directory is renamed to `step-N` and the parent fsynced, and `latest` is replaced atomically afterwards. A crash
mid-save leaves the previous checkpoint and `latest` intact. `--resume` verifies checkpoints newest first and
falls back to the newest intact one; a damaged one is kept, renamed `damaged-step-N`. Contents: trainable weights
(safetensors), optimizer, scheduler, per-rank RNG states and data positions (with the bad-sample counts), and the
trainer state."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deem.io import atomic_write_text, fsync_path
from deem.models.weights import CheckpointError

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
# files up to this size are hashed in the manifest; larger ones (weights and optimizer states of big models) are
# checked by size and by parsing their headers, which catches truncation without reading gigabytes twice
HASH_MAX_BYTES = 256 * 2**20
_STEP_DIR = re.compile(r"step-(\d+)")


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that must be used (the pointer target, or every candidate of `--resume`) is damaged."""


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory bottom-up (so renames inside are durable too)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> dict[str, Any]:
    """List every file under `directory` with its size (and SHA-256 up to `HASH_MAX_BYTES`) in `manifest.json`."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= HASH_MAX_BYTES:
            entry["sha256"] = _sha256(path)
        files[path.relative_to(directory).as_posix()] = entry
    manifest = {"format": 1, "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _check_safetensors(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"{path.name}: {size} bytes, too short for a safetensors header"
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            return f"{path.name}: header of {n} bytes in a file of {size}"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"{path.name}: safetensors header does not parse ({exc})"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return f"{path.name}: safetensors header has no valid data_offsets"
    if 8 + n + end != size:
        return f"{path.name}: {size} bytes, its header describes {8 + n + end}"
    return None


def _check_file(path: Path) -> str | None:
    """Structural check of one checkpoint file by its kind (JSON parses, zip/pickle archive readable, safetensors
    header consistent with the size)."""
    if path.suffix == ".safetensors":
        return _check_safetensors(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"{path.name}: not valid JSON ({exc})"
    if path.suffix == ".pt":
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{path.name}: not a readable torch archive ({exc})"
    return None


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

    def checkpoints(self) -> list[Path]:
        """The `step-N` directories, oldest first (damaged ones renamed away and `.tmp-*` ones not included)."""
        found = [p for p in self.root.glob("step-*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        """The checkpoint `latest` points to; `DamagedCheckpointError` if it fails `verify`."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        problem = self.verify(path)
        if problem is not None:
            raise DamagedCheckpointError(f"{pointer} names {path}, which is damaged: {problem}")
        return path

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint at `path` is intact, else what is wrong with it: a missing file (the trainer
        state, weights, scheduler, each rank's RNG and data files), a size or SHA-256 that differs from the
        manifest, or a file whose structure does not parse (JSON, safetensors header, torch archive)."""
        if not path.is_dir():
            return "not a directory"
        try:
            state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
            world = int(state["world_size"])
        except FileNotFoundError:
            return f"{STATE_FILE} is missing"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{STATE_FILE} is unreadable ({type(exc).__name__}: {exc})"
        required = [STATE_FILE, "weights.safetensors", "scheduler.json",
                    *(f"{kind}-rank{r}.{ext}" for r in range(world) for kind, ext in (("rng", "pt"), ("data", "json")))]
        listed: dict[str, Any] = {}
        if state.get("manifest") or (path / MANIFEST).exists():  # checkpoints of older versions have none
            try:
                listed = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
            except FileNotFoundError:
                return f"{MANIFEST} is missing"
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})"
        for name in dict.fromkeys([*required, *listed]):
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            meta = listed.get(name)
            if meta is not None:
                size = file.stat().st_size
                if size != meta.get("size"):
                    return f"{name}: {size} bytes, the manifest says {meta.get('size')}"
                if "sha256" in meta and _sha256(file) != meta["sha256"]:
                    return f"{name}: SHA-256 differs from the manifest"
            problem = _check_file(file)
            if problem is not None:
                return problem
        return None

    def resume_point(self, barrier: Callable[[], Any] = lambda: None, say: Callable[[str], Any] = print
                     ) -> Path | None:
        """The newest intact checkpoint (None if there is none at all). Newer damaged ones are renamed
        `damaged-step-N` (kept, never deleted, out of the rotation) and `say` gets one line naming them; if every
        checkpoint is damaged, `DamagedCheckpointError` (nothing renamed). All ranks call it together."""
        damaged: list[tuple[Path, str]] = []
        chosen = None
        for path in reversed(self.checkpoints()):
            problem = self.verify(path)
            if problem is None:
                chosen = path
                break
            damaged.append((path, problem))
        if chosen is None and damaged:
            raise DamagedCheckpointError(
                f"--resume: every checkpoint under {self.root} is damaged: "
                + "; ".join(f"{p.name}: {why}" for p, why in damaged))
        barrier()  # every rank has decided before anything is renamed
        if damaged and self.is_main:
            kept = []
            for path, why in damaged:
                target = self._damaged_name(path)
                os.replace(path, target)
                kept.append(f"{path.name} is damaged ({why}), kept as {target.name}")
            fsync_path(self.root)
            atomic_write_text(self.root / "latest", chosen.name)
            say(f"--resume: {'; '.join(kept)}; resuming from {chosen.name}")
        barrier()
        return chosen

    def _damaged_name(self, path: Path) -> Path:
        target, n = self.root / f"damaged-{path.name}", 1
        while target.exists():
            n += 1
            target = self.root / f"damaged-{path.name}-{n}"
        return target

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
        rng_file = tmp / f"rng-rank{self.rank}.pt"
        torch.save(rng_state(), rng_file)
        fsync_path(rng_file)
        atomic_write_text(tmp / f"data-rank{self.rank}.json", json.dumps(data_state))
        if extra_writer is not None:
            extra_writer(tmp)
        if self.is_main:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            atomic_write_text(tmp / "scheduler.json", json.dumps(scheduler_state))
        barrier()
        if self.is_main:
            state = {**trainer_state, "step": step, "world_size": self.world_size, "manifest": MANIFEST}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state))
            write_manifest(tmp)
            _fsync_tree(tmp)  # every file of every rank and every directory, before the rename
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.root)  # the rename itself
            atomic_write_text(self.root / "latest", final.name)
            self._rotate()
        barrier()
        return final

    def _rotate(self) -> None:
        done = self.checkpoints()
        for old in done[: -self.keep]:
            shutil.rmtree(old)
        for stale in self.root.glob(".tmp-step-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale)
        fsync_path(self.root)

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
