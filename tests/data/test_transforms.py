"""Dual-view transform: one crop/flip decision for both views, masks and boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deem.data.errors import SampleError
from deem.data.images import DualViewTransform, ViewParams, box_mask, load_image, random_crop_containing


def _half_image(w=60, h=40) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left red
    arr[:, w // 2:] = (0, 0, 255)  # right blue
    return Image.fromarray(arr)


def test_views_share_one_flip_decision():
    tf = DualViewTransform(resolution=8, resolution_dec=24, center_crop=True, random_flip=True)
    flips = set()
    for seed in range(12):
        enc, dec, params = tf(_half_image(), np.random.default_rng(seed))
        assert enc.shape == (3, 8, 8) and dec.shape == (3, 24, 24)
        assert enc.dtype == torch.float32 and float(enc.min()) >= 0.0 and float(enc.max()) <= 1.0
        left_is_red = [bool(v[0, :, 0].mean() > v[2, :, 0].mean()) for v in (enc, dec)]
        assert left_is_red[0] == left_is_red[1] == (not params.flip), "both views must be flipped together"
        flips.add(params.flip)
    assert flips == {True, False}


def test_center_crop_and_squash():
    img = Image.new("RGB", (80, 40), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 20, 40))  # red band on the far left, cropped away by a centre crop
    crop = DualViewTransform(16, 16, center_crop=True, random_flip=False)(img)[0]
    squash = DualViewTransform(16, 16, center_crop=False, random_flip=False)(img)[0]
    assert float(crop[0].max()) < 0.1, "centre square crop drops the left quarter"
    assert float(squash[0, :, 0].mean()) > 0.9, "squash-resize keeps the whole width"


def test_mask_and_box_follow_the_image():
    w, h = 50, 40
    img = Image.new("RGB", (w, h), (0, 0, 0))
    img.paste((255, 255, 255), (5, 10, 20, 30))  # white box at x 5..20, y 10..30
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 5:20] = 1
    tf = DualViewTransform(20, 40, center_crop=False, random_flip=False)
    for flip in (False, True):
        params = ViewParams(crop=(0.0, 0.0, float(w), float(h)), flip=flip, size=(w, h))
        enc, _, _ = tf(img, params=params)
        m = tf.mask(mask, params)
        assert m.shape == (1, 20, 20)
        white = enc.mean(0) > 0.5
        agree = (white == m[0].bool()).float().mean()
        assert agree > 0.95
        x1, y1, x2, y2 = tf.box((5, 10, 20, 30), params)
        bm = box_mask((x1, y1, x2, y2), 20)
        assert float((bm[0].bool() == m[0].bool()).float().mean()) > 0.95
        assert (x1 < 0.5) != flip, "a flip moves the box to the other side"


def test_random_crop_contains_box():
    rng = np.random.default_rng(0)
    for _ in range(50):
        box = (30.0, 20.0, 45.0, 35.0)
        left, top, right, bottom = random_crop_containing((100, 80), box, rng)
        assert left <= box[0] and top <= box[1] and right >= box[2] and bottom >= box[3]
        assert left >= 0 and top >= 0 and right <= 100 and bottom <= 80


def test_load_image_errors(tmp_path):
    with pytest.raises(SampleError, match="image not found"):
        load_image(tmp_path / "nope.jpg", "ds", "k1")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(SampleError, match=r"ds \[k2\]: corrupt image .*bad.jpg"):
        load_image(bad, "ds", "k2")
    Image.new("L", (4, 4)).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png", "ds", "k3").mode == "RGB"


def test_transform_config_validation():
    assert DualViewTransform.from_config({"resolution": 448}).resolution_dec == 512
    with pytest.raises(KeyError, match="aug_type"):
        DualViewTransform.from_config({"aug_type": "dual_numpy"})
