"""Stage-1 interleaved pre-training streams: MMC4 documents (jsonl inside zip shards) and LAION/BLIP image-text
pairs (webdataset tars), packed into fixed-length sequences, batched, mixed by probability.

Streams are deterministic functions of (seed, epoch, rank, worker): shards are shuffled per epoch and split
over ranks x DataLoader workers (or samples are, when there are fewer shards than consumers), samples go
through a seeded shuffle buffer, and every random choice uses seeded generators. A resumable position is
the number of batches each consumer has delivered: `load_state_dict` replays that many batches without
transforming their images.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset

from deem.data.errors import BadSampleTracker, CountDeltas, DataError, NoValidSamples, SampleError
from deem.data.images import DEFAULT_MAX_IMAGE_PIXELS, DualViewTransform, load_image
from deem.data.labels import build_labels, nearest_bos_indices, pad_sequences
from deem.data.packing import Document, PackedSequence, SequencePacker
from deem.data.sharding import consumer_of, default_rank_world, shuffle_buffer, shuffled, split_samples, split_shards
from deem.data.text import decode_utf8, jsonl_records
from deem.data.tokenizer import DeemTokenizer

logger = logging.getLogger("deem.data")

# MMC4 shards that do not exist upstream (spec §1.1); they are removed from the real shard list.
MMC4_MISSING_SHARDS = (3218, 3267, 5064, 5146, 7119, 8991, 9750, 11899, 15127, 15252, 16996, 17369, 17499, 17818)


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return [s for p in patterns for s in braceexpand(p)]


class MMC4Source:
    """MMC4 documents: `<root>/<shard>.zip` holding the member `<shard>` (JSON lines with `text_list`,
    `image_info` [{image_name, matched_text_index, matched_sim}] and `similarity_matrix`); images are
    `<image_root>/<image_name[:12]>.jpg`."""

    level = "image"

    def __init__(self, name: str, annotation_root: str | Path, shards: str | Sequence[str], image_root: str | Path,
                 tokenizer: DeemTokenizer, tracker: BadSampleTracker, sim_threshold: float = 0.24,
                 max_num_images: int = 6, img_first_prob: float = 0.5, single_image_drop_prob: float = 0.5,
                 exclude_shard_ids: Sequence[int] = MMC4_MISSING_SHARDS, max_doc_tokens: int | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.name, self.root, self.image_root = name, Path(annotation_root), Path(image_root)
        self.max_image_pixels = max_image_pixels
        self.tok, self.tracker = tokenizer, tracker
        self.sim_threshold, self.max_num_images = sim_threshold, max_num_images
        self.img_first_prob, self.single_image_drop_prob = img_first_prob, single_image_drop_prob
        self.max_doc_tokens = max_doc_tokens
        excluded = {f"_shard_{i}_" for i in exclude_shard_ids}
        listed = [s for s in expand_shards(shards) if not any(e in s for e in excluded)]
        self.shards = [s for s in listed if (self.root / f"{s}.zip").is_file()]
        missing = len(listed) - len(self.shards)
        if missing:
            logger.warning("%s: %d of %d listed shards are missing under %s and are skipped", name, missing,
                           len(listed), self.root)
        if not self.shards:
            raise DataError(f"{name}: none of the {len(listed)} listed shards exist under {self.root}")

    def records(self, shard: str) -> Iterator[tuple[str, Any]]:
        path = self.root / f"{shard}.zip"
        try:
            with zipfile.ZipFile(path) as zf, zf.open(shard) as f:
                for item in jsonl_records(f, f"{path}:{shard}", key_prefix=f"{shard}:"):
                    if isinstance(item, SampleError):
                        self.tracker.record_bad(item)
                    else:
                        yield item
        except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error, NotImplementedError) as exc:
            self.tracker.record_bad(SampleError(str(path), shard, f"unreadable shard: {exc}"))

    def document(self, key: str, doc: Any, rng: np.random.Generator) -> Document | None:
        try:
            texts = [str(t) for t in doc["text_list"]]
            infos = list(zip(doc["image_info"], doc["similarity_matrix"]))
            candidates = [(info["image_name"], int(info["matched_text_index"]), float(info["matched_sim"]))
                          for info, _ in infos]
        except (KeyError, TypeError, ValueError) as exc:
            raise SampleError(self.name, key, f"malformed record: {type(exc).__name__}: {exc}") from None
        kept, failed = [], []
        for image_name, idx, sim in candidates:
            if sim < self.sim_threshold:
                continue
            if not 0 <= idx < len(texts):
                raise SampleError(self.name, key, f"matched_text_index {idx} outside {len(texts)} sentences")
            try:
                image = load_image(self.image_root / f"{image_name[:12]}.jpg", self.name, f"{key} {image_name}",
                                   max_pixels=self.max_image_pixels)
            except SampleError as err:
                self.tracker.record_bad(err)
                failed.append(image_name)
                continue
            kept.append((idx, image))
        if not kept and failed:  # each image is counted above; the document is unusable too
            raise SampleError(self.name, key, f"no loadable image: all {len(failed)} matched images failed "
                              f"({', '.join(failed[:3])})", kind="no loadable image")
        if not kept:
            return None
        if len(kept) > self.max_num_images:
            pick = sorted(rng.choice(len(kept), self.max_num_images, replace=False))
            kept = [kept[i] for i in pick]
        kept.sort(key=lambda x: x[0])
        if len(kept) == 1 and rng.random() < self.single_image_drop_prob:
            return None
        sentences = list(texts)
        for idx, _ in kept:
            if rng.random() < self.img_first_prob:
                sentences[idx] = self.tok.image_run + sentences[idx]
            else:
                sentences[idx] = sentences[idx] + self.tok.image_run
        text = " ".join(sentences)
        sp = self.tok.special
        text = re.sub(r" *(" + re.escape(sp.soi) + "|" + re.escape(sp.image) + ") *", r"\1", text) + sp.eos
        ids = self.tok.encode(text)
        if self.max_doc_tokens is not None and len(ids) > self.max_doc_tokens:
            raise SampleError(self.name, key, f"over-long document: {len(ids)} > {self.max_doc_tokens} tokens")
        # images are ordered by matched sentence; image-before vs after keeps that order in the text
        return Document(ids, [im for _, im in kept], key)


class LaionSource:
    """LAION/BLIP pairs in webdataset tars: `<key>.jpg` (or png/webp) + `<key>.json` with `caption` (str or list),
    or `<key>.txt` holding the caption when there is no json or it has no caption (img2dataset writes both)."""

    level = "sample"

    def __init__(self, name: str, data_root: str | Path, shards: str | Sequence[str], tokenizer: DeemTokenizer,
                 tracker: BadSampleTracker, img_first_prob: float = 0.5, seq_len: int = 2048,
                 image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.name, self.root, self.tok, self.tracker = name, Path(data_root), tokenizer, tracker
        self.max_image_pixels = max_image_pixels
        self.img_first_prob, self.seq_len, self.image_exts = img_first_prob, seq_len, tuple(image_exts)
        listed = expand_shards(shards)
        self.shards = [s for s in listed if (self.root / s).is_file()]
        if len(listed) != len(self.shards):
            logger.warning("%s: %d of %d listed tars are missing under %s and are skipped", name,
                           len(listed) - len(self.shards), len(listed), self.root)
        if not self.shards:
            raise DataError(f"{name}: none of the {len(listed)} listed tars exist under {self.root}")

    def records(self, shard: str) -> Iterator[tuple[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        path = self.root / shard

        def on_error(exc: Exception) -> bool:
            self.tracker.record_bad(SampleError(str(path), shard, f"unreadable tar content: {exc}"))
            return True

        try:
            with path.open("rb") as stream:
                files = tar_file_expander([{"url": str(path), "stream": stream}], handler=on_error)
                for sample in group_by_keys(files, handler=on_error):
                    yield f"{shard}:{sample.get('__key__')}", sample
        except OSError as exc:
            self.tracker.record_bad(SampleError(str(path), shard, f"unreadable shard: {exc}"))

    def document(self, key: str, sample: dict, rng: np.random.Generator) -> Document | None:
        ext = next((e for e in self.image_exts if e in sample), None)
        if ext is None or ("json" not in sample and "txt" not in sample):
            raise SampleError(self.name, key, f"incomplete sample: has {sorted(k for k in sample if k[0] != '_')}")
        caption = self.caption(key, sample)
        image = load_image(sample[ext], self.name, f"{key}.{ext}", max_pixels=self.max_image_pixels)
        image_first = rng.random() < self.img_first_prob
        run, eos = self.tok.image_run, self.tok.special.eos
        text = (run + caption.lower() if image_first else caption.lower() + run) + eos
        ids = self.tok.encode(text)
        if len(ids) > self.seq_len:
            tail = self.tok.num_img_token + 2  # image run + EOS
            ids = ids[: self.seq_len] if image_first else ids[: self.seq_len - tail] + ids[-tail:]
        return Document(ids, [image], key)

    def caption(self, key: str, sample: dict) -> str:
        """The caption of a tar sample: the json's `caption` (a list joined by spaces), else the txt file."""
        if "json" in sample:
            text = decode_utf8(sample["json"], self.name, f"{key}.json", "json")
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SampleError(self.name, f"{key}.json", f"malformed record: {exc}") from None
            caption = meta.get("caption") if isinstance(meta, dict) else None
            if isinstance(caption, str):
                return caption
            if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
                return " ".join(caption)
            if caption is not None:
                raise SampleError(self.name, f"{key}.json", f"malformed record: caption {caption!r} is not text")
        if "txt" in sample:
            return decode_utf8(sample["txt"], self.name, f"{key}.txt", "caption").strip()
        raise SampleError(self.name, f"{key}.json", "malformed record: no `caption` and no .txt caption")


