"""Config -> datasets and collators. A dataset config is a plain dict (or YAML mapping) whose `type` selects
the reader; `build_dataset(cfg)` and `build_collator(cfg, tokenizer)` are the only entry points the trainer
and evaluator need. Unknown keys are rejected so that typos do not pass silently."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from deem.data import collators as C
from deem.data.captions import build_caption_dataset
from deem.data.errors import BadSampleTracker, DataError
from deem.data.grounding import build_grounding_dataset
from deem.data.images import DEFAULT_MAX_IMAGE_PIXELS, DualViewTransform
from deem.data.interleaved import MMC4_MISSING_SHARDS, InterleavedStream, LaionSource, MixedStream, MMC4Source
from deem.data.records import RecordDataset
from deem.data.referring import PREAMBLES, build_referring_dataset
from deem.data.tokenizer import DeemTokenizer, load_tokenizer
from deem.data.visdial import build_visdial_dataset
from deem.data.vqa import QA_TYPES, build_qa_dataset

COMMON_KEYS = {"type", "name", "transform", "seed", "max_bad_fraction", "min_bad_samples", "collator", "eval",
               "prompts", "max_image_pixels"}
CAPTION_TYPES = {"coco_karpathy", "coco_captions", "image2paragraph", "flickr30k_grounded", "textcaps", "lncoco"}
GROUNDING_TYPES = {"refcoco", "vg_regions", "refcoco_grounding_eval"}
REFERRING_TYPES = {*PREAMBLES, "refcocog_referring_eval"}
STREAM_TYPES = {"mmc4", "laion"}
KNOWN_KEYS: dict[str, set[str]] = {
    **{t: {"annotation", "image_root", "lowercase", "split_file", "test_file"} for t in CAPTION_TYPES},
    **{t: {"questions", "annotations", "annotation", "image_root", "image_prefix", "subset"} for t in QA_TYPES},
    "refcoco": {"refs", "instances", "image_root", "split", "image_prefix", "random_flip", "random_resize_crop_prob"},
    "vg_regions": {"regions", "image_data", "image_root", "max_area", "random_flip", "random_resize_crop_prob"},
    "refcoco_grounding_eval": {"annotation", "image_root", "max_samples"},
    **{t: {"annotation", "image_root", "max_regions", "preamble"} for t in REFERRING_TYPES},
    "visdial": {"dialogs", "dense_annotations", "image_root", "image_pattern"},
    "mmc4": {"annotation_root", "shards", "image_root", "sim_threshold", "max_num_images", "img_first_prob",
             "single_image_drop_prob", "exclude_shard_ids", "max_doc_tokens", "seq_len", "max_images", "batch_size",
             "shuffle_buffer", "ignore_noimage_cond_loss", "tokenizer"},
    "laion": {"data_root", "shards", "img_first_prob", "seq_len", "max_images", "batch_size", "shuffle_buffer",
              "ignore_noimage_cond_loss", "tokenizer"},
    "random_mix": {"datasets", "probs", "sampling_type", "tokenizer"},
    "concat": {"datasets", "weights", "length"},
}


def _check_keys(cfg: dict[str, Any]) -> None:
    kind = cfg.get("type")
    if kind not in KNOWN_KEYS:
        raise DataError(f"unknown dataset type {kind!r}; known: {sorted(KNOWN_KEYS)}")
    unknown = sorted(set(cfg) - COMMON_KEYS - KNOWN_KEYS[kind])
    if unknown:
        raise DataError(f"dataset {cfg.get('name', kind)!r} (type {kind}): unknown keys {unknown}")


def max_image_pixels(cfg: dict[str, Any]) -> int | None:
    """The dataset's pixel limit: `max_image_pixels` (0 or null: no limit of ours, Pillow's bomb guard stays),
    default `DEFAULT_MAX_IMAGE_PIXELS`."""
    value = cfg.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise DataError(f"dataset {cfg.get('name', cfg.get('type'))!r}: max_image_pixels must be a pixel count >= 0 "
                        f"or null, got {value!r}")
    return int(value) or None


def _inherit(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """A child dataset of concat / random_mix takes the parent's pixel limit unless it sets its own."""
    if "max_image_pixels" in parent and isinstance(child, dict) and "max_image_pixels" not in child:
        return {**child, "max_image_pixels": parent["max_image_pixels"]}
    return child


def _tracker(cfg: dict[str, Any]) -> BadSampleTracker:
    return BadSampleTracker(cfg.get("name", cfg["type"]), max_bad_fraction=float(cfg.get("max_bad_fraction", 0.05)),
                            min_samples=int(cfg.get("min_bad_samples", 20)))


