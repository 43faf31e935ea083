"""Image loading and the dual-view transform (encoder view + diffusion view with one shared crop/flip).

Both views of an image, its region masks and its boxes go through the *same* geometric decision
(`ViewParams`: a crop window in original pixels and a horizontal flip), fixing the original's independent
per-view flips (spec data-eval.md §0.1, §5.1).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deem.data.errors import SampleError

# Images with more pixels are refused from their header, before any decoding (`max_image_pixels` in a dataset or
# data config overrides it). Below Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS, 89.5 MP), which stays active.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# where transparent pixels show: their stored colour is arbitrary (often black or noise), so they are composited
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(src: str | Path | bytes, source: str, key: str,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB (`to_rgb`).

    A missing, truncated or non-image file, a decompression bomb (Pillow's guard) or an image with more than
    `max_pixels` pixels (checked from the header, before decoding; None or 0 disables our limit) raises
    `SampleError` naming `source`, `key` and the file."""
    where = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice its limit; our own limit below decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
                w, h = img.size
                if max_pixels and w * h > max_pixels:
                    raise SampleError(source, key, f"image too large: {where} is {w}x{h} = {w * h} pixels > "
                                      f"max_image_pixels {max_pixels}", kind="image too large")
                img.load()
                return to_rgb(img)
    except SampleError:
        raise
    except FileNotFoundError:
        raise SampleError(source, key, f"image not found: {src}", kind="image not found") from None
    except Image.DecompressionBombError as exc:
        raise SampleError(source, key, f"decompression bomb: {where}: {exc}", kind="decompression bomb") from None
    except Exception as exc:  # a third-party decoder over untrusted bytes: any failure is this sample's
        raise SampleError(source, key, f"corrupt image {where}: {type(exc).__name__}: {exc}",
                          kind="corrupt image") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """A new 8-bit RGB image with the same content, for every Pillow mode.

    16-bit and 32-bit integer greyscale (I;16*, I: values 0-65535) is scaled to 0-255 (Pillow's own conversion
    clips instead: 200/65535 would become 200/255); F is read on the 0-255 scale of L (Pillow's convention), NaN
    as 0; transparency (RGBA, LA, PA, premultiplied modes, P or L/RGB with a transparent colour) is composited
    over a white background instead of exposing the colour stored under transparent pixels."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        values = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
        return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        if mode == "La":
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ViewParams:
    """One geometric decision: crop window (left, top, right, bottom) in original pixels, then optional flip."""

    crop: tuple[float, float, float, float]
    flip: bool
    size: tuple[int, int]  # original (width, height)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class DualViewTransform:
    """Produce the encoder view (`resolution`, 256/448 in the real configs) and the diffusion view
    (`resolution_dec`, 512) of a PIL image as float32 CHW tensors in [0, 1] (no mean/std normalisation).

    `center_crop=True`: square centre crop of the short side, bicubic resize (with box pre-reduction for large
    downscales, like the original's repeated halving). `center_crop=False`: squash-resize the whole image.
    `random_flip=True`: one horizontal flip decision (p=0.5) shared by both views, masks and boxes.
    """

    def __init__(
        self, resolution: int = 256, resolution_dec: int = 512, center_crop: bool = True, random_flip: bool = True
    ):
        if resolution < 1 or resolution_dec < 1:
            raise ValueError(f"resolutions must be positive, got {resolution}, {resolution_dec}")
        self.resolution = int(resolution)
        self.resolution_dec = int(resolution_dec)
        self.center_crop = center_crop
        self.random_flip = random_flip

    @classmethod
    def from_config(cls, cfg: dict | None) -> DualViewTransform:
        cfg = dict(cfg or {})
        known = {"resolution", "resolution_dec", "center_crop", "random_flip"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise KeyError(f"unknown transform keys {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    def sample_params(self, size: tuple[int, int], rng: np.random.Generator | None) -> ViewParams:
        w, h = size
        if self.center_crop:
            s = min(w, h)
            left, top = (w - s) / 2, (h - s) / 2
            crop = (left, top, left + s, top + s)
        else:
            crop = (0.0, 0.0, float(w), float(h))
        flip = bool(self.random_flip and rng is not None and rng.random() < 0.5)
        return ViewParams(crop=crop, flip=flip, size=(w, h))

    def view(self, image: Image.Image, params: ViewParams, resolution: int) -> torch.Tensor:
        out = image.resize((resolution, resolution), Image.BICUBIC, box=params.crop, reducing_gap=2.0)
        if params.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(out)

    def __call__(
        self, image: Image.Image, rng: np.random.Generator | None = None, params: ViewParams | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, ViewParams]:
        """Return (encoder view, diffusion view, the params used)."""
        params = params or self.sample_params(image.size, rng)
        return self.view(image, params, self.resolution), self.view(image, params, self.resolution_dec), params

    def mask(self, mask: np.ndarray, params: ViewParams) -> torch.Tensor:
        """Map an HxW region mask (original pixels) into the encoder view: (1, R, R) float32 of 0/1."""
        if mask.shape != (params.size[1], params.size[0]):
            raise ValueError(f"mask shape {mask.shape} does not match image size {params.size}")
        img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
        img = img.resize((self.resolution, self.resolution), Image.NEAREST, box=params.crop)
        if params.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy((np.asarray(img) > 127).astype(np.float32))[None]

    @staticmethod
    def box(box: tuple[float, float, float, float], params: ViewParams) -> tuple[float, float, float, float]:
        """Map an (x1, y1, x2, y2) box in original pixels to the view, normalised to [0, 1] and clipped."""
        left, top, right, bottom = params.crop
        cw, ch = right - left, bottom - top
        x1, x2 = (box[0] - left) / cw, (box[2] - left) / cw
        y1, y2 = (box[1] - top) / ch, (box[3] - top) / ch
        if params.flip:
            x1, x2 = 1.0 - x2, 1.0 - x1
        clip = lambda v: min(1.0, max(0.0, v))
        return clip(x1), clip(y1), clip(x2), clip(y2)


def box_mask(box01: tuple[float, float, float, float], resolution: int) -> torch.Tensor:
    """A (1, R, R) mask with ones inside a [0,1]-normalised box (at least one pixel)."""
    x1 = min(resolution - 1, math.floor(box01[0] * resolution))
    y1 = min(resolution - 1, math.floor(box01[1] * resolution))
    x2 = max(x1 + 1, math.ceil(box01[2] * resolution))
    y2 = max(y1 + 1, math.ceil(box01[3] * resolution))
    m = torch.zeros(1, resolution, resolution)
    m[:, y1:y2, x1:x2] = 1.0
    return m


def random_crop_containing(
    size: tuple[int, int], box: tuple[float, float, float, float], rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
    """A random-resized-crop window (timm/torchvision sampling of area and aspect) enlarged to contain `box`.

    Unlike the original, the enlargement uses the window's own coordinates (spec §5.14)."""
    w, h = size
    area = w * h
    cw, ch = float(w), float(h)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        tw, th = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < tw <= w and 0 < th <= h:
            cw, ch = tw, th
            break
    left = rng.uniform(0, w - cw) if w > cw else 0.0
    top = rng.uniform(0, h - ch) if h > ch else 0.0
    right, bottom = left + cw, top + ch
    left, top = min(left, box[0]), min(top, box[1])
    right, bottom = max(right, box[2]), max(bottom, box[3])
    return max(0.0, left), max(0.0, top), min(float(w), right), min(float(h), bottom)
