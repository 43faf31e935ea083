"""RefCOCO / Visual Genome region readers, their augmentation, collators and the grounding eval reader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from deem.data import build_collator, build_dataset
from deem.data.grounding import box_text, convert_refer_pickle, swap_left_right
from tests.data.conftest import write_json

TF = {"resolution": 20, "resolution_dec": 40, "center_crop": False, "random_flip": False}
SYS = "You are a helpful assistant.\n\n"


def _scene(path, w=60, h=40, box=(30, 10, 50, 30)):
    img = Image.new("RGB", (w, h), (0, 0, 0))
    img.paste((255, 255, 255), box)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def refcoco(tmp_path):
    for i in (1, 2):
        _scene(tmp_path / "train2014" / f"COCO_train2014_{i:012d}.jpg")
    inst = {"images": [{"id": 1}, {"id": 2}],
            "annotations": [{"id": 100, "image_id": 1, "bbox": [30, 10, 20, 20]},
                            {"id": 200, "image_id": 2, "bbox": [30, 10, 20, 20]}]}
    refs = [{"ref_id": 1, "ann_id": 100, "image_id": 1, "split": "train",
             "sentences": [{"raw": "the bright square on the left"}]},
            {"ref_id": 2, "ann_id": 200, "image_id": 2, "split": "train", "sentences": [{"raw": "white square"}]},
            {"ref_id": 3, "ann_id": 200, "image_id": 2, "split": "val", "sentences": [{"raw": "val only"}]},
            {"ref_id": 4, "ann_id": 999, "image_id": 2, "split": "train", "sentences": [{"raw": "bad ann"}]}]
    return {"type": "refcoco", "name": "refcoco", "refs": str(write_json(tmp_path / "refs(unc).json", refs)),
            "instances": str(write_json(tmp_path / "instances.json", inst)), "image_root": str(tmp_path / "train2014"),
            "transform": TF, "max_bad_fraction": 1.0}


def test_refcoco_items_boxes_and_masks(refcoco):
    ds = build_dataset(refcoco)
    assert len(ds) == 2 and ds.tracker.bad == 1, "ref with unknown annotation counted"
    item = ds[1]
    whole, region = item["images"]
    assert float(whole.mask.min()) == 1.0
    assert item["box"] == (500, 250, 832, 749) and item["box_text"] == "(500,250)(832,749)"
    white = whole.enc.mean(0) > 0.5
    assert float((white == region.mask[0].bool()).float().mean()) > 0.95, "box mask covers the box pixels"
    assert region.enc is whole.enc, "the region slot shows the same pixels"


def test_flip_swaps_words_and_box_together(refcoco):
    ds = build_dataset({**refcoco, "random_flip": True})
    seen = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        flipped = "on the right" in item["sentence"]
        seen.add(flipped)
        assert "bright" in item["sentence"], "whole words only: 'bright' is not a 'left'/'right'"
        assert (item["box"][0] < 500) == flipped
        white = item["images"][0].enc.mean(0) > 0.5
        assert float((white == item["images"][1].mask[0].bool()).float().mean()) > 0.95
    assert seen == {True, False}
    assert swap_left_right("Left of the right one, upright") == "Right of the left one, upright"


def test_random_resized_crop_keeps_box_and_views_consistent(refcoco):
    ds = build_dataset({**refcoco, "random_resize_crop_prob": 1.0})
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[1]  # "white square": no spatial word, so the crop applies
        whole, region = item["images"]
        white = whole.enc.mean(0) > 0.5
        assert float((white == region.mask[0].bool()).float().mean()) > 0.9
        dec_white = whole.dec.mean(0) > 0.5
        assert abs(float(white.float().mean()) - float(dec_white.float().mean())) < 0.08, "same window in both views"
    item = ds[0]  # "... on the left": spatial word -> no crop
    assert item["box"] == (500, 250, 832, 749)


def test_grounding_collator_templates(tok, refcoco):
    ds = build_dataset(refcoco)
    region = build_collator({**refcoco, "collator": {"type": "grounding_train"}}, tok)([ds[1]])
    img = tok.image_run
    prompt = (SYS + " ## USER: " + img + " \n I will provide you with only one region containing only one object, "
              "although there may be other objects present in the image. It is recommended that you describe the "
              "object's relative position with respect to other objects in the image and its basic attibuts, you "
              "should not give its position within the image. " + img + ". \n ## ASSISTANT:")
    assert region["text_ids"][0].tolist() == tok.encode(prompt + " white square</s>")
    assert region["num_image_per_seq"].tolist() == [2] and region["image_tensors_mask"].shape == (2, 1, 20, 20)
    n = len(tok.encode(prompt))
    assert region["gt_text_ids"][0].tolist() == [-100] * n + tok.encode(" white square</s>", add_bos=False)

    box = build_collator({"type": "grounding_train", "tasks": ["grounding"]}, tok)([ds[1]])
    bprompt = (SYS + " ## USER: " + img + " Provide the bounding box coordinate of the region this sentence "
               "describes: white square. \n ## ASSISTANT: the bounding box coordinate is")
    assert box["text_ids"][0].tolist() == tok.encode(bprompt + " <box>(500,250)(832,749)</box></s>")
    assert box["num_image_per_seq"].tolist() == [1]


def test_packing_rows(tok, refcoco):
    ds = build_dataset(refcoco)
    col = build_collator({"type": "grounding_train", "pack": True, "max_length": 1000}, tok)
    batch = col([ds[0], ds[1], ds[0]])
    assert batch["text_ids"].shape[0] == 1 and batch["num_image_per_seq"].tolist() == [6]
    ids = batch["text_ids"][0].tolist()
    assert ids.count(tok.special.bos_id) == 3, "each packed sample keeps its BOS"
    single = build_collator({"type": "grounding_train", "pack": True, "max_length": 200}, tok)([ds[0], ds[1]])
    assert single["text_ids"].shape[0] == 2


def test_vg_regions_and_eval_reader(tmp_path):
    _scene(tmp_path / "VG_100K" / "1.jpg")
    _scene(tmp_path / "VG_100K_2" / "2.jpg")
    regions = [{"id": 1, "regions": [{"region_id": 11, "image_id": 1, "phrase": " a box ", "x": 30, "y": 10,
                                      "width": 20, "height": 20},
                                     {"region_id": 12, "image_id": 1, "phrase": "huge", "x": 0, "y": 0,
                                      "width": 200, "height": 100}]},
               {"id": 2, "regions": [{"region_id": 21, "image_id": 2, "phrase": "second", "x": 30, "y": 10,
                                      "width": 20, "height": 20}]}]
    image_data = [{"image_id": 1, "url": "http://x/VG_100K/1.jpg"}, {"image_id": 2, "url": "http://x/VG_100K_2/2.jpg"}]
    ds = build_dataset({"type": "vg_regions", "regions": str(write_json(tmp_path / "r.json", regions)),
                        "image_data": str(write_json(tmp_path / "i.json", image_data)),
                        "image_root": [str(tmp_path / "VG_100K"), str(tmp_path / "VG_100K_2")], "transform": TF,
                        "max_area": 16384})
    assert [r.sentences for r in ds.records] == [["a box"], ["second"]], "large regions dropped"
    assert ds[1]["sentence"] == "second", "images of VG_100K_2 are found"

    _scene(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg")
    rows = [{"img_id": "COCO_train2014_000000000005_77", "sents": "white square", "bbox": [30, 10, 20, 20]}] * 3
    cfg = {"type": "refcoco_grounding_eval", "annotation": str(write_json(tmp_path / "refcoco_val.json", rows)),
           "image_root": str(tmp_path / "train2014"), "transform": TF, "collator": "grounding_eval"}
    eds = build_dataset(cfg)
    item = eds[0]
    assert item["gt_box"] == (500, 250, 832, 749) and (item["width"], item["height"]) == (60, 40)
    sub = build_dataset({**cfg, "max_samples": 2, "seed": 3})
    assert len(sub) == 2 and [r.key for r in sub.records] == [r.key for r in build_dataset(
        {**cfg, "max_samples": 2, "seed": 3}).records], "a seeded, reproducible subset"


def test_grounding_eval_prompt(tok, tmp_path):
    _scene(tmp_path / "COCO_train2014_000000000005.jpg")
    rows = [{"img_id": "COCO_train2014_000000000005_77", "sents": "white square", "bbox": [30, 10, 20, 20]}]
    cfg = {"type": "refcoco_grounding_eval", "annotation": str(write_json(tmp_path / "v.json", rows)),
           "image_root": str(tmp_path), "transform": TF, "collator": "grounding_eval"}
    batch = build_collator(cfg, tok)([build_dataset(cfg)[0]])
    assert batch["text_ids"][0].tolist() == tok.encode(
        SYS + " ## USER: " + tok.image_run + " Provide the bounding box coordinate of the region this sentence "
        "describes: white square. \n ## ASSISTANT: the bounding box coordinate is <box>")
    assert batch["collate_mode"] == "generate_grounding" and batch["generation_kwargs"] == {}
    assert box_text((1, 22, 333, 999)) == "(001,022)(333,999)"


def test_refer_pickle_conversion_is_restricted(tmp_path):
    refs = [{"ref_id": 1, "sentences": [{"raw": "x"}], "split": "train"}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    assert convert_refer_pickle(tmp_path / "refs(unc).p", tmp_path / "refs(unc).json") == 1
    (tmp_path / "evil.p").write_bytes(pickle.dumps([np.random.default_rng]))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        convert_refer_pickle(tmp_path / "evil.p", tmp_path / "evil.json")
