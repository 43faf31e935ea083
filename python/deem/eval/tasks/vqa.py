"""Open-ended VQA, VQAv2 style (VQAv2, OK-VQA, TextVQA): the official accuracy min(#humans agreeing / 3, 1)
averaged over the 10-choose-9 annotator subsets (or the DEEM code's variant, `vqa_metric: original`)."""

from __future__ import annotations

from deem.eval import metrics as M
from deem.eval.errors import EvalError
from deem.eval.postprocess import ANSWER_RULES
from deem.eval.tasks.base import Task, percent, sample_id


def gt_answers(item) -> list[str]:
    gts = item.get("gt_answers") or item.get("answers") or []
    return [str(a) for a in gts]


def record(item, text, ctx):
    rule = ANSWER_RULES[ctx.postprocess or "first_line"]
    rec = {"id": sample_id(item), "question": item["question"], "generation": text, "prediction": rule(text),
           "gt_answers": gt_answers(item)}
    if item.get("answer_type") is not None:
        rec["answer_type"] = item["answer_type"]
    return rec


def score(records, ctx):
    missing = [r["id"] for r in records if len(r["gt_answers"]) < 2]
    if missing:
        raise EvalError(f"{ctx.benchmark}: {len(missing)} questions without human answers (e.g. {missing[:3]}): "
                        "the VQA accuracy needs the annotation file's 10 answers")
    return percent(M.vqa_scores({r["id"]: r["prediction"] for r in records},
                                {r["id"]: r["gt_answers"] for r in records}, metric=ctx.vqa_metric))


TASK = Task("vqa", ("generate_vqa",), record, score, ("accuracy",), tuple(ANSWER_RULES),
            dataset_types=("okvqa", "textvqa", "vqav2"))
