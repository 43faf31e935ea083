"""The `deem` command line.

Sub-commands raise, they never print an error and exit: `main` turns a user error (`USER_ERRORS`: deem's
`UserError` family and the file-system errors) into one line `deem VERB: error: MESSAGE` on stderr and exit
status 2; `--debug` adds the traceback. Every other exception is a bug in deem and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback

from deem.errors import UsageError, UserError

USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


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

    if args.steps_scale <= 0:
        raise UsageError(f"--steps-scale must be > 0, got {args.steps_scale}")
    plan = (DemoPlan.quick() if args.quick else DemoPlan()).with_seed(args.seed)
    if args.steps_scale != 1.0:
        plan = plan.scaled(args.steps_scale)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    run_demo(args.out, plan, seeds=args.seeds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from deem import __version__
    from deem.data.cli import add_data_commands
    from deem.eval.cli import add_eval_commands, add_robustvqa_command
    from deem.export.cli import add_parser as add_export_command
    from deem.infer.cli import add_infer_commands
    from deem.train.cli import add_train_commands

    parser = argparse.ArgumentParser(prog="deem", description="DEEM: diffusion models as the eyes of LLMs.")
    parser.add_argument("--version", action="version", version=f"deem {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also after the verb)")
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
    add_export_command(sub)
    demo = sub.add_parser("demo", help="the whole system on the tiny model and the synthetic world (CPU minutes)")
    demo.add_argument("--out", default="demo_out", help="output directory (report.md, metrics.json, plots)")
    demo.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's training steps")
    demo.add_argument("--quick", action="store_true", help="a few steps of everything (checks the pipeline)")
    demo.add_argument("--seed", type=int, default=0, help="the (first) seed: world, initialisation, data order")
    demo.add_argument("--seeds", type=int, default=1,
                      help="run the experiment for K seeds and report mean ± std of every metric")
    demo.set_defaults(func=_cmd_demo)
    for verb in _verbs(parser):
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        verb.set_defaults(verb=verb.prog)
    return parser


def _verbs(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of the runnable sub-commands (`deem train`, `deem data inspect`, ...): the leaves."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [parser]
    return [leaf for group in groups for sub in dict.fromkeys(group.choices.values()) for leaf in _verbs(sub)]


def error_line(exc: BaseException) -> str:
    """An exception's message as one line: `path: reason` for file-system errors, the original error (not
    the DataLoader's wrapping traceback) for an error re-raised from a worker process."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        text = f"{where}: {exc.strerror[:1].lower()}{exc.strerror[1:]}"
    else:
        text = str(exc) or type(exc).__name__
        marker = "\nOriginal Traceback (most recent call last):"
        if marker in text:  # torch.utils.data re-raised it from a worker: keep the original message
            lines = text.split(marker, 1)[1].rstrip().splitlines()
            frames_end = max((i for i, line in enumerate(lines) if line[:1].isspace()), default=-1)
            text = re.sub(r"^[\w.]+: ", "", " ".join(lines[frames_end + 1:]), count=1)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run `deem ARGV`; returns the exit status (2 for a user error, after its one-line message)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{args.verb}: error: {error_line(exc)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
