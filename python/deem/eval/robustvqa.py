"""Build the RobustVQA test file from local ImageNet-A / ImageNet-R / ImageNet-V2 folders (`deem data robustvqa`).

Every image becomes an entry `{file_name, gt_caption, error_caption, ...}`: the true class and the "hardest"
wrong class, i.e. the class other than the true one that a zero-shot CLIP scores highest ("A photo of a
{class}", image and text features L2-normalised). The reader (`deem.data`, type `robustvqa`) turns each entry
into a "yes" and a "no" question.

Fixes to the original script (spec data-eval.md §3.2, §5.21): paths, labels and CLIP scores stay aligned
image by image (the original zipped filtered labels with unfiltered paths inside each batch of 512, so
`file_name` and captions could belong to different images); text features are normalised; the order is
deterministic (sorted folders and files, no global RNG); the CLIP model, prompt, resolution and the dataset
folders are recorded under `info`; nothing is downloaded (CLIP loads from a local directory).

Folder layouts: ImageNet-A and ImageNet-R have one folder per WordNet id (`n01440764/...`), ImageNet-V2 one
folder per class index (`0/` .. `999/`); `imagenet_class_index.json` maps index -> [wnid, name].
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from deem.eval.errors import EvalError
from deem.io import atomic_write_json

log = logging.getLogger("deem.eval")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SUBSETS = ("imagenet_a", "imagenet_r", "imagenet_v2")
DEFAULT_PROMPT = "A photo of a {}"


class Scorer(Protocol):
    """Scores images against the 1000 class prompts: a list of RGB images -> float array [N, num_classes]."""

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...


class ClipScorer:
    """Zero-shot CLIP (transformers `CLIPModel` + processor from a local directory, offline): cosine similarity
    of L2-normalised image and text features (scaled by CLIP's logit scale)."""

    def __init__(self, clip_dir: str | Path, prompts: Sequence[str], device: str = "cpu", batch_size: int = 256):
        import torch
        from transformers import AutoProcessor, CLIPModel

        path = Path(clip_dir)
        if not (path / "config.json").is_file():
            raise EvalError(f"CLIP directory {path} has no config.json (a transformers CLIP model is expected)")
        self.torch, self.device = torch, torch.device(device)
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        ip = getattr(self.processor, "image_processor", None)
        crop = getattr(ip, "crop_size", None)  # a dict (transformers 4) or a SizeDict (transformers 5)
        self.resolution = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        self.name = str(path.resolve())
        feats = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                t = self.processor(text=list(prompts[i: i + batch_size]), return_tensors="pt", padding=True)
                t = {k: v.to(self.device) for k, v in t.items()}
                feats.append(self._features(self.model.get_text_features(**t)))
        self.text = torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    def _features(self, out: Any):
        # transformers 4 returns the projected tensor, transformers 5 an output whose pooler_output holds it
        return out if isinstance(out, self.torch.Tensor) else out.pooler_output

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            px = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
            img = torch.nn.functional.normalize(self._features(self.model.get_image_features(pixel_values=px)), dim=-1)
            scale = self.model.logit_scale.exp()
            return (scale * img @ self.text.T).float().cpu().numpy()


def read_class_index(path: str | Path) -> tuple[list[str], list[str]]:
    """`imagenet_class_index.json` ({"0": ["n01440764", "tench"], ...}) -> (wnids, names) by class index;
    underscores in names become spaces."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"cannot read the ImageNet class index {path}: {exc}") from None
    try:
        n = len(data)
        rows = [data[str(i)] for i in range(n)]
        wnids = [str(r[0]) for r in rows]
        names = [str(r[1]).replace("_", " ") for r in rows]
    except (KeyError, IndexError, TypeError):
        raise EvalError(f"{path}: expected {{\"0\": [wnid, name], ...}} with consecutive indices") from None
    return wnids, names


def list_subset(root: str | Path, wnids: Sequence[str]) -> list[tuple[Path, int]]:
    """(image path, class index) for every image under the class folders of `root` (named by wnid or by class
    index), in sorted order. Non-image files and loose files at the top level are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"image folder {root} does not exist")
    by_wnid = {w: i for i, w in enumerate(wnids)}
    out = []
    folders = [d for d in root.iterdir() if d.is_dir()]
    for d in sorted(folders, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name)):
        if d.name.isdigit() and int(d.name) < len(wnids):
            label = int(d.name)
        elif d.name in by_wnid:
            label = by_wnid[d.name]
        else:
            raise EvalError(f"{d}: folder name is neither a WordNet id of the class index nor a class number")
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        out.extend((p, label) for p in files)
    if not out:
        raise EvalError(f"no images under {root} (expected <class folder>/<image> files)")
    return out


