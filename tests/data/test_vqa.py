"""Question-answering readers and the VQA / yes-no collators."""

from __future__ import annotations

import pytest

from deem.data import build_collator, build_dataset
from deem.data.prompts import CAPTION_QUESTIONS
from tests.data.conftest import write_image, write_json

TF = {"resolution": 16, "resolution_dec": 32, "center_crop": False, "random_flip": False}
SYS = "You are a helpful assistant.\n\n"


def _vqav2(tmp_path, split="train2014"):
    for i in (1, 2):
        write_image(tmp_path / "coco" / split / f"COCO_{split}_{i:012d}.jpg")
    qs = {"questions": [{"image_id": 1, "question": "What colour is the circle?", "question_id": 10},
                        {"image_id": 2, "question": "How many shapes are there in this picture?", "question_id": 20},
                        {"image_id": 2, "question": "Orphan?", "question_id": 30}]}
    anns = {"annotations": [
        {"question_id": 10, "image_id": 1, "multiple_choice_answer": "red",
         "answers": [{"answer": "red"}] * 9 + [{"answer": "orange"}]},
        {"question_id": 20, "image_id": 2, "answers": [{"answer": "2"}] * 10}]}
    return {"type": "vqav2", "name": "vqav2", "questions": str(write_json(tmp_path / "q.json", qs)),
            "annotations": str(write_json(tmp_path / "a.json", anns)), "image_root": str(tmp_path / "coco" / split),
            "image_prefix": f"COCO_{split}", "transform": TF, "max_bad_fraction": 1.0}


