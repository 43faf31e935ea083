"""`deem eval ...` and `deem data robustvqa ...`.

Wiring (python/deem/cli.py):

    from deem.eval.cli import add_eval_commands, add_robustvqa_command
    data = add_data_commands(sub)        # the existing `data` group
    add_robustvqa_command(data)          # -> deem data robustvqa
    add_eval_commands(sub)               # -> deem eval
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from deem.errors import UsageError


class _Progress:
    """Logs a benchmark's progress every 10% or every minute."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, float]] = {}
        self.log = logging.getLogger("deem.eval")

    def __call__(self, bench: str, done: int, total: int) -> None:
        step, t0 = self.last.get(bench, (-1, 0.0))
        now, tenth = time.monotonic(), (10 * done) // max(total, 1)
        if tenth > step or now - t0 > 60 or done == total:
            self.last[bench] = (tenth, now)
            self.log.info("%s: %d / %d samples", bench, done, total)


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("deem.eval").setLevel(logging.INFO)


def _cmd_eval(args: argparse.Namespace) -> int:
    from deem.eval.engine import evaluate
    from deem.eval.report import results_table

    _setup_logging()
    if args.checkpoint is None and not args.score_only:
        raise UsageError("--checkpoint is required (or --score-only with --out)")
    if args.out is None and args.checkpoint is None:
        raise UsageError("--out is required with --score-only and no --checkpoint")
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else None
    tokenizer = None
    if args.tokenizer:
        tokenizer = {"type": "hf" if args.tokenizer_type == "hf" else "llama", "path": args.tokenizer}
        if args.num_img_token is not None:
            tokenizer["num_img_token"] = args.num_img_token
    scored = evaluate(args.config, args.checkpoint, out, benchmarks=names, root=args.root, tokenizer=tokenizer,
                      rank=args.rank, world_size=args.world_size, overwrite=args.overwrite,
                      score_only=args.score_only, resolution=args.resolution, device=args.device,
                      dtype=args.dtype, progress=_Progress())
    if scored and (out / "results.md").is_file():
        print(results_table({"checkpoint": str(args.checkpoint), "benchmarks": scored}))
        print(f"predictions and metrics in {out} (all benchmarks of the directory: {out / 'results.md'})")
    return 0


def add_eval_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `deem eval` on the `deem` command's subparsers."""
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on benchmarks (captioning, VQA, POPE, RobustVQA, MMVP, VisDial, RefCOCO)",
        description="Batched, resumable evaluation; several ranks under torchrun. Writes <out>/<benchmark>/"
                    "predictions.json and metrics.json, <out>/metrics.json and <out>/results.md.")
    p.add_argument("config", help="eval config YAML (configs/eval/*.yaml)")
    p.add_argument("--checkpoint", help="deem checkpoint directory (DeemModel.save_pretrained)")
    p.add_argument("--benchmarks", help="comma-separated benchmark names (default: all of the config)")
    p.add_argument("--out", help="output directory (default: <checkpoint>/eval)")
    p.add_argument("--root", help="base directory of relative dataset paths (overrides the config's root)")
    p.add_argument("--tokenizer", help="tokenizer directory (overrides the config's tokenizer)")
    p.add_argument("--tokenizer-type", choices=("llama", "hf"), default="llama",
                   help="llama: Vicuna/LLaMA with pad 31999 (default); hf: a tokenizer with its own pad token")
    p.add_argument("--num-img-token", type=int, help="image tokens per image for --tokenizer (default 77 / 4)")
    p.add_argument("--resolution", type=int, help="encoder image size for every benchmark (e.g. 448)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the config's, auto)")
    p.add_argument("--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--rank", type=int, help="run one shard explicitly (with --world-size), without torchrun")
    p.add_argument("--world-size", type=int)
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions of these benchmarks")
    p.add_argument("--score-only", action="store_true", help="merge and score existing predictions, no model")
    p.set_defaults(func=_cmd_eval)
    return p


def _cmd_robustvqa(args: argparse.Namespace) -> int:
    from deem.eval.robustvqa import build_robustvqa

    _setup_logging()
    counts = build_robustvqa(args.imagenet_a, args.imagenet_r, args.imagenet_v2, args.out,
                             class_index=args.class_index, clip=args.clip, relative_to=args.relative_to,
                             keep=args.keep, prompt=args.prompt, batch_size=args.batch_size, device=args.device,
                             max_per_subset=args.max_per_subset)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _subparsers_of(parser: argparse.ArgumentParser | argparse._SubParsersAction) -> argparse._SubParsersAction:
    if isinstance(parser, argparse._SubParsersAction):
        return parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise TypeError("expected the `data` parser (with sub-commands) or its sub-parsers action")


def add_robustvqa_command(data: argparse.ArgumentParser | argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `robustvqa` under the existing `deem data` group (its parser, as `add_data_commands` returns it,
    or its sub-parsers action)."""
    from deem.eval.robustvqa import DEFAULT_PROMPT

    p = _subparsers_of(data).add_parser(
        "robustvqa", help="build the RobustVQA test file from local ImageNet-A/-R/-V2 folders",
        description="Zero-shot CLIP (local transformers directory) picks each image's hardest wrong class.")
    p.add_argument("--imagenet-a", help="ImageNet-A folder (<wnid>/<image>)")
    p.add_argument("--imagenet-r", help="ImageNet-R folder (<wnid>/<image>)")
    p.add_argument("--imagenet-v2", help="ImageNet-V2 folder (<class index>/<image>)")
    p.add_argument("--class-index", required=True, help="imagenet_class_index.json")
    p.add_argument("--clip", required=True, help="local transformers CLIP directory (e.g. clip-vit-large-patch14-336)")
    p.add_argument("--out", required=True, help="output JSON (e.g. datasets/robustvqa/robustvqa_test.json)")
    p.add_argument("--relative-to", default=".", help="file names are written relative to this directory")
    p.add_argument("--keep", choices=("all", "misclassified"), default="all")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-per-subset", type=int)
    p.set_defaults(func=_cmd_robustvqa)
    return p
