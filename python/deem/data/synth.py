"""The synthetic "shapes world": small images of coloured shapes on varied backgrounds, written in the REAL
on-disk formats (LAION tars, MMC4 zip shards, COCO Karpathy captions, VQAv2 questions/annotations, POPE,
RobustVQA with style-shifted renderings, RefCOCO refs/eval and Osprey-style masks), so that demos and CI run
through the real readers. Everything is deterministic from the seed; a default world takes a few seconds.

Questions are answerable from the pixels: the colour of a shape, which shape it is, how many shapes there
are, whether a given coloured shape is present, which shape is on the left/right.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from deem.data.prompts import CAPTION_QUESTIONS, DEFAULT_PROMPTS, IMAGE_QUESTIONS, VG_QUESTIONS
from deem.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = ("gray", "sand", "sky", "mint", "gradient", "checker")
STYLES = ("normal", "noisy", "outline", "inverted", "striped")
SHIFT_STYLES = ("noisy", "striped")  # content- and colour-preserving shifts (the shifted VQA split)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


@dataclass
class Shape:
    kind: str
    colour: str
    size: str  # "small" | "large"
    cx: float  # centre, fraction of the width/height
    cy: float
    radius: float  # fraction of the image size

    def polygon(self, px: int) -> list[tuple[float, float]]:
        """The outline as a polygon in pixels (used both to draw and as the COCO segmentation)."""
        cx, cy, r = self.cx * px, self.cy * px, self.radius * px
        if self.kind == "circle":
            angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        elif self.kind == "square":
            s = r * 0.85
            pts = [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
        elif self.kind == "triangle":
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        elif self.kind == "diamond":
            pts = [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
        else:  # star
            pts = []
            for k in range(10):
                a = -math.pi / 2 + k * math.pi / 5
                rr = r if k % 2 == 0 else r * 0.45
                pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return [(min(px - 1.0, max(0.0, x)), min(px - 1.0, max(0.0, y))) for x, y in pts]

    def box(self, px: int) -> tuple[float, float, float, float]:
        pts = self.polygon(px)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return min(xs), min(ys), max(xs) + 1, max(ys) + 1

    @property
    def position(self) -> str:
        return "left" if self.cx < 0.4 else "right" if self.cx > 0.6 else "middle"

    @property
    def where(self) -> str:
        return "in the middle" if self.position == "middle" else f"on the {self.position}"

    def phrase(self, colour: bool = True) -> str:
        return f"a {self.size} {self.colour} {self.kind}" if colour else f"a {self.size} {self.kind}"


@dataclass
class Scene:
    shapes: list[Shape]
    background: str
    index: int

    def caption(self, colours: bool = True) -> str:
        """The scene in words; `colours=False` leaves the shapes' colours out (the alt-text a contrastive
        encoder is pre-fitted on in `deem demo`)."""
        parts = [f"{s.phrase(colours)} {s.where}" for s in self.shapes]
        joined = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
        return f"{joined} on a {self.background} background"

    def attributes(self) -> dict[str, Any]:
        """The scene's content as plain data (written to scenes.json, so nothing re-parses captions)."""
        return {
            "background": self.background,
            "shapes": [{"kind": s.kind, "colour": s.colour, "size": s.size, "position": s.position,
                        "cx": round(s.cx, 4), "cy": round(s.cy, 4), "radius": round(s.radius, 4)}
                       for s in self.shapes],
        }


def random_scene(rng: np.random.Generator, index: int, max_shapes: int = 3) -> Scene:
    n = int(rng.integers(1, max_shapes + 1))
    slots = rng.permutation(3)[:n]  # left / middle / right columns keep shapes apart and positions unambiguous
    shapes = []
    for slot in sorted(slots):
        size = "large" if rng.random() < 0.5 else "small"
        radius = float(rng.uniform(0.14, 0.16) if size == "large" else rng.uniform(0.09, 0.11))
        cx = (0.2, 0.5, 0.8)[slot] + float(rng.uniform(-0.03, 0.03))
        cy = float(rng.uniform(0.3, 0.7))
        shapes.append(Shape(SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))],
                            size, cx, cy, radius))
    return Scene(shapes, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], index)


