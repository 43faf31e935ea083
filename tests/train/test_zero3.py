"""The model under DeepSpeed ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator, gloo): partitioned
parameters must be gathered for every use in the forward and the backward (bare parameters such as `soi_token`
and module outputs DeepSpeed can see into). Skipped where DeepSpeed is not installed (`pip install .[deepspeed]`);
the GPU run is benchmarks/zero_parity.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import json, os, sys, torch, deepspeed
from deem.train import TrainConfig
from deem.train.build import build_model
from deem.train.data import TrainData

world = sys.argv[1]
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
cfg = TrainConfig.load("configs/train/tiny_sft_vqa.yaml", [f"data.root={world}", "init_from=null"])
data = TrainData(cfg.data.config, cfg.data.dataset, cfg.data.root, 4, 0, 0, rank, 2)
torch.manual_seed(0)
model, _ = build_model(cfg, data.tokenizer)
ds = json.load(open("configs/deepspeed/zero3.json"))
ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, gradient_clipping=1.0,
          bf16={"enabled": False}, fp16={"enabled": False})
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
batches = data.batches(torch.device("cpu"))
losses = []
for _ in range(2):
    output = engine(**next(batches))
    engine.backward(output.loss)
    engine.step()
    losses.append({k: float(output[k]) for k in ("loss", "loss_txt", "loss_img", "loss_feedback") if k in output})
with open(os.path.join(os.environ["DEEM_TEST_RESULTS"], f"rank{rank}.json"), "w") as f:
    json.dump(losses, f)
"""


def test_zero3_trains_the_model(world, tmp_path, torchrun):
    """VQA fine-tuning of the tiny model under ZeRO-3 on 2 processes. (Batches must run the same modules on
    every rank under ZeRO-3: see docs/train.md.)"""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = torchrun([str(script), str(world)], env=env, cwd=REPO)
    assert proc.returncode == 0, proc.report()
    assert sorted(proc.results) == [0, 1], proc.report()
    for steps in proc.results.values():
        assert len(steps) == 2
        assert "loss_txt" in steps[0]
        assert all(math.isfinite(v) for step in steps for v in step.values())
