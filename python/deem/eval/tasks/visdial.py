"""VisDial v1.0 (answer ranking): the model scores each round's 100 options (`output = OPTION_SCORES`); NDCG
from the dense relevance, MRR / R@k / mean rank from the ground-truth option of the dialogs file (`prepare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from deem.eval import metrics as M
from deem.eval.errors import EvalError
from deem.eval.tasks.base import OPTION_SCORES, Context, Task, percent, sample_id


def gt_indices(dialogs_file: str | Path) -> dict[tuple[int, int], int]:
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


def prepare(benchmark: str, dataset: dict[str, Any], ctx: Context) -> None:
    if "dialogs" not in dataset:
        raise EvalError(f"{benchmark}: VisDial metrics need the dataset's `dialogs` file")
    ctx.visdial_gt_index = gt_indices(dataset["dialogs"])


def record(item, scores, ctx):
    key = (int(item["image_id"]), int(item["round_id"]))
    gt = ctx.visdial_gt_index.get(key) if ctx.visdial_gt_index else None
    return {"id": sample_id(item), "image_id": int(item["image_id"]), "round_id": int(item["round_id"]),
            "scores": [float(s) for s in scores], "relevance": [float(r) for r in item["relevance"]], "gt_index": gt}


def score(records, ctx):
    scores = np.array([r["scores"] for r in records], dtype=np.float64)
    relevance = np.array([r["relevance"] for r in records], dtype=np.float64)
    gts = [r["gt_index"] for r in records]
    out = M.visdial_scores(scores, relevance, gts if all(g is not None for g in gts) else None)
    return percent(out, keep=("mean_rank",))


TASK = Task("visdial", ("generate_scores",), record, score, ("ndcg", "mrr", "r@1", "r@5", "r@10", "mean_rank"),
            dataset_types=("visdial",), output=OPTION_SCORES, prepare=prepare)
