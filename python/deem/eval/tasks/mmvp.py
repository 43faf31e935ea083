"""MMVP (multiple choice over CLIP-blind pairs): the option letter an answer picks (`metrics.mmvp_choice`);
accuracy per question and per pair."""

from __future__ import annotations

from deem.eval import metrics as M
from deem.eval.tasks.base import Task, percent, sample_id


def record(item, text, ctx):
    options = str(item.get("options", ""))
    return {"id": sample_id(item), "question": item["question"], "options": options, "generation": text,
            "prediction": M.mmvp_choice(text, options), "answer": str(item["answers"][0])}


def score(records, ctx):
    return percent(M.mmvp_scores({r["id"]: r["prediction"] for r in records},
                                 {r["id"]: r["answer"] for r in records}), keep=("num_pairs",))


TASK = Task("mmvp", ("generate_yesno", "generate_vqa"), record, score, ("accuracy", "pair_accuracy"),
            dataset_types=("mmvp",))
