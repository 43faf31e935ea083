"""Question-answering readers: VQAv2-format (VQAv2, OK-VQA, TextVQA-eval), TextVQA train, A-OKVQA, OCR-VQA,
GQA, COCO-captions-as-VQA, LLaVA-665k rounds, VizWiz, POPE, RobustVQA and MMVP.

Training items carry one answer (drawn per access from the item's seeded generator where the file has
several); evaluation items carry the ground-truth answers for scoring.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deem.data.captions import read_coco_karpathy
from deem.data.errors import BadSampleTracker, DataError
from deem.data.images import DualViewTransform
from deem.data.prompts import CAPTION_QUESTIONS, merged_prompts
from deem.data.records import RecordDataset, parse_records, read_json, read_jsonl
from deem.data.text import read_text_file

QA_TYPES = frozenset({"vqav2", "okvqa", "textvqa", "aokvqa", "ocrvqa", "gqa", "coco_vqa", "llava", "vizwiz", "pope",
                      "robustvqa", "mmvp"})


@dataclass
class QARecord:
    image: Path
    question: str
    answers: list[str]  # candidate/GT answers; training draws one
    question_id: str
    weights: list[float] | None = None  # answer sampling weights (A-OKVQA)
    draw_caption_question: bool = False  # caption-as-VQA: the question is drawn per access
    extra: dict[str, Any] = field(default_factory=dict)


class QADataset(RecordDataset):
    """Items: {images: [views], question, answer (train) | answers (eval), question_id, ...extra}."""

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        rec: QARecord = self.records[index]
        views, _ = self.image_views(rec.image, f"question {rec.question_id}", rng)
        item = {"images": [views], "question": rec.question, "question_id": rec.question_id, **rec.extra}
        if self.eval_mode:
            item["answers"] = list(rec.answers)
        else:
            p = None if rec.weights is None else np.asarray(rec.weights, dtype=float) / sum(rec.weights)
            item["answer"] = rec.answers[int(rng.choice(len(rec.answers), p=p))] if len(rec.answers) > 1 \
                else rec.answers[0]
            if rec.draw_caption_question:
                item["question"] = CAPTION_QUESTIONS[int(rng.integers(len(CAPTION_QUESTIONS)))]
        return item


def coco_image_name(prefix: str, image_id: int) -> str:
    return f"{prefix}_{int(image_id):012d}.jpg"


def read_vqav2_format(questions: str | Path, annotations: str | Path | None, image_root: str | Path,
                      tracker: BadSampleTracker, image_prefix: str | None = None) -> list[QARecord]:
    """VQAv2-format pair (`questions[]` with image_id/question_id/question, `annotations[]` with
    multiple_choice_answer/answers). Image = <image_root>/<prefix>_<image_id:012>.jpg (prefix e.g.
    COCO_val2014) unless the question carries an `image` field (TextVQA conversions). Without annotations
    (test sets) answers are empty."""
    qdata = read_json(questions)
    anns: dict[Any, dict] = {}
    if annotations is not None:
        for ann in read_json(annotations).get("annotations", []):
            anns[ann["question_id"]] = ann

    def parse(key, q):
        qid = q["question_id"]
        if "image" in q:
            image = Path(image_root) / q["image"]
        elif image_prefix:
            image = Path(image_root) / coco_image_name(image_prefix, q["image_id"])
        else:
            raise ValueError("question has no `image` field and no image_prefix is configured")
        answers: list[str] = []
        if annotations is not None:
            if qid not in anns:
                raise ValueError(f"question {qid} has no annotation")
            ann = anns[qid]
            gts = [a["answer"] for a in ann.get("answers", [])]
            mc = ann.get("multiple_choice_answer")
            answers = [mc, *gts] if mc else gts
            if not answers:
                raise ValueError(f"question {qid} has no answer")
        return QARecord(image, q["question"], answers, str(qid),
                        extra={"image_id": q.get("image_id"), "gt_answers": [] if annotations is None else gts})

    return parse_records(((f"question {i}", q) for i, q in enumerate(qdata["questions"])), parse, tracker,
                         str(questions))


def read_textvqa_train(annotation, image_root, tracker) -> list[QARecord]:
    """TextVQA_0.5.1_train.json ({data: [{image_id, question, question_id, answers}]})."""
    data = read_json(annotation)

    def parse(key, row):
        if not row["answers"]:
            raise ValueError("no answers")
        return QARecord(Path(image_root) / f"{row['image_id']}.jpg", row["question"], list(row["answers"]),
                        str(row["question_id"]))

    return parse_records(((f"data {i}", r) for i, r in enumerate(data["data"])), parse, tracker, str(annotation))


def read_aokvqa(annotation, image_root, tracker) -> list[QARecord]:
    """LAVIS-style A-OKVQA list ({question_id, question, image, direct_answers}); answers weighted by frequency."""

    def parse(key, row):
        counts = Counter(row["direct_answers"])
        if not counts:
            raise ValueError("no direct_answers")
        return QARecord(Path(image_root) / row["image"], row["question"], list(counts), str(row["question_id"]),
                        weights=[float(c) for c in counts.values()])

    rows = read_json(annotation)
    return parse_records(((f"entry {i}", r) for i, r in enumerate(rows)), parse, tracker, str(annotation))


def read_ocrvqa(annotation, image_root, tracker) -> list[QARecord]:
    """OCR-VQA dataset.json (dict keyed by image id; `split == 1` = train; image extension from imageURL);
    one record per (question, answer)."""
    data = read_json(annotation)

    def parse(key, row):
        if row.get("split") != 1:
            return None
        ext = Path(row["imageURL"]).suffix or ".jpg"
        image = Path(image_root) / f"{key}{ext}"
        if len(row["questions"]) != len(row["answers"]):
            raise ValueError("questions and answers differ in length")
        return [QARecord(image, q, [a], f"{key}_{k}") for k, (q, a) in enumerate(zip(row["questions"],
                                                                                    row["answers"]))]

    return parse_records(data.items(), parse, tracker, str(annotation))


def read_gqa(annotation, image_root, tracker) -> list[QARecord]:
    """LAVIS-style GQA list ({image, question, question_id, answer}); image ids kept as strings (GQA has
    non-numeric `n...` ids)."""

    def parse(key, row):
        return QARecord(Path(image_root) / row["image"], row["question"], [row["answer"]], str(row["question_id"]),
                        extra={"image_id": Path(row["image"]).stem})

    rows = read_json(annotation)
    return parse_records(((f"entry {i}", r) for i, r in enumerate(rows)), parse, tracker, str(annotation))


def read_llava(annotation, image_root, tracker) -> list[QARecord]:
    """LLaVA-665k conversations: every (human, gpt) round becomes one record; `<image>` markers are removed
    from the question; entries without an image are skipped (as `convert_llava_data.py` does)."""

    def parse(key, row):
        if "image" not in row:
            return None
        conv = row["conversations"]
        out = []
        for r in range(0, len(conv) - 1, 2):
            human, gpt = conv[r], conv[r + 1]
            if human["from"] != "human" or gpt["from"] != "gpt":
                raise ValueError(f"round {r // 2}: expected human then gpt, got {human['from']}, {gpt['from']}")
            q = human["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
            out.append(QARecord(Path(image_root) / row["image"], q, [gpt["value"]], f"{row.get('id', key)}_{r // 2}"))
        return out

    rows = read_json(annotation)
    return parse_records(((f"entry {i}", r) for i, r in enumerate(rows)), parse, tracker, str(annotation))


def read_coco_caption_vqa(annotation, image_root, tracker) -> list[QARecord]:
    """COCO Karpathy captions as VQA: question = a caption question drawn per access, answer = the caption."""
    caps = read_coco_karpathy(annotation, image_root, tracker, lowercase=True)
    return [QARecord(c.image, "", c.captions, f"{c.image_id}_{i}", draw_caption_question=True)
            for i, c in enumerate(caps)]


def read_vizwiz(annotation, image_root, tracker) -> list[QARecord]:
    """VizWiz val list ({image, question, answers: [{answer}], answer_type}); question id = number in the name."""

    def parse(key, row):
        m = re.search(r"(\d+)", Path(row["image"]).stem)
        return QARecord(Path(image_root) / row["image"], row["question"],
                        [a["answer"] for a in row.get("answers", [])], m.group(1) if m else row["image"],
                        extra={"image_name": row["image"], "answer_type": row.get("answer_type")})

    rows = read_json(annotation)
    return parse_records(((f"entry {i}", r) for i, r in enumerate(rows)), parse, tracker, str(annotation))


def read_pope(annotation, image_root, tracker, prompts: dict[str, str]) -> list[QARecord]:
    """POPE JSON-lines ({question_id?, image, text, label: yes|no}); question = "{text} Please anwser yes or no"."""

    def parse(key, row):
        label = row["label"].strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"label must be yes or no, got {row['label']!r}")
        return QARecord(Path(image_root) / row["image"], prompts["pope_question"].format(text=row["text"]), [label],
                        str(row.get("question_id", key)), extra={"image_name": row["image"]})

    return parse_records(read_jsonl(annotation, tracker), parse, tracker, str(annotation))


def read_robustvqa(annotation, image_root, tracker, subset: str, prompts: dict[str, str]) -> list[QARecord]:
    """RobustVQA json ({imagenet_a|imagenet_r|imagenet_v2|...: [{file_name, gt_caption, error_caption}]}):
    every entry yields a "yes" question (true class) and a "no" question (hardest wrong class). No global
    RNG reseeding: the order is the file's (shuffle through the sampler if wanted)."""
    data = read_json(annotation)
    key = subset if subset in data else f"imagenet_{subset}"
    if key not in data:
        raise DataError(f"{annotation}: no subset {subset!r} (have {sorted(data)})")

    def parse(k, row):
        image = Path(image_root) / row["file_name"]
        q = prompts["robust_question"]
        return [QARecord(image, q.format(label=row["gt_caption"]), ["yes"], f"{k}_yes"),
                QARecord(image, q.format(label=row["error_caption"]), ["no"], f"{k}_no")]

    return parse_records(((f"{key} {i}", r) for i, r in enumerate(data[key])), parse, tracker, str(annotation))


