"""What a model scores without looking at the image: the bar every demo metric is read against."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path


def question_type(question: str) -> str:
    """"Is ... the main object" (RobustVQA's question), else the first two words ("How many", "What colour",
    "Is there", "Which shape")."""
    if question.rstrip("?").endswith("the main object in this image"):
        return "Is ... the main object"
    return " ".join(question.split()[:2])


def _questions(world: Path, split: str) -> list[tuple[str, str]]:
    qs = json.loads((world / f"vqav2/v2_OpenEnded_mscoco_{split}2014_questions.json").read_text())["questions"]
    ans = json.loads((world / f"vqav2/v2_mscoco_{split}2014_annotations.json").read_text())["annotations"]
    by_id = {a["question_id"]: a["multiple_choice_answer"] for a in ans}
    return [(question_type(q["question"]), by_id[q["question_id"]]) for q in qs]


def blind_vqa(world: Path) -> tuple[float, dict[str, float]]:
    """The training set's most frequent answer per question type, scored on the test questions: the overall
    accuracy and the accuracy per type (%)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for qtype, answer in _questions(world, "train"):
        counts[qtype][answer] += 1
    by_type: dict[str, list[bool]] = collections.defaultdict(list)
    for qtype, answer in _questions(world, "val"):
        by_type[qtype].append(bool(counts[qtype]) and counts[qtype].most_common(1)[0][0] == answer)
    total = sum(len(v) for v in by_type.values())
    overall = 100.0 * sum(sum(v) for v in by_type.values()) / max(1, total)
    return overall, {k: 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())}


def blind_caption_cider(world: Path, candidates: int = 20, seed: int = 0) -> float:
    """CIDEr (x100) of the best of `candidates` random training captions given for every test image: the
    world's captions share one template, so a caption that ignores the image already scores high."""
    from deem.eval.caption_metrics import caption_scores

    test = json.loads((world / "coco/annotations/coco_karpathy_test.json").read_text())
    train = json.loads((world / "coco/annotations/coco_karpathy_train.json").read_text())
    references = {str(i): row["caption"] for i, row in enumerate(test)}
    pool = [row["caption"] for row in train]
    picks = random.Random(seed).sample(pool, min(candidates, len(pool)))
    return 100.0 * max(
        caption_scores({k: caption for k in references}, references, metrics=("CIDEr",))["CIDEr"] for caption in picks
    )


def chance_levels(world: Path) -> dict[str, object]:
    """Chance for every reported metric: VQA (overall and per type), the balanced yes/no sets (50 %) and the
    best blind caption."""
    overall, by_type = blind_vqa(world)
    return {"vqa": overall, "vqa_by_type": by_type, "yesno": 50.0, "caption": blind_caption_cider(world)}


def vqa_by_type(predictions: Path) -> dict[str, float]:
    """Exact-match accuracy (%) per question type (the world's ten reference answers of a question agree)."""
    by_type: dict[str, list[bool]] = collections.defaultdict(list)
    for row in json.loads(predictions.read_text()):
        by_type[question_type(row["question"])].append(row["prediction"] == row["gt_answers"][0])
    return {k: 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())}
