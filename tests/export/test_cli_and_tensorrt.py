"""`deem export` errors (one line, status 2), and the TensorRT side that runs without TensorRT: the message naming
what is missing, and the optimisation-profile shapes taken from the manifest."""

from __future__ import annotations

import importlib.util

import pytest

from deem.cli import main
from deem.export.tensorrt import Ranges, axis_value, profile_shapes


def test_export_onnx_of_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["export", "onnx", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deem export onnx: error:") and "config.json" in err and "\n" not in err


def test_export_tensorrt_of_a_directory_without_a_manifest(tmp_path, capsys):
    assert main(["export", "tensorrt", "--onnx", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_export_tensorrt_says_what_is_missing(exported, tmp_path, capsys):
    assert main(["export", "tensorrt", "--onnx", str(exported), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'tensorrt' cannot be imported" in err
    assert "libdeem_trt_plugins.so" in err and "DEEM_TENSORRT=ON" in err and "--decompose" in err
    assert not (tmp_path / "e").exists()


def test_export_tensorrt_checks_its_ranges(exported, tmp_path, capsys):
    assert main(["export", "tensorrt", "--onnx", str(exported), "--out", str(tmp_path), "--batch", "4,2,8"]) == 2
    assert "--batch must be MIN,OPT,MAX" in capsys.readouterr().err


def test_profile_shapes_from_the_manifest_axes():
    assert axis_value("past_sequence + 1", {"past_sequence": 7}) == 8
    assert axis_value("2*images", {"images": 3}) == 6 and axis_value(5, {}) == 5
    with pytest.raises(ValueError, match="cannot evaluate"):
        axis_value("__import__('os')", {})
    io = [{"name": "attention_mask", "shape": ["batch", "past_sequence + 1"]},
          {"name": "past_key.0", "shape": ["batch", 4, "past_sequence", 24]}]
    shapes = profile_shapes(io, Ranges(batch=(1, 2, 4), sequence=(2, 16, 64)).axes(context=512))
    assert shapes["attention_mask"] == [(1, 2), (2, 17), (4, 512)]  # past capped at the context - 1
    assert shapes["past_key.0"][2] == (4, 4, 511, 24)
