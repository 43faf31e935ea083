"""Fixtures of the inference tests: a tiny checkpoint with a tiny tokenizer, whose weights make decoding depend on
the prompt, the images and the position (gates open, a text head with a real spread of logits), and engines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

NUM_IMG_TOKEN = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread_everywhere(one_thread):
    yield


def wake(model, seed: int = 0) -> None:
    """Random tiny weights decode one token over and over (near-tied logits, uniform attention). Open the
    cross-attention gates (with a non-zero null-slot path), sharpen self-attention (positions and cache contents
    matter) and spread the head and embeddings, so that outputs depend on everything and greedy choices are not
    ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for cross in model.llm.cross_attention_layers():
            cross.gate.fill_(0.8)
            cross.attn.ignore_token.copy_(torch.randn(cross.attn.ignore_token.shape, generator=g) * 0.3)
            cross.attn.output_proj.weight.mul_(3.0)
            cross.attn.output_proj.bias.copy_(torch.randn(cross.attn.output_proj.bias.shape, generator=g) * 0.3)
        for layer in model.llm.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
        proj = model.visual_tokenizer.proj_t.weight  # image tokens as large as text embeddings
        proj.copy_(torch.randn(proj.shape, generator=g) * 0.3)
        head = model.text_head.head.weight
        head.copy_(torch.randn(head.shape, generator=g) * 0.5)
        emb = model.llm.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=g))


def make_model(tokenizer=None, seed: int = 0, **llm):
    from deem.models import DeemModel, tiny
    from deem.tokens import TokenLayout

    tokens = None if tokenizer is None else TokenLayout(tokenizer.special, len(tokenizer.hf), NUM_IMG_TOKEN)
    cfg = tiny(tokens)
    cfg.llm.update(llm)
    torch.manual_seed(seed)
    model = DeemModel(cfg).eval()
    wake(model, seed)
    return model


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from deem.data.synth import synth_corpus
    from deem.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(synth_corpus(), vocab_size=512, num_img_token=NUM_IMG_TOKEN,
                                save_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    """A `deem train export`-style directory: the model and tokenizer/."""
    path = tmp_path_factory.mktemp("ckpt")
    make_model(tokenizer).save_pretrained(path)
    tokenizer.hf.save_pretrained(path / "tokenizer")
    return path


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):
        arr = (rng.random((40 + 8 * k, 48, 3)) * 255).astype(np.uint8)
        arr[: 10 + 5 * k, :, k] = 255  # a different coloured band per image
        p = out / f"img{k}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def engine(checkpoint):
    from deem.infer import InferenceEngine

    return InferenceEngine.from_checkpoint(checkpoint, "cpu")