class MixtureDataset(Dataset):
    """Map-style weighted mixture: item i picks a dataset by weight, then a uniform item of it, from a generator
    seeded with (seed, epoch, i) (the original's WeightedConcatDataset bug, spec §5.2, is not reproduced).
    `weights="sqrt"` weighs by sqrt(len), `"size"` by len (plain concatenation statistics)."""

    def __init__(self, datasets: Sequence[Dataset], weights: str | Sequence[float] = "size", seed: int = 0,
                 length: int | None = None, name: str = "concat"):
        if not datasets:
            raise DataError("concat needs at least one dataset")
        sizes = np.array([len(d) for d in datasets], dtype=float)
        if isinstance(weights, str):
            if weights not in ("sqrt", "size"):
                raise DataError(f"concat weights must be 'sqrt', 'size' or a list, got {weights!r}")
            w = np.sqrt(sizes) if weights == "sqrt" else sizes
        else:
            if len(weights) != len(datasets):
                raise DataError(f"{len(weights)} weights for {len(datasets)} datasets")
            w = np.asarray(weights, dtype=float)
        self.datasets, self.p = list(datasets), w / w.sum()
        self.length = int(length) if length else int(sizes.sum())
        self.seed, self.epoch, self.name = int(seed), 0, name

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        d = int(rng.choice(len(self.datasets), p=self.p))
        return self.datasets[d][int(rng.integers(len(self.datasets[d])))]


def _tokenizer_for(cfg: dict[str, Any], tokenizer: DeemTokenizer | None) -> DeemTokenizer:
    if tokenizer is not None:
        return tokenizer
    if "tokenizer" in cfg:
        return load_tokenizer(cfg["tokenizer"])
    raise DataError(f"dataset {cfg.get('name', cfg['type'])!r} needs a tokenizer (pass one or set `tokenizer:`)")


def _build_stream(cfg, tokenizer, transform, rank, world_size) -> InterleavedStream:
    tracker, name = _tracker(cfg), cfg.get("name", cfg["type"])
    seq_len = int(cfg.get("seq_len", 2048))
    if cfg["type"] == "mmc4":
        source = MMC4Source(name, cfg["annotation_root"], cfg["shards"], cfg["image_root"], tokenizer, tracker,
                            sim_threshold=float(cfg.get("sim_threshold", 0.24)),
                            max_num_images=int(cfg.get("max_num_images", 6)),
                            img_first_prob=float(cfg.get("img_first_prob", 0.5)),
                            single_image_drop_prob=float(cfg.get("single_image_drop_prob", 0.5)),
                            exclude_shard_ids=cfg.get("exclude_shard_ids", MMC4_MISSING_SHARDS),
                            max_doc_tokens=cfg.get("max_doc_tokens"), max_image_pixels=max_image_pixels(cfg))
    else:
        source = LaionSource(name, cfg["data_root"], cfg["shards"], tokenizer, tracker,
                             img_first_prob=float(cfg.get("img_first_prob", 0.5)), seq_len=seq_len,
                             max_image_pixels=max_image_pixels(cfg))
    return InterleavedStream(source, tokenizer, transform, seq_len=seq_len, max_images=int(cfg.get("max_images", 15)),
                             batch_size=int(cfg.get("batch_size", 4)), seed=int(cfg.get("seed", 0)), rank=rank,
                             world_size=world_size, shuffle_buffer=int(cfg.get("shuffle_buffer", 1000)),
                             ignore_noimage_cond_loss=bool(cfg.get("ignore_noimage_cond_loss", False)))