class ResumableStream(IterableDataset):
    """Base of the pre-training streams: yields ready batches (use `DataLoader(batch_size=None)`), each with
    `meta["position"]`; `note_batch` + `state_dict`/`load_state_dict` give a resumable position."""

    def __init__(self, tokenizer: DeemTokenizer, transform: DualViewTransform, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        self.tok, self.transform, self.seed = tokenizer, transform, int(seed)
        if rank is None or world_size is None:
            rank, world_size = default_rank_world()
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.consumed: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed = {}
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": {str(k): v for k, v in self.consumed.items()}, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise DataError(f"stream state was saved with seed {state['seed']}, this stream has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}

    def note_batch(self, batch: dict[str, Any]) -> None:
        """Record that the training loop consumed `batch` (call once per batch, in the main process)."""
        pos = batch["meta"]["position"]
        if pos["epoch"] == self.epoch:
            self.consumed[pos["consumer"]] = max(self.consumed.get(pos["consumer"], 0), pos["batch_index"] + 1)

    def raw_batches(self, epoch: int, consumer: int, num_consumers: int) -> Iterator[tuple[str, list, bool]]:
        """Yield (source name, packed sequences, ignore_noimage_cond_loss) per batch, images untransformed."""
        raise NotImplementedError

    def trackers(self) -> list[BadSampleTracker]:
        """The bad-sample trackers of this stream's sources."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the resumed position on; `meta["bad_samples"]` holds what the sources counted while
        reading that batch ({source: {good, bad, reasons}}; batches replayed to reach the position count nothing)."""
        consumer, n, worker, num_workers = consumer_of(self.rank, self.world_size)
        skip = self.consumed.get(consumer, 0)
        counts = CountDeltas(self.trackers())
        for k, (name, seqs, ignore_noimage) in enumerate(self.raw_batches(self.epoch, consumer, n)):
            if k < skip:
                counts.reset()
                continue
            rng = np.random.default_rng([self.seed, self.epoch, consumer, k])
            batch = self.collate(seqs, name, ignore_noimage, rng)
            batch["meta"]["position"] = {"epoch": self.epoch, "consumer": consumer, "batch_index": k,
                                         "rank": self.rank, "worker": worker, "num_workers": num_workers}
            batch["meta"]["bad_samples"] = counts.take()
            yield batch

    def collate(self, seqs: list[PackedSequence], name: str, ignore_noimage: bool,
                rng: np.random.Generator) -> dict[str, Any]:
        sp = self.tok.special
        text_ids = pad_sequences([s.ids for s in seqs], sp.pad_id, side="right")
        attention_mask = pad_sequences([[1] * len(s.ids) for s in seqs], 0, side="right")
        views = [self.transform(img, rng) for s in seqs for img in s.images]
        return {
            "text_ids": text_ids,
            "attention_mask": attention_mask,
            "gt_text_ids": build_labels(text_ids, attention_mask, attention_mask.bool(), sp, ignore_noimage),
            "image_tensors": torch.stack([v[0] for v in views]),
            "image_tensors_dec": torch.stack([v[1] for v in views]),
            "image_tensors_mask": None,
            "num_image_per_seq": torch.tensor([len(s.images) for s in seqs], dtype=torch.long),
            "nearest_bos_idxs": torch.tensor([i for s in seqs for i in nearest_bos_indices(s.ids, sp)],
                                             dtype=torch.long),
            "ignore_prompt_token_offset": [0] * len(seqs),
            "loss_img_weight": None,
            "loss_txt_weight": None,
            "meta": {"dataset_name": name, "meta": [s.meta for s in seqs], "seq_lens": [len(s.ids) for s in seqs]},
        }


