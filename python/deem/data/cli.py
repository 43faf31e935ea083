"""`deem data ...` commands: `synth OUT_DIR` writes the shapes world, `inspect CONFIG` describes a data config
(`--all`: reads every sample and prints per-source counts). Data configs: `deem.data.config`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from deem.data.config import load_data_config
from deem.data.errors import DataError, NoValidSamples
from deem.data.labels import IGNORE_INDEX
from deem.data.registry import build_collator, build_dataset, trackers_of
from deem.data.tokenizer import DeemTokenizer, load_tokenizer


def _entries(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for split in ("train", "eval"):
        value = cfg.get(split)
        for entry in value if isinstance(value, list) else [value] if value else []:
            out.append((split, entry))
    return out


def _describe_batch(batch: dict[str, Any], tok: DeemTokenizer, rows: int) -> list[str]:
    lines = []
    ids, mask = batch["text_ids"], batch["attention_mask"]
    for b in range(min(rows, ids.shape[0])):
        real = ids[b][mask[b].bool()].tolist()
        lines.append(f"    [{b}] text ({len(real)} tokens): {tok.decode_compact(real)!r}")
        if "gt_text_ids" in batch:
            target = [t for t in batch["gt_text_ids"][b].tolist() if t != IGNORE_INDEX]
            lines.append(f"        trained ({len(target)} tokens): {tok.decode_compact(target)!r}")
    lines.append(f"    image_tensors {tuple(batch['image_tensors'].shape)}, image_tensors_dec "
                 f"{tuple(batch['image_tensors_dec'].shape)}, num_image_per_seq {batch['num_image_per_seq'].tolist()}")
    m = batch.get("image_tensors_mask")
    if m is not None:
        cover = [round(float(x), 3) for x in m.flatten(1).mean(1)]
        lines.append(f"    image_tensors_mask {tuple(m.shape)}, mask coverage per image {cover}")
    extras = {k: v for k, v in batch.items() if k in ("loss_img_weight", "loss_txt_weight", "collate_mode",
                                                         "generation_kwargs") and v is not None}
    if extras:
        lines.append(f"    {json.dumps(extras)}")
    items = batch.get("meta", {}).get("items")
    if items:
        keep = ("question", "answer", "answers", "caption", "references", "sentence", "box_text", "gt_box",
                "question_id", "image_id", "id")
        lines.append(f"    meta[0]: { {k: items[0][k] for k in keep if k in items[0]} }")
    return lines


def inspect(config: str | Path | dict[str, Any], num_samples: int = 2, root: str | Path | None = None) -> str:
    """Build every dataset of a data config and return a report: sizes, then `num_samples` decoded samples
    per dataset (text with image placeholders, trained tokens, image/mask shapes)."""
    cfg = load_data_config(config, root)
    if "tokenizer" not in cfg:
        raise DataError("data config has no `tokenizer` entry")
    tok = load_tokenizer(cfg["tokenizer"])
    sp = tok.special
    out = [f"tokenizer: {len(tok.hf)} tokens, special ids {sp.as_dict()}, {tok.num_img_token} image tokens/image"]
    for split, entry in _entries(cfg):
        ds = build_dataset(entry, tok, rank=0, world_size=1)
        name = entry.get("name", entry["type"])
        collator = build_collator(entry, tok)
        if collator is None:  # a stream of ready batches
            shards = sum(len(s.source.shards) for s in getattr(ds, "streams", [ds]))
            out.append(f"[{split}] {name} ({entry['type']}): stream over {shards} shards")
            batch = next(iter(ds), None)
            if batch is None:
                out.append("    (no batch: too little data for one packed batch)")
                continue
        else:
            out.append(f"[{split}] {name} ({entry['type']}): {len(ds)} items, collator {type(collator).__name__}")
            batch = collator([ds[i] for i in range(min(num_samples, len(ds)))])
            if batch is None:
                out.append("    (every inspected item failed to load)")
                out.extend(_tracker_lines(ds))
                continue
        out.extend(_describe_batch(batch, tok, num_samples))
        out.extend(_tracker_lines(ds))
    return "\n".join(out)


def inspect_all(config: str | Path | dict[str, Any], root: str | Path | None = None
                ) -> tuple[str, dict[str, dict[str, Any]]]:
    """Read every sample of every dataset of a data config (records, documents, images, with the training
    checks: pixel limit, UTF-8, ...). Returns the report (a per-source table: samples read, good, skipped by
    reason) and the counts per source."""
    from deem.data.survey import format_table, survey

    cfg = load_data_config(config, root)
    if "tokenizer" not in cfg:
        raise DataError("data config has no `tokenizer` entry")
    tok = load_tokenizer(cfg["tokenizer"])
    rows, counts = [], {}
    for split, entry in _entries(cfg):
        for name, c in survey(build_dataset(entry, tok, rank=0, world_size=1)).items():
            rows.append((split, name, c))
            counts[f"{split}/{name}"] = c
    return "\n".join(format_table(rows)), counts


def _tracker_lines(ds: Any) -> list[str]:
    lines = []
    for t in trackers_of(ds):
        if t.bad:
            lines.append(f"    skipped {t.bad} of {t.seen} samples of {t.name}: {t.reasons}; last: {t.last_errors[-1]}")
    return lines


def _cmd_synth(args: argparse.Namespace) -> int:
    from deem.data.synth import synth_world

    summary = synth_world(args.out_dir, seed=args.seed, image_size=args.image_size, num_train=args.num_train,
                          num_test=args.num_test)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    if not args.all:
        print(inspect(args.config, num_samples=args.num_samples, root=args.root))
        return 0
    report, counts = inspect_all(args.config, root=args.root)
    print(report, flush=True)
    empty = [name for name, c in counts.items() if c["good"] == 0]
    if empty:
        raise NoValidSamples(f"{len(empty)} source(s) without a single valid sample: {', '.join(empty)}")
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data synth` and `data inspect` on the `deem` command's subparsers."""
    data = subparsers.add_parser("data", help="datasets: synthetic world, inspection")
    sub = data.add_subparsers(dest="data_command", required=True)
    synth = sub.add_parser("synth", help="write the synthetic shapes world in the real dataset formats")
    synth.add_argument("out_dir")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=96)
    synth.add_argument("--num-train", type=int, default=120)
    synth.add_argument("--num-test", type=int, default=40)
    synth.set_defaults(func=_cmd_synth)
    insp = sub.add_parser("inspect", help="print dataset sizes and decoded samples of a data config")
    insp.add_argument("config")
    insp.add_argument("--root", default=None, help="base directory of relative paths in the config")
    insp.add_argument("--num-samples", type=int, default=2)
    insp.add_argument("--all", action="store_true",
                      help="read every sample of every source and print a per-source table of good and skipped ones")
    insp.set_defaults(func=_cmd_inspect)
    return data