def _background(name: str, px: int, rng: np.random.Generator) -> Image.Image:
    base = {"gray": (128, 128, 128), "sand": (210, 190, 150), "sky": (150, 200, 235), "mint": (170, 225, 195)}
    if name in base:
        return Image.new("RGB", (px, px), base[name])
    if name == "gradient":
        t = np.linspace(0, 1, px, dtype=np.float32)[None, :, None]
        arr = (np.array([90, 90, 160]) * (1 - t) + np.array([200, 160, 110]) * t).repeat(px, axis=0)
        return Image.fromarray(arr.astype(np.uint8))
    tile = max(4, px // 8)  # checker
    yy, xx = np.mgrid[0:px, 0:px]
    arr = np.where(((xx // tile + yy // tile) % 2 == 0)[..., None], [185, 185, 185], [150, 150, 150])
    return Image.fromarray(arr.astype(np.uint8))


def render(scene: Scene, px: int = 96, style: str = "normal", seed: int = 0) -> Image.Image:
    """Draw a scene; `style` renders the same content differently (for the RobustVQA-style split)."""
    rng = np.random.default_rng([seed, scene.index, STYLES.index(style)])
    img = _background(scene.background, px, rng)
    if style == "noisy":
        noise = rng.integers(0, 256, (px, px, 3), dtype=np.uint8)
        img = Image.fromarray((0.5 * np.asarray(img) + 0.5 * noise).astype(np.uint8))
    elif style == "striped":
        arr = np.asarray(img).copy()
        arr[:, ::4] = arr[:, ::4] // 2
        img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        if style == "outline":
            draw.polygon(s.polygon(px), outline=COLOURS[s.colour], width=max(1, px // 32))
        else:
            draw.polygon(s.polygon(px), fill=COLOURS[s.colour])
    if style == "inverted":
        img = Image.fromarray(255 - np.asarray(img))
    return img


def shape_mask(shape: Shape, px: int) -> np.ndarray:
    m = Image.new("L", (px, px), 0)
    ImageDraw.Draw(m).polygon(shape.polygon(px), fill=1)
    return np.asarray(m, dtype=np.uint8)


def questions_for(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, answer, answer_type) pairs answerable from the image."""
    s = scene.shapes[int(rng.integers(len(scene.shapes)))]
    qa = [
        (f"What colour is the {s.kind}?" if sum(x.kind == s.kind for x in scene.shapes) == 1
         else f"What colour is the {s.kind} {s.where}?", s.colour, "other"),
        (f"Which shape is {s.colour}?" if sum(x.colour == s.colour for x in scene.shapes) == 1
         else f"Which shape is {s.where}?", s.kind, "other"),
        ("How many shapes are there?", str(len(scene.shapes)), "number"),
    ]
    # yes/no, balanced within every image: one question names a shape that is there, one a shape that is not
    # (half of the time a present kind in another colour, as POPE's adversarial negatives do)
    shown = scene.shapes[int(rng.integers(len(scene.shapes)))]
    absent = [(k, c) for k in SHAPES for c in COLOURS if not any(x.kind == k and x.colour == c for x in scene.shapes)]
    same_kind = [a for a in absent if a[0] == shown.kind]
    pool = same_kind if same_kind and rng.random() < 0.5 else absent
    kind, colour = pool[int(rng.integers(len(pool)))]
    pairs = [((shown.kind, shown.colour), "yes"), ((kind, colour), "no")]
    for (k, c), answer in (pairs if rng.random() < 0.5 else pairs[::-1]):
        qa.append((f"Is there a {c} {k} in the image?", answer, "yes/no"))  # POPE's wording
    main = main_shape(scene)
    if main is not None:  # RobustVQA's wording, about the scene's one large shape
        wrong = [k for k in SHAPES if k != main.kind][int(rng.integers(len(SHAPES) - 1))]
        kind, answer = (main.kind, "yes") if rng.random() < 0.5 else (wrong, "no")
        qa.append((f"Is {kind} the main object in this image?", answer, "yes/no"))
    if len(scene.shapes) > 1:
        qa.append(("Which shape is on the left?", scene.shapes[0].kind, "other"))
    return qa


def main_shape(scene: Scene) -> Shape | None:
    """The scene's main object: its only shape, or its only large one (None when that is ambiguous)."""
    if len(scene.shapes) == 1:
        return scene.shapes[0]
    large = [s for s in scene.shapes if s.size == "large"]
    return large[0] if len(large) == 1 else None


def synth_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt template, question list and world word."""
    words = [*SHAPES, *COLOURS, *BACKGROUNDS, *NUMBER_WORDS, "small", "large", "left", "right", "middle", "yes", "no"]
    corpus = [*DEFAULT_PROMPTS.values(), *CAPTION_QUESTIONS, *IMAGE_QUESTIONS, *VG_QUESTIONS]
    rng = np.random.default_rng(0)
    for i in range(300):
        scene = random_scene(rng, i)
        corpus.append(scene.caption())
        corpus += [f"{q} The answer is {a}" for q, a, _ in questions_for(scene, rng)]
    corpus.append(" ".join(words))
    return corpus


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def synth_world(out_dir: str | Path, seed: int = 0, image_size: int = 96, num_train: int = 120, num_test: int = 40,
                num_laion_shards: int = 4, laion_per_shard: int = 40, num_mmc4_shards: int = 4,
                docs_per_shard: int = 12, with_tokenizer: bool = True) -> dict[str, Any]:
    """Write the shapes world under `out_dir` in the real layouts (paths as in configs/data/synth.yaml) and
    return a summary {files, counts}. Deterministic in `seed`."""
    if image_size < 8 or num_train < 1 or num_test < 1:
        raise ConfigError(f"synthetic world: image_size >= 8 and num_train, num_test >= 1 expected, got image_size "
                          f"{image_size}, num_train {num_train}, num_test {num_test}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    px = image_size
    counts: dict[str, int] = {}

    # COCO-style images: train2014 for training sets, val2014 for evaluation sets
    train = [random_scene(rng, i) for i in range(num_train)]
    test = [random_scene(rng, 100000 + i) for i in range(num_test)]
    for split, scenes in (("train2014", train), ("val2014", test)):
        d = out / "coco" / split
        d.mkdir(parents=True, exist_ok=True)
        for sc in scenes:
            render(sc, px, seed=seed).save(d / f"COCO_{split}_{sc.index:012d}.jpg", quality=90)

    def name(split: str, sc: Scene) -> str:
        return f"{split}/COCO_{split}_{sc.index:012d}.jpg"

    # COCO Karpathy captions (train: one row per caption; test: list of references)
    _write_json(out / "coco/annotations/coco_karpathy_train.json",
                [{"image": name("train2014", sc), "caption": sc.caption(), "image_id": f"coco_{sc.index}"}
                 for sc in train])
    _write_json(out / "coco/annotations/coco_karpathy_test.json",
                [{"image": name("val2014", sc), "caption": [sc.caption(), sc.caption().replace(" on a ", " over a ")]}
                 for sc in test])
    counts["coco_karpathy_train"], counts["coco_karpathy_test"] = len(train), len(test)
    _write_json(out / "scenes.json", {
        split: [{"image": name(folder, sc), "index": sc.index, **sc.attributes()} for sc in scenes]
        for split, folder, scenes in (("train", "train2014", train), ("test", "val2014", test))})

    # the test scenes again in shifted styles that keep content and colours (noisy / striped renderings): the
    # same VQA questions under a distribution shift
    d = out / "coco" / "shift2014"
    d.mkdir(parents=True, exist_ok=True)
    for sc in test:
        style = SHIFT_STYLES[sc.index % len(SHIFT_STYLES)]
        render(sc, px, style=style, seed=seed).save(d / f"COCO_shift2014_{sc.index:012d}.jpg", quality=90)

    # VQAv2 questions + annotations (shift2014 asks the val2014 questions of the restyled images)
    for split, scenes in (("train2014", train), ("val2014", test), ("shift2014", test)):
        qs, anns = [], []
        for sc in scenes:
            for k, (q, a, atype) in enumerate(questions_for(sc, np.random.default_rng([seed, sc.index]))):
                qid = sc.index * 10 + k
                qs.append({"image_id": sc.index, "question": q, "question_id": qid})
                anns.append({"image_id": sc.index, "question_id": qid, "question_type": "what", "answer_type": atype,
                             "multiple_choice_answer": a,
                             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                         for j in range(10)]})
        header = {"info": {"description": "deem shapes world"}, "license": {}, "data_subtype": split,
                  "task_type": "Open-Ended", "data_type": "mscoco"}
        _write_json(out / f"vqav2/v2_OpenEnded_mscoco_{split}_questions.json", {**header, "questions": qs})
        _write_json(out / f"vqav2/v2_mscoco_{split}_annotations.json", {**header, "annotations": anns})
        counts[f"vqav2_{split}"] = len(qs)

    # POPE: yes/no object-presence questions on the test images (three negative-sampling variants)
    for variant in ("random", "popular", "adversarial"):
        vr = np.random.default_rng([seed, len(variant)])
        lines, qid = [], 1
        for sc in test:
            s = sc.shapes[0]
            lines.append({"question_id": qid, "image": name("val2014", sc).split("/")[1],
                          "text": f"Is there a {s.colour} {s.kind} in the image?", "label": "yes"})
            absent = [(c, k) for c in COLOURS for k in SHAPES
                      if not any(x.colour == c and x.kind == k for x in sc.shapes)]
            if variant == "adversarial":  # same shape, another colour
                absent = [a for a in absent if a[1] == s.kind] or absent
            c, k = absent[int(vr.integers(len(absent)))]
            lines.append({"question_id": qid + 1, "image": name("val2014", sc).split("/")[1],
                          "text": f"Is there a {c} {k} in the image?", "label": "no"})
            qid += 2
        p = out / f"pope/coco_pope_{variant}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        counts[f"pope_{variant}"] = len(lines)

    # RobustVQA: the main (first) shape's class, rendered in shifted styles
    robust: dict[str, list[dict[str, Any]]] = {}
    for key, style in (("imagenet_a", "noisy"), ("imagenet_r", "outline"), ("imagenet_v2", "inverted")):
        entries = []
        for sc in test:
            main = main_shape(sc)
            if main is None:
                continue
            rel = f"robustvqa/{key}/{main.kind}/{sc.index:06d}.jpg"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            render(sc, px, style=style, seed=seed).save(out / rel, quality=90)
            wrong = [k for k in SHAPES if k != main.kind][sc.index % (len(SHAPES) - 1)]
            entries.append({"file_name": rel, "gt_caption": main.kind, "error_caption": wrong})
        robust[key] = entries
    _write_json(out / "robustvqa/robustvqa_test.json", robust)
    counts["robustvqa"] = sum(len(v) for v in robust.values())

    # RefCOCO: COCO instances + refs (JSON form of REFER's refs(unc).p) + grounding eval + Osprey masks
    images, anns, refs = [], [], []
    ann_id = 1
    for sc, split in [(s, "train") for s in train] + [(s, "val") for s in test]:
        folder = "train2014" if split == "train" else "val2014"
        images.append({"id": sc.index, "file_name": name(folder, sc).split("/")[1], "height": px, "width": px})
        for s in sc.shapes:
            x1, y1, x2, y2 = s.box(px)
            poly = [round(v, 2) for p in s.polygon(px) for v in p]
            anns.append({"id": ann_id, "image_id": sc.index, "category_id": SHAPES.index(s.kind) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(shape_mask(s, px).sum()),
                         "segmentation": [poly], "iscrowd": 0})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": sc.index, "split": split,
                         "category_id": SHAPES.index(s.kind) + 1,
                         "sentences": [{"raw": f"the {s.colour} {s.kind}", "sent": f"the {s.colour} {s.kind}"},
                                       {"raw": f"{s.phrase()} {s.where}", "sent": f"{s.phrase()} {s.where}"}]})
            ann_id += 1
    categories = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(SHAPES)]
    _write_json(out / "refcoco/refcoco/instances.json", {"images": images, "annotations": anns,
                                                         "categories": categories})
    _write_json(out / "refcoco/refcoco/refs(unc).json", refs)
    counts["refcoco_refs"] = len(refs)
    by_id = {a["id"]: a for a in anns}
    _write_json(out / "refcoco/refcoco_val.json", [
        {"img_id": f"COCO_val2014_{r['image_id']:012d}_{r['ref_id']}", "sents": r["sentences"][1]["raw"],
         "bbox": by_id[r["ann_id"]]["bbox"]} for r in refs if r["split"] == "val"])

    def osprey(scenes: list[Scene], folder: str, per_expression: bool) -> dict[str, Any]:
        """Osprey COCO format: per_expression -> one image entry per shape with its `caption` (RefCOCO style);
        otherwise one entry per image with every shape as a category-labelled region (COCO instances style)."""
        o_images, o_anns = [], []
        for sc in scenes:
            regions = [a for a in anns if a["image_id"] == sc.index]
            file_name = name(folder, sc).split("/")[1]
            if per_expression:
                for shape, ann in zip(sc.shapes, regions):
                    o_images.append({"id": len(o_images) + 1, "file_name": file_name, "height": px, "width": px,
                                     "caption": f"{shape.phrase()} {shape.where}"})
                    o_anns.append({**ann, "id": len(o_anns) + 1, "image_id": len(o_images)})
            else:
                o_images.append({"id": sc.index, "file_name": file_name, "height": px, "width": px})
                o_anns += [{**a, "id": len(o_anns) + k + 1} for k, a in enumerate(regions)]
        return {"images": o_images, "annotations": o_anns, "categories": categories}

    _write_json(out / "refcoco/finetune_refcoco_train_with_mask.json", osprey(train, "train2014", True))
    _write_json(out / "refcoco/finetune_refcocog_val_with_mask.json", osprey(test, "val2014", True))
    _write_json(out / "coco/annotations/instances_train2017_shapes.json", osprey(train, "train2014", False))
    counts["osprey_refcoco_train"] = len(train)

    # LAION-style webdataset tars (img2dataset layout: <key>.jpg, <key>.json, <key>.txt)
    (out / "laion").mkdir(parents=True, exist_ok=True)
    idx = 0
    for shard in range(num_laion_shards):
        with tarfile.open(out / "laion" / f"{shard:05d}.tar", "w") as tar:
            for _ in range(laion_per_shard):
                sc = random_scene(rng, 200000 + idx)
                key = f"{shard:05d}{idx:04d}"
                cap = sc.caption()
                for ext, data in (("jpg", _jpeg(render(sc, px, seed=seed))),
                                  ("json", json.dumps({"caption": cap, "key": key, "status": "success"}).encode()),
                                  ("txt", cap.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                idx += 1
    counts["laion_pairs"] = idx

    # MMC4-style documents: sentences describing several scenes, each image matched to its sentence
    img_dir = out / "mmc4" / "mmc4_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    (out / "mmc4" / "mmc4_annts").mkdir(parents=True, exist_ok=True)
    n_docs = 0
    for shard in range(num_mmc4_shards):
        member = f"docs_no_face_shard_{shard}_v3.jsonl"
        lines = []
        for d in range(docs_per_shard):
            n_img = int(rng.integers(2, 5))
            scenes = [random_scene(rng, 300000 + n_docs * 10 + k) for k in range(n_img)]
            texts, infos = [], []
            for k, sc in enumerate(scenes):
                texts.append(f"Picture {k + 1} shows {sc.caption()}.")
                if rng.random() < 0.5:
                    texts.append(f"There {'is' if len(sc.shapes) == 1 else 'are'} "
                                 f"{NUMBER_WORDS[len(sc.shapes)]} shape{'s' if len(sc.shapes) > 1 else ''} in it.")
                image_name = hashlib.sha1(f"{seed}-{shard}-{d}-{k}".encode()).hexdigest()[:12] + ".jpg"
                render(sc, px, seed=seed).save(img_dir / image_name, quality=90)
                sim = 0.3 if k > 0 or rng.random() < 0.8 else 0.1  # some images fall below the 0.24 threshold
                infos.append({"image_name": image_name, "raw_url": f"http://example.invalid/{image_name}",
                              "matched_text_index": len(texts) - 1, "matched_sim": sim})
            lines.append({"url": f"http://example.invalid/doc{n_docs}", "text_list": texts, "image_info": infos,
                          "similarity_matrix": [[0.0] * len(texts) for _ in infos]})
            n_docs += 1
        with zipfile.ZipFile(out / "mmc4" / "mmc4_annts" / f"{member}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            info = zipfile.ZipInfo(member, date_time=(2024, 1, 1, 0, 0, 0))  # fixed time: byte-identical worlds
            zf.writestr(info, "".join(json.dumps(x) + "\n" for x in lines), compress_type=zipfile.ZIP_DEFLATED)
    counts["mmc4_docs"] = n_docs

    if with_tokenizer:
        from deem.data.tokenizer import build_llama_layout_tokenizer, build_tiny_tokenizer

        build_tiny_tokenizer(synth_corpus(), vocab_size=512, save_dir=out / "tokenizer")
        # the same words with Vicuna's id layout, for the 7B architecture (configs/data/synth_7b.yaml)
        build_llama_layout_tokenizer(synth_corpus(), save_dir=out / "tokenizer_llama")
    summary = {"seed": seed, "image_size": px, "counts": counts}
    _write_json(out / "world.json", summary)
    return summary
