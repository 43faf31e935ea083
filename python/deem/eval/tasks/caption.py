"""Captioning (COCO Karpathy, NoCaps, Flickr30k, image2paragraph, ...): the prediction after a postprocess rule
against every reference; pycocoevalcap BLEU, METEOR, ROUGE-L, CIDEr (and SPICE where Java allows)."""

from __future__ import annotations

from deem.data.registry import CAPTION_TYPES
from deem.eval import metrics as M
from deem.eval.postprocess import CAPTION_RULES
from deem.eval.tasks.base import Task, percent, sample_id


def record(item, text, ctx):
    rule = CAPTION_RULES[ctx.postprocess or "strip"]
    return {"id": sample_id(item), "prediction": rule(text), "references": list(item["references"])}


def score(records, ctx):
    preds = {r["id"]: r["prediction"] for r in records}
    refs = {r["id"]: r["references"] for r in records}
    return percent(M.caption_scores(preds, refs))


TASK = Task("caption", ("generate_texts",), record, score, ("CIDEr", "BLEU_4", "METEOR"), tuple(CAPTION_RULES),
            dataset_types=tuple(sorted(CAPTION_TYPES)))
