"""Images drawn by the image decoder from test captions, and measured checks that they follow the caption:
per caption, the dominant shape colour of the drawn image must be one the caption names
(`caption_colour_match`); stricter, per shape, the dominant palette colour in the image's third where the
caption puts the shape (left / middle / right) must be that shape's colour (`colour_match`)."""

from __future__ import annotations

import collections

import numpy as np
import torch

from deem.data.synth import COLOURS
from deem.data.tokenizer import DeemTokenizer
from deem.demo.world import WorldScene
from deem.models import DeemModel

# colours a background pixel can have (flat backgrounds, the gradient's ramp, the checker's two greys)
_BACKGROUND_RGB = [(128, 128, 128), (210, 190, 150), (150, 200, 235), (170, 225, 195), (185, 185, 185),
                   (150, 150, 150)] + [tuple(int(v) for v in np.array([90, 90, 160]) * (1 - t)
                                             + np.array([200, 160, 110]) * t) for t in np.linspace(0, 1, 6)]
_BANDS = {"left": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "right": (2 / 3, 1.0)}


@torch.no_grad()
def generate_from_captions(model: DeemModel, tokenizer: DeemTokenizer, captions: list[str], seed: int,
                           steps: int = 50, guidance: float = 3.5) -> torch.Tensor:
    """One image per caption ([N, 3, s, s] in [0, 1]): "<s>caption<soi><image>..." through the LLM and the
    image decoder, DDPM with classifier-free guidance."""
    sp, n = tokenizer.special, model.config.num_img_token
    seqs = [[*tokenizer.encode(c), sp.soi_id, *[sp.image_id] * n] for c in captions]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), sp.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    size = model.config.image_encoder["image_size"]
    placeholder = torch.zeros(len(seqs), 3, size, size)  # the image being drawn: its tokens are never read
    return model.eval().generate_images(ids, mask, placeholder, torch.ones(len(seqs), dtype=torch.long),
                                        num_inference_steps=steps, guidance_scale=guidance,
                                        generator=torch.Generator().manual_seed(seed))


def dominant_colour(image: torch.Tensor, band: tuple[float, float]) -> str | None:
    """The palette colour most of the non-background pixels of a vertical band ([3, H, W] in [0, 1]) are
    closest to; None when no pixel of the band is closer to a shape colour than to a background colour."""
    w = image.shape[-1]
    x0, x1 = int(band[0] * w), max(int(band[0] * w) + 1, int(band[1] * w))
    pixels = (image[:, :, x0:x1].permute(1, 2, 0).reshape(-1, 3).numpy() * 255.0).astype(np.float32)
    names = list(COLOURS)
    refs = np.array([COLOURS[c] for c in names] + _BACKGROUND_RGB, dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - refs[None]) ** 2).sum(-1), axis=1)
    votes = collections.Counter(names[i] for i in nearest if i < len(names))
    return votes.most_common(1)[0][0] if votes else None


def caption_colour_match(images: torch.Tensor, scenes: list[WorldScene]) -> tuple[float, list[str | None]]:
    """Accuracy (%) over captions: the dominant shape colour of the whole drawn image is one of the colours the
    caption names. Also returns the dominant colour per image."""
    found = [dominant_colour(img, (0.0, 1.0)) for img in images]
    hits = [c is not None and c in {s.colour for s in ws.shapes} for c, ws in zip(found, scenes)]
    return 100.0 * sum(hits) / max(1, len(hits)), found


def caption_colour_chance(scenes: list[WorldScene]) -> float:
    """The best constant answer for `caption_colour_match`: the colour named by the most captions (%)."""
    counts = collections.Counter(c for ws in scenes for c in {s.colour for s in ws.shapes})
    return 100.0 * counts.most_common(1)[0][1] / max(1, len(scenes))


def colour_match(images: torch.Tensor, scenes: list[WorldScene]) -> tuple[float, list[list[tuple[str, str | None]]]]:
    """Accuracy (%) over every shape of every scene: the dominant colour at the shape's position equals its
    colour. Also returns (expected, found) per shape."""
    pairs = [[(s.colour, dominant_colour(img, _BANDS[s.position])) for s in ws.shapes]
             for img, ws in zip(images, scenes)]
    flat = [a == b for row in pairs for a, b in row]
    return 100.0 * sum(flat) / max(1, len(flat)), pairs


def colour_chance(train: list[WorldScene]) -> float:
    """The most frequent shape colour of the training scenes, as an accuracy (%)."""
    counts = collections.Counter(s.colour for ws in train for s in ws.shapes)
    return 100.0 * counts.most_common(1)[0][1] / max(1, sum(counts.values()))
