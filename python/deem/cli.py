"""The `deem` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _model_counts(config_name: str, stage: str | None) -> dict[str, dict[str, int]]:
    """Parameter counts per component, built on the meta device (no memory, no weights)."""
    import torch

    from deem.models import DeemModel, config_from_name

    cfg = config_from_name(config_name, stage)
    with torch.device("meta"):
        model = DeemModel(cfg)
    counts = model.parameter_counts()
    counts["total"] = {k: sum(c[k] for c in counts.values()) for k in ("total", "trainable")}
    return counts


def _cmd_info(args: argparse.Namespace) -> int:
    from deem import build_info

    if args.config:
        counts = _model_counts(args.config, args.stage)
        if args.json:
            print(json.dumps(counts, indent=2))
            return 0
        print(f"{'component':<20}{'parameters':>16}{'trainable':>16}")
        for name, c in counts.items():
            print(f"{name:<20}{c['total'] / 1e6:>15.2f}M{c['trainable'] / 1e6:>15.2f}M")
        return 0
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from deem.demo import DemoPlan, run_demo

    plan = DemoPlan.quick() if args.quick else DemoPlan(seed=args.seed)
    if args.steps_scale != 1.0:
        plan = plan.scaled(args.steps_scale)
    run_demo(args.out, plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from deem import __version__
    from deem.data.cli import add_data_commands
    from deem.eval.cli import add_eval_commands, add_robustvqa_command
    from deem.infer.cli import add_infer_commands
    from deem.train.cli import add_train_commands

    parser = argparse.ArgumentParser(prog="deem", description="DEEM: diffusion models as the eyes of LLMs.")
    parser.add_argument("--version", action="version", version=f"deem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the installed build, or a model's parameter counts")
    info.add_argument("--config", help="a preset (deem_7b, tiny) or a saved config: print parameter counts")
    info.add_argument("--stage", help="training stage preset (pretrain_deem, pretrain_baseline, sft_vqa, ...)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    data = add_data_commands(sub)
    add_robustvqa_command(data)
    add_train_commands(sub)
    add_eval_commands(sub)
    add_infer_commands(sub)
    demo = sub.add_parser("demo", help="the whole system on the tiny model and the synthetic world (CPU minutes)")
    demo.add_argument("--out", default="demo_out", help="output directory (report.md, metrics.json, plots)")
    demo.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's training steps")
    demo.add_argument("--quick", action="store_true", help="a few steps of everything (checks the pipeline)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
