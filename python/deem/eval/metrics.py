"""Evaluation metrics, each a pure function (fractions in [0, 1] unless stated; the engine reports percent).

Captioning (pycocoevalcap, all references) and VQA live in `caption_metrics` and `vqa_metrics` and are
re-exported here; this module has POPE / RobustVQA yes-no scoring, MMVP, VisDial ranking and box grounding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from deem.eval.caption_metrics import CaptionMetricError, caption_scores, ptb_tokenize
from deem.eval.vqa_metrics import (
    gqa_scores,
    normalize_gqa_answer,
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    vizwiz_scores,
    vqa_accuracy,
    vqa_scores,
)

__all__ = [
    "CaptionMetricError", "box_iou", "caption_scores", "gqa_scores", "grounding_scores", "mmvp_choice",
    "mmvp_scores", "normalize_gqa_answer", "normalize_vqa_answer", "parse_box", "parse_mmvp_options",
    "pope_scores", "process_digit_article", "process_punctuation", "ptb_tokenize", "robustvqa_scores",
    "scores_to_ranks", "visdial_scores", "vizwiz_scores", "vqa_accuracy", "vqa_scores", "yes_no",
]


# ------------------------------------------------------------------------------------------------ yes / no


def yes_no(text: str) -> str:
    """The standard POPE extraction (POPE's and LLaVA's `eval_pope.py`): keep the text before the first ".",
    drop commas, split on spaces; "no" if one of the words is `No`, `no` or `not`, otherwise "yes"
    (so an answer that says neither counts as "yes")."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _label(value: str) -> str:
    v = str(value).strip().lower()
    if v not in ("yes", "no"):
        raise ValueError(f"label must be 'yes' or 'no', got {value!r}")
    return v


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class: accuracy, precision TP/(TP+FP), recall TP/(TP+FN),
    F1 = 2PR/(P+R) and yes-ratio (#predicted yes / N). Predictions are free text (see `yes_no`)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        raise ValueError("no predictions to score")
    pred = [yes_no(p) == "yes" for p in predictions]
    gold = [_label(g) == "yes" for g in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pred), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / len(pred)}


def robustvqa_scores(subsets: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, float]:
    """RobustVQA: yes/no accuracy (POPE extraction) per subset (`accuracy_<subset>`, e.g. a, r, v2) and their
    unweighted mean (`accuracy_mean`). `subsets` maps a subset name to (predictions, labels)."""
    if not subsets:
        raise ValueError("no subsets to score")
    out = {f"accuracy_{name}": pope_scores(p, g)["accuracy"] for name, (p, g) in subsets.items()}
    out["accuracy_mean"] = sum(out.values()) / len(subsets)
    return out


# ------------------------------------------------------------------------------------------------ MMVP

_OPTION_RE = re.compile(r"\(([a-zA-Z])\)\s*([^()]*?)\s*(?=\([a-zA-Z]\)|$)")


def parse_mmvp_options(options: str) -> dict[str, str]:
    """"(a) Open (b) Closed" -> {"a": "open", "b": "closed"}."""
    return {m.group(1).lower(): m.group(2).strip().lower() for m in _OPTION_RE.finditer(options or "")}


def mmvp_choice(text: str, options: str | None = None) -> str | None:
    """The option letter a free-text answer picks, or None: a leading letter ("a", "(a)", "a)", "a." ...), else
    the first parenthesised letter "(b)", else the one option whose text appears (as whole words) in the answer.
    With `options`, only their letters count."""
    opts = parse_mmvp_options(options) if options else {}
    allowed = set(opts) or set("abcdefghijklmnopqrstuvwxyz")
    t = text.strip().lower()
    m = re.match(r"^\(?([a-z])\)?(?=[\s.:,;)!]|$)", t)
    if m and m.group(1) in allowed:
        return m.group(1)
    for m in re.finditer(r"\(([a-z])\)", t):
        if m.group(1) in allowed:
            return m.group(1)
    hits = [k for k, v in opts.items() if v and re.search(r"\b" + re.escape(v) + r"\b", t)]
    return hits[0] if len(hits) == 1 else None


