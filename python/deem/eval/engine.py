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

import copy
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from deem.data.errors import DataError
from deem.data.registry import build_collator, build_dataset, resolve_paths
from deem.data.sharding import EvalShardSampler
from deem.data.tokenizer import DeemTokenizer, load_tokenizer
from deem.eval.benchmarks import KINDS, Context, EvalError, Kind, kind_for, record_ids, sample_id, visdial_gt_indices
from deem.eval.io import PartWriter, atomic_write_json, atomic_write_text, read_json, read_parts
from deem.eval.vqa_metrics import VQA_METRICS
from deem.infer import generate_texts

log = logging.getLogger("deem.eval")

TOP_KEYS = {"root", "tokenizer", "device", "dtype", "batch_size", "num_workers", "save_every", "save_interval_s",
            "resolution", "benchmarks", "groups", "vqa_metric"}
BENCH_KEYS = {"name", "dataset", "metric", "batch_size", "generation", "postprocess", "num_workers", "save_every",
              "vqa_metric"}
GENERATION_KEYS = {"max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "do_sample", "top_p",
                   "temperature", "repetition_penalty"}
GENERATION_ALIASES = {"max_length": "max_new_tokens", "min_length": "min_new_tokens"}  # the original's names
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
ProgressFn = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------------ config


@dataclass
class BenchmarkConfig:
    """One benchmark: a dataset config (data-layer keys), its kind, batch size and generation overrides."""

    name: str
    dataset: dict[str, Any]
    kind: Kind
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


