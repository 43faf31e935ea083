"""Benchmark kinds: how a model output becomes a prediction record, and how records become metrics.

A record is a JSON-safe dict with the sample `id`, the model's output and the ground truth needed to score it,
so a predictions file can be re-scored without the dataset. Metrics are reported in percent (x100) except
counts and VisDial's mean rank.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deem.data.registry import CAPTION_TYPES
from deem.errors import UserError
from deem.eval import metrics as M
from deem.eval.postprocess import ANSWER_RULES, CAPTION_RULES, clean_referring


class EvalError(UserError, RuntimeError):
    """A configuration or data problem that stops an evaluation (the message names the benchmark/file)."""


def _percent(values: dict[str, float], keep: Sequence[str] = ()) -> dict[str, float]:
    return {k: (v if k in keep else 100.0 * v) for k, v in values.items()}


@dataclass
class Context:
    """What a kind needs besides the batch: the benchmark name, its postprocess rule and extra lookups."""

    benchmark: str
    postprocess: str | None = None
    visdial_gt_index: dict[tuple[int, int], int] | None = None
    vqa_metric: str = "official"  # the VQA accuracy variant (vqa_metrics.VQA_METRICS)


@dataclass(frozen=True)
class Kind:
    """A family of benchmarks sharing a collate mode, a record layout and a metric."""

    name: str
    modes: tuple[str, ...]
    record: Callable[[dict[str, Any], Any, Context], dict[str, Any]]
    score: Callable[[list[dict[str, Any]], Context], dict[str, float]]
    headline: tuple[str, ...]
    postprocess: tuple[str, ...] = ()


def sample_id(item: dict[str, Any]) -> str:
    """The id a sample is de-duplicated and resumed by (the same rule as `record_ids`)."""
    if "question_id" in item:
        return str(item["question_id"])
    if "round_id" in item:
        return f"{item['image_id']}_{item['round_id']}"
    if "id" in item:
        return str(item["id"])
    if "image_id" in item:
        return str(item["image_id"])
    raise EvalError(f"sample of {item.get('dataset', '?')}[{item.get('index', '?')}] has no id field")


def record_ids(dataset: Any, benchmark: str) -> list[str]:
    """Ids of every sample of an evaluation dataset, from its parsed records (no image is loaded)."""
    out = []
    for rec in getattr(dataset, "records", None) or []:
        if hasattr(rec, "question_id"):
            out.append(str(rec.question_id))
        elif hasattr(rec, "round_id"):
            out.append(f"{rec.image_id}_{rec.round_id}")
        elif hasattr(rec, "key"):
            out.append(str(rec.key))
        elif hasattr(rec, "image_id"):
            out.append(str(rec.image_id))
        else:
            raise EvalError(f"{benchmark}: cannot tell the id of a {type(rec).__name__} record")
    if len(out) != len(dataset):
        raise EvalError(f"{benchmark}: {type(dataset).__name__} is not a map-style evaluation dataset")
    seen: set[str] = set()
    dup = [i for i in out if i in seen or seen.add(i)]
    if dup:
        raise EvalError(f"{benchmark}: sample ids are not unique (e.g. {dup[:3]}): predictions could not be "
                        "matched to samples; fix the annotation file")
    return out


# ------------------------------------------------------------------------------------------------ records


def _caption_record(item, text, ctx):
    rule = CAPTION_RULES[ctx.postprocess or "strip"]
    return {"id": sample_id(item), "prediction": rule(text), "references": list(item["references"])}


def _caption_score(records, ctx):
    preds = {r["id"]: r["prediction"] for r in records}
    refs = {r["id"]: r["references"] for r in records}
    return _percent(M.caption_scores(preds, refs))


def _gt_answers(item):
    gts = item.get("gt_answers") or item.get("answers") or []
    return [str(a) for a in gts]


def _vqa_record(item, text, ctx):
    rule = ANSWER_RULES[ctx.postprocess or "first_line"]
    rec = {"id": sample_id(item), "question": item["question"], "generation": text, "prediction": rule(text),
           "gt_answers": _gt_answers(item)}
    if item.get("answer_type") is not None:
        rec["answer_type"] = item["answer_type"]
    return rec


def _vqa_score(records, ctx):
    missing = [r["id"] for r in records if len(r["gt_answers"]) < 2]
    if missing:
        raise EvalError(f"{ctx.benchmark}: {len(missing)} questions without human answers (e.g. {missing[:3]}): "
                        "the VQA accuracy needs the annotation file's 10 answers")
    return _percent(M.vqa_scores({r["id"]: r["prediction"] for r in records},
                                 {r["id"]: r["gt_answers"] for r in records}, metric=ctx.vqa_metric))


def _vizwiz_score(records, ctx):
    types = {r["id"]: r.get("answer_type") for r in records}
    return _percent(M.vizwiz_scores({r["id"]: r["prediction"] for r in records},
                                    {r["id"]: r["gt_answers"] for r in records}, types))


def _gqa_record(item, text, ctx):
    rule = ANSWER_RULES[ctx.postprocess or "first_line"]
    return {"id": sample_id(item), "question": item["question"], "generation": text, "prediction": rule(text),
            "answer": str(item["answers"][0])}


def _gqa_score(records, ctx):
    return _percent(M.gqa_scores({r["id"]: r["prediction"] for r in records}, {r["id"]: r["answer"] for r in records}))


def _yesno_record(item, text, ctx):
    return {"id": sample_id(item), "question": item["question"], "generation": text, "prediction": M.yes_no(text),
            "label": str(item["answers"][0])}


def _yesno_score(records, ctx):
    return _percent(M.pope_scores([r["generation"] for r in records], [r["label"] for r in records]))


def _mmvp_record(item, text, ctx):
    options = str(item.get("options", ""))
    return {"id": sample_id(item), "question": item["question"], "options": options, "generation": text,
            "prediction": M.mmvp_choice(text, options), "answer": str(item["answers"][0])}


def _mmvp_score(records, ctx):
    return _percent(M.mmvp_scores({r["id"]: r["prediction"] for r in records},
                                  {r["id"]: r["answer"] for r in records}), keep=("num_pairs",))


def _visdial_record(item, scores, ctx):
    key = (int(item["image_id"]), int(item["round_id"]))
    gt = ctx.visdial_gt_index.get(key) if ctx.visdial_gt_index else None
    return {"id": sample_id(item), "image_id": int(item["image_id"]), "round_id": int(item["round_id"]),
            "scores": [float(s) for s in scores], "relevance": [float(r) for r in item["relevance"]], "gt_index": gt}


def _visdial_score(records, ctx):
    scores = np.array([r["scores"] for r in records], dtype=np.float64)
    relevance = np.array([r["relevance"] for r in records], dtype=np.float64)
    gts = [r["gt_index"] for r in records]
    out = M.visdial_scores(scores, relevance, gts if all(g is not None for g in gts) else None)
    return _percent(out, keep=("mean_rank",))


def _grounding_record(item, text, ctx):
    box = M.parse_box(text, float(item["width"]), float(item["height"]))
    gt = [float(v) for v in item["gt_box_pixels"]]
    return {"id": sample_id(item), "sentence": item["sentence"], "generation": text,
            "box": None if box is None else [round(v, 3) for v in box], "gt_box": gt,
            "width": int(item["width"]), "height": int(item["height"]),
            "iou": 0.0 if box is None else M.box_iou(box, gt)}


def _grounding_score(records, ctx):
    return _percent(M.grounding_scores([r["box"] for r in records], [r["gt_box"] for r in records]))


def _referring_record(item, text, ctx):
    return {"id": sample_id(item), "generation": text, "prediction": clean_referring(text),
            "references": list(item["references"])}


KINDS: dict[str, Kind] = {
    "caption": Kind("caption", ("generate_texts",), _caption_record, _caption_score, ("CIDEr", "BLEU_4", "METEOR"),
                    tuple(CAPTION_RULES)),
    "vqa": Kind("vqa", ("generate_vqa",), _vqa_record, _vqa_score, ("accuracy",), tuple(ANSWER_RULES)),
    "vizwiz": Kind("vizwiz", ("generate_vqa",), _vqa_record, _vizwiz_score, ("accuracy", "accuracy_unanswerable"),
                   tuple(ANSWER_RULES)),
    "gqa": Kind("gqa", ("generate_vqa",), _gqa_record, _gqa_score, ("accuracy",), tuple(ANSWER_RULES)),
    "pope": Kind("pope", ("generate_imagenet",), _yesno_record, _yesno_score,
                 ("accuracy", "f1", "precision", "recall", "yes_ratio")),
    "robustvqa": Kind("robustvqa", ("generate_imagenet",), _yesno_record, _yesno_score, ("accuracy", "yes_ratio")),
    "mmvp": Kind("mmvp", ("generate_imagenet", "generate_vqa"), _mmvp_record, _mmvp_score,
                 ("accuracy", "pair_accuracy")),
    "visdial": Kind("visdial", ("generate_scores",), _visdial_record, _visdial_score,
                    ("ndcg", "mrr", "r@1", "r@5", "r@10", "mean_rank")),
    "grounding": Kind("grounding", ("generate_grounding",), _grounding_record, _grounding_score,
                      ("accuracy", "mean_iou")),
    "referring": Kind("referring", ("generate_referring",), _referring_record, _caption_score, ("CIDEr", "METEOR")),
}

_TYPE_TO_KIND = {**dict.fromkeys(CAPTION_TYPES, "caption"), "vqav2": "vqa", "okvqa": "vqa", "textvqa": "vqa",
                 "vizwiz": "vizwiz", "gqa": "gqa", "pope": "pope", "robustvqa": "robustvqa", "mmvp": "mmvp",
                 "visdial": "visdial", "refcoco_grounding_eval": "grounding", "refcocog_referring_eval": "referring"}


def kind_for(dataset_cfg: dict[str, Any], explicit: str | None, benchmark: str) -> Kind:
    """The kind named by `metric:` or implied by the dataset type."""
    name = explicit or _TYPE_TO_KIND.get(str(dataset_cfg.get("type")))
    if name is None:
        raise EvalError(f"{benchmark}: dataset type {dataset_cfg.get('type')!r} is not an evaluation benchmark; "
                        f"set `metric:` to one of {sorted(KINDS)}")
    if name not in KINDS:
        raise EvalError(f"{benchmark}: unknown metric {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def visdial_gt_indices(dialogs_file: str | Path) -> dict[tuple[int, int], int]:
    """(image_id, 1-based round_id) -> index of the ground-truth answer option, from visdial_1.0_val.json (the
    sparse annotation MRR/R@k need; the dense reader does not carry it)."""
    try:
        data = json.loads(Path(dialogs_file).read_text(encoding="utf-8"))["data"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise EvalError(f"cannot read the VisDial dialogs file {dialogs_file}: {exc}") from None
    out = {}
    for d in data.get("dialogs", []):
        for r, turn in enumerate(d.get("dialog", [])):
            if "gt_index" in turn:
                out[(int(d["image_id"]), r + 1)] = int(turn["gt_index"])
    return out
