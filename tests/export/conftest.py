"""Fixtures of the export tests: the inference tests' tiny checkpoint (weights that make decoding depend on prompts,
images and positions) exported once per session with custom nodes (through `deem export onnx`) and decomposed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.infer.conftest import NUM_IMG_TOKEN, make_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread_everywhere(one_thread):
    yield


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from deem.data.synth import synth_corpus
    from deem.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(synth_corpus(), vocab_size=512, num_img_token=NUM_IMG_TOKEN,
                                save_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def model(tokenizer):
    return make_model(tokenizer, seed=2, num_hidden_layers=3)  # layers 0 and 2 with cross-attention, 1 without


@pytest.fixture(scope="session")
def checkpoint(model, tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tokenizer.hf.save_pretrained(path / "tokenizer")
    return path


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory) -> Path:
    """`deem export onnx` of the checkpoint (fp32, deem custom nodes), its weights in external-data files as a
    graph over 2 GB has them (the threshold lowered to 0 bytes)."""
    from deem.cli import main
    from deem.export import onnx_export

    out = tmp_path_factory.mktemp("onnx")
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
        assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def decomposed(model, tmp_path_factory) -> Path:
    """The same model exported with standard ops only."""
    from deem.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("onnx_decomposed")
    torch.set_num_threads(1)
    export_model(model, out, "fp32", decompose_ops=True)
    return out


@pytest.fixture(scope="session", params=["custom", "decomposed"])
def export_dir(request) -> Path:
    return request.getfixturevalue("exported" if request.param == "custom" else "decomposed")


def rel_l2(a, b) -> float:
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
