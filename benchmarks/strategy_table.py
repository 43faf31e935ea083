"""Write cpp/src/cuda/strategy_measured.inc, the table behind the 'auto' d(value) strategy, from measurements.

Reads the deem backward rows of benchmarks/results/msda_cuda.json (benchmarks/msda.py: each strategy's
backward time per case and dtype, core op and MMFS core) and writes one entry per (case, dtype) with the
strategies ordered by their measured backward time. See cpp/src/cuda/strategy_table.h for how 'auto' uses it.

    python benchmarks/strategy_table.py [--results benchmarks/results/msda_cuda.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGY = {"atomic": "kAtomic", "owner": "kOwner", "tensor": "kTensor"}
OP = {"msda": "kMsda", "mmfs": "kMmfs"}


def entries(records: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], dict] = {}
    for r in records:
        if r.get("impl") != "deem" or r.get("strategy") not in STRATEGY or r.get("bwd_ms") is None:
            continue
        if "slice_rows" not in r:
            raise SystemExit(f"{r['case']}: the record has no problem features (re-run benchmarks/msda.py)")
        g = groups.setdefault((r["case"], r["dtype"]), dict(
            name=f"{r['case']} {r['dtype']}", op=r["op"], points_per_query=r["points_per_query"],
            slice_rows=r["slice_rows"], queries=r["queries"], card=r.get("card", "?"), date=r.get("date", "?"),
            times={}))
        g["times"][r["strategy"]] = r["bwd_ms"]
    return list(groups.values())


def render(table: list[dict], note: str = "") -> str:
    cards = sorted({e["card"] for e in table})
    dates = sorted({e["date"] for e in table})
    lines = ["// Written by benchmarks/strategy_table.py from benchmarks/results/msda_cuda.json; do not edit.",
             f"// Measured on {', '.join(cards)} ({', '.join(dates)}): backward (ms) of each d(value) strategy.",
             *([f"// {note}"] if note else []),
             f'constexpr const char* kMeasuredCard = "{", ".join(cards)}";',
             "constexpr MeasuredStrategies kMeasuredStrategies[] = {"]
    for e in table:
        ranked = sorted(e["times"].items(), key=lambda kv: kv[1])
        slots = [STRATEGY[s] for s, _ in ranked] + ["kAuto"] * (3 - len(ranked))
        times = [f"{t:.4f}f" for _, t in ranked] + ["0.f"] * (3 - len(ranked))
        lines.append(f'    {{"{e["name"]}", StrategyOp::{OP[e["op"]]}, {e["points_per_query"]}, {e["slice_rows"]}, '
                     f'{e["queries"]}, {{{", ".join("GradValueStrategy::" + s for s in slots)}}}, '
                     f'{{{", ".join(times)}}}}},')
    lines.append("};")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/msda_cuda.json"))
    parser.add_argument("--out", default=str(ROOT / "cpp/src/cuda/strategy_measured.inc"))
    parser.add_argument("--note", default="", help="one line on how the measurement was made")
    args = parser.parse_args(argv)
    table = entries(json.loads(Path(args.results).read_text()))
    if not table:
        raise SystemExit(f"{args.results}: no deem backward rows with a strategy")
    Path(args.out).write_text(render(table, args.note))
    for e in table:
        ranked = sorted(e["times"].items(), key=lambda kv: kv[1])
        print(f"{e['name']:<28} " + "  ".join(f"{s} {t:.3f}" for s, t in ranked))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