def test_vqa_train_template_and_labels(tok, tmp_path):
    cfg = {**_vqav2(tmp_path), "collator": "vqa_train"}
    ds = build_dataset(cfg)
    assert len(ds) == 2 and ds.tracker.bad == 1, "question without annotation is skipped and counted"
    assert ds[0]["answer"] == "red" and ds[1]["answer"] == "2", "multiple_choice_answer, else first answer"
    batch = build_collator(cfg, tok)([ds[0], ds[1]])
    for row, (q, a) in enumerate([("What colour is the circle?", "red"),
                                  ("How many shapes are there in this picture?", "2")]):
        prompt = (SYS + " ## USER: Based on the image, please answer the question. " + tok.image_run + q
                  + "\n ## ASSISTANT:  The answer is")
        ids = batch["text_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == tok.encode(prompt + " " + a + "</s>")
        n = len(tok.encode(prompt))
        labels = batch["gt_text_ids"][row].tolist()
        assert labels[:n] == [-100] * n and labels[n: len(ids)] == ids[n:]
        assert all(v == -100 for v in labels[len(ids):]), "right padding is never learned"
        assert tok.decode(ids[n:]) == a + "</s>"
    assert batch["attention_mask"][0].tolist()[-1] == 0, "training batches are right-padded"
    assert batch["loss_img_weight"] == 0.0


def test_vqa_eval_left_padding_and_vizwiz(tok, tmp_path):
    cfg = {**_vqav2(tmp_path, "val2014"), "eval": True, "collator": "vqa_eval"}
    ds = build_dataset(cfg)
    batch = build_collator(cfg, tok)([ds[0], ds[1]])
    assert batch["attention_mask"][0].tolist()[0] == 0 and batch["attention_mask"][0].tolist()[-1] == 1
    prompt = (SYS + " ## USER: Based on the image, please answer the question. " + tok.image_run
              + "What colour is the circle? Please provide an accurate answer within one word.\n"
              + " ## ASSISTANT: The answer is")
    row = batch["text_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row == tok.encode(prompt)
    assert batch["meta"]["items"][0]["answers"][0] == "red" and len(batch["meta"]["items"][0]["gt_answers"]) == 10
    assert batch["generation_kwargs"] == {"max_length": 10, "min_length": 0, "length_penalty": 0.0, "num_beams": 3}

    write_image(tmp_path / "vizwiz" / "VizWiz_val_00000042.jpg")
    viz = {"type": "vizwiz", "image_root": str(tmp_path / "vizwiz"), "transform": TF,
           "annotation": str(write_json(tmp_path / "val.json", [{"image": "VizWiz_val_00000042.jpg",
                                                                  "question": "What is this?",
                                                                  "answers": [{"answer": "unanswerable"}] * 10,
                                                                  "answer_type": "unanswerable"}])),
           "collator": {"type": "vqa_eval", "template": "vizwiz"}}
    vds = build_dataset(viz)
    vb = build_collator(viz, tok)([vds[0]])
    assert vds[0]["question_id"] == "00000042"
    assert vb["text_ids"][0].tolist() == tok.encode(
        SYS + " ## USER: Based on the image, please answer the question. " + tok.image_run + "What is this? When the "
        "provided information is insufficient, respond with 'Unanswerable'. Please provide an accurate answer within "
        "one word.\n ## ASSISTANT: The answer is")


def test_pope_robustvqa_mmvp(tok, tmp_path):
    write_image(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    (tmp_path / "pope.json").write_text(
        '{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?", '
        '"label": "yes"}\n{"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat?", '
        '"label": "maybe"}\n')
    cfg = {"type": "pope", "annotation": str(tmp_path / "pope.json"), "image_root": str(tmp_path / "val2014"),
           "transform": TF, "collator": "yesno_eval", "max_bad_fraction": 1.0}
    ds = build_dataset(cfg)
    assert len(ds) == 1 and ds.tracker.bad == 1, "a label other than yes/no is a malformed record"
    batch = build_collator(cfg, tok)([ds[0]])
    assert batch["text_ids"][0].tolist() == tok.encode(
        SYS + " ## USER: Based on the image, please answer the question. " + tok.image_run
        + "Is there a dog in the image? Please anwser yes or no \n ## ASSISTANT: The answer is")
    assert batch["collate_mode"] == "generate_yesno" and batch["meta"]["items"][0]["answers"] == ["yes"]

    write_image(tmp_path / "robustvqa" / "imagenet-r" / "n01" / "a.jpg")
    robust = {"imagenet_r": [{"file_name": "robustvqa/imagenet-r/n01/a.jpg", "gt_caption": "goldfish",
                              "error_caption": "shark"}], "imagenet_a": []}
    rcfg = {"type": "robustvqa", "subset": "r", "annotation": str(write_json(tmp_path / "r.json", robust)),
            "image_root": str(tmp_path), "transform": TF}
    rds = build_dataset(rcfg)
    assert [(rds[i]["question"], rds[i]["answers"]) for i in range(2)] == [
        ("Is goldfish the main object in this image? Please anwser yes or no", ["yes"]),
        ("Is shark the main object in this image? Please anwser yes or no", ["no"])]

    write_image(tmp_path / "mmvp" / "1.jpg")
    (tmp_path / "mmvp" / "Questions.csv").write_text(
        'lndex,Question,Options,Correct Answer\n1,Is the dog facing left or right?,(a) Left (b) Right,(a)\n')
    mds = build_dataset({"type": "mmvp", "annotation": str(tmp_path / "mmvp" / "Questions.csv"),
                         "image_root": str(tmp_path / "mmvp"), "transform": TF})
    assert mds[0]["answers"] == ["a"]
    assert mds[0]["question"] == ("Is the dog facing left or right? Options: (a) Left (b) Right "
                                  "Answer with the option's letter.")


def test_instruction_and_other_vqa_readers(tmp_path):
    write_image(tmp_path / "img" / "a.jpg")
    write_image(tmp_path / "img" / "7.jpg")
    write_image(tmp_path / "img" / "9.png")
    llava = [{"id": "x1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Where?\n<image>"}, {"from": "gpt", "value": "On the left."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    ds = build_dataset({"type": "llava", "annotation": str(write_json(tmp_path / "llava.json", llava)),
                        "image_root": str(tmp_path / "img"), "transform": TF})
    assert [(r.question, r.answers[0]) for r in ds.records] == [("What is it?", "A red square."),
                                                                ("Where?", "On the left.")]

    aok = [{"question_id": "q", "question": "Why?", "image": "a.jpg", "direct_answers": ["rain"] * 9 + ["snow"]}]
    ds = build_dataset({"type": "aokvqa", "annotation": str(write_json(tmp_path / "aok.json", aok)),
                        "image_root": str(tmp_path / "img"), "transform": TF})
    answers = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        answers.append(ds[0]["answer"])
    assert 25 < answers.count("rain") < 40 and "snow" in answers, "drawn per access, weighted by frequency"

    ocr = {"7": {"imageURL": "http://x/7.jpg", "questions": ["Who wrote it?", "Title?"], "answers": ["Me", "T"],
                 "split": 1},
           "9": {"imageURL": "http://x/9.png", "questions": ["Q"], "answers": ["A"], "split": 2}}
    ds = build_dataset({"type": "ocrvqa", "annotation": str(write_json(tmp_path / "ocr.json", ocr)),
                        "image_root": str(tmp_path / "img"), "transform": TF})
    assert [(r.question, r.answers) for r in ds.records] == [("Who wrote it?", ["Me"]), ("Title?", ["T"])]

    gqa = [{"image": "a.jpg", "question": "Is it red?", "question_id": "201", "answer": "yes"},
           {"image": "n12345.jpg", "question": "Q", "question_id": "202", "answer": "no"}]
    ds = build_dataset({"type": "gqa", "annotation": str(write_json(tmp_path / "gqa.json", gqa)),
                        "image_root": str(tmp_path / "img"), "transform": TF})
    assert ds.records[1].extra["image_id"] == "n12345", "non-numeric GQA image ids are fine"

    tv = {"data": [{"image_id": "7", "question": "What?", "question_id": 3, "answers": ["x", "y"]}]}
    ds = build_dataset({"type": "textvqa", "annotation": str(write_json(tmp_path / "tv.json", tv)),
                        "image_root": str(tmp_path / "img"), "transform": TF})
    assert ds[0]["answer"] in ("x", "y")

    kp = [{"image": "a.jpg", "caption": "A Cat"}]
    ds = build_dataset({"type": "coco_vqa", "annotation": str(write_json(tmp_path / "kp.json", kp)),
                        "image_root": str(tmp_path / "img"), "transform": TF})
    item = ds[0]
    assert item["answer"] == "a cat" and item["question"] in CAPTION_QUESTIONS


def test_unknown_prompt_name_is_rejected(tok):
    with pytest.raises(KeyError, match="vqa_usr"):
        build_collator({"type": "vqa_train", "prompts": {"vqa_usr": "x"}}, tok)


def test_overlong_sample_is_skipped_and_counted(tok, tmp_path):
    cfg = _vqav2(tmp_path)
    ds = build_dataset(cfg)
    short_len = len(build_collator({"type": "vqa_train"}, tok)([ds[0]])["text_ids"][0])
    col = build_collator({"type": "vqa_train", "max_length": short_len, "max_bad_fraction": 1.0}, tok)
    batch = col([ds[0], ds[1]])  # the second question is longer than max_length
    assert [it["question_id"] for it in batch["meta"]["items"]] == ["10"]
    assert col.tracker.bad == 1 and "over-long sample" in col.tracker.last_errors[-1]
    assert "vqav2[1]" in col.tracker.last_errors[-1], "the message names the dataset and the sample"
