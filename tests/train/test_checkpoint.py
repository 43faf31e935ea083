"""Checkpoints: durable writes (every file and directory fsynced around the rename), a manifest, verification,
and `--resume` falling back to the newest intact checkpoint while keeping the damaged one; bad-sample counts in
the log and the checkpoint, continued across a resume."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from deem.train import TrainConfig, Trainer
from deem.train.checkpoint import MANIFEST, STATE_FILE, CheckpointManager, DamagedCheckpointError

REPO = Path(__file__).resolve().parents[2]


def _save(mgr: CheckpointManager, step: int) -> Path:
    weights = {"a": torch.arange(6, dtype=torch.float32) * step, "b": torch.ones(2, 3)}
    optimizer = {"state": {0: {"exp_avg": torch.full((3,), float(step))}}, "param_groups": [{"lr": 0.1}]}
    return mgr.save(step, weights, optimizer, {"last_epoch": step}, {"batches_consumed": step}, {"nonfinite": 0})


def _checkpoints(tmp_path, n=3, keep=5) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path / "ckpt", keep=keep)
    for step in range(1, n + 1):
        _save(mgr, step)
    return mgr


def test_every_file_and_directory_is_fsynced_around_the_rename(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "ckpt", keep=2)
    _save(mgr, 1)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", f"{a} -> {b}")), real_replace(a, b))[1])
    final = _save(mgr, 2)
    tmp = str(mgr.root / ".tmp-step-00000002")
    rename = events.index(("replace", f"{tmp} -> {final}"))
    before = {path for what, path in events[:rename] if what == "fsync"}
    files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert {"weights.safetensors", "optimizer.pt", "rng-rank0.pt", "data-rank0.json", "scheduler.json",
            STATE_FILE} <= set(files)
    renamed_from = {b: a for what, ev in events if what == "replace" for a, b in [ev.split(" -> ")]}
    for name in files:  # (a file written through a temporary name and renamed counts as fsynced)
        path = f"{tmp}/{name}"
        assert {path, renamed_from.get(path)} & before, f"{name} is not fsynced before the rename"
    assert tmp in before, "the checkpoint directory is fsynced before the rename"
    after = [path for what, path in events[rename + 1:] if what == "fsync"]
    assert str(mgr.root) in after, "the parent directory is fsynced after the rename"
    latest = events.index(("replace", f"{renamed_from[str(mgr.root / 'latest')]} -> {mgr.root / 'latest'}"))
    assert ("fsync", str(mgr.root)) in events[latest + 1:], "the `latest` pointer's rename is made durable too"
    assert MANIFEST in files
    manifest = json.loads((final / MANIFEST).read_text())["files"]
    assert set(manifest) == set(files) - {MANIFEST}
    assert all(manifest[f]["size"] == (final / f).stat().st_size and len(manifest[f]["sha256"]) == 64 for f in manifest)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda d: _truncate(d / "weights.safetensors"), r"weights.safetensors: \d+ bytes, the manif"),
    "flipped byte": (lambda d: _flip_byte(d / "optimizer.pt"), "optimizer.pt: SHA-256 differs from the manifest"),
    "missing rank file": (lambda d: (d / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    "missing state": (lambda d: (d / STATE_FILE).unlink(), f"{STATE_FILE} is missing"),
    "garbage manifest": (lambda d: (d / MANIFEST).write_text("{not json"), f"{MANIFEST} is unreadable"),
    "no manifest": (lambda d: (d / MANIFEST).unlink(), f"{MANIFEST} is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    mgr = _checkpoints(tmp_path)
    newest = mgr.root / "step-00000003"
    hurt, why = DAMAGE[damage]
    hurt(newest)
    said: list[str] = []
    assert mgr.resume_point(say=said.append) == mgr.root / "step-00000002"
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith("--resume: step-00000003 is damaged (")
    assert said[0].endswith("kept as damaged-step-00000003; resuming from step-00000002")
    assert re.search(why, said[0]), said[0]
    assert (mgr.root / "damaged-step-00000003").is_dir() and not newest.exists(), "kept, renamed, not deleted"
    assert (mgr.root / "latest").read_text() == "step-00000002"
    assert mgr.resume_point(say=said.append) == mgr.root / "step-00000002" and len(said) == 1
    # training goes on: the next save of step 3 does not clash with the kept one, rotation leaves it alone
    mgr.keep = 1
    _save(mgr, 3)
    assert sorted(p.name for p in mgr.root.iterdir()) == ["damaged-step-00000003", "latest", "step-00000003"]
    assert mgr.verify(mgr.root / "step-00000003") is None


def test_checkpoints_without_a_manifest_are_checked_by_structure(tmp_path):
    mgr = _checkpoints(tmp_path, n=2)
    for d in mgr.checkpoints():  # as written before manifests existed
        (d / MANIFEST).unlink()
        state = json.loads((d / STATE_FILE).read_text())
        del state["manifest"]
        (d / STATE_FILE).write_text(json.dumps(state))
        assert mgr.verify(d) is None
    newest = mgr.root / "step-00000002"
    weights = newest / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])  # the tensor data cut short
    assert "its header describes" in mgr.verify(newest)
    _truncate(weights)  # into the header
    assert "header of" in mgr.verify(newest)
    (newest / "weights.safetensors").write_bytes(b"\x05")
    assert "too short for a safetensors header" in mgr.verify(newest)
    _truncate(newest / "optimizer.pt")
    (newest / "weights.safetensors").unlink()
    assert mgr.verify(newest) == "weights.safetensors is missing"
    assert mgr.resume_point(say=lambda _: None) == mgr.root / "step-00000001"


def test_every_checkpoint_damaged_is_an_error_and_nothing_is_renamed(tmp_path):
    mgr = _checkpoints(tmp_path, n=2)
    for d in mgr.checkpoints():
        _truncate(d / "weights.safetensors")
    with pytest.raises(DamagedCheckpointError, match=r"every checkpoint under .* is damaged: step-00000002: "
                                                    r"weights.safetensors.*; step-00000001: weights"):
        mgr.resume_point(say=lambda _: None)
    assert [p.name for p in mgr.checkpoints()] == ["step-00000001", "step-00000002"]
    with pytest.raises(DamagedCheckpointError, match=r"latest names .* which is damaged"):
        mgr.latest()
    assert CheckpointManager(tmp_path / "empty", keep=1).resume_point() is None


# ------------------------------------------------------------------------------------------- with the trainer
pytestmark = pytest.mark.usefixtures("one_thread")


def _damaged_world(world: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the synthetic world with 4 MMC4 images corrupt and a data config that tolerates them."""
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    for image in sorted((copy / "mmc4" / "mmc4_images").iterdir())[::7][:4]:
        image.write_bytes(b"not an image")
    cfg = yaml.safe_load((REPO / "configs/data/synth.yaml").read_text())
    for entry in cfg["train"][0]["datasets"]:
        entry["max_bad_fraction"] = 1.0
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(cfg))
    return copy, data


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_resume_with_a_damaged_newest_checkpoint_and_bad_sample_counts(world, tmp_path, capsys):
    root, data = _damaged_world(world, tmp_path)
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", f"data.root={root}", f"data.config={data}", "log.every=1",
                 "log.progress=false", "log.tensorboard=false", "schedule.max_steps=6", "checkpoint.every=3",
                 "checkpoint.keep=3"]
    cfg = lambda: TrainConfig.load(REPO / "configs/train/tiny_pretrain.yaml", overrides)
    Trainer(cfg()).run()
    whole = _records(run)
    saved = json.loads((run / "checkpoints" / "step-00000006" / "data-rank0.json").read_text()).get("bad_samples")
    newest = run / "checkpoints" / "step-00000006"
    _truncate(newest / "weights.safetensors")
    capsys.readouterr()
    resumed = Trainer(cfg(), resume=True)
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("--resume")]
    assert len(line) == 1 and re.fullmatch(
        r"--resume: step-00000006 is damaged \(weights.safetensors: \d+ bytes, the manifest says \d+\), "
        r"kept as damaged-step-00000006; resuming from step-00000003", line[0]), out
    assert resumed.step == 3
    resumed.run()
    again = _records(run)
    assert [r["step"] for r in again] == [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in again] == [r["loss"] for r in whole], "the fallback resume is exact"
    assert (run / "checkpoints" / "damaged-step-00000006").is_dir() and (run / "checkpoints" / "step-00000006").is_dir()

    counts = [r["bad_samples"] for r in whole]
    assert set(counts[-1]) == {"mmc4", "blip"}
    assert counts[-1]["mmc4"]["bad"] > 0 and counts[-1]["mmc4"]["reasons"].get("corrupt image", 0) > 0
    assert counts[-1]["blip"]["bad"] == 0 and counts[-1]["blip"]["good"] > 0
    assert all(counts[i + 1]["mmc4"]["good"] >= counts[i].get("mmc4", {"good": 0})["good"] for i in range(5))
    assert saved == counts[-1], "the checkpoint holds the counts"
    assert [r["bad_samples"] for r in again] == counts, "bad-sample counts continue across the resume"
