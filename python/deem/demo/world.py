"""The demo's view of the synthetic world: scene attributes (from `scenes.json`, never parsed back from
captions), captions with and without colours, and images as tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deem.data.synth import COLOURS, SHAPES, Scene, Shape


@dataclass
class WorldScene:
    """One image of the world and its content."""

    image: str  # relative to <world>/coco
    scene: Scene

    @property
    def background(self) -> str:
        return self.scene.background

    @property
    def shapes(self) -> list[Shape]:
        return self.scene.shapes


def load_scenes(world: Path, split: str) -> list[WorldScene]:
    """The scenes of a split ("train" or "test") as `synth_world` wrote them to scenes.json."""
    rows = json.loads((Path(world) / "scenes.json").read_text(encoding="utf-8"))[split]
    out = []
    for row in rows:
        shapes = [Shape(s["kind"], s["colour"], s["size"], s["cx"], s["cy"], s["radius"]) for s in row["shapes"]]
        out.append(WorldScene(row["image"], Scene(shapes, row["background"], row["index"])))
    return out


def load_pixels(world: Path, scenes: list[WorldScene], size: int, folder: str | None = None) -> torch.Tensor:
    """[N, 3, size, size] float images in [0, 1] (bicubic squash, as the evaluation transform)."""

    def one(ws: WorldScene) -> torch.Tensor:
        path = Path(world) / "coco" / ws.image
        if folder is not None:
            path = Path(world) / "coco" / folder / path.name.replace(path.parent.name, folder)
        image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    return torch.stack([one(ws) for ws in scenes])


COLOUR_NAMES = tuple(COLOURS)
KIND_NAMES = tuple(SHAPES)


def pretraining_corpus(seed: int, n: int, sizes: tuple[int, ...], image_size: int = 96) -> tuple[list[WorldScene],
                                                                                                 list[torch.Tensor]]:
    """`n` fresh scenes of the world (never among its training or test images) rendered in memory: the large
    corpus the stand-ins for the pretrained components are fitted on (CLIP and Stable Diffusion were
    pretrained on far more images than any downstream set). Returns the scenes and one [n, 3, s, s] tensor in
    [0, 1] per size in `sizes`."""
    from deem.data.synth import random_scene, render

    rng = np.random.default_rng([seed, 7919])
    scenes, pixels = [], [[] for _ in sizes]
    for i in range(n):
        scene = random_scene(rng, 900000 + i)
        image = render(scene, image_size, seed=seed)
        scenes.append(WorldScene(f"pretraining/{scene.index}", scene))
        for k, size in enumerate(sizes):
            small = image.resize((size, size), Image.BICUBIC)
            pixels[k].append(torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return scenes, [torch.stack(p) for p in pixels]
