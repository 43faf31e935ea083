"""The evaluation engine behind `deem eval`: batched inference over every configured benchmark, on one or many
ranks, resumable, with the standard metrics.

    evaluate("configs/eval/vqa.yaml", "ckpt/", "out/")        # -> {benchmark: {metric: value}}

Ranks: rank r of W takes the samples with index r, r+W, ... (`EvalShardSampler`: no padding, no duplicates),
writes its predictions as atomic part files, and rank 0 merges every part exactly by sample id (first record
of an id wins), scores and writes the outputs. Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR) the process group
is initialised here and ranks exchange their records through it; shards run as separate calls with explicit
`rank`/`world_size` meet through the output directory (rank 0 merges whatever parts exist when it finishes).

Resumption: samples whose id is already in `predictions.json` or in a part file are skipped; a crash loses at
most the batches since the last flush (`save_every` batches / `save_interval_s` seconds). `run.json` records
what produced the predictions; a rerun with another checkpoint, dataset or generation setting is refused
unless `overwrite=True`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deem.data.errors import DataError
from deem.data.registry import build_collator, build_dataset
from deem.data.sharding import EvalShardSampler
from deem.data.tokenizer import DeemTokenizer
from deem.eval.config import BenchmarkConfig, EvalConfig, load_eval_config, normalise_generation
from deem.eval.distributed import Ranks, ranks_for
from deem.eval.errors import EvalError
from deem.eval.io import PartWriter, read_output, read_parts
from deem.eval.model import checkpoint_fingerprint, load_for_eval, resolve_device
from deem.eval.report import write_summary
from deem.eval.tasks import OPTION_SCORES, Context, record_ids, sample_id
from deem.infer import generate_texts
from deem.io import atomic_write_json

log = logging.getLogger("deem.eval")

ProgressFn = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------------ model


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _generation_kwargs(bench: BenchmarkConfig, collator: Any) -> dict[str, Any]:
    """The collator's settings (the spec's defaults per benchmark; a configured dict replaces them), then the
    benchmark's `generation` overrides. Settings left unset fall back to the model's defaults."""
    out = normalise_generation(dict(getattr(collator, "generation_kwargs", {}) or {}), bench.name)
    out.update(bench.generation)
    return out


@torch.no_grad()
def _run_batch(model: Any, tok: DeemTokenizer, batch: dict[str, Any], gen: dict[str, Any], bench: BenchmarkConfig
               ) -> list[Any]:
    """The model's outputs for a collated batch, of the kind's output type: decoded texts, or option scores."""
    if bench.kind.output == OPTION_SCORES:
        return _option_scores(model, batch, bench.name)
    n = batch["text_ids"].shape[0]
    if gen.get("num_beams", 5) == 1:  # no beams: a length penalty has no effect (and transformers warns)
        gen = {k: v for k, v in gen.items() if k != "length_penalty"}
    out = generate_texts(model, batch["text_ids"], batch["attention_mask"], batch["image_tensors"],
                         batch["num_image_per_seq"], batch.get("image_tensors_mask"), **gen)  # the inference engine
    if out.shape[0] != n:
        raise EvalError(f"{bench.name}: the model returned {out.shape[0]} sequences for {n} prompts")
    return [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in out]


def _option_scores(model: Any, batch: dict[str, Any], bench: str) -> list[list[float]]:
    """Per sample, the model's score of each answer option given the (unpadded) context and its one image."""
    if not bool((batch["num_image_per_seq"] == 1).all()):
        raise EvalError(f"{bench}: option scoring needs exactly one image per sample")
    mask = batch["attention_mask"].bool()
    contexts = [row[m].tolist() for row, m in zip(batch["text_ids"], mask)]
    options = [[o[om.bool()].tolist() for o, om in zip(opts, omask)]
               for opts, omask in zip(batch["options_ids"], batch["options_attention_mask"])]
    scores = model.generate_scores(contexts, options, batch["image_tensors"]).float().cpu()
    return [[float(s) if math.isfinite(float(s)) else -1e30 for s in row[: len(opts)]]
            for row, opts in zip(scores, options)]


# ------------------------------------------------------------------------------------------------ data


