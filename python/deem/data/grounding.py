"""Region grounding readers: RefCOCO/+/g (REFER refs converted to JSON + COCO instances), Visual Genome
regions, and the RefCOCO box-grounding evaluation files.

Training items hold two image slots: the whole image (all-ones mask) and the same pixels with the box mask.
Augmentation (flip with a word-level left/right swap, random-resized crop that keeps the box) is decided
once and applied to both views and the box (spec §1.4, fixing §5.14).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deem.data.errors import BadSampleTracker, DataError, SampleError
from deem.data.images import ViewParams, box_mask, random_crop_containing
from deem.data.records import ImageViews, RecordDataset, parse_records, read_json

SPATIAL_WORDS = ("top", "bottom", "left", "right", "center", "middle", "above", "below", "first", "second",
                 "third")
_SPATIAL_RE = re.compile(r"\b(" + "|".join(SPATIAL_WORDS) + r")\b", re.IGNORECASE)
_LEFT_RIGHT_RE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap the whole words left/right (case kept): "bright" stays "bright" (spec §5.14)."""

    def repl(m: re.Match) -> str:
        word = m.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT_RE.sub(repl, text)


def box_text(box999: tuple[int, int, int, int]) -> str:
    """`(x1,y1)(x2,y2)` with 3-digit zero-padded 0-999 coordinates."""
    x1, y1, x2, y2 = box999
    return f"({x1:03d},{y1:03d})({x2:03d},{y2:03d})"


