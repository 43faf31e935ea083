"""Caption readers and collators: templates word for word, label masks token by token, bad samples."""

from __future__ import annotations

import pytest
import torch

from deem.data import build_collator, build_dataset
from deem.data.errors import DataError, TooManyBadSamples
from deem.data.prompts import CAPTION_QUESTIONS, IMAGE_QUESTIONS
from tests.data.conftest import write_corrupt, write_image, write_json

TF = {"resolution": 16, "resolution_dec": 32, "center_crop": False, "random_flip": False}
SYS = "You are a helpful assistant.\n\n"


@pytest.fixture
def karpathy(tmp_path):
    for i in range(3):
        write_image(tmp_path / "coco" / "train2014" / f"COCO_train2014_{i:012d}.jpg")
    write_corrupt(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000009.jpg")
    rows = [{"image": f"train2014/COCO_train2014_{i:012d}.jpg", "caption": f"A Red Circle number {i}",
             "image_id": f"coco_{i}"} for i in range(3)]
    rows.append({"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "corrupt"})
    rows.append({"image": "train2014/COCO_train2014_000000000005.jpg", "caption": "missing"})
    rows.append({"image": "train2014/COCO_train2014_000000000001.jpg"})  # malformed: no caption
    ann = write_json(tmp_path / "coco" / "annotations" / "coco_karpathy_train.json", rows)
    return {"type": "coco_karpathy", "name": "coco_caption_karpathy", "annotation": str(ann),
            "image_root": str(tmp_path / "coco"), "transform": TF, "max_bad_fraction": 1.0}


def _check_labels(tok, batch, row, prompt):
    ids = batch["text_ids"][row][batch["attention_mask"][row].bool()].tolist()
    n = len(tok.encode(prompt))
    assert ids[:n] == tok.encode(prompt), "the prompt tokenises identically alone and inside the sequence"
    expect = [-100] * n + [t if t != tok.special.image_id else -100 for t in ids[n:]]
    assert batch["gt_text_ids"][row][: len(ids)].tolist() == expect
    assert batch["ignore_prompt_token_offset"][row] == n


def test_image_to_text_template_and_labels(tok, karpathy):
    ds = build_dataset(karpathy)
    assert len(ds) == 5 and ds.tracker.bad == 1, "the caption-less record is skipped at load"
    col = build_collator({**karpathy, "collator": {"type": "caption_train", "img_first_prob": 1.0}}, tok)
    items = [ds[0], ds[1]]
    batch = col(items)
    assert batch["loss_img_weight"] == 0.0 and batch["loss_txt_weight"] is None
    img = tok.image_run
    for row, item in enumerate(items):
        assert item["caption"] == f"a red circle number {item['index']}", "lower-cased"
        ids = batch["text_ids"][row][batch["attention_mask"][row].bool()].tolist()
        candidates = {q: SYS + " ## USER: " + img + q + " \n ## ASSISTANT:  A photo of" for q in CAPTION_QUESTIONS}
        match = [q for q, prompt in candidates.items() if ids == tok.encode(prompt + " " + item["caption"] + "</s>")]
        assert len(match) == 1
        _check_labels(tok, batch, row, candidates[match[0]].strip())
    assert batch["image_tensors"].shape == (2, 3, 16, 16) and batch["image_tensors_dec"].shape == (2, 3, 32, 32)
    assert batch["num_image_per_seq"].tolist() == [1, 1] and batch["image_tensors_mask"] is None
    assert batch["meta"]["dataset_name"] == "coco_caption_karpathy"


def test_text_to_image_template(tok, karpathy):
    ds = build_dataset(karpathy)
    col = build_collator({**karpathy, "collator": {"type": "caption_train", "img_first_prob": 0.0}}, tok)
    batch = col([ds[2]])
    assert batch["loss_txt_weight"] == 0.0 and batch["loss_img_weight"] is None
    ids = batch["text_ids"][0].tolist()
    cap = "a red circle number 2"
    # the question is glued to the caption (original behaviour), the image is the answer
    expected = [SYS + " ## USER: " + q + cap + " \n ## ASSISTANT:" + " " + tok.image_run + "</s>"
                for q in IMAGE_QUESTIONS]
    assert sum(ids == tok.encode(e) for e in expected) == 1


def test_batch_direction_is_deterministic_and_varies(tok, karpathy):
    ds = build_dataset(karpathy)
    col = build_collator({**karpathy, "collator": {"type": "caption_train"}}, tok)
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        a = col([ds[0], ds[1]])
        b = col([ds[0], ds[1]])
        assert torch.equal(a["text_ids"], b["text_ids"])
        seen.add(a["loss_img_weight"])
    assert seen == {0.0, None}


def test_bad_images_are_replaced_counted_and_bounded(tok, karpathy):
    ds = build_dataset(karpathy)
    item = ds[3]  # corrupt image -> served by the next index (missing image) -> next (wraps to 0)
    assert item["index"] == 0 and ds.tracker.bad == 1 + 2
    assert any("corrupt image" in e for e in ds.tracker.last_errors)
    assert any("image not found" in e and "COCO_train2014_000000000005" in e for e in ds.tracker.last_errors)
    strict = build_dataset({**karpathy, "max_bad_fraction": 0.2, "min_bad_samples": 4})
    with pytest.raises(TooManyBadSamples, match="coco_caption_karpathy"):
        for i in range(5):
            strict[i]


def test_caption_eval_template_and_references(tok, tmp_path):
    for i in range(2):
        write_image(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    write_corrupt(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg")
    rows = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": [f"Ref A{i}", f"Ref B{i}"]} for i in (0, 1, 7)]
    cfg = {"type": "coco_karpathy", "eval": True, "annotation": str(write_json(tmp_path / "test.json", rows)),
           "image_root": str(tmp_path), "transform": TF, "collator": "caption_eval", "max_bad_fraction": 1.0}
    ds = build_dataset(cfg)
    col = build_collator(cfg, tok)
    batch = col([ds[i] for i in range(3)])
    assert len(batch["meta"]["items"]) == 2, "the corrupt image is dropped, not replaced"
    assert batch["meta"]["items"][0]["references"] == ["Ref A0", "Ref B0"], "all references, case kept"
    assert batch["meta"]["items"][0]["image_id"] == "000000000000"
    prompt = ("You are a helpful assistant. \n\n ## USER: " + tok.image_run
              + " Could you provide a short description of the image? \n ## ASSISTANT: A photo of")
    assert batch["text_ids"][0].tolist() == tok.encode(prompt)
    assert batch["collate_mode"] == "generate_texts"
    assert batch["generation_kwargs"] == {"max_length": 20, "min_length": 8, "length_penalty": 1.0, "num_beams": 5}
    assert "gt_text_ids" not in batch
    para = build_collator({"type": "caption_eval", "template": "paragraph",
                           "generation_kwargs": {"max_length": 90}}, tok)
    pb = para([ds[0]])
    assert pb["text_ids"][0].tolist() == tok.encode(
        "You are a helpful assistant. \n\n ## USER: " + tok.image_run
        + " Please describe the image in detail. \n ## ASSISTANT: The image depicts")
    assert pb["generation_kwargs"] == {"max_length": 90}, "a configured dict replaces the defaults"


def test_other_caption_readers(tmp_path):
    root = tmp_path
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        write_image(root / "vg" / name)
    para = {"annotations": [{"image_id": 1, "caption": "Old.", "url": "http://x/vg/1.jpg"},
                            {"image_id": 1, "caption": "New Paragraph.", "url": "http://x/vg/1.jpg"},
                            {"image_id": 2, "caption": "Two.", "url": "http://x/vg/2.jpg"},
                            {"image_id": 3, "caption": "Three.", "url": "http://x/vg/3.jpg"}]}
    ds = build_dataset({"type": "image2paragraph", "annotation": str(write_json(root / "p.json", para)),
                        "split_file": str(write_json(root / "train_split.json", [1, 3])),
                        "image_root": str(root / "vg"), "transform": TF})
    assert len(ds) == 2 and ds.records[0].captions == ["New Paragraph."], "later duplicate wins, case kept"

    write_image(root / "flickr" / "11.jpg")
    write_image(root / "flickr" / "12.jpg")
    ds = build_dataset({"type": "flickr30k_grounded",
                        "annotation": str(write_json(root / "g.json", [{"image_id": "11", "detailed_caption": "A B"},
                                                                       {"image_id": "12", "detailed_caption": "C"}])),
                        "test_file": str(write_json(root / "t.json", {"images": [{"file_name": "12.jpg"}]})),
                        "image_root": str(root / "flickr"), "transform": TF})
    assert [r.image_id for r in ds.records] == ["11"] and ds[0]["caption"] == "a b"

    ds = build_dataset({"type": "textcaps", "image_root": str(root / "flickr"), "transform": TF,
                        "annotation": str(write_json(root / "tc.json", {"data": [{"image_id": "11",
                                                                                   "caption_str": "A Sign"}]}))})
    assert ds[0]["caption"] == "a sign" and ds.records[0].image.name == "11.jpg"

    (root / "ln.jsonl").write_text('{"image_id": "42", "caption": "In This Image"}\nnot json\n')
    write_image(root / "train2017" / "000000000042.jpg")
    ds = build_dataset({"type": "lncoco", "annotation": str(root / "ln.jsonl"), "image_root": str(root / "train2017"),
                        "transform": TF, "max_bad_fraction": 1.0})
    assert ds[0]["caption"] == "in this image" and ds.tracker.bad == 1, "malformed line counted"

    coco = {"images": [{"id": 5, "file_name": "11.jpg"}, {"id": 6, "file_name": "12.jpg"}],
            "annotations": [{"image_id": 5, "caption": "one"}, {"image_id": 5, "caption": "two"},
                            {"image_id": 6, "caption": "three"}]}
    ds = build_dataset({"type": "coco_captions", "eval": True, "image_root": str(root / "flickr"), "transform": TF,
                        "annotation": str(write_json(root / "nocaps.json", coco))})
    assert len(ds) == 2 and ds[0]["references"] == ["one", "two"], "one item per image, all references"


def test_missing_annotation_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"annotation file .*nope.json does not exist"):
        build_dataset({"type": "coco_karpathy", "annotation": str(tmp_path / "nope.json"), "image_root": "."})
    with pytest.raises(DataError, match="unknown keys \\['anotation'\\]"):
        build_dataset({"type": "coco_karpathy", "anotation": "x", "image_root": "."})
