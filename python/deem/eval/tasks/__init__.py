"""Benchmark kinds, one module each (as lmms-eval keeps one folder per task): what batches a kind reads, what the
model returns for them, its record, its score, its headline metrics and its optional `prepare` hook.

    TASKS["pope"].score(records, Context("pope_random"))      # re-score a predictions.json
    task_for({"type": "vqav2", ...}, None, "vqav2_val")        # the kind a dataset type implies

A new kind is a module here defining `TASK = Task(...)`, listed in `_MODULES`.
"""

from __future__ import annotations

from typing import Any

from deem.eval.errors import EvalError
from deem.eval.tasks import (
    caption,
    gqa,
    grounding,
    mmvp,
    pope,
    referring,
    robustvqa,
    visdial,
    vizwiz,
    vqa,
)
from deem.eval.tasks.base import OPTION_SCORES, TEXT, Context, Task, record_ids, sample_id

_MODULES = (caption, vqa, vizwiz, gqa, pope, robustvqa, mmvp, visdial, grounding, referring)
TASKS: dict[str, Task] = {m.TASK.name: m.TASK for m in _MODULES}
DATASET_TASKS: dict[str, str] = {t: task.name for task in TASKS.values() for t in task.dataset_types}

__all__ = ["DATASET_TASKS", "OPTION_SCORES", "TASKS", "TEXT", "Context", "Task", "record_ids", "sample_id",
           "task_for"]


def task_for(dataset_cfg: dict[str, Any], explicit: str | None, benchmark: str) -> Task:
    """The kind named by `metric:` or implied by the dataset type."""
    name = explicit or DATASET_TASKS.get(str(dataset_cfg.get("type")))
    if name is None:
        raise EvalError(f"{benchmark}: dataset type {dataset_cfg.get('type')!r} is not an evaluation benchmark; "
                        f"set `metric:` to one of {sorted(TASKS)}")
    if name not in TASKS:
        raise EvalError(f"{benchmark}: unknown metric {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
