"""`deem train` and `deem export-weights`."""

from __future__ import annotations

import argparse


def _cmd_train(args: argparse.Namespace) -> int:
    from deem.train.config import TrainConfig
    from deem.train.engine import Trainer

    cfg = TrainConfig.load(args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume)
    last = trainer.run()
    trainer.print(f"done: step {trainer.step}, last log {last}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from deem.train.export import export_weights

    out = export_weights(args.run_dir, args.out_dir, args.checkpoint)
    print(f"wrote {out}")
    return 0


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a stage (configs/train/*.yaml); torchrun for several GPUs")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.set_defaults(func=_cmd_train)
    export = subparsers.add_parser("export-weights", help="write a run's weights as a from_pretrained directory")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--checkpoint", help="a step-N directory under <run_dir>/checkpoints (default: latest)")
    export.set_defaults(func=_cmd_export)
