"""What an evaluation reports: per-group means over benchmarks, `<out>/metrics.json` (every benchmark scored in
the directory) and the markdown table `<out>/results.md`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from deem.eval.config import EvalConfig
from deem.eval.io import read_output
from deem.eval.tasks import TASKS
from deem.io import atomic_write_json, atomic_write_text


def group_metrics(groups: dict[str, dict[str, Any]], scored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, g in groups.items():
        absent = [b for b in g["benchmarks"] if b not in scored]
        if absent:
            out[name] = {"incomplete": absent}
            continue
        entry: dict[str, Any] = {}
        for m in g["metrics"]:
            values = [scored[b][m] for b in g["benchmarks"] if m in scored[b]]
            if len(values) == len(g["benchmarks"]):
                entry[m] = sum(values) / len(values)
                entry.update({f"{m}_{b}": scored[b][m] for b in g["benchmarks"]})
        out[name] = entry
    return out


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def results_table(summary: dict[str, Any]) -> str:
    """The markdown table of a summary (`<out>/metrics.json` content)."""
    lines = [f"# deem eval: {summary.get('checkpoint', '?')}", "",
             "Metrics in percent (CIDEr, BLEU, METEOR, ROUGE-L x100); VisDial mean rank in ranks.", "",
             "| benchmark | kind | samples | metrics |", "|---|---|---|---|"]
    for name, m in summary.get("benchmarks", {}).items():
        kind = m.get("kind", "?")
        head = TASKS[kind].headline if kind in TASKS else ()
        keys = [k for k in head if k in m] + [k for k in sorted(m) if k not in head and not k.startswith("num_")
                                              and k != "kind"]
        samples = f"{m.get('num_samples', 0)}/{m.get('num_expected', '?')}"
        if m.get("num_missing"):
            samples += f" ({m['num_missing']} missing)"
        lines.append(f"| {name} | {kind} | {samples} | {', '.join(f'{k} {_fmt(m[k])}' for k in keys)} |")
    for name, g in summary.get("groups", {}).items():
        body = (f"incomplete: {', '.join(g['incomplete'])}" if "incomplete" in g
                else ", ".join(f"{k} {_fmt(v)}" for k, v in g.items()))
        lines.append(f"| {name} | group mean | | {body} |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, cfg: EvalConfig, checkpoint: str | None, scored: dict[str, dict[str, Any]]
                  ) -> dict[str, Any]:
    """Merge `scored` into `<out>/metrics.json` (benchmarks scored by earlier runs stay), recompute the groups and
    write `<out>/results.md`. `checkpoint`: what was evaluated (kept from the file when None)."""
    path = out / "metrics.json"
    summary = read_output(path) if path.is_file() else {}
    benches = dict(summary.get("benchmarks", {}))
    benches.update(scored)
    summary = {"checkpoint": checkpoint or summary.get("checkpoint"),
               "config": cfg.source,
               "benchmarks": benches, "groups": group_metrics(cfg.groups, benches),
               "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(path, summary, indent=2)
    atomic_write_text(out / "results.md", results_table(summary))
    return summary