def _normalise_generation(gen: dict[str, Any] | None, where: str) -> dict[str, Any]:
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
        path = Path(config)
        if not path.is_file():
            raise EvalError(f"eval config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise EvalError(f"eval config {path} is not valid YAML: {exc}") from None
        source = str(path)
    if not isinstance(raw, dict):
        raise EvalError(f"eval config {source} must be a mapping")
    unknown = sorted(k for k in raw if k not in TOP_KEYS and not str(k).startswith("x-"))
    if unknown:
        raise EvalError(f"{source}: unknown keys {unknown}; known: {sorted(TOP_KEYS)}")
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
        bad = sorted(set(entry) - BENCH_KEYS)
        if bad:
            raise EvalError(f"{where}: unknown keys {bad}; known: {sorted(BENCH_KEYS)}")
        if not _NAME_RE.match(name) or name in seen:
            raise EvalError(f"{where}: names must be unique and use only letters, digits and _ . + -")
        seen.add(name)
        if not isinstance(entry["dataset"], dict) or "type" not in entry["dataset"]:
            raise EvalError(f"{where}: `dataset` must be a dataset config with a `type` (see docs/data.md)")
        dataset = resolve_paths({"name": name, **entry["dataset"]}, base)
        if resolution is not None:
            dataset["transform"] = {**(dataset.get("transform") or {}), "resolution": int(resolution)}
        kind = kind_for(dataset, entry.get("metric"), name)
        post = entry.get("postprocess")
        if post is not None and post not in kind.postprocess:
            raise EvalError(f"{where}: postprocess {post!r} not available for {kind.name} "
                            f"(choose from {list(kind.postprocess) or 'none'})")
        if "vqa_metric" in entry and kind.name != "vqa":
            raise EvalError(f"{where}: vqa_metric applies to VQAv2-style benchmarks (kind vqa), not {kind.name}")
        benches.append(BenchmarkConfig(
            name=name, dataset=dataset, kind=kind,
            batch_size=int(entry.get("batch_size", defaults["batch_size"])),
            generation=_normalise_generation(entry.get("generation"), where), postprocess=post,
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


# ------------------------------------------------------------------------------------------------ ranks


@dataclass
class _Ranks:
    rank: int
    world_size: int
    distributed: bool  # torch.distributed carries the records / barriers

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def _ranks(rank: int | None, world_size: int | None, device: torch.device | None) -> _Ranks:
    if rank is not None or world_size is not None:
        rank, world_size = int(rank or 0), int(world_size or 1)
        if not 0 <= rank < world_size:
            raise EvalError(f"rank {rank} outside world of size {world_size}")
        return _Ranks(rank, world_size, False)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return _Ranks(dist.get_rank(), dist.get_world_size(), dist.get_world_size() > 1)
    ws = int(os.environ.get("WORLD_SIZE", 1))
    if ws > 1:
        if not dist.is_available() or "MASTER_ADDR" not in os.environ:
            raise EvalError("WORLD_SIZE > 1 but no torch.distributed rendezvous (launch with torchrun, or pass "
                            "explicit rank/world_size to run shards separately)")
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        return _Ranks(dist.get_rank(), dist.get_world_size(), True)
    return _Ranks(0, 1, False)


# ------------------------------------------------------------------------------------------------ model


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise EvalError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from exc


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        dt = getattr(torch, name)
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype):
        raise EvalError(f"unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return dt


def _checkpoint_fingerprint(checkpoint: Any) -> dict[str, Any]:
    if checkpoint is None:
        return {"checkpoint": None}
    if not isinstance(checkpoint, (str, Path)):
        return {"checkpoint": "in-memory model"}
    path = Path(checkpoint).resolve()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json")) if path.is_dir() else []
    return {"checkpoint": str(path),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _load_model(checkpoint: Any, device: torch.device, dtype: torch.dtype):
    from deem.models import DeemModel

    if isinstance(checkpoint, torch.nn.Module):
        return checkpoint.eval()
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise EvalError(f"checkpoint {path} is not a deem checkpoint directory (no config.json; save one with "
                        "DeemModel.save_pretrained)")
    model = DeemModel.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def _check_compatible(model: Any, tok: DeemTokenizer, benches: Sequence[BenchmarkConfig]) -> None:
    cfg = model.config
    sp_tok = tok.special.as_dict()
    bad = {k: (v, sp_tok[k]) for k, v in cfg.special_tokens.items() if k in sp_tok and sp_tok[k] != v}
    if bad:
        raise EvalError(f"tokenizer and checkpoint disagree on special token ids (model, tokenizer): {bad}")
    if len(tok.hf) > cfg.text_vocab_size:
        raise EvalError(f"tokenizer has {len(tok.hf)} tokens, the checkpoint's vocabulary {cfg.text_vocab_size}")
    if tok.num_img_token != cfg.num_img_token:
        raise EvalError(f"tokenizer num_img_token {tok.num_img_token} != checkpoint num_img_token "
                        f"{cfg.num_img_token} (set tokenizer.num_img_token in the eval config)")
    size = (getattr(cfg, "image_encoder", None) or {}).get("image_size")
    for b in benches:
        res = (b.dataset.get("transform") or {}).get("resolution")
        if size is not None and res is not None and int(res) != int(size):
            raise EvalError(f"{b.name}: images are resized to {res} px but the checkpoint's image encoder expects "
                            f"{size} (set `resolution:` in the eval config or --resolution)")


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _generation_kwargs(bench: BenchmarkConfig, collator: Any) -> dict[str, Any]:
    """The collator's settings (the spec's defaults per benchmark; a configured dict replaces them), then the
    benchmark's `generation` overrides. Settings left unset fall back to the model's defaults."""
    out = _normalise_generation(dict(getattr(collator, "generation_kwargs", {}) or {}), bench.name)
    out.update(bench.generation)
    return out


@torch.no_grad()
def _run_batch(model: Any, tok: DeemTokenizer, batch: dict[str, Any], gen: dict[str, Any], bench: str) -> list[Any]:
    """Model outputs for a collated batch: decoded texts, or option scores (VisDial)."""
    n = batch["text_ids"].shape[0]
    if batch.get("collate_mode") == "generate_scores":
        if not bool((batch["num_image_per_seq"] == 1).all()):
            raise EvalError(f"{bench}: option scoring needs exactly one image per sample")
        mask = batch["attention_mask"].bool()
        contexts = [row[m].tolist() for row, m in zip(batch["text_ids"], mask)]
        options = [[o[om.bool()].tolist() for o, om in zip(opts, omask)]
                   for opts, omask in zip(batch["options_ids"], batch["options_attention_mask"])]
        scores = model.generate_scores(contexts, options, batch["image_tensors"]).float().cpu()
        return [[float(s) if math.isfinite(float(s)) else -1e30 for s in row[: len(opts)]]
                for row, opts in zip(scores, options)]
    if gen.get("num_beams", 5) == 1:  # no beams: a length penalty has no effect (and transformers warns)
        gen = {k: v for k, v in gen.items() if k != "length_penalty"}
    out = generate_texts(model, batch["text_ids"], batch["attention_mask"], batch["image_tensors"],
                         batch["num_image_per_seq"], batch.get("image_tensors_mask"), **gen)  # the inference engine
    if out.shape[0] != n:
        raise EvalError(f"{bench}: the model returned {out.shape[0]} sequences for {n} prompts")
    return [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in out]


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


def _prepare(bench: BenchmarkConfig, tok: DeemTokenizer | None, ranks: _Ranks, base_fp: dict[str, Any]
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
    if bench.kind.name == "visdial":
        if "dialogs" not in bench.dataset:
            raise EvalError(f"{bench.name}: VisDial metrics need the dataset's `dialogs` file")
        prep.ctx.visdial_gt_index = visdial_gt_indices(bench.dataset["dialogs"])
    prep.fingerprint = {**base_fp, "benchmark": bench.name, "kind": bench.kind.name, "dataset": bench.dataset,
                        "generation": prep.generation, "postprocess": bench.postprocess}
    return prep


def _check_fingerprint(bdir: Path, fp: dict[str, Any], bench: str) -> None:
    path = bdir / "run.json"
    if path.is_file():
        old = read_json(path)
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
        done.update(str(r["id"]) for r in read_json(merged))
    return done


def _infer(prep: _Prepared, model: Any, tok: DeemTokenizer, device: torch.device, ranks: _Ranks, bdir: Path,
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
                outputs = _run_batch(model, tok, _to(batch, device), prep.generation, bench.name)
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
    previous = read_json(merged_path) if merged_path.is_file() else []
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


def _group_metrics(groups: dict[str, dict[str, Any]], scored: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
        head = KINDS[kind].headline if kind in KINDS else ()
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


def _write_summary(out: Path, cfg: EvalConfig, checkpoint: Any, scored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    path = out / "metrics.json"
    summary = read_json(path) if path.is_file() else {}
    benches = dict(summary.get("benchmarks", {}))
    benches.update(scored)
    summary = {"checkpoint": _checkpoint_fingerprint(checkpoint)["checkpoint"] or summary.get("checkpoint"),
               "config": cfg.source,
               "benchmarks": benches, "groups": _group_metrics(cfg.groups, benches),
               "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(path, summary, indent=2)
    atomic_write_text(out / "results.md", results_table(summary))
    return summary


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
    dev = _device(device or cfg.device)
    ranks = _ranks(rank, world_size, dev)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and ranks.rank == 0:
        for b in selected:
            shutil.rmtree(out / b.name, ignore_errors=True)
    ranks.barrier()

    was_training = isinstance(checkpoint, torch.nn.Module) and checkpoint.training
    try:
        tok, model, dev, dt = _load(cfg, selected, checkpoint, tokenizer, dev, dtype, score_only)
        base_fp = {**_checkpoint_fingerprint(checkpoint), "dtype": str(dt).replace("torch.", ""),
                   "tokenizer": None if tok is None else tok.special.as_dict()}
        return _run_all(cfg, selected, checkpoint, model, tok, dev, ranks, out, base_fp, score_only, progress)
    finally:
        if was_training:
            checkpoint.train()


def _load(cfg: EvalConfig, selected: Sequence[BenchmarkConfig], checkpoint: Any, tokenizer: Any, dev: torch.device,
          dtype: str | None, score_only: bool) -> tuple[DeemTokenizer | None, Any, torch.device, torch.dtype]:
    """Tokenizer and model (none of them with `score_only`); an in-memory model keeps its device and dtype."""
    dt = _dtype(dtype or cfg.dtype, dev)
    if score_only:
        return None, None, dev, dt
    if isinstance(tokenizer, DeemTokenizer):
        tok = tokenizer
    else:
        tok_cfg = tokenizer if tokenizer is not None else cfg.tokenizer
        if tok_cfg is None:
            raise EvalError(f"{cfg.source}: no tokenizer configured (set `tokenizer:` or pass --tokenizer)")
        try:
            tok = load_tokenizer(tok_cfg)
        except DataError as exc:
            raise EvalError(f"tokenizer: {exc}") from exc
    if isinstance(checkpoint, torch.nn.Module):
        tensor = next(iter(checkpoint.parameters()), None)
        if tensor is not None:
            dev, dt = tensor.device, tensor.dtype
    model = _load_model(checkpoint, dev, dt)
    _check_compatible(model, tok, selected)
    return tok, model, dev, dt


def _run_all(cfg: EvalConfig, selected: Sequence[BenchmarkConfig], checkpoint: Any, model: Any,
             tok: DeemTokenizer | None, dev: torch.device, ranks: _Ranks, out: Path, base_fp: dict[str, Any],
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
        _write_summary(out, cfg, checkpoint, scored)
    ranks.barrier()
    return scored
