"""benchmarks/step.py --tiny --baseline: the step with our blocks and with the original building blocks runs on the
CPU, computes the same losses from the same weights and records every figure."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

STEP = Path(__file__).resolve().parents[2] / "benchmarks" / "step.py"


def load_step():
    spec = importlib.util.spec_from_file_location("deem_bench_step", STEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through the module
    spec.loader.exec_module(module)
    return module


def test_tiny_step_with_baseline(tmp_path):
    step = load_step()
    assert step.main(["--tiny", "--baseline", "--steps", "1", "--reps", "1", "--profile-rows", "5",
                      "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "step_tiny.json").read_text())
    ours, base = result["variants"]["ours"], result["variants"]["baseline"]
    # the original formulation computes the same function over the same weights (fp32, no dropout in tiny)
    assert ours["losses_first_step"].keys() == {"txt", "img", "feedback"}
    for k, v in ours["losses_first_step"].items():
        assert math.isfinite(v)
        assert base["losses_first_step"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    switched = base["switched"]
    assert all(n > 0 for n in switched.values()), switched
    for variant in (ours, base):
        assert variant["step_ms"] > 0
        assert variant["forward_ms_in_step"]["backward"] > 0
        assert variant["forward_calls_in_step"]["Q-Former resampler (visual tokenizer)"] >= 1
        assert len(variant["profile_top_ops"]) == 5
        iso = variant["isolated"]
        assert {"Q-Former resampler (visual tokenizer)", "MMFSNet (UNet feature path, all blocks)",
                "image decoder Q-Former"} <= set(iso)
        assert any(k.startswith("MMFS cross-attention") for k in iso)
        assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in iso.values())
    assert result["comparison"]["speedup (baseline / ours)"]["step"] > 0


def test_original_blocks_switch_back():
    step = load_step()
    import torch

    from deem.models import DeemModel, tiny
    from deem.models.resampler import EagerQFormerAttention, QKNormQFormerAttention

    torch.manual_seed(0)
    model = DeemModel(tiny())
    step.use_original_blocks(model)
    assert any(type(m) is EagerQFormerAttention for m in model.modules())
    assert any(type(m) is step.BaselineMMFS for m in model.modules())
    step.use_our_blocks(model)
    assert not any(isinstance(m, (EagerQFormerAttention, step.BaselineMMFS)) for m in model.modules())
    assert any(type(m) is QKNormQFormerAttention for m in model.modules())