class _Indexed(torch.utils.data.Dataset):
    """(index, item) pairs, so the loop knows which requested samples an eval collator dropped."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, Any]:
        i = self.indices[k]
        return i, self.dataset[i]


class _Collate:
    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, pairs: list[tuple[int, Any]]) -> tuple[list[int], dict[str, Any] | None]:
        return [i for i, _ in pairs], self.collator([it for _, it in pairs])


# ------------------------------------------------------------------------------------------------ engine


@dataclass
class _Prepared:
    bench: BenchmarkConfig
    dataset: Any
    ids: list[str]
    ctx: Context
    fingerprint: dict[str, Any]
    collator: Any = None
    generation: dict[str, Any] = field(default_factory=dict)


def _prepare(bench: BenchmarkConfig, tok: DeemTokenizer | None, ranks: Ranks, base_fp: dict[str, Any]
             ) -> _Prepared:
    try:
        ds = build_dataset(bench.dataset, tok, rank=ranks.rank, world_size=ranks.world_size)
    except DataError as exc:
        raise EvalError(f"{bench.name}: {exc}") from exc
    ids = record_ids(ds, bench.name)
    prep = _Prepared(bench, ds, ids, Context(bench.name, bench.postprocess, vqa_metric=bench.vqa_metric), {})
    if tok is not None:
        try:
            prep.collator = build_collator(bench.dataset, tok)
        except DataError as exc:
            raise EvalError(f"{bench.name}: {exc}") from exc
        mode = getattr(prep.collator, "collate_mode", None)
        if mode not in bench.kind.modes:
            raise EvalError(f"{bench.name}: collator mode {mode!r} does not produce {bench.kind.name} predictions "
                            f"(expected {bench.kind.modes}); check `dataset.collator` / `metric`")
        prep.generation = _generation_kwargs(bench, prep.collator)
    if bench.kind.prepare is not None:
        bench.kind.prepare(bench.name, bench.dataset, prep.ctx)
    prep.fingerprint = {**base_fp, "benchmark": bench.name, "kind": bench.kind.name, "dataset": bench.dataset,
                        "generation": prep.generation, "postprocess": bench.postprocess}
    return prep


def _check_fingerprint(bdir: Path, fp: dict[str, Any], bench: str) -> None:
    path = bdir / "run.json"
    if path.is_file():
        old = read_output(path)
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        if diff:
            raise EvalError(f"{bench}: {bdir} holds predictions of another run (differs in {diff}); use another "
                            "output directory or overwrite=True (--overwrite) to discard them")
    else:
        atomic_write_json(path, fp, indent=2)


def _done_ids(bdir: Path) -> set[str]:
    # parts first: a part is deleted only after rank 0 merged it into predictions.json
    records, _, _ = read_parts(bdir / "parts")
    done = {str(r["id"]) for r in records}
    merged = bdir / "predictions.json"
    if merged.is_file():
        done.update(str(r["id"]) for r in read_output(merged))
    return done


def _infer(prep: _Prepared, model: Any, tok: DeemTokenizer, device: torch.device, ranks: Ranks, bdir: Path,
           save_interval_s: float, progress: ProgressFn | None) -> list[dict[str, Any]]:
    """Run this rank's remaining samples; returns the records produced (already flushed to part files)."""
    bench = prep.bench
    done = _done_ids(bdir)
    shard = list(EvalShardSampler(len(prep.dataset), ranks.rank, ranks.world_size))
    mine = [i for i in shard if prep.ids[i] not in done]
    total = len(mine)
    log.info("%s: rank %d/%d has %d samples to run (%d of its %d done before)", bench.name, ranks.rank,
             ranks.world_size, total, len(shard) - total, len(shard))
    if not mine:
        return []
    if bench.num_workers > 0:  # collators tokenise in forked workers
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = torch.utils.data.DataLoader(
        _Indexed(prep.dataset, mine), batch_size=bench.batch_size, shuffle=False, num_workers=bench.num_workers,
        collate_fn=_Collate(prep.collator), pin_memory=device.type == "cuda")
    writer = PartWriter(bdir / "parts", ranks.rank)
    produced: list[dict[str, Any]] = []
    since_flush, last_flush, seen = 0, time.monotonic(), 0
    try:
        for indices, batch in loader:
            seen += len(indices)
            kept: list[dict[str, Any]] = [] if batch is None else batch["meta"]["items"]
            for item in kept:
                expected = prep.ids[int(item["index"])]
                if sample_id(item) != expected:
                    raise EvalError(f"{bench.name}: item {item['index']} has id {sample_id(item)!r}, its record "
                                    f"{expected!r}: the dataset changed while running")
            records = []
            if kept:
                outputs = _run_batch(model, tok, _to(batch, device), prep.generation, bench)
                records = [bench.kind.record(item, out, prep.ctx) for item, out in zip(kept, outputs)]
            kept_idx = {int(it["index"]) for it in kept}
            failed = [prep.ids[i] for i in indices if i not in kept_idx]
            if failed:
                log.warning("%s: %d samples failed to load and are left for a rerun: %s", bench.name, len(failed),
                            failed[:5])
            writer.add(records, failed)
            produced.extend(records)
            since_flush += 1
            if since_flush >= bench.save_every or time.monotonic() - last_flush >= save_interval_s:
                writer.flush()
                since_flush, last_flush = 0, time.monotonic()
            if progress is not None:
                progress(bench.name, seen, total)
    finally:  # an exception (interrupt, bad batch) keeps every completed batch
        writer.flush()
    return produced


