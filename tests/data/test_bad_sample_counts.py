"""Bad-sample counts per source: carried with each batch out of the process (or DataLoader worker) that read it,
summed by the training data iterator, kept across a resume; `deem data inspect --all` reads every sample."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from deem.data import build_dataset, synth_world
from deem.data.cli import add_data_commands, inspect_all
from deem.data.errors import NoValidSamples, merge_counts
from deem.train.data import TrainData
from tests.data.conftest import write_corrupt, write_image, write_json
from tests.data.test_interleaved import TF, mmc4_cfg, write_mmc4

REPO = Path(__file__).resolve().parents[2]


def _damaged_mmc4(root: Path) -> Path:
    """4 shards x 6 documents x 2 images; 3 images corrupt and one malformed line per shard."""
    write_mmc4(root, n_shards=4, docs_per_shard=6, extra_lines=["{broken"])
    for name in ("000000000000", "000100020001", "000300050000"):
        (root / "mmc4_images" / f"{name}.jpg").write_bytes(b"garbage")
    return root


def _sum_batches(batches) -> dict:
    return merge_counts(*(b["meta"]["bad_samples"] for b in batches))


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_batches_carry_the_counts_of_their_reading(tok, tmp_path, workers):
    cfg = mmc4_cfg(_damaged_mmc4(tmp_path), max_bad_fraction=1.0, shuffle_buffer=1)
    ds = build_dataset(cfg, tok, rank=0, world_size=1)
    full = list(DataLoader(ds, batch_size=None, num_workers=workers))
    total = _sum_batches(full)["mmc4"]
    # what was read after the last full batch (the unpacked tail) belongs to no batch
    assert set(total["reasons"]) == {"corrupt image", "malformed record"} and 3 <= total["bad"] <= 7
    assert total["good"] >= 20 and total["bad"] == sum(total["reasons"].values())
    if workers == 0:  # the main process read everything itself
        assert total["bad"] <= ds.source.tracker.bad and total["good"] <= ds.source.tracker.good
    # replaying to a resumed position counts nothing twice: the rest after the resume counts what it read
    for b in full[:3]:
        ds.note_batch(b)
    resumed = build_dataset(cfg, tok, rank=0, world_size=1)
    resumed.load_state_dict(ds.state_dict())
    rest = list(DataLoader(resumed, batch_size=None, num_workers=workers))
    key = lambda b: (b["meta"]["position"]["consumer"], b["meta"]["position"]["batch_index"])
    want = {key(b): b["meta"]["bad_samples"] for b in full}
    assert rest and all(b["meta"]["bad_samples"] == want[key(b)] for b in rest)
    assert merge_counts(*(want[k] for k in want if k not in {key(b) for b in rest}), _sum_batches(rest)) == \
        _sum_batches(full)


def _data_config(tmp_path: Path) -> Path:
    mmc4 = _damaged_mmc4(tmp_path / "mmc4")
    for i in range(12):
        write_image(tmp_path / "coco" / f"{i}.jpg", colour=(20 * i, 10, 10))
    for i in (3, 7):
        write_corrupt(tmp_path / "coco" / f"{i}.jpg")
    rows = [{"image": f"{i}.jpg", "caption": f"picture {i}"} for i in range(12)] + [{"image": "no caption.jpg"}]
    ann = write_json(tmp_path / "ann.json", rows)
    cfg = {"tokenizer": {"type": "tiny", "num_img_token": 3},
           "train": [{**mmc4_cfg(mmc4, shuffle_buffer=1), "max_bad_fraction": 1.0},
                     {"type": "coco_karpathy", "name": "cap", "annotation": str(ann), "image_root": str(tmp_path /
                      "coco"), "transform": TF, "max_bad_fraction": 1.0,
                      "collator": {"type": "caption_train", "max_length": 256}}]}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(("name", "workers"), [("mmc4", 0), ("cap", 0), ("cap", 2)])
def test_train_data_counts_continue_across_a_resume(tmp_path, name, workers):
    config = str(_data_config(tmp_path))
    make = lambda: TrainData(config, name, None, 2, workers, 0, 0, 1)
    cpu = torch.device("cpu")
    whole = make()
    if name == "cap":
        assert whole.bad_samples == {"cap": {"good": 0, "bad": 1, "reasons": {"malformed record": 1}}}, \
            "the caption-less record counts once, from the annotation file"
    it = whole.batches(cpu)
    for _ in range(10):
        next(it)
    reference = whole.bad_sample_totals()
    assert reference[name]["bad"] >= 2 and reference[name]["good"] > 0

    first = make()
    it = first.batches(cpu)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    assert state["bad_samples"] == first.bad_samples and state["bad_samples"][name]["good"] > 0
    resumed = make()
    resumed.load_state_dict(state)
    it = resumed.batches(cpu)
    for _ in range(6):
        next(it)
    assert resumed.bad_sample_totals() == reference


def _world(tmp_path: Path) -> Path:
    out = tmp_path / "world"
    synth_world(out, seed=3, image_size=32, num_train=12, num_test=4, num_laion_shards=2, laion_per_shard=5,
                num_mmc4_shards=2, docs_per_shard=3, with_tokenizer=True)
    write_corrupt(out / "coco" / "train2014" / "COCO_train2014_000000000001.jpg")
    big = out / "coco" / "val2014" / "COCO_val2014_000000100000.jpg"
    write_image(big, size=(300, 300))
    return out


def test_inspect_all_reads_every_sample_and_prints_a_table(tmp_path, capsys):
    world = _world(tmp_path)
    config = yaml.safe_load((REPO / "configs/data/synth.yaml").read_text())
    config["max_image_pixels"] = 200 * 200  # the 300x300 eval image is refused, in training and in inspect
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser(prog="deem")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "inspect", str(path), "--root", str(world), "--all"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["split", "source", "read", "good", "skipped", "skipped", "by", "reason"]
    rows = {(ln.split()[0], ln.split()[1]): ln.split()[2:] for ln in lines[1:]}
    assert rows[("train", "coco_caption_karpathy")] == ["12", "11", "1", "corrupt", "image:", "1"]
    assert rows[("train", "mmc4")][:3] == ["6", "6", "0"], "every document of every shard"
    assert rows[("train", "blip")][:3] == ["10", "10", "0"]
    assert rows[("eval", "coco_caption")] == ["4", "3", "1", "image", "too", "large:", "1"]
    _, counts = inspect_all(path, root=world)
    assert counts["eval/vqav2_val"]["reasons"] == {"image too large": counts["eval/vqav2_val"]["bad"]} and \
        counts["eval/vqav2_val"]["bad"] > 0
    assert set(counts) == {f"{split}/{name}" for split, name in rows}
    # a source without one valid sample: the table, then an error naming it
    for tar in (world / "laion").glob("*.tar"):
        tar.write_bytes(b"garbage" * 100)
    with pytest.raises(NoValidSamples, match="train/blip"):
        args.func(args)
    assert "blip" in capsys.readouterr().out
