"""`deem data robustvqa` on tiny ImageNet-A/-R/-V2 folders (alignment of paths and labels, the real CLIP scorer
with a tiny local CLIP), and the CLI hooks of `deem eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deem.data import build_dataset
from deem.data.cli import add_data_commands
from deem.eval import EvalError
from deem.eval.cli import add_eval_commands, add_robustvqa_command
from deem.eval.robustvqa import build_robustvqa, list_subset, read_class_index
from tests.eval.conftest import eval_config

CLASSES = [("n01440764", "tench"), ("n01443537", "gold_fish"), ("n01484850", "great_white_shark"),
           ("n01491361", "tiger_shark"), ("n01494475", "hammerhead"), ("n01496331", "electric_ray")]
NAMES = [n.replace("_", " ") for _, n in CLASSES]


def _image(path: Path, label: int, hardest: int) -> None:
    """An image whose colour encodes its own label (green) and the class the fake scorer ranks highest (red)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (40 * hardest, 40 * label, 0)).save(path)


def _decode(path: Path) -> tuple[int, int]:
    r, g, _ = Image.open(path).convert("RGB").getpixel((5, 5))
    return round(g / 40), round(r / 40)


class ColourScorer:
    """Deterministic stand-in for CLIP: the red channel's class scores highest; the true class (green) second,
    or first when red == green (CLIP right)."""

    name = "colour"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        out = np.zeros((len(images), len(CLASSES)))
        for i, im in enumerate(images):
            r, g, _ = im.getpixel((5, 5))
            label, top = round(g / 40), round(r / 40)
            out[i, (label + 1) % len(CLASSES)] = 1.0  # a decoy, never the hardest
            out[i, label] = 5.0
            out[i, top] = 10.0 if top != label else 20.0
        return out


@pytest.fixture()
def imagenet(tmp_path) -> dict[str, Path]:
    idx = tmp_path / "imagenet_class_index.json"
    idx.write_text(json.dumps({str(i): [w, n] for i, (w, n) in enumerate(CLASSES)}))
    a, r, v2 = tmp_path / "imagenet-a", tmp_path / "imagenet-r", tmp_path / "imagenetv2-matched-frequency"
    # ImageNet-A / -R: WordNet-id folders (with a README at the top, as shipped)
    for k, (label, hardest) in enumerate([(0, 3), (0, 0), (2, 5), (4, 1)]):
        _image(a / CLASSES[label][0] / f"a_{k}.jpg", label, hardest)
    (a / "README.txt").write_text("ImageNet-A")
    for k, (label, hardest) in enumerate([(1, 2), (5, 5), (3, 0)]):
        _image(r / CLASSES[label][0] / f"r_{k}.png", label, hardest)
    (r / CLASSES[3][0] / "broken.jpg").write_bytes(b"not an image")
    # ImageNet-V2: class-index folders 0..999 (numeric order, not lexicographic)
    for k, (label, hardest) in enumerate([(5, 0), (0, 2), (1, 1)]):
        _image(v2 / str(label) / f"{k:03d}.jpeg", label, hardest)
    return {"index": idx, "a": a, "r": r, "v2": v2, "root": tmp_path}


def test_entries_keep_paths_and_labels_aligned(imagenet):
    out = imagenet["root"] / "robustvqa_test.json"
    scorer = ColourScorer()
    counts = build_robustvqa(imagenet["a"], imagenet["r"], imagenet["v2"], out, class_index=imagenet["index"],
                             scorer=scorer, relative_to=imagenet["root"], batch_size=2)
    assert counts == {"imagenet_a": 4, "imagenet_r": 3, "imagenet_v2": 3}  # the unreadable image is skipped
    data = json.loads(out.read_text())
    assert data["info"]["subsets"]["imagenet_r"]["unreadable"] == 1
    assert data["info"]["prompt"] == "A photo of a {}" and data["info"]["normalised_features"] is True
    for key in ("imagenet_a", "imagenet_r", "imagenet_v2"):
        for e in data[key]:
            label, hardest = _decode(imagenet["root"] / e["file_name"])
            assert e["gt_caption"] == NAMES[label] and e["label"] == label
            wrong = hardest if hardest != label else (label + 1) % len(CLASSES)  # CLIP right: next best class
            assert e["error_caption"] == NAMES[wrong] != e["gt_caption"]
            assert e["clip_correct"] == (hardest == label)
    assert [e["file_name"] for e in data["imagenet_v2"]] == [
        "imagenetv2-matched-frequency/0/001.jpeg", "imagenetv2-matched-frequency/1/002.jpeg",
        "imagenetv2-matched-frequency/5/000.jpeg"]
    # the data layer reads it: one yes and one no question per entry, image paths resolve under the root
    ds = build_dataset({"type": "robustvqa", "subset": "a", "annotation": str(out), "image_root": str(imagenet["root"]),
                        "transform": {"resolution": 8, "resolution_dec": 8}})
    assert len(ds) == 8
    item = ds[0]
    assert item["question"] == "Is tench the main object in this image? Please anwser yes or no"
    assert item["answers"] == ["yes"] and ds[1]["answers"] == ["no"]


