"""Osprey-style mask-referring readers and collators: masks, conversation format, labels, truncation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from deem.data import build_collator, build_dataset
from deem.data.prompts import PARTIMAGENET_PREAMBLE, PASCAL_PREAMBLE, VG_ANSWER_SUFFIX, VG_QUESTIONS
from tests.data.conftest import write_json

TF = {"resolution": 20, "resolution_dec": 40, "center_crop": False, "random_flip": False}
SYS = "You are a helpful assistant.\n\n"
W, H = 60, 40


def _coco_file(tmp_path, caption: str | None = None, ignore_last: bool = False):
    img = Image.new("RGB", (W, H), (0, 0, 0))
    img.paste((255, 255, 255), (5, 5, 20, 20))
    img.paste((255, 0, 0), (30, 10, 50, 30))
    (tmp_path / "imgs").mkdir(exist_ok=True)
    img.save(tmp_path / "imgs" / "a.jpg", quality=95)
    m = np.zeros((H, W), np.uint8, order="F")
    m[10:30, 30:50] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    uncompressed = {"size": [H, W], "counts": [int(c) for c in _runs(m)]}
    image = {"id": 1, "file_name": "a.jpg", "height": H, "width": W}
    if caption:
        image["caption"] = caption
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[5, 5, 20, 5, 20, 20, 5, 20]],
             "caption": "white square"},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle, "caption": "red box"},
            {"id": 3, "image_id": 1, "category_id": 2, "segmentation": uncompressed, "caption": "red again",
             "ignore": ignore_last}]
    data = {"images": [image, {"id": 2, "file_name": "none.jpg", "height": H, "width": W}], "annotations": anns,
            "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "box"}]}
    return write_json(tmp_path / "ann.json", data)


def _runs(m: np.ndarray) -> list[int]:
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    return [*runs, n]


def test_masks_from_polygon_and_rle(tmp_path):
    cfg = {"type": "mask_coco", "annotation": str(_coco_file(tmp_path)), "image_root": str(tmp_path / "imgs"),
           "transform": TF}
    ds = build_dataset(cfg)
    assert len(ds) == 1, "images without regions are skipped"
    item = ds[0]
    assert len(item["images"]) == 4 and float(item["images"][0].mask.min()) == 1.0
    enc = item["images"][0].enc
    white, red = enc.min(0).values > 0.7, (enc[0] > 0.7) & (enc[1] < 0.3)
    by_answer = {}
    for (_, answer), view in zip(item["conversation"][1::2], item["images"][1:]):
        by_answer.setdefault(answer, []).append(view.mask[0].bool())
    assert float((by_answer["square"][0] == white).float().mean()) > 0.95
    for m in by_answer["box"]:
        assert float((m == red).float().mean()) > 0.95, "compressed and uncompressed RLE decode alike"


def test_conversation_text_and_labels(tok, tmp_path):
    cfg = {"type": "mask_coco", "annotation": str(_coco_file(tmp_path)), "image_root": str(tmp_path / "imgs"),
           "transform": TF, "max_regions": 2, "collator": "referring_train"}
    ds = build_dataset(cfg)
    item = ds[0]
    answers = [a for _, a in item["conversation"][1::2]]
    assert len(answers) == 2 and len(item["images"]) == 3, "at most max_regions regions"
    batch = build_collator(cfg, tok)([item])
    img = tok.image_run
    header = SYS + "## user: " + img + ("\nIn the conversation below, you simply answer the category name based on "
                                        "what you see in the imagery inside a particular region. I will give you only "
                                        "one region each time.\n") + img + "\n"
    turn1, turn2 = f"## asistant: {answers[0]}\n", f"## user: {img}\n"
    turn3 = f"## asistant: {answers[1]}\n"
    text = header + turn1 + turn2 + turn3 + "</s>"
    ids = batch["text_ids"][0].tolist()
    assert ids == tok.encode(text)
    labels = batch["gt_text_ids"][0].tolist()
    n1 = len(tok.encode(header))
    n2 = len(tok.encode(header + turn1))
    n3 = len(tok.encode(header + turn1 + turn2))
    expect = [-100] * n1 + ids[n1:n2] + [-100] * (n3 - n2) + ids[n3:]
    assert labels == expect, "human turns masked; assistant turns (tag, text, newline) and EOS trained"
    assert tok.decode([t for t in labels if t != -100]) == turn1 + turn3 + "</s>"
    assert batch["image_tensors_mask"].shape == (3, 1, 20, 20) and batch["num_image_per_seq"].tolist() == [3]


def test_overlong_conversation_loses_last_rounds(tok, tmp_path):
    cfg = {"type": "mask_coco", "annotation": str(_coco_file(tmp_path)), "image_root": str(tmp_path / "imgs"),
           "transform": TF}
    item = build_dataset(cfg)[0]
    full = build_collator({"type": "referring_train"}, tok)([item])
    n_full = full["text_ids"].shape[1]
    short = build_collator({"type": "referring_train", "max_length": n_full - 3}, tok)([item])
    assert short["num_image_per_seq"].tolist() == [3] and short["meta"]["items"][0]["rounds"] == 2
    assert short["text_ids"].shape[1] <= n_full - 3
    assert short["text_ids"][0].tolist()[-1] == tok.special.eos_id
    tiny = build_collator({"type": "referring_train", "max_length": 10, "max_bad_fraction": 1.0}, tok)
    with pytest.raises(Exception, match="every sample of the batch was skipped"):
        tiny([item])
    assert tiny.tracker.bad == 1 and "over-long" in tiny.tracker.last_errors[-1]


def test_refcoco_vg_and_part_variants(tmp_path):
    ann = _coco_file(tmp_path, caption="the white square", ignore_last=True)
    ref = build_dataset({"type": "mask_refcoco", "annotation": str(ann), "image_root": str(tmp_path / "imgs"),
                         "transform": TF})[0]
    assert {a for _, a in ref["conversation"][1::2]} == {"the white square"}
    first = ref["conversation"][0][1]
    assert first.startswith("<mask>\nI will provide you") and first.endswith("its basic attributes.<mask>")

    vg = build_dataset({"type": "mask_vg", "annotation": str(ann), "image_root": str(tmp_path / "imgs"),
                        "transform": TF})[0]
    assert len(vg["images"]) == 3, "the ignored region is dropped"
    q0 = vg["conversation"][0][1]
    assert q0.startswith("<mask>\nThis provides an overview of the picture.\n") and q0.endswith(VG_ANSWER_SUFFIX)
    asked = q0[len("<mask>\nThis provides an overview of the picture.\n"): -len(VG_ANSWER_SUFFIX)]
    assert asked in [q.replace("<region>", "<mask>") for q in VG_QUESTIONS]

    refp = build_dataset({"type": "mask_refcocop", "annotation": str(ann), "image_root": str(tmp_path / "imgs"),
                          "transform": TF})[0]
    assert refp["conversation"][0][1].endswith("attibuts, you should not give its position within the image.<mask>")
    part = build_dataset({"type": "mask_partimagenet", "annotation": str(ann), "image_root": str(tmp_path / "imgs"),
                          "transform": TF})[0]
    assert part["conversation"][0][1] == "<mask>\n" + PARTIMAGENET_PREAMBLE + "<mask>"
    assert PARTIMAGENET_PREAMBLE.endswith("Subcategories Containing Tier,Hand,Wing,Mouth,Tail,Side,Fin,Engine,Foot,"
                                          "Head,Body,Sail,Seat.\n")
    assert {a for _, a in part["conversation"][1::2]} <= {"square", "box"}, "category names"

    pascal = build_dataset({"type": "mask_pascal", "annotation": str(ann), "image_root": str(tmp_path / "imgs"),
                            "transform": TF})[0]
    assert pascal["conversation"][0][1] == "<mask>\n" + PASCAL_PREAMBLE + "<mask>"
    assert PASCAL_PREAMBLE.startswith(" In the conversation below") and "seein the image" in PASCAL_PREAMBLE


def test_bad_segmentation_is_counted(tmp_path):
    ann = _coco_file(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"][0]["segmentation"] = [[1, 2]]
    ann.write_text(json.dumps(data))
    ds = build_dataset({"type": "mask_coco", "annotation": str(ann), "image_root": str(tmp_path / "imgs"),
                        "transform": TF, "max_bad_fraction": 1.0})
    with pytest.raises(Exception, match="consecutive bad samples"):
        ds[0]
    assert "bad segmentation" in ds.tracker.last_errors[-1]


def test_referring_eval_prompt(tok, tmp_path):
    ann = _coco_file(tmp_path, caption="the white square")
    cfg = {"type": "refcocog_referring_eval", "annotation": str(ann), "image_root": str(tmp_path / "imgs"),
           "transform": TF, "collator": "referring_eval"}
    ds = build_dataset(cfg)
    batch = build_collator(cfg, tok)([ds[0]])
    img = tok.image_run
    assert batch["text_ids"][0].tolist() == tok.encode(
        SYS + "## user: " + img + "\nI will provide you with only one region containing only one object, although "
        "there may be other objects present in the image. you should describe the object's relative position with "
        "respect to other objects in the image, as well as its position within the image and its basic attributes."
        + img + "\n## asistant:")
    assert batch["meta"]["items"][0]["references"] == ["the white square"]
    assert batch["num_image_per_seq"].tolist() == [2] and batch["collate_mode"] == "generate_referring"
