"""Eval configs (see docs/eval.md): a YAML file (or dict) of benchmarks, each a dataset config of the data layer
plus its kind, batch size and generation overrides; read with the config mechanism of `deem.config`."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deem.config import check_keys, read_yaml
from deem.data.registry import resolve_paths
from deem.eval.errors import EvalError
from deem.eval.tasks import Task, task_for
from deem.eval.vqa_metrics import VQA_METRICS

TOP_KEYS = {"root", "tokenizer", "device", "dtype", "batch_size", "num_workers", "save_every", "save_interval_s",
            "resolution", "benchmarks", "groups", "vqa_metric"}
BENCH_KEYS = {"name", "dataset", "metric", "batch_size", "generation", "postprocess", "num_workers", "save_every",
              "vqa_metric"}
GENERATION_KEYS = {"max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "do_sample", "top_p",
                   "temperature", "repetition_penalty"}
GENERATION_ALIASES = {"max_length": "max_new_tokens", "min_length": "min_new_tokens"}  # the original's names
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass
class BenchmarkConfig:
    """One benchmark: a dataset config (data-layer keys), its kind, batch size and generation overrides."""

    name: str
    dataset: dict[str, Any]
    kind: Task  # the benchmark kind (deem.eval.tasks)
    batch_size: int
    generation: dict[str, Any] = field(default_factory=dict)
    postprocess: str | None = None
    num_workers: int = 2
    save_every: int = 20
    vqa_metric: str = "official"


@dataclass
class EvalConfig:
    """A parsed eval config (see docs/eval.md)."""

    benchmarks: list[BenchmarkConfig]
    tokenizer: dict[str, Any] | None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    save_interval_s: float = 120.0
    source: str = "<dict>"

    def select(self, names: Sequence[str] | None) -> list[BenchmarkConfig]:
        if not names:
            return list(self.benchmarks)
        known = {b.name: b for b in self.benchmarks}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise EvalError(f"{self.source}: no benchmark {unknown}; configured: {sorted(known)}")
        return [known[n] for n in names]


def normalise_generation(gen: dict[str, Any] | None, where: str) -> dict[str, Any]:
    out = {}
    for k, v in (gen or {}).items():
        key = GENERATION_ALIASES.get(k, k)
        if key not in GENERATION_KEYS:
            raise EvalError(f"{where}: unknown generation setting {k!r}; known: {sorted(GENERATION_KEYS)}")
        out[key] = v
    return out


def _vqa_metric(value: Any, where: str) -> str:
    if value not in VQA_METRICS:
        raise EvalError(f"{where}: vqa_metric must be one of {list(VQA_METRICS)}, got {value!r}")
    return str(value)


def load_eval_config(config: str | Path | dict[str, Any], root: str | Path | None = None,
                     resolution: int | None = None) -> EvalConfig:
    """Parse an eval config (YAML path or dict). Relative dataset and tokenizer paths resolve against `root`
    (argument, else the config's `root`, else the current directory); keys starting with `x-` hold YAML
    anchors and are ignored; any other unknown key is an error."""
    if isinstance(config, dict):
        raw, source = copy.deepcopy(config), "<dict>"
    else:
        raw, source = read_yaml(config, "eval config", EvalError), str(config)
    if not isinstance(raw, dict):
        raise EvalError(f"eval config {source} must be a mapping")
    check_keys(raw, TOP_KEYS, source, EvalError, ignore_prefix="x-")
    base = Path(root if root is not None else raw.get("root", "."))
    resolution = resolution if resolution is not None else raw.get("resolution")
    defaults = {"batch_size": int(raw.get("batch_size", 8)), "num_workers": int(raw.get("num_workers", 2)),
                "save_every": int(raw.get("save_every", 20)),
                "vqa_metric": _vqa_metric(raw.get("vqa_metric", "official"), source)}
    benches, seen = [], set()
    for n, entry in enumerate(raw.get("benchmarks") or []):
        where = f"{source}: benchmark {n}"
        if not isinstance(entry, dict) or "name" not in entry or "dataset" not in entry:
            raise EvalError(f"{where}: needs `name` and `dataset`")
        name = str(entry["name"])
        where = f"{source}: benchmark {name!r}"
        check_keys(entry, BENCH_KEYS, where, EvalError)
        if not _NAME_RE.match(name) or name in seen:
            raise EvalError(f"{where}: names must be unique and use only letters, digits and _ . + -")
        seen.add(name)
        if not isinstance(entry["dataset"], dict) or "type" not in entry["dataset"]:
            raise EvalError(f"{where}: `dataset` must be a dataset config with a `type` (see docs/data.md)")
        dataset = resolve_paths({"name": name, **entry["dataset"]}, base)
        if resolution is not None:
            dataset["transform"] = {**(dataset.get("transform") or {}), "resolution": int(resolution)}
        kind = task_for(dataset, entry.get("metric"), name)
        post = entry.get("postprocess")
        if post is not None and post not in kind.postprocess:
            raise EvalError(f"{where}: postprocess {post!r} not available for {kind.name} "
                            f"(choose from {list(kind.postprocess) or 'none'})")
        if "vqa_metric" in entry and kind.name != "vqa":
            raise EvalError(f"{where}: vqa_metric applies to VQAv2-style benchmarks (kind vqa), not {kind.name}")
        benches.append(BenchmarkConfig(
            name=name, dataset=dataset, kind=kind,
            batch_size=int(entry.get("batch_size", defaults["batch_size"])),
            generation=normalise_generation(entry.get("generation"), where), postprocess=post,
            num_workers=int(entry.get("num_workers", defaults["num_workers"])),
            save_every=max(1, int(entry.get("save_every", defaults["save_every"]))),
            vqa_metric=_vqa_metric(entry.get("vqa_metric", defaults["vqa_metric"]), where)))
    if not benches:
        raise EvalError(f"{source}: no benchmarks configured")
    groups = raw.get("groups") or {}
    for gname, g in groups.items():
        if not isinstance(g, dict) or not g.get("benchmarks") or not g.get("metrics") or set(g) - {"benchmarks",
                                                                                                    "metrics"}:
            raise EvalError(f"{source}: group {gname!r} needs exactly `benchmarks` and `metrics` lists")
        missing = [b for b in g["benchmarks"] if b not in seen]
        if missing:
            raise EvalError(f"{source}: group {gname!r} names unknown benchmarks {missing}")
    tok = raw.get("tokenizer")
    if tok is not None:
        tok = resolve_paths({"type": "llama", "path": tok} if isinstance(tok, str) else dict(tok), base)
    return EvalConfig(benches, tok, groups, str(raw.get("device", "auto")), str(raw.get("dtype", "auto")),
                      float(raw.get("save_interval_s", 120.0)), source)
