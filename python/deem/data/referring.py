"""Mask-referring readers (Osprey-style COCO-format region masks): COCO instances, RefCOCO/RefCOCO+ with masks,
Visual Genome with masks, PartImageNet, Pascal-Part, and the RefCOCOg mask-referring evaluation file.

An item is the image plus N region masks and a conversation whose `<mask>` placeholders become image runs:
the first `<mask>` is the whole image (all-ones mask), every following one the same pixels with one region
mask (spec §1.5, model.md §10.1). Region subset and order, and VG questions, are drawn from the item's
seeded generator.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deem.data import prompts as P
from deem.data.errors import BadSampleTracker, DataError, SampleError
from deem.data.records import ImageViews, RecordDataset, parse_records, read_json

MASK = "<mask>"
PREAMBLES = {
    "mask_coco": P.COCO_MASK_PREAMBLE,
    "mask_refcoco": P.REFCOCO_PREAMBLE,
    "mask_refcocop": P.REFCOCOP_PREAMBLE,
    "mask_vg": P.VG_MASK_PREAMBLE,
    "mask_partimagenet": P.PARTIMAGENET_PREAMBLE,
    "mask_pascal": P.PASCAL_PREAMBLE,
}


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """COCO polygons, uncompressed RLE or compressed RLE -> HxW uint8 mask (pycocotools)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 for p in seg):
            raise ValueError("polygon segmentation needs lists of >= 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword deprecation, not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = mask_utils.decode(rle)
    if mask.shape[:2] != (height, width):
        raise ValueError(f"mask shape {mask.shape[:2]} differs from image size {(height, width)}")
    return mask


@dataclass
class MaskImageRecord:
    image: Path
    height: int
    width: int
    regions: list[tuple[Any, str]]  # (segmentation, answer)
    key: str


class ReferringMaskDataset(RecordDataset):
    """Training items: {images: [whole, region_1..N], conversation: [(human|gpt, text)...]}; eval items:
    {images: [whole, region], references: [expression], id}."""

    def __init__(self, name, records, transform, tracker, kind: str, seed=0, eval_mode=False, max_regions=15,
                 preamble: str | None = None):
        super().__init__(name, records, transform, tracker, seed=seed, eval_mode=eval_mode)
        self.kind = kind
        self.max_regions = max_regions
        self.preamble = PREAMBLES.get(kind, "") if preamble is None else preamble

    def conversation(self, answers: list[str], rng: np.random.Generator) -> list[tuple[str, str]]:
        begin = MASK + "\n" + self.preamble
        conv = []
        for i, answer in enumerate(answers):
            if self.kind == "mask_vg":
                q = P.VG_QUESTIONS[int(rng.integers(len(P.VG_QUESTIONS)))].strip().replace("<region>", MASK)
                q = (begin + q if i == 0 else q) + P.VG_ANSWER_SUFFIX
            else:
                q = begin + MASK if i == 0 else MASK
            conv += [("human", q), ("gpt", answer)]
        return conv

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        rec: MaskImageRecord = self.records[index]
        image = self.open_image(rec.image, rec.key)
        if image.size != (rec.width, rec.height):
            raise SampleError(self.name, rec.key, f"image is {image.size}, annotation says {(rec.width, rec.height)}")
        enc, dec, params = self.transform(image, rng)
        regions = rec.regions
        if not self.eval_mode:
            order = rng.permutation(len(regions))[: self.max_regions]
            regions = [regions[i] for i in order]
        else:
            regions = regions[:1]
        views = [ImageViews(enc, dec, torch.ones(1, *enc.shape[1:]))]
        for seg, _ in regions:
            try:
                m = decode_segmentation(seg, rec.height, rec.width)
            except (ValueError, TypeError, KeyError) as exc:
                raise SampleError(self.name, rec.key, f"bad segmentation: {exc}") from None
            views.append(ImageViews(enc, dec, self.transform.mask(m, params)))
        answers = [a for _, a in regions]
        if self.eval_mode:
            return {"images": views, "references": answers, "id": rec.key}
        return {"images": views, "conversation": self.conversation(answers, rng)}


def read_osprey_coco(annotation, image_root, tracker, kind: str, eval_mode: bool = False) -> list[MaskImageRecord]:
    """Osprey COCO-format file: images [{id, file_name, height, width, caption?}], annotations [{image_id,
    segmentation, category_id, caption?, ignore?}], categories [{id, name}]. The answer per region is the
    category name (mask_coco, part sets), the image entry's caption (RefCOCO/+ and eval) or the annotation's
    caption (VG; `ignore` regions dropped). Images without regions are skipped; duplicate annotation ids are
    an error."""
    data = read_json(annotation)
    cats = {c["id"]: c["name"] for c in data.get("categories", [])}
    by_image: dict[Any, list[dict]] = {}
    seen_ids: set[Any] = set()
    for ann in data.get("annotations", []):
        if "id" in ann:
            if ann["id"] in seen_ids:
                raise DataError(f"{annotation}: annotation id {ann['id']} is not unique")
            seen_ids.add(ann["id"])
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    use_image_caption = eval_mode or kind in ("mask_refcoco", "mask_refcocop")

    def parse(key, img):
        anns = by_image.get(img["id"], [])
        regions = []
        for ann in anns:
            if kind == "mask_vg":
                if ann.get("ignore", False):
                    continue
                answer = ann["caption"]
            elif use_image_caption:
                answer = img["caption"]
            else:
                answer = cats[ann["category_id"]]
            regions.append((ann["segmentation"], answer))
        if not regions:
            return None
        return MaskImageRecord(Path(image_root) / img["file_name"], int(img["height"]), int(img["width"]), regions,
                               f"image {img['id']} ({img['file_name']})")

    return parse_records(((f"image {i}", img) for i, img in enumerate(data["images"])), parse, tracker,
                         str(annotation))


def build_referring_dataset(cfg: dict, transform, tracker: BadSampleTracker) -> ReferringMaskDataset:
    """cfg['type'] in mask_coco, mask_refcoco, mask_refcocop, mask_vg, mask_partimagenet, mask_pascal,
    refcocog_referring_eval."""
    kind = cfg["type"]
    eval_mode = kind == "refcocog_referring_eval" or bool(cfg.get("eval", False))
    if kind not in PREAMBLES and kind != "refcocog_referring_eval":
        raise DataError(f"unknown referring dataset type {kind!r}")
    records = read_osprey_coco(cfg["annotation"], cfg["image_root"], tracker, kind, eval_mode=eval_mode)
    return ReferringMaskDataset(cfg.get("name", kind), records, transform, tracker, kind, seed=cfg.get("seed", 0),
                                eval_mode=eval_mode, max_regions=int(cfg.get("max_regions", 15)),
                                preamble=cfg.get("preamble"))
