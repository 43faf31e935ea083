"""What a benchmark kind is: the `Task` record every module of `deem.eval.tasks` registers, the `Context` its
functions get, and the sample-id rule records are matched and resumed by.

A record is a JSON-safe dict with the sample `id`, the model's output and the ground truth needed to score it,
so a predictions file can be re-scored without the dataset. Metrics are reported in percent (x100) except
counts and VisDial's mean rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deem.eval.errors import EvalError

TEXT = "text"  # the model generates an answer per prompt (decoded text)
OPTION_SCORES = "option_scores"  # the model scores every answer option of a prompt (log-likelihoods)


@dataclass
class Context:
    """What a task needs besides the batch: the benchmark name, its postprocess rule and lookups its `prepare`
    hook filled in."""

    benchmark: str
    postprocess: str | None = None
    visdial_gt_index: dict[tuple[int, int], int] | None = None
    vqa_metric: str = "official"  # the VQA accuracy variant (vqa_metrics.VQA_METRICS)


Record = Callable[[dict[str, Any], Any, Context], dict[str, Any]]
Score = Callable[[list[dict[str, Any]], Context], dict[str, float]]
Prepare = Callable[[str, dict[str, Any], Context], None]


@dataclass(frozen=True)
class Task:
    """A benchmark kind: which collated batches it reads (`modes`: collate modes of data's eval collators), what
    the model returns for them (`output`), how an output becomes a record and records become metrics, the
    metrics a report leads with, the postprocess rules a config may pick, the dataset types that imply it, and
    an optional `prepare(benchmark, dataset_cfg, ctx)` hook that loads what scoring needs beyond the items."""

    name: str
    modes: tuple[str, ...]
    record: Record
    score: Score
    headline: tuple[str, ...]
    postprocess: tuple[str, ...] = ()
    dataset_types: tuple[str, ...] = ()
    output: str = TEXT
    prepare: Prepare | None = None


def percent(values: dict[str, float], keep: Sequence[str] = ()) -> dict[str, float]:
    """Fractions as percent, except the metrics named in `keep` (counts, ranks)."""
    return {k: (v if k in keep else 100.0 * v) for k, v in values.items()}


def _id_of(fields: dict[str, Any]) -> str | None:
    """The one id rule: the question id, else "<image_id>_<round_id>" (dialog rounds), else the id (a region's
    key), else the image id."""
    if "question_id" in fields:
        return str(fields["question_id"])
    if "round_id" in fields:
        return f"{fields['image_id']}_{fields['round_id']}"
    if "id" in fields:
        return str(fields["id"])
    if "image_id" in fields:
        return str(fields["image_id"])
    return None


def sample_id(item: dict[str, Any]) -> str:
    """The id a loaded sample is de-duplicated and resumed by."""
    found = _id_of(item)
    if found is None:
        raise EvalError(f"sample of {item.get('dataset', '?')}[{item.get('index', '?')}] has no id field")
    return found


def record_ids(dataset: Any, benchmark: str) -> list[str]:
    """Ids of every sample of an evaluation dataset, from its parsed records (no image is loaded), by the rule
    of `sample_id` (a record's `key` is its items' `id`)."""
    out = []
    for rec in getattr(dataset, "records", None) or []:
        fields = dict(vars(rec))
        if "key" in fields:
            fields.setdefault("id", fields["key"])
        found = _id_of(fields)
        if found is None:
            raise EvalError(f"{benchmark}: cannot tell the id of a {type(rec).__name__} record")
        out.append(found)
    if len(out) != len(dataset):
        raise EvalError(f"{benchmark}: {type(dataset).__name__} is not a map-style evaluation dataset")
    seen: set[str] = set()
    dup = [i for i in out if i in seen or seen.add(i)]
    if dup:
        raise EvalError(f"{benchmark}: sample ids are not unique (e.g. {dup[:3]}): predictions could not be "
                        "matched to samples; fix the annotation file")
    return out