def to_999(box01: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return tuple(int(min(999, max(0, round(v * 999)))) for v in box01)  # type: ignore[return-value]


@dataclass
class RegionRecord:
    image: Path
    sentences: list[str]
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    key: str


class GroundingDataset(RecordDataset):
    """Training items: {images: [whole, region], sentence, box (0-999 ints), box_text}; eval items (one image):
    {images: [whole], sentence, gt_box (0-999), gt_box_pixels, width, height, id}."""

    def __init__(self, name, records, transform, tracker, seed=0, eval_mode=False, random_flip=False,
                 random_resize_crop_prob=0.0):
        super().__init__(name, records, transform, tracker, seed=seed, eval_mode=eval_mode)
        self.random_flip = random_flip
        self.random_resize_crop_prob = random_resize_crop_prob

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        rec: RegionRecord = self.records[index]
        image = self.open_image(rec.image, rec.key)
        w, h = image.size
        x1, y1, x2, y2 = rec.box
        if not (0 <= x1 < x2 <= w + 1 and 0 <= y1 < y2 <= h + 1):
            raise SampleError(self.name, rec.key, f"box {rec.box} outside image of size {w}x{h}")
        sentence = rec.sentences[int(rng.integers(len(rec.sentences)))] if not self.eval_mode else rec.sentences[0]
        params = self.transform.sample_params((w, h), None)  # dataset-level augmentation below, not the transform's
        if not self.eval_mode:
            flip = bool(self.random_flip and rng.random() < 0.5)
            if flip:
                sentence = swap_left_right(sentence)
            crop = params.crop
            if rng.random() < self.random_resize_crop_prob and not _SPATIAL_RE.search(sentence):
                crop = random_crop_containing((w, h), rec.box, rng)
            params = ViewParams(crop=crop, flip=flip, size=(w, h))
        enc, dec, _ = self.transform(image, params=params)
        box01 = self.transform.box(rec.box, params)
        whole = ImageViews(enc, dec, torch.ones(1, *enc.shape[1:]))
        box999 = to_999(box01)
        if self.eval_mode:
            return {"images": [whole], "sentence": sentence, "gt_box": box999, "gt_box_pixels": list(rec.box),
                    "width": w, "height": h, "id": rec.key, "sentences": list(rec.sentences)}
        region = ImageViews(enc, dec, box_mask(box01, self.transform.resolution))
        return {"images": [whole, region], "sentence": sentence, "box": box999, "box_text": box_text(box999)}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain containers are allowed")


def convert_refer_pickle(src: str | Path, dst: str | Path) -> int:
    """Convert a REFER `refs(<splitBy>).p` to JSON once, refusing anything but plain dicts/lists/strings/numbers
    (no arbitrary object construction). Returns the number of refs."""
    import json

    with open(src, "rb") as f:
        refs = _PlainUnpickler(f, encoding="latin1").load()
    if not isinstance(refs, list):
        raise DataError(f"{src}: expected a list of refs, got {type(refs).__name__}")
    Path(dst).write_text(json.dumps(refs), encoding="utf-8")
    return len(refs)


def read_refcoco_refs(refs_file, instances_file, image_root, tracker, split: str = "train",
                      image_prefix: str = "COCO_train2014") -> list[RegionRecord]:
    """REFER refs as JSON (list of {ref_id, ann_id, image_id, split, sentences: [{raw}]}) + COCO instances;
    box = the ref's annotation bbox (x, y, w, h) as x1y1x2y2."""
    inst = read_json(instances_file)
    boxes = {a["id"]: a["bbox"] for a in inst.get("annotations", [])}

    def parse(key, ref):
        if ref["split"] != split:
            return None
        if ref["ann_id"] not in boxes:
            raise ValueError(f"annotation {ref['ann_id']} not in {Path(instances_file).name}")
        x, y, bw, bh = boxes[ref["ann_id"]]
        sents = [s["raw"] for s in ref["sentences"]]
        if not sents:
            raise ValueError("no sentences")
        return RegionRecord(Path(image_root) / f"{image_prefix}_{int(ref['image_id']):012d}.jpg", sents,
                            (float(x), float(y), float(x + bw), float(y + bh)), f"ref {ref['ref_id']}")

    refs = read_json(refs_file)
    keyed = ((f"ref_id {r.get('ref_id', i)}" if isinstance(r, dict) else f"entry {i}", r) for i, r in enumerate(refs))
    return parse_records(keyed, parse, tracker, str(refs_file))


def read_vg_regions(regions_file, image_data_file, image_roots, tracker, max_area: float = 16384.0
                    ) -> list[RegionRecord]:
    """Visual Genome region_descriptions.json ([{id, regions: [{region_id, phrase, x, y, width, height}]}]) and
    image_data.json ([{image_id|id, url}]); regions with area >= `max_area` px^2 are dropped (as the original);
    the image is looked up in each of `image_roots` (VG_100K and VG_100K_2)."""
    roots = [Path(r) for r in ([image_roots] if isinstance(image_roots, (str, Path)) else image_roots)]
    names = {}
    for img in read_json(image_data_file):
        names[img.get("image_id", img.get("id"))] = Path(img["url"]).name

    def locate(name: str) -> Path:
        for root in roots:
            if (root / name).exists():
                return root / name
        return roots[0] / name  # reported as missing at load time

    def parse(key, entry):
        image_id = entry.get("id", entry.get("image_id"))
        if image_id not in names:
            raise ValueError(f"image {image_id} not in {Path(image_data_file).name}")
        path = locate(names[image_id])
        out = []
        for reg in entry["regions"]:
            if reg["width"] * reg["height"] >= max_area:
                continue
            x, y = float(reg["x"]), float(reg["y"])
            out.append(RegionRecord(path, [reg["phrase"].strip()], (x, y, x + reg["width"], y + reg["height"]),
                                    f"region {reg['region_id']}"))
        return out

    data = read_json(regions_file)
    return parse_records(((f"image {i}", e) for i, e in enumerate(data)), parse, tracker, str(regions_file))


def read_refcoco_eval(annotation, image_root, tracker) -> list[RegionRecord]:
    """RefCOCO grounding eval list ({img_id, sents, bbox: [x, y, w, h]}); the image is the COCO file name that
    starts `img_id` (`COCO_train2014_<12 digits>`, i.e. its first 27 characters) + ".jpg"."""

    def parse(key, row):
        m = re.match(r"(.*?_\d{12})", row["img_id"])
        stem = m.group(1) if m else row["img_id"][:27]
        x, y, bw, bh = (float(v) for v in row["bbox"])
        sents = row["sents"] if isinstance(row["sents"], list) else [row["sents"]]
        return RegionRecord(Path(image_root) / f"{stem}.jpg", [str(s) for s in sents],
                            (x, y, x + bw, y + bh), f"{key} ({row['img_id']})")

    rows = read_json(annotation)
    return parse_records(((f"entry {i}", r) for i, r in enumerate(rows)), parse, tracker, str(annotation))


def build_grounding_dataset(cfg: dict, transform, tracker: BadSampleTracker) -> GroundingDataset:
    """Dispatch on cfg['type']: refcoco (train refs), vg_regions, refcoco_grounding_eval."""
    kind = cfg["type"]
    if kind == "refcoco":
        records = read_refcoco_refs(cfg["refs"], cfg["instances"], cfg["image_root"], tracker,
                                    split=cfg.get("split", "train"), image_prefix=cfg.get("image_prefix",
                                                                                          "COCO_train2014"))
    elif kind == "vg_regions":
        records = read_vg_regions(cfg["regions"], cfg["image_data"], cfg["image_root"], tracker,
                                  max_area=float(cfg.get("max_area", 16384)))
    elif kind == "refcoco_grounding_eval":
        records = read_refcoco_eval(cfg["annotation"], cfg["image_root"], tracker)
    else:
        raise DataError(f"unknown grounding dataset type {kind!r}")
    eval_mode = kind.endswith("_eval") or bool(cfg.get("eval", False))
    if eval_mode and cfg.get("max_samples"):
        order = np.random.default_rng(int(cfg.get("seed", 0))).permutation(len(records))[: int(cfg["max_samples"])]
        records = [records[i] for i in sorted(order)]
    return GroundingDataset(cfg.get("name", kind), records, transform, tracker, seed=cfg.get("seed", 0),
                            eval_mode=eval_mode, random_flip=bool(cfg.get("random_flip", False)),
                            random_resize_crop_prob=float(cfg.get("random_resize_crop_prob", 0.0)))