def _load(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        log.warning("robustvqa: skipping unreadable image %s: %s", path, exc)
        return None


def score_subset(images: Sequence[tuple[Path, int]], names: Sequence[str], scorer: Callable, relative_to: Path,
                 batch_size: int = 64, keep: str = "all") -> tuple[list[dict[str, Any]], int]:
    """Entries of one subset and the number of unreadable images. Each image is scored alone against every
    class; its hardest wrong class is the arg-max over the classes other than its label."""
    entries, skipped = [], 0
    for start in range(0, len(images), batch_size):
        chunk = [(p, label, _load(p)) for p, label in images[start: start + batch_size]]
        skipped += sum(im is None for _, _, im in chunk)
        chunk = [c for c in chunk if c[2] is not None]
        if not chunk:
            continue
        scores = np.asarray(scorer([im for _, _, im in chunk]), dtype=np.float64)
        if scores.shape != (len(chunk), len(names)):
            raise EvalError(f"scorer returned shape {scores.shape} for {len(chunk)} images and {len(names)} classes")
        for (path, label, _), row in zip(chunk, scores):
            top1 = int(np.argmax(row))
            wrong = row.copy()
            wrong[label] = -np.inf
            error = int(np.argmax(wrong))
            if keep == "misclassified" and top1 == label:
                continue
            entries.append({"file_name": os.path.relpath(path, relative_to).replace(os.sep, "/"),
                            "gt_caption": names[label], "error_caption": names[error], "label": label,
                            "error_label": error, "clip_correct": top1 == label})
    return entries, skipped


def build_robustvqa(imagenet_a: str | Path | None, imagenet_r: str | Path | None, imagenet_v2: str | Path | None,
                    out_file: str | Path, *, class_index: str | Path, clip: str | Path | None = None,
                    scorer: Scorer | None = None, relative_to: str | Path = ".", keep: str = "all",
                    prompt: str = DEFAULT_PROMPT, batch_size: int = 64, device: str = "cpu",
                    max_per_subset: int | None = None) -> dict[str, int]:
    """Write the RobustVQA test JSON ({info, imagenet_a, imagenet_r, imagenet_v2}) and return entries per subset.

    `clip` is a local transformers CLIP directory (the original used ViT-L/14-336); `scorer` replaces it (any
    callable images -> [N, 1000] scores). `file_name`s are relative to `relative_to` (the eval config's
    `root`, with `image_root: .`). `keep="misclassified"` keeps only images CLIP gets wrong (the later
    script's intent); "all" (default) keeps every image, as the committed file of the original.
    `max_per_subset` takes the first N images of each subset (sorted order) for quick runs."""
    if keep not in ("all", "misclassified"):
        raise EvalError(f"keep must be 'all' or 'misclassified', got {keep!r}")
    if "{}" not in prompt:
        raise EvalError(f"prompt {prompt!r} needs a {{}} placeholder for the class name")
    folders = dict(zip(SUBSETS, (imagenet_a, imagenet_r, imagenet_v2)))
    folders = {k: Path(v) for k, v in folders.items() if v is not None}
    if not folders:
        raise EvalError("give at least one of ImageNet-A, ImageNet-R, ImageNet-V2")
    wnids, names = read_class_index(class_index)
    if scorer is None:
        if clip is None:
            raise EvalError("a local CLIP directory (--clip) is needed to pick the hardest wrong class")
        scorer = ClipScorer(clip, [prompt.format(n) for n in names], device=device, batch_size=batch_size)
    relative_to = Path(relative_to)
    result: dict[str, Any] = {}
    info: dict[str, Any] = {
        "generator": "deem data robustvqa", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scorer": getattr(scorer, "name", type(scorer).__name__), "prompt": prompt,
        "resolution": getattr(scorer, "resolution", None), "normalised_features": True, "keep": keep,
        "class_index": str(Path(class_index).resolve()), "relative_to": str(relative_to.resolve()), "subsets": {}}
    counts = {}
    for key, folder in folders.items():
        images = list_subset(folder, wnids)
        if max_per_subset is not None:
            images = images[: int(max_per_subset)]
        entries, skipped = score_subset(images, names, scorer, relative_to, batch_size=batch_size, keep=keep)
        result[key] = entries
        counts[key] = len(entries)
        info["subsets"][key] = {"folder": str(folder.resolve()), "images": len(images), "unreadable": skipped,
                                "entries": len(entries),
                                "clip_accuracy": (sum(e["clip_correct"] for e in entries) / len(entries)
                                                  if entries and keep == "all" else None)}
        log.info("robustvqa: %s: %d entries from %d images (%d unreadable)", key, len(entries), len(images), skipped)
    atomic_write_json(out_file, {"info": info, **result})
    return counts