def mmvp_scores(choices: Mapping[str, str | None], answers: Mapping[str, str]) -> dict[str, float]:
    """MMVP accuracy per question (`accuracy`) and per pair (`pair_accuracy`: both questions of a pair right;
    questions 1&2, 3&4, ... by their 1-based index id). Incomplete pairs are left out of the pair accuracy
    (`num_pairs` counts the complete ones)."""
    if not choices:
        raise ValueError("no predictions to score")
    correct = {qid: c is not None and c == str(answers[qid]).strip().strip("()").lower() for qid, c in choices.items()}
    pairs: dict[int, list[bool]] = {}
    for qid, ok in correct.items():
        try:
            idx = int(qid)
        except ValueError:
            raise ValueError(f"MMVP question id {qid!r} is not a 1-based integer index") from None
        pairs.setdefault((idx - 1) // 2, []).append(ok)
    complete = [v for v in pairs.values() if len(v) == 2]
    return {"accuracy": sum(correct.values()) / len(correct),
            "pair_accuracy": sum(all(v) for v in complete) / len(complete) if complete else 0.0,
            "num_pairs": float(len(complete))}


# ------------------------------------------------------------------------------------------------ VisDial


def scores_to_ranks(scores: np.ndarray) -> np.ndarray:
    """[N, K] option scores -> ranks 1..K (1 = highest score; ties keep the option order)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[-1] + 1)[None, :].repeat(len(scores), 0), axis=-1)
    return ranks


def visdial_scores(scores: np.ndarray, relevance: np.ndarray | None = None,
                   gt_index: Sequence[int] | None = None) -> dict[str, float]:
    """VisDial v1.0 metrics from [N, K] option scores.

    NDCG (dense annotations `relevance` [N, K]): per round, k = #options with non-zero relevance, DCG of the
    relevance of the k best-ranked options with discount 1/log2(rank + 1), over the ideal DCG; mean over rounds
    (rounds without relevant option are skipped). With `gt_index` (the ground-truth option of each round):
    MRR, R@1, R@5, R@10 and the mean rank of the ground-truth answer."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty [N, K] array, got shape {scores.shape}")
    ranks = scores_to_ranks(scores)
    out: dict[str, float] = {}
    if relevance is not None:
        rel = np.asarray(relevance, dtype=np.float64)
        if rel.shape != scores.shape:
            raise ValueError(f"relevance {rel.shape} and scores {scores.shape} differ in shape")
        values = []
        for r_rank, r_rel in zip(ranks, rel):
            k = int((r_rel != 0).sum())
            if k == 0:
                continue
            discount = 1.0 / np.log2(np.arange(k) + 2.0)
            by_pred = r_rel[np.argsort(r_rank, kind="stable")][:k]
            ideal = np.sort(r_rel)[::-1][:k]
            values.append(float((by_pred * discount).sum() / (ideal * discount).sum()))
        if not values:
            raise ValueError("no round has a relevant option: NDCG undefined")
        out["ndcg"] = float(np.mean(values))
    if gt_index is not None:
        gt = np.asarray(gt_index, dtype=np.int64)
        if gt.shape != (len(scores),):
            raise ValueError(f"{gt.shape} gt_index for {len(scores)} rounds")
        if (gt < 0).any() or (gt >= scores.shape[1]).any():
            raise ValueError("gt_index outside the options")
        gt_rank = ranks[np.arange(len(gt)), gt].astype(np.float64)
        out.update({"mrr": float((1.0 / gt_rank).mean()), "r@1": float((gt_rank <= 1).mean()),
                    "r@5": float((gt_rank <= 5).mean()), "r@10": float((gt_rank <= 10).mean()),
                    "mean_rank": float(gt_rank.mean())})
    return out


# ------------------------------------------------------------------------------------------------ grounding

_NUM = r"\s*(\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,?\s*\(" + _NUM + "," + _NUM + r"\)")


def parse_box(text: str, width: float, height: float, scale: float = 999.0
              ) -> tuple[float, float, float, float] | None:
    """The first `(x1,y1)(x2,y2)` of a model answer (DEEM's `<box>(x1,y1)(x2,y2)</box>` format, coordinates on
    the 0-`scale` grid) as pixel corners (x1 <= x2, y1 <= y2), or None if there is none."""
    m = _BOX_RE.search(text)
    if m is None:
        return None
    x1, y1, x2, y2 = (min(float(v), scale) / scale for v in m.groups())
    x1, x2 = sorted((x1 * width, x2 * width))
    y1, y2 = sorted((y1 * height, y2 * height))
    return x1, y1, x2, y2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (continuous coordinates)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(pred_boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[float]],
                     threshold: float = 0.5) -> dict[str, float]:
    """Referring-expression grounding: `accuracy` = fraction with IoU >= threshold (Acc@0.5), `mean_iou`, and
    `parse_failure_rate` (answers without a box count as wrong, IoU 0)."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(gt_boxes)} ground-truth boxes")
    if not gt_boxes:
        raise ValueError("no predictions to score")
    ious = [0.0 if p is None else box_iou(p, g) for p, g in zip(pred_boxes, gt_boxes)]
    if any(math.isnan(v) for v in ious):
        raise ValueError("NaN IoU: a box has NaN coordinates")
    return {"accuracy": sum(v >= threshold for v in ious) / len(ious), "mean_iou": sum(ious) / len(ious),
            "parse_failure_rate": sum(p is None for p in pred_boxes) / len(ious)}
