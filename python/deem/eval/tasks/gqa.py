"""GQA: exact match of the normalised answer against the single ground truth."""

from __future__ import annotations

from deem.eval import metrics as M
from deem.eval.postprocess import ANSWER_RULES
from deem.eval.tasks.base import Task, percent, sample_id


def record(item, text, ctx):
    rule = ANSWER_RULES[ctx.postprocess or "first_line"]
    return {"id": sample_id(item), "question": item["question"], "generation": text, "prediction": rule(text),
            "answer": str(item["answers"][0])}


def score(records, ctx):
    return percent(M.gqa_scores({r["id"]: r["prediction"] for r in records}, {r["id"]: r["answer"] for r in records}))


TASK = Task("gqa", ("generate_vqa",), record, score, ("accuracy",), tuple(ANSWER_RULES), dataset_types=("gqa",))
