"""RefCOCO/+/g box grounding: the first `(x1,y1)(x2,y2)` of the answer (0-999 grid) in pixels; Acc@0.5 IoU and
the mean IoU (an answer without a box counts as IoU 0)."""

from __future__ import annotations

from deem.eval import metrics as M
from deem.eval.tasks.base import Task, percent, sample_id


def record(item, text, ctx):
    box = M.parse_box(text, float(item["width"]), float(item["height"]))
    gt = [float(v) for v in item["gt_box_pixels"]]
    return {"id": sample_id(item), "sentence": item["sentence"], "generation": text,
            "box": None if box is None else [round(v, 3) for v in box], "gt_box": gt,
            "width": int(item["width"]), "height": int(item["height"]),
            "iou": 0.0 if box is None else M.box_iou(box, gt)}


def score(records, ctx):
    return percent(M.grounding_scores([r["box"] for r in records], [r["gt_box"] for r in records]))


TASK = Task("grounding", ("generate_grounding",), record, score, ("accuracy", "mean_iou"),
            dataset_types=("refcoco_grounding_eval",))