def _finalize(prep: _Prepared, bdir: Path, gathered: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge predictions.json, every part file and the gathered records exactly by id; score; write outputs."""
    bench = prep.bench
    merged_path = bdir / "predictions.json"
    previous = read_output(merged_path) if merged_path.is_file() else []
    part_records, failed, files = read_parts(bdir / "parts")
    by_id: dict[str, dict[str, Any]] = {}
    conflicts = 0
    for rec in [*previous, *part_records, *gathered]:
        rid = str(rec["id"])
        if rid in by_id:
            conflicts += by_id[rid] != rec
            continue
        by_id[rid] = rec
    if conflicts:
        log.warning("%s: %d samples were predicted more than once with different outputs; the first kept",
                    bench.name, conflicts)
    order = {rid: n for n, rid in enumerate(prep.ids)}
    stray = [rid for rid in by_id if rid not in order]
    if stray:
        log.warning("%s: %d predictions for ids not in the dataset dropped (e.g. %s)", bench.name, len(stray),
                    stray[:3])
    records = sorted((r for rid, r in by_id.items() if rid in order), key=lambda r: order[str(r["id"])])
    atomic_write_json(merged_path, records)
    for p in files:
        p.unlink(missing_ok=True)
    if (bdir / "parts").is_dir() and not any((bdir / "parts").iterdir()):
        (bdir / "parts").rmdir()
    missing = [rid for rid in prep.ids if rid not in by_id]
    failed_now = sorted(set(failed) & set(missing))
    if missing:
        log.warning("%s: %d of %d samples have no prediction (e.g. %s)%s", bench.name, len(missing), len(prep.ids),
                    missing[:3], f"; {len(failed_now)} failed to load" if failed_now else "")
    try:
        metrics: dict[str, Any] = dict(bench.kind.score(records, prep.ctx)) if records else {}
    except (ValueError, KeyError, RuntimeError) as exc:  # a malformed record or a failed scorer (Java)
        raise EvalError(f"{bench.name}: scoring {merged_path} failed: {type(exc).__name__}: {exc}") from exc
    metrics.update({"num_samples": len(records), "num_expected": len(prep.ids), "num_missing": len(missing),
                    "num_failed": len(failed_now)})
    atomic_write_json(bdir / "metrics.json", metrics, indent=2)
    return metrics


def evaluate(config: str | Path | dict[str, Any] | EvalConfig, checkpoint: str | Path | torch.nn.Module,
             out_dir: str | Path, *, benchmarks: Sequence[str] | None = None, root: str | Path | None = None,
             tokenizer: str | Path | dict[str, Any] | DeemTokenizer | None = None, rank: int | None = None,
             world_size: int | None = None, overwrite: bool = False, score_only: bool = False,
             resolution: int | None = None, device: str | None = None, dtype: str | None = None,
             progress: ProgressFn | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate a checkpoint (directory or an in-memory `DeemModel`) on the benchmarks of an eval config.

    Writes `<out_dir>/<benchmark>/{predictions,metrics,run}.json`, `<out_dir>/metrics.json` and
    `<out_dir>/results.md`; returns {benchmark: metrics} on the rank that scores (rank 0), {} elsewhere.
    `rank`/`world_size` run one shard explicitly (no process group); otherwise torchrun's environment is used.
    `score_only` merges and scores existing predictions without loading the model. `progress(benchmark,
    samples_done, samples_total)` is called after every batch."""
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config, root, resolution)
    selected = cfg.select(benchmarks)
    dev = resolve_device(device or cfg.device)
    ranks = ranks_for(rank, world_size, dev)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and ranks.rank == 0:
        for b in selected:
            shutil.rmtree(out / b.name, ignore_errors=True)
    ranks.barrier()

    was_training = isinstance(checkpoint, torch.nn.Module) and checkpoint.training
    try:
        tok, model, dev, dt = load_for_eval(cfg, selected, checkpoint, tokenizer, dev, dtype, score_only)
        base_fp = {**checkpoint_fingerprint(checkpoint), "dtype": str(dt).replace("torch.", ""),
                   "tokenizer": None if tok is None else tok.special.as_dict()}
        return _run_all(cfg, selected, checkpoint, model, tok, dev, ranks, out, base_fp, score_only, progress)
    finally:
        if was_training:
            checkpoint.train()


def _run_all(cfg: EvalConfig, selected: Sequence[BenchmarkConfig], checkpoint: Any, model: Any,
             tok: DeemTokenizer | None, dev: torch.device, ranks: Ranks, out: Path, base_fp: dict[str, Any],
             score_only: bool, progress: ProgressFn | None) -> dict[str, dict[str, Any]]:
    scored: dict[str, dict[str, Any]] = {}
    for bench in selected:
        bdir = out / bench.name
        prep = _prepare(bench, tok, ranks, base_fp)
        produced: list[dict[str, Any]] = []
        if not score_only:
            bdir.mkdir(parents=True, exist_ok=True)
            _check_fingerprint(bdir, prep.fingerprint, bench.name)
            produced = _infer(prep, model, tok, dev, ranks, bdir, cfg.save_interval_s, progress)
        gathered = ranks.gather(produced)
        if ranks.rank == 0:
            if score_only and not (bdir / "predictions.json").is_file() and not (bdir / "parts").is_dir():
                log.warning("%s: no predictions in %s, skipped", bench.name, bdir)
                continue
            metrics = _finalize(prep, bdir, [r for part in gathered for r in part])
            scored[bench.name] = {"kind": bench.kind.name, **metrics}
            log.info("%s: %s", bench.name, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    if ranks.rank == 0 and scored:
        write_summary(out, cfg, checkpoint_fingerprint(checkpoint)["checkpoint"], scored)
    ranks.barrier()
    return scored
