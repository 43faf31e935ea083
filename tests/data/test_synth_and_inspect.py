"""The synthetic shapes world through the real readers, `inspect`, and the `deem data` command wiring."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from deem.data import build_collator, build_dataset, inspect, load_tokenizer, synth_world
from deem.data.cli import add_data_commands
from deem.data.config import load_data_config
from deem.data.synth import COLOURS, SHAPES, main_shape, questions_for, random_scene, render

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = synth_world(out, seed=3, image_size=64, num_train=24, num_test=8, num_laion_shards=2,
                          laion_per_shard=10, num_mmc4_shards=2, docs_per_shard=6)
    return out, summary


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.parent.name.startswith("tokenizer"):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_world_is_deterministic_and_complete(world, tmp_path):
    out, summary = world
    again = synth_world(tmp_path / "again", seed=3, image_size=64, num_train=24, num_test=8, num_laion_shards=2,
                        laion_per_shard=10, num_mmc4_shards=2, docs_per_shard=6, with_tokenizer=False)
    assert again == summary and _digest(tmp_path / "again") == _digest(out)
    other = synth_world(tmp_path / "other", seed=4, image_size=64, num_train=24, num_test=8, num_laion_shards=1,
                        laion_per_shard=2, num_mmc4_shards=1, docs_per_shard=1, with_tokenizer=False)
    assert other["counts"]["coco_karpathy_train"] == 24
    a = (out / "coco/train2014/COCO_train2014_000000000000.jpg").read_bytes()
    assert a != (tmp_path / "other/coco/train2014/COCO_train2014_000000000000.jpg").read_bytes()
    for rel in ("laion/00000.tar", "mmc4/mmc4_annts/docs_no_face_shard_0_v3.jsonl.zip",
                "coco/annotations/coco_karpathy_test.json", "vqav2/v2_mscoco_val2014_annotations.json",
                "pope/coco_pope_random.json", "robustvqa/robustvqa_test.json", "refcoco/refcoco/refs(unc).json",
                "refcoco/finetune_refcoco_train_with_mask.json", "tokenizer/tokenizer.json",
                "tokenizer_llama/tokenizer.json"):
        assert (out / rel).is_file(), rel


def test_questions_are_answerable_from_the_scene():
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(50):
        scene = random_scene(rng, i)
        img = np.asarray(render(scene, 64)).astype(int)
        for q, a, _ in questions_for(scene, rng):
            if q == "How many shapes are there?":
                assert a == str(len(scene.shapes))
            elif q.startswith("Is there a "):
                colour, kind = q[len("Is there a "):-len(" in the image?")].split(" ")
                assert (a == "yes") == any(s.colour == colour and s.kind == kind for s in scene.shapes)
            elif q.endswith(" the main object in this image?"):
                kind = q[len("Is "):-len(" the main object in this image?")]
                assert (a == "yes") == (main_shape(scene).kind == kind)
            elif q.startswith("What colour"):
                assert a in COLOURS
            else:
                assert a in SHAPES
        s = scene.shapes[0]
        cx, cy = int(s.cx * 64), int(s.cy * 64)
        assert np.abs(img[cy, cx] - np.array(COLOURS[s.colour])).max() < 60, "the shape is drawn where it is said"
    assert len({random_scene(np.random.default_rng(k), 0).caption() for k in range(30)}) > 20


def test_synth_config_through_real_readers(world):
    out, _ = world
    cfg = load_data_config(REPO / "configs" / "data" / "synth.yaml", root=out)
    tok = load_tokenizer(cfg["tokenizer"])
    assert tok.hf.unk_token_id not in tok.encode(" ".join(SHAPES) + " Please anwser yes or no")
    for entry in cfg["train"] + cfg["eval"]:
        ds = build_dataset(entry, tok, rank=0, world_size=1)
        col = build_collator(entry, tok)
        batch = next(iter(ds)) if col is None else col([ds[i] for i in range(2)])
        assert batch is not None, entry.get("name")
        assert batch["text_ids"].shape[0] >= 1 and batch["image_tensors"].shape[-1] == 32
        trackers = [getattr(ds, "tracker", None)]
        assert all(t is None or t.bad == 0 for t in trackers), entry.get("name")


def test_inspect_report(world):
    out, _ = world
    report = inspect(str(REPO / "configs" / "data" / "synth.yaml"), num_samples=1, root=out)
    for name in ("pretrain", "coco_caption_karpathy", "sft_vqa", "refcoco", "mask_refcoco", "coco_caption",
                 "vqav2_val", "pope_adversarial", "robustvqa_r", "refcoco_val", "refcocog_referring"):
        assert f"] {name} (" in report, name
    assert "<|startofimage|><image x4>" in report and "image_tensors (" in report and "mask coverage" in report
    assert "trained (" in report and "every inspected item failed" not in report and "skipped" not in report


def test_cli_wiring(world, tmp_path, capsys):
    out, _ = world
    parser = argparse.ArgumentParser(prog="deem")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "synth", str(tmp_path / "w"), "--seed", "1", "--num-train", "4",
                              "--num-test", "2", "--image-size", "48"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["coco_karpathy_train"] == 4
    args = parser.parse_args(["data", "inspect", str(REPO / "configs" / "data" / "synth.yaml"), "--root", str(out),
                              "--num-samples", "1"])
    assert args.func(args) == 0
    assert "pope_adversarial" in capsys.readouterr().out


def test_real_configs_parse_and_use_known_keys():
    from deem.data.registry import COLLATORS, COMMON_KEYS, KNOWN_KEYS

    files = sorted((REPO / "configs" / "data").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        assert "tokenizer" in cfg, f.name
        stack = [e for split in ("train", "eval") for e in (cfg.get(split) or [])]
        while stack:
            entry = stack.pop()
            assert entry["type"] in KNOWN_KEYS, (f.name, entry["type"])
            assert not set(entry) - COMMON_KEYS - KNOWN_KEYS[entry["type"]], (f.name, entry)
            col = entry.get("collator")
            if col is not None:
                assert (col if isinstance(col, str) else col["type"]) in COLLATORS, (f.name, col)
            stack += entry.get("datasets", [])
