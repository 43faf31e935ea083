"""VisDial dense evaluation: context template, full history, option ids."""

from __future__ import annotations

from deem.data import build_collator, build_dataset
from tests.data.conftest import write_image, write_json

TF = {"resolution": 16, "resolution_dec": 32, "center_crop": False, "random_flip": False}


def test_visdial_context_and_options(tok, tmp_path):
    write_image(tmp_path / "VisualDialog_val2018_000000000007.jpg")
    questions = ["is it red", "how many", "is it big"]
    answers = ["yes", "two", "no", "maybe"]
    dialog = {"image_id": 7, "caption": "a red circle", "dialog": [
        {"question": 0, "answer": 0, "answer_options": [0, 1, 2, 3]},
        {"question": 1, "answer": 1, "answer_options": [0, 1, 2, 3]},
        {"question": 2, "answer": 2, "answer_options": [3, 2, 1, 0]}]}
    cfg = {"type": "visdial", "image_root": str(tmp_path), "transform": TF, "collator": "score_eval",
           "dialogs": str(write_json(tmp_path / "d.json", {"data": {"questions": questions, "answers": answers,
                                                                     "dialogs": [dialog]}})),
           "dense_annotations": str(write_json(tmp_path / "dense.json", [{"image_id": 7, "round_id": 3,
                                                                           "gt_relevance": [0, 0.5, 1, 0]}]))}
    ds = build_dataset(cfg)
    item = ds[0]
    assert item["history"] == [("is it red", "yes"), ("how many", "two")], "every earlier round, the last included"
    assert item["options"] == ["maybe", "no", "two", "yes"]
    batch = build_collator(cfg, tok)([item])
    expected = ("You are a helpful assistant.\n\n  ## USER: " + tok.image_run + " caption: a red circle. "
                "question: is it red? answer: yes. question: how many? answer: two. "
                "question: is it big? \n ## ASSISTANT: the answer is")
    assert batch["text_ids"][0].tolist() == tok.encode(expected)
    assert batch["collate_mode"] == "generate_scores"
    opts, mask = batch["options_ids"][0], batch["options_attention_mask"][0]
    assert opts.shape[0] == 4
    for k, option in enumerate(item["options"]):
        row = opts[k][mask[k].bool()].tolist()
        assert row == tok.encode(option, add_bos=False) and tok.special.bos_id not in row
        assert tok.encode(expected + " " + option)[-len(row):] == row, "options continue the context's tokens"
