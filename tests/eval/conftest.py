"""Fixtures of the evaluation tests: a small synthetic world, extra benchmark files in the real formats of the
benchmarks the world lacks (NoCaps-style COCO captions, image2paragraph, TextVQA-style, VizWiz, GQA, MMVP,
VisDial), a tiny checkpoint matching the world's tokenizer, and an eval config covering every reader."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from deem.data import load_tokenizer
from deem.data.synth import synth_world

NUM_IMG_TOKEN = 4
TF = {"resolution": 32, "resolution_dec": 32, "center_crop": False, "random_flip": False}
SHORT = {"num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread_everywhere(one_thread):
    """Every evaluation test module runs on one intra-op thread."""
    yield


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _val_images(world: Path) -> list[Path]:
    return sorted((world / "coco" / "val2014").glob("*.jpg"))


def write_extra_benchmarks(world: Path) -> None:
    """Benchmark files the shapes world does not write, in the real formats, over its val images."""
    images = _val_images(world)
    caps = json.loads((world / "coco/annotations/coco_karpathy_test.json").read_text())
    by_name = {Path(c["image"]).name: c["caption"] for c in caps}
    # NoCaps / Flickr30k style: COCO caption format, several captions per image
    _write_json(world / "nocaps/nocaps_val.json", {
        "images": [{"id": i, "file_name": p.name} for i, p in enumerate(images)],
        "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c} for i, p in enumerate(images)
                        for k, c in enumerate(by_name[p.name])]})
    # image2paragraph: paragraphs_coco.json + a split file of image ids
    _write_json(world / "image2parag/paragraphs_coco.json", {"annotations": [
        {"image_id": i, "caption": by_name[p.name][0] + ". It is a synthetic scene.", "url": f"http://x/{p.name}"}
        for i, p in enumerate(images)]})
    _write_json(world / "image2parag/test_split.json", list(range(0, len(images), 2)))
    # TextVQA converted to the VQAv2 format: questions carry their `image`
    qs = json.loads((world / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    anns = json.loads((world / "vqav2/v2_mscoco_val2014_annotations.json").read_text())
    name_of = {int(p.stem.split("_")[-1]): p.name for p in images}
    tq = [{**q, "image": name_of[q["image_id"]]} for q in qs["questions"][:6]]
    _write_json(world / "textvqa/textvqa_val_questions.json", {**qs, "questions": tq})
    _write_json(world / "textvqa/textvqa_val_annotations.json", anns)
    # VizWiz: official list format, answers of 10 workers, an unanswerable question
    (world / "vizwiz/val").mkdir(parents=True, exist_ok=True)
    vizwiz = []
    for i, p in enumerate(images[:4]):
        name = f"VizWiz_val_{i:08d}.jpg"
        shutil.copy(p, world / "vizwiz/val" / name)
        answers = ["unanswerable"] * 10 if i == 0 else ["red"] * 6 + ["dark red"] * 4
        vizwiz.append({"image": name, "question": "What colour is this?", "answers": [{"answer": a} for a in answers],
                       "answer_type": "unanswerable" if i == 0 else "other", "answerable": int(i != 0)})
    _write_json(world / "vizwiz/val.json", vizwiz)
    # GQA: LAVIS-style list
    (world / "gqa/images").mkdir(parents=True, exist_ok=True)
    gqa = []
    for i, p in enumerate(images[:4]):
        shutil.copy(p, world / "gqa/images" / f"n{i}.jpg")
        gqa.append({"image": f"n{i}.jpg", "question": "Is there a shape?", "question_id": f"g{i}", "answer": "yes"})
    _write_json(world / "gqa/testdev_balanced_questions.json", gqa)
    # MMVP: Questions.csv with the official "lndex" header, two pairs
    mm = world / "mmvp"
    (mm / "MMVP Images").mkdir(parents=True, exist_ok=True)
    with (mm / "Questions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["lndex", "Question", "Options", "Correct Answer"])
        for i in range(4):
            shutil.copy(images[i % len(images)], mm / "MMVP Images" / f"{i + 1}.jpg")
            w.writerow([i + 1, "Is the shape on the left?", "(a) Yes (b) No", "(a)" if i % 2 == 0 else "(b)"])
    # VisDial v1.0 val: dialogs + dense annotations (6 options per round keep scoring cheap)
    vd = world / "visdial"
    (vd / "VisualDialog_val2018").mkdir(parents=True, exist_ok=True)
    questions = ["what colour is it", "how many shapes", "is it big"]
    answers = ["red", "blue", "two", "one", "yes", "no", "green"]
    dialogs, dense = [], []
    for i, p in enumerate(images[:3]):
        image_id = 1000 + i
        shutil.copy(p, vd / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg")
        dialog = [{"question": r, "answer": r * 2, "answer_options": [(r + k) % len(answers) for k in range(6)],
                   "gt_index": (i + r) % 6} for r in range(3)]
        dialogs.append({"image_id": image_id, "caption": by_name[p.name][0], "dialog": dialog})
        dense.append({"image_id": image_id, "round_id": 1 + i % 3,
                      "gt_relevance": [1.0 if k == (i + i % 3) % 6 else 0.5 * (k % 2) for k in range(6)]})
    _write_json(vd / "visdial_1.0_val.json", {"version": "1.0", "split": "val", "data": {
        "questions": questions, "answers": answers, "dialogs": dialogs}})
    _write_json(vd / "visdial_1.0_val_dense_annotations.json", dense)


def all_benchmarks() -> list[dict[str, Any]]:
    """One benchmark per evaluation reader (and per metric kind), tiny generation settings."""
    return [
        {"name": "coco_caption", "dataset": {"type": "coco_karpathy", "eval": True,
                                             "annotation": "coco/annotations/coco_karpathy_test.json",
                                             "image_root": "coco", "transform": TF, "collator": "caption_eval"},
         "generation": {"num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 1}},
        {"name": "nocaps", "dataset": {"type": "coco_captions", "eval": True, "annotation": "nocaps/nocaps_val.json",
                                       "image_root": "coco/val2014", "transform": TF, "collator": "caption_eval"},
         "generation": SHORT},
        {"name": "image2paragraph", "dataset": {"type": "image2paragraph", "eval": True,
                                                "annotation": "image2parag/paragraphs_coco.json",
                                                "split_file": "image2parag/test_split.json",
                                                "image_root": "coco/val2014", "transform": TF,
                                                "collator": {"type": "caption_eval", "template": "paragraph"}},
         "generation": {"num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 4, "repetition_penalty": 1.2}},
        {"name": "vqav2", "dataset": {"type": "vqav2", "eval": True,
                                      "questions": "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                                      "annotations": "vqav2/v2_mscoco_val2014_annotations.json",
                                      "image_root": "coco/val2014", "image_prefix": "COCO_val2014", "transform": TF,
                                      "collator": "vqa_eval"}, "generation": SHORT},
        {"name": "okvqa", "dataset": {"type": "okvqa", "eval": True,
                                      "questions": "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                                      "annotations": "vqav2/v2_mscoco_val2014_annotations.json",
                                      "image_root": "coco/val2014", "image_prefix": "COCO_val2014", "transform": TF,
                                      "collator": "vqa_eval"}, "generation": SHORT, "postprocess": "original"},
        {"name": "textvqa", "dataset": {"type": "vqav2", "eval": True,
                                        "questions": "textvqa/textvqa_val_questions.json",
                                        "annotations": "textvqa/textvqa_val_annotations.json",
                                        "image_root": "coco/val2014", "transform": TF, "collator": "vqa_eval"},
         "generation": SHORT},
        {"name": "vizwiz", "dataset": {"type": "vizwiz", "annotation": "vizwiz/val.json", "image_root": "vizwiz/val",
                                       "transform": TF, "collator": {"type": "vqa_eval", "template": "vizwiz"}},
         "generation": SHORT},
        {"name": "gqa", "dataset": {"type": "gqa", "eval": True, "annotation": "gqa/testdev_balanced_questions.json",
                                    "image_root": "gqa/images", "transform": TF, "collator": "vqa_eval"},
         "generation": SHORT},
        {"name": "pope_random", "dataset": {"type": "pope", "annotation": "pope/coco_pope_random.json",
                                            "image_root": "coco/val2014", "transform": TF, "collator": "yesno_eval"},
         "generation": SHORT},
        *({"name": f"robustvqa_{s}", "dataset": {"type": "robustvqa", "subset": s,
                                                 "annotation": "robustvqa/robustvqa_test.json", "image_root": ".",
                                                 "transform": TF, "collator": "yesno_eval"},
           "generation": SHORT} for s in ("a", "r", "v2")),
        {"name": "mmvp", "dataset": {"type": "mmvp", "annotation": "mmvp/Questions.csv",
                                     "image_root": "mmvp/MMVP Images", "transform": TF, "collator": "yesno_eval"},
         "generation": SHORT},
        {"name": "visdial", "dataset": {"type": "visdial", "dialogs": "visdial/visdial_1.0_val.json",
                                        "dense_annotations": "visdial/visdial_1.0_val_dense_annotations.json",
                                        "image_root": "visdial/VisualDialog_val2018", "transform": TF,
                                        "collator": "score_eval"}, "batch_size": 2},
        {"name": "refcoco_val", "dataset": {"type": "refcoco_grounding_eval", "annotation": "refcoco/refcoco_val.json",
                                            "image_root": "coco/val2014", "transform": TF,
                                            "collator": "grounding_eval"},
         "generation": {"num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 1}},
        {"name": "refcocog_referring", "dataset": {"type": "refcocog_referring_eval",
                                                   "annotation": "refcoco/finetune_refcocog_val_with_mask.json",
                                                   "image_root": "coco/val2014", "transform": TF,
                                                   "collator": "referring_eval"}, "generation": SHORT},
    ]


def eval_config(world: Path, names: list[str] | None = None, **top: Any) -> dict[str, Any]:
    benches = [b for b in all_benchmarks() if names is None or b["name"] in names]
    return {"root": str(world), "tokenizer": {"type": "hf", "path": "tokenizer", "num_img_token": NUM_IMG_TOKEN},
            "batch_size": 3, "num_workers": 0, "save_every": 1, "benchmarks": benches,
            "groups": {"robustvqa": {"benchmarks": ["robustvqa_a", "robustvqa_r", "robustvqa_v2"],
                                     "metrics": ["accuracy"]}} if names is None else {}, **top}


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synth_world(out, image_size=48, num_train=4, num_test=4, num_laion_shards=1, laion_per_shard=1,
                num_mmc4_shards=1, docs_per_shard=1)
    write_extra_benchmarks(out)
    return out


@pytest.fixture(scope="session")
def checkpoint(world, tmp_path_factory) -> Path:
    """A tiny DEEM checkpoint whose vocabulary and special ids match the world's tokenizer."""
    from deem.models import DeemModel, tiny
    from deem.tokens import TokenLayout

    tok = load_tokenizer({"type": "hf", "path": str(world / "tokenizer"), "num_img_token": NUM_IMG_TOKEN})
    cfg = tiny(TokenLayout(tok.special, len(tok.hf), NUM_IMG_TOKEN), image_size=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    DeemModel(cfg).save_pretrained(path)
    return path