class InterleavedStream(ResumableStream):
    """One source (MMC4 or LAION) -> documents -> packed sequences -> batches of `batch_size`."""

    def __init__(self, source: MMC4Source | LaionSource, tokenizer: DeemTokenizer, transform: DualViewTransform,
                 seq_len: int = 2048, max_images: int = 15, batch_size: int = 4, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, shuffle_buffer: int = 1000,
                 ignore_noimage_cond_loss: bool = False):
        super().__init__(tokenizer, transform, seed=seed, rank=rank, world_size=world_size)
        self.source, self.name = source, source.name
        self.seq_len, self.max_images, self.batch_size = seq_len, max_images, batch_size
        self.shuffle_buffer, self.ignore_noimage_cond_loss = shuffle_buffer, ignore_noimage_cond_loss

    def trackers(self) -> list[BadSampleTracker]:
        return [self.source.tracker]

    def documents(self, epoch: int, consumer: int, num_consumers: int) -> Iterator[Document]:
        shards = shuffled(self.source.shards, (self.seed, epoch))
        own, by_sample = split_shards(shards, consumer, num_consumers)
        records = (r for shard in own for r in self.source.records(shard))
        if by_sample:
            records = split_samples(records, consumer, num_consumers)
        rng = np.random.default_rng([self.seed, epoch, consumer, 1])
        tracker = self.source.tracker
        good, bad = tracker.good, tracker.bad
        for key, raw in shuffle_buffer(records, self.shuffle_buffer, np.random.default_rng([self.seed, epoch,
                                                                                            consumer, 2])):
            try:
                doc = self.source.document(key, raw, rng)
            except SampleError as err:
                tracker.record_bad(err)
                continue
            tracker.record_good()
            if doc is not None:
                yield doc
        if tracker.good == good and tracker.bad > bad:  # a whole pass and not one usable sample: stop the run
            raise NoValidSamples(
                f"source {self.name}: no valid sample in a whole pass over {len(own)} shard(s) under "
                f"{self.source.root} (reader {consumer} of {num_consumers}); {tracker.bad - bad} skipped, by reason "
                f"{tracker.reasons}; last errors: {'; '.join(tracker.last_errors[-3:])}")

    def raw_batches(self, epoch: int, consumer: int, num_consumers: int) -> Iterator[tuple[str, list, bool]]:
        packer = SequencePacker(self.tok.special, self.tok.num_img_token, self.seq_len, self.max_images,
                                level=self.source.level)
        pending: list[PackedSequence] = []
        for doc in self.documents(epoch, consumer, num_consumers):
            pending.extend(packer.add(doc))
            while len(pending) >= self.batch_size:
                yield self.name, pending[: self.batch_size], self.ignore_noimage_cond_loss
                pending = pending[self.batch_size:]