def build_dataset(cfg: dict[str, Any], tokenizer: DeemTokenizer | None = None, rank: int | None = None,
                  world_size: int | None = None, root: str | Path | None = None) -> Any:
    """Build the dataset a config describes (see configs/data/ and docs/data.md).

    Map-style readers return a `torch.utils.data.Dataset` of item dicts (use with `build_collator`); `mmc4`,
    `laion` and `random_mix` return an `IterableDataset` of ready batches (use `DataLoader(batch_size=None)`);
    only these need the tokenizer. `root` resolves relative paths in the config."""
    cfg = resolve_paths(cfg, root) if root is not None else dict(cfg)
    _check_keys(cfg)
    kind = cfg["type"]
    if kind == "concat":
        parts = [build_dataset(_inherit(cfg, c), tokenizer, rank, world_size) for c in cfg["datasets"]]
        return MixtureDataset(parts, cfg.get("weights", "size"), seed=int(cfg.get("seed", 0)),
                              length=cfg.get("length"), name=cfg.get("name", "concat"))
    if kind == "random_mix":
        tok = _tokenizer_for(cfg, tokenizer)
        streams = [build_dataset(_inherit(cfg, c), tok, rank, world_size) for c in cfg["datasets"]]
        return MixedStream(streams, cfg.get("probs", [1.0] * len(streams)), cfg.get("sampling_type", "longest"),
                           seed=int(cfg.get("seed", 0)), rank=rank, world_size=world_size)
    transform = DualViewTransform.from_config(cfg.get("transform"))
    if kind in STREAM_TYPES:
        return _build_stream(cfg, _tokenizer_for(cfg, tokenizer), transform, rank, world_size)
    tracker, limit = _tracker(cfg), max_image_pixels(cfg)
    if kind in CAPTION_TYPES:
        ds = build_caption_dataset(cfg, transform, tracker)
    elif kind in QA_TYPES:
        ds = build_qa_dataset(cfg, transform, tracker)
    elif kind in GROUNDING_TYPES:
        ds = build_grounding_dataset(cfg, transform, tracker)
    elif kind in REFERRING_TYPES:
        ds = build_referring_dataset(cfg, transform, tracker)
    else:
        ds = build_visdial_dataset(cfg, transform, tracker)
    if isinstance(ds, RecordDataset):
        ds.max_image_pixels = limit
    return ds


def trackers_of(ds: Any) -> list[BadSampleTracker]:
    """Every bad-sample tracker of a built dataset (readers, mixtures, streams)."""
    if hasattr(ds, "trackers"):
        return list(ds.trackers())
    found = [ds.tracker] if isinstance(getattr(ds, "tracker", None), BadSampleTracker) else []
    for child in getattr(ds, "datasets", []):
        found += trackers_of(child)
    return list({id(t): t for t in found}.values())


COLLATORS: dict[str, Callable[..., C.BaseCollator]] = {
    "caption_train": C.CaptionTrainCollator,
    "vqa_train": C.VQATrainCollator,
    "grounding_train": C.GroundingTrainCollator,
    "referring_train": C.ReferringTrainCollator,
    "caption_eval": C.CaptionEvalCollator,
    "vqa_eval": C.VQAEvalCollator,
    "yesno_eval": C.YesNoEvalCollator,
    "grounding_eval": C.GroundingEvalCollator,
    "referring_eval": C.ReferringEvalCollator,
    "score_eval": C.ScoreEvalCollator,
}


def build_collator(cfg: dict[str, Any] | str, tokenizer: DeemTokenizer) -> C.BaseCollator | None:
    """The collator of a dataset config (its `collator` entry: a type name or {type, ...options}) or of a
    collator config itself. Streams (`mmc4`, `laion`, `random_mix`) batch themselves: returns None."""
    if isinstance(cfg, dict) and cfg.get("type") in (*STREAM_TYPES, "random_mix"):
        return None
    if isinstance(cfg, dict) and "collator" in cfg:
        col = cfg["collator"]
        col = {"type": col} if isinstance(col, str) else dict(col)
        if "prompts" in cfg and "prompts" not in col:
            col["prompts"] = cfg["prompts"]
        col.setdefault("seed", cfg.get("seed", 0))
    elif isinstance(cfg, str):
        col = {"type": cfg}
    else:
        col = dict(cfg)
    kind = col.pop("type", None)
    if kind not in COLLATORS:
        raise DataError(f"unknown collator {kind!r}; known: {sorted(COLLATORS)}")
    try:
        return COLLATORS[kind](tokenizer, **col)
    except TypeError as exc:
        raise DataError(f"collator {kind}: bad options {sorted(col)}: {exc}") from None


PATH_KEYS = {"annotation", "image_root", "questions", "annotations", "split_file", "test_file", "refs", "instances",
             "regions", "image_data", "dialogs", "dense_annotations", "annotation_root", "data_root", "path",
             "corpus_file"}


def resolve_paths(cfg: Any, root: str | Path) -> Any:
    """Make every relative path-valued entry of a (nested) config relative to `root`."""
    if isinstance(cfg, dict):
        out = {}
        for k, v in cfg.items():
            if k in PATH_KEYS and isinstance(v, str) and not Path(v).is_absolute():
                out[k] = str(Path(root) / v)
            elif k == "image_root" and isinstance(v, list):
                out[k] = [str(Path(root) / x) if not Path(x).is_absolute() else x for x in v]
            else:
                out[k] = resolve_paths(v, root)
        return out
    if isinstance(cfg, list):
        return [resolve_paths(v, root) for v in cfg]
    return cfg
