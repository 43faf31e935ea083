"""POPE (object hallucination, yes/no): the standard extraction (`metrics.yes_no`) of the generated answer;
accuracy, precision, recall and F1 with "yes" positive, and the yes-ratio."""

from __future__ import annotations

from deem.eval import metrics as M
from deem.eval.tasks.base import Task, percent, sample_id


def record(item, text, ctx):
    return {"id": sample_id(item), "question": item["question"], "generation": text, "prediction": M.yes_no(text),
            "label": str(item["answers"][0])}


def score(records, ctx):
    return percent(M.pope_scores([r["generation"] for r in records], [r["label"] for r in records]))


TASK = Task("pope", ("generate_yesno",), record, score, ("accuracy", "f1", "precision", "recall", "yes_ratio"),
            dataset_types=("pope",))