def read_mmvp(annotation, image_root, tracker, prompts: dict[str, str]) -> list[QARecord]:
    """MMVP Questions.csv (Index, Question, Options, Correct Answer); image = <image_root>/<Index>.jpg."""
    rows = list(csv.DictReader(io.StringIO(read_text_file(annotation), newline="")))

    def parse(key, row):
        idx = row.get("Index") or row.get("lndex")  # the official file spells the header "lndex"
        if not idx:
            raise ValueError("no Index column")
        q = prompts["mmvp_question"].format(question=row["Question"].strip(), options=row["Options"].strip())
        answer = row["Correct Answer"].strip().strip("()").lower()
        return QARecord(Path(image_root) / f"{idx}.jpg", q, [answer], str(idx), extra={"options": row["Options"]})

    return parse_records(((f"row {i + 2}", r) for i, r in enumerate(rows)), parse, tracker, str(annotation))


_PLAIN_READERS = {"textvqa": read_textvqa_train, "aokvqa": read_aokvqa, "ocrvqa": read_ocrvqa, "gqa": read_gqa,
                  "coco_vqa": read_coco_caption_vqa, "llava": read_llava, "vizwiz": read_vizwiz}


def build_qa_dataset(cfg: dict, transform: DualViewTransform, tracker: BadSampleTracker) -> QADataset:
    """Dispatch on cfg['type']: vqav2 (also okvqa / textvqa eval in VQAv2 format), textvqa, aokvqa, ocrvqa,
    gqa, coco_vqa, llava, vizwiz, pope, robustvqa, mmvp."""
    kind = cfg["type"]
    eval_mode = bool(cfg.get("eval", kind in ("vizwiz", "pope", "robustvqa", "mmvp")))
    prompts = merged_prompts(cfg.get("prompts"))
    root = cfg["image_root"]
    if kind in ("vqav2", "okvqa"):
        records = read_vqav2_format(cfg["questions"], cfg.get("annotations"), root, tracker,
                                    image_prefix=cfg.get("image_prefix"))
    elif kind in _PLAIN_READERS:
        records = _PLAIN_READERS[kind](cfg["annotation"], root, tracker)
    elif kind == "pope":
        records = read_pope(cfg["annotation"], root, tracker, prompts)
    elif kind == "robustvqa":
        records = read_robustvqa(cfg["annotation"], root, tracker, str(cfg.get("subset", "a")), prompts)
    elif kind == "mmvp":
        records = read_mmvp(cfg["annotation"], root, tracker, prompts)
    else:
        raise DataError(f"unknown QA dataset type {kind!r}")
    return QADataset(cfg.get("name", kind), records, transform, tracker, seed=cfg.get("seed", 0), eval_mode=eval_mode)
