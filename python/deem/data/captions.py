"""Image-caption readers: COCO Karpathy, image2paragraph, Flickr30k, TextCaps, LN-COCO, COCO-format (NoCaps).

Training items carry one caption (drawn per access from the item's seeded generator); evaluation items
carry every reference caption of the image, one item per image (spec §5.16/§5.18).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deem.data.errors import BadSampleTracker, DataError
from deem.data.images import DualViewTransform
from deem.data.records import RecordDataset, parse_records, read_json, read_jsonl


@dataclass
class CaptionRecord:
    image: Path
    captions: list[str]
    image_id: str
    extra: dict[str, Any] = field(default_factory=dict)


class CaptionDataset(RecordDataset):
    """Items: {images: [views], caption (train) | references (eval), image_id}."""

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        rec: CaptionRecord = self.records[index]
        views, _ = self.image_views(rec.image, rec.image_id, rng)
        item = {"images": [views], "image_id": rec.image_id, **rec.extra}
        if self.eval_mode:
            item["references"] = list(rec.captions)
        else:
            item["caption"] = rec.captions[int(rng.integers(len(rec.captions)))]
        return item


def _as_list(caption: Any) -> list[str]:
    caps = caption if isinstance(caption, list) else [caption]
    if not caps or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"caption must be a string or a non-empty list of strings, got {caption!r}")
    return caps


def read_coco_karpathy(annotation: str | Path, image_root: str | Path, tracker: BadSampleTracker,
                       lowercase: bool = True) -> list[CaptionRecord]:
    """BLIP/LAVIS Karpathy split: a list of {image: "val2014/COCO_val2014_...jpg", caption: str|list, image_id?}.

    Train files have one row per caption (rows of the same image are merged here only in eval);
    the id is the 12-digit number in the file name."""
    rows = read_json(annotation)
    if not isinstance(rows, list):
        raise DataError(f"{annotation}: expected a JSON list of {{image, caption}} entries")

    def parse(key, row):
        caps = _as_list(row["caption"])
        m = re.search(r"(\d{12})", row["image"])
        image_id = m.group(1) if m else str(row.get("image_id", Path(row["image"]).stem))
        return CaptionRecord(Path(image_root) / row["image"], [c.lower() if lowercase else c for c in caps], image_id)

    return parse_records(((f"entry {i}", r) for i, r in enumerate(rows)), parse, tracker, str(annotation))


def read_coco_format_captions(annotation: str | Path, image_root: str | Path, tracker: BadSampleTracker,
                              lowercase: bool = False) -> list[CaptionRecord]:
    """COCO caption format ({images: [{id, file_name}], annotations: [{image_id, caption}]}): one record per
    image with all its captions (NoCaps val, Flickr30k test, captions_train2014)."""
    data = read_json(annotation)
    try:
        images = {img["id"]: img for img in data["images"]}
        anns = data["annotations"]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{annotation}: not a COCO caption file ({exc})") from None
    caps: dict[Any, list[str]] = {}
    for ann in anns:
        if isinstance(ann, dict) and "image_id" in ann and isinstance(ann.get("caption"), str):
            caps.setdefault(ann["image_id"], []).append(ann["caption"].lower() if lowercase else ann["caption"])

    def parse(key, img):
        if img["id"] not in caps:
            raise ValueError(f"image {img['id']} has no caption")
        return CaptionRecord(Path(image_root) / img["file_name"], caps[img["id"]], str(img["id"]),
                             {"file_name": img["file_name"]})

    return parse_records(((f"image {i}", img) for i, img in images.items()), parse, tracker, str(annotation))


def read_image2paragraph(annotation: str | Path, split_file: str | Path, image_root: str | Path,
                         tracker: BadSampleTracker) -> list[CaptionRecord]:
    """paragraphs_coco.json ({annotations: [{image_id, caption, url}]}, later duplicates win) filtered by a
    split file (a JSON list of image ids); image = <image_root>/<basename(url)>; case kept."""
    data = read_json(annotation)
    split = {int(i) for i in read_json(split_file)}
    by_id: dict[int, dict] = {}
    for ann in data.get("annotations", []) if isinstance(data, dict) else []:
        if isinstance(ann, dict) and "image_id" in ann:
            by_id[int(ann["image_id"])] = ann

    def parse(key, ann):
        if int(ann["image_id"]) not in split:
            return None
        return CaptionRecord(Path(image_root) / Path(ann["url"]).name, _as_list(ann["caption"]), str(ann["image_id"]))

    return parse_records(((f"image_id {i}", a) for i, a in by_id.items()), parse, tracker, str(annotation))


def read_flickr30k_grounded(annotation: str | Path, test_file: str | Path | None, image_root: str | Path,
                            tracker: BadSampleTracker) -> list[CaptionRecord]:
    """groundedcaption.json (list of {image_id, detailed_caption}, last duplicate wins) minus the images of the
    test split (COCO-format flickr30k_test1k.json); image = <image_root>/<image_id>.jpg; lower-cased."""
    rows = read_json(annotation)
    excluded: set[str] = set()
    if test_file is not None:
        excluded = {Path(img["file_name"]).stem for img in read_json(test_file).get("images", [])}
    by_id = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and "image_id" in row:
            by_id[str(row["image_id"])] = row

    def parse(key, row):
        if str(row["image_id"]) in excluded:
            return None
        return CaptionRecord(Path(image_root) / f"{row['image_id']}.jpg",
                             [c.lower() for c in _as_list(row["detailed_caption"])], str(row["image_id"]))

    return parse_records(((f"image_id {i}", r) for i, r in by_id.items()), parse, tracker, str(annotation))


def read_textcaps(annotation: str | Path, image_root: str | Path, tracker: BadSampleTracker) -> list[CaptionRecord]:
    """TextCaps_0.1_train.json ({data: [{image_id, caption_str}]}); image = <image_root>/<image_id>.jpg."""
    data = read_json(annotation)

    def parse(key, row):
        return CaptionRecord(Path(image_root) / f"{row['image_id']}.jpg", [row["caption_str"].lower()],
                             str(row["image_id"]))

    return parse_records(((f"data {i}", r) for i, r in enumerate(data["data"])), parse, tracker, str(annotation))


def read_lncoco(annotation: str | Path, image_root: str | Path, tracker: BadSampleTracker) -> list[CaptionRecord]:
    """Localized Narratives COCO jsonl ({image_id, caption}); image = <image_root>/<image_id:012>.jpg."""

    def parse(key, row):
        return CaptionRecord(Path(image_root) / f"{int(row['image_id']):012d}.jpg", [row["caption"].lower()],
                             str(row["image_id"]))

    return parse_records(read_jsonl(annotation, tracker), parse, tracker, str(annotation))


def merge_by_image(records: list[CaptionRecord]) -> list[CaptionRecord]:
    """One record per image with all captions (Karpathy rows are per caption in train files)."""
    merged: dict[str, CaptionRecord] = {}
    for rec in records:
        if rec.image_id in merged:
            merged[rec.image_id].captions.extend(rec.captions)
        else:
            merged[rec.image_id] = CaptionRecord(rec.image, list(rec.captions), rec.image_id, dict(rec.extra))
    return list(merged.values())


def build_caption_dataset(cfg: dict, transform: DualViewTransform, tracker: BadSampleTracker) -> CaptionDataset:
    """Dispatch on cfg['type'] (coco_karpathy, coco_captions, image2paragraph, flickr30k_grounded, textcaps,
    lncoco); cfg['eval'] selects evaluation items (all references, one per image)."""
    kind, eval_mode = cfg["type"], bool(cfg.get("eval", False))
    ann, root = cfg["annotation"], cfg["image_root"]
    if kind == "coco_karpathy":
        records = read_coco_karpathy(ann, root, tracker, lowercase=cfg.get("lowercase", not eval_mode))
        if eval_mode:
            records = merge_by_image(records)
    elif kind == "coco_captions":
        records = read_coco_format_captions(ann, root, tracker, lowercase=cfg.get("lowercase", False))
    elif kind == "image2paragraph":
        records = read_image2paragraph(ann, cfg["split_file"], root, tracker)
    elif kind == "flickr30k_grounded":
        records = read_flickr30k_grounded(ann, cfg.get("test_file"), root, tracker)
    elif kind == "textcaps":
        records = read_textcaps(ann, root, tracker)
    elif kind == "lncoco":
        records = read_lncoco(ann, root, tracker)
    else:
        raise DataError(f"unknown caption dataset type {kind!r}")
    return CaptionDataset(cfg.get("name", kind), records, transform, tracker, seed=cfg.get("seed", 0),
                          eval_mode=eval_mode)