class MixedStream(ResumableStream):
    """Each batch comes from one stream chosen with probability proportional to `probs` (seeded per consumer).

    `sampling="longest"`: a finished stream restarts at its next epoch (so shards keep changing, spec §5.3)
    and iteration ends once every stream has finished at least once; `"shortest"` stops at the first end."""

    def __init__(self, streams: Sequence[InterleavedStream], probs: Sequence[float], sampling: str = "longest",
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        if len(streams) != len(probs) or not streams:
            raise DataError(f"random_mix needs one prob per dataset, got {len(streams)} datasets, {len(probs)} probs")
        if sampling not in ("longest", "shortest"):
            raise DataError(f"sampling_type must be 'longest' or 'shortest', got {sampling!r}")
        s0 = streams[0]
        super().__init__(s0.tok, s0.transform, seed=seed, rank=s0.rank if rank is None else rank,
                         world_size=s0.world_size if world_size is None else world_size)
        self.streams, self.sampling = list(streams), sampling
        p = np.asarray(probs, dtype=float)
        self.probs = p / p.sum()

    def trackers(self) -> list[BadSampleTracker]:
        return [t for s in self.streams for t in s.trackers()]

    def raw_batches(self, epoch: int, consumer: int, num_consumers: int) -> Iterator[tuple[str, list, bool]]:
        rng = np.random.default_rng([self.seed, epoch, consumer, 3])
        probs = self.probs.copy()
        epochs = [epoch] * len(self.streams)
        iters = [s.raw_batches(epoch, consumer, num_consumers) for s in self.streams]
        produced = [0] * len(self.streams)
        done = [False] * len(self.streams)
        while not all(done):
            i = int(rng.choice(len(self.streams), p=probs / probs.sum()))
            try:
                batch = next(iters[i])
            except StopIteration:
                if self.sampling == "shortest":
                    return
                done[i] = True
                if produced[i] == 0:  # valid data, but not one full batch for this consumer: never pick it again
                    logger.warning("random_mix: source %s gives reader %d of %d no full batch in a whole pass; "
                                   "it is left out of this reader's mix", self.streams[i].name, consumer, num_consumers)
                    probs[i] = 0.0
                    if probs.sum() == 0:
                        return
                    continue
                epochs[i] += 1
                produced[i] = 0
                iters[i] = self.streams[i].raw_batches(epochs[i], consumer, num_consumers)
                continue
            produced[i] += 1
            yield batch