def test_misclassified_only_and_errors(imagenet):
    out = imagenet["root"] / "mis.json"
    counts = build_robustvqa(imagenet["a"], None, imagenet["v2"], out, class_index=imagenet["index"],
                             scorer=ColourScorer(), relative_to=imagenet["root"], keep="misclassified")
    assert counts == {"imagenet_a": 3, "imagenet_v2": 2}
    data = json.loads(out.read_text())
    assert "imagenet_r" not in data and not any(e["clip_correct"] for e in data["imagenet_a"])
    with pytest.raises(EvalError, match="neither a WordNet id"):
        (imagenet["a"] / "not_a_class").mkdir()
        list_subset(imagenet["a"], [w for w, _ in CLASSES])
    with pytest.raises(EvalError, match="CLIP directory"):
        build_robustvqa(imagenet["v2"], None, None, out, class_index=imagenet["index"], clip=imagenet["root"])
    with pytest.raises(EvalError, match="at least one"):
        build_robustvqa(None, None, None, out, class_index=imagenet["index"], scorer=ColourScorer())
    assert read_class_index(imagenet["index"])[1][1] == "gold fish"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet (to write a tiny CLIP vocabulary without merges)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@pytest.fixture()
def tiny_clip(tmp_path) -> Path:
    """A randomly initialised transformers CLIP with a character-level tokenizer, saved locally."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path / "clip"
    d.mkdir()
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": eos,
                     "bos_token_id": vocab["<|startoftext|>"], "pad_token_id": eos},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(d)
    return d


def _parser() -> argparse.ArgumentParser:
    """The `deem` parser as python/deem/cli.py wires it."""
    parser = argparse.ArgumentParser(prog="deem")
    sub = parser.add_subparsers(dest="command", required=True)
    add_robustvqa_command(add_data_commands(sub))
    add_eval_commands(sub)
    return parser


def test_cli_robustvqa_with_a_local_clip(imagenet, tiny_clip, tmp_path):
    from deem.eval.robustvqa import ClipScorer

    scorer = ClipScorer(tiny_clip, [f"A photo of a {n}" for n in NAMES])
    im = Image.new("RGB", (20, 30), (10, 200, 30))
    s = scorer([im, im.rotate(90)])
    assert s.shape == (2, len(NAMES)) and np.isfinite(s).all()
    assert not np.allclose(s[0], s[0][0])  # the class prompts score differently
    out = tmp_path / "cli.json"
    args = _parser().parse_args(["data", "robustvqa", "--imagenet-v2", str(imagenet["v2"]), "--class-index",
                                 str(imagenet["index"]), "--clip", str(tiny_clip), "--out", str(out),
                                 "--relative-to", str(imagenet["root"])])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert len(data["imagenet_v2"]) == 3 and data["info"]["resolution"] == 32
    for e in data["imagenet_v2"]:
        assert e["error_caption"] != e["gt_caption"]
        assert e["gt_caption"] == NAMES[_decode(imagenet["root"] / e["file_name"])[0]]


def test_cli_eval(world, checkpoint, tmp_path, capsys):
    cfg = eval_config(world, ["gqa", "mmvp"])
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    args = _parser().parse_args(["eval", str(path), "--checkpoint", str(checkpoint), "--benchmarks", "mmvp",
                                 "--out", str(out)])
    assert args.func(args) == 0
    assert "| mmvp | mmvp | 4/4 |" in capsys.readouterr().out
    assert (out / "mmvp" / "predictions.json").is_file() and not (out / "gqa").exists()
    assert json.loads((out / "metrics.json").read_text())["benchmarks"]["mmvp"]["num_samples"] == 4
    args = _parser().parse_args(["eval", str(path), "--score-only", "--out", str(out)])
    assert args.func(args) == 0
    args = _parser().parse_args(["eval", str(path), "--checkpoint", str(checkpoint), "--benchmarks", "nope",
                                 "--out", str(out)])
    with pytest.raises(EvalError, match="no benchmark"):
        args.func(args)
