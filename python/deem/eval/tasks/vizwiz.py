"""VizWiz: VQA records (`vqa.record`, with the answer type) scored by the VizWiz accuracy, overall and on the
unanswerable questions."""

from __future__ import annotations

from deem.eval import metrics as M
from deem.eval.postprocess import ANSWER_RULES
from deem.eval.tasks import vqa
from deem.eval.tasks.base import Task, percent


def score(records, ctx):
    types = {r["id"]: r.get("answer_type") for r in records}
    return percent(M.vizwiz_scores({r["id"]: r["prediction"] for r in records},
                                   {r["id"]: r["gt_answers"] for r in records}, types))


TASK = Task("vizwiz", ("generate_vqa",), vqa.record, score, ("accuracy", "accuracy_unanswerable"),
            tuple(ANSWER_RULES), dataset_types=("vizwiz",))
