"""Shared fixtures for the data-layer tests: a tiny offline tokenizer and image writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deem.data.images import DualViewTransform
from deem.data.synth import synth_corpus
from deem.data.tokenizer import DeemTokenizer, build_tiny_tokenizer

NUM_IMG_TOKEN = 3


@pytest.fixture(scope="session")
def tok() -> DeemTokenizer:
    return build_tiny_tokenizer(synth_corpus(), vocab_size=400, num_img_token=NUM_IMG_TOKEN)


@pytest.fixture
def small_tf() -> DualViewTransform:
    return DualViewTransform(resolution=16, resolution_dec=32, center_crop=False, random_flip=False)


def write_image(path: Path, size=(40, 30), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def ids_of(tok: DeemTokenizer, text: str) -> list[int]:
    """The reference tokenisation of a whole prompt string (BOS prepended)."""
    return tok.encode(text)


def trained_text(tok: DeemTokenizer, batch, row: int) -> str:
    labels = batch["gt_text_ids"][row]
    return tok.decode([int(t) for t in labels if t != -100])


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
