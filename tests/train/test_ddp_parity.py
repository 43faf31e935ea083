"""Interleaved stage 1 of the tiny model on two CPU processes (gloo) under DDP without find_unused_parameters,
against one process on the same global batch: per-step losses and final weights agree. On step 2 rank 1's part
of the batch has no images at all, so only the rank-uniform dummy path (deem.models.deem) keeps its collectives in
step with rank 0's. Each part draws its diffusion noise from its own seeded generator, so the two runs see the
same random numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import json, os, sys, torch
sys.path.insert(0, os.getcwd())
from tests.models.test_deem_model import make_batch, make_model, wake_zero_inits

torch.set_num_threads(1)
out = sys.argv[1]
STEPS, TEXT_ONLY_STEP = 3, 1
world = int(os.environ.get("WORLD_SIZE", "1"))
zero3 = os.environ.get("DEEM_TEST_ZERO3") == "1"
if zero3:
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
elif world > 1:
    torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank() if world > 1 else 0
model = make_model()
wake_zero_inits(model)
for name, p in model.named_parameters():  # parameters no batch of this test trains: DDP would wait for them
    if any(k in name for k in ("ignore_token", "query_relpos", "neg_prompt_embeds")):
        p.requires_grad_(False)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.SGD(params, lr=0.5)
net = model
if world > 1:
    model.rank_uniform = True
if zero3:
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3,
          "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    net, opt, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
elif world > 1:
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)


def parts(step):
    b = make_batch(model.config, seed=step)
    image = model.special["image"]
    keys = ("text_ids", "attention_mask", "gt_text_ids", "image_tensors", "image_tensors_dec", "num_image_per_seq",
            "nearest_bos_idxs")
    first = {k: b[k][:1] for k in keys}  # sample 0 has one image, so image_tensors[:1] are its images
    second = {k: b[k][1:] for k in keys}
    if step == TEXT_ONLY_STEP:  # rank 1: a text-only sample (no images to read or to generate)
        ids = second["text_ids"]
        keep = (ids != image) & (ids != model.special["soi"])
        second = dict(text_ids=torch.where(keep, ids, 30), attention_mask=second["attention_mask"],
                      gt_text_ids=torch.where(keep, second["gt_text_ids"], -100))
    return [first, second]


losses = []
for step in range(STEPS):
    if not zero3:
        opt.zero_grad(set_to_none=True)
    mine = [(i, p) for i, p in enumerate(parts(step)) if world == 1 or i == rank]
    total = 0.0
    for i, part in mine:
        loss = net(**part, generator=torch.Generator().manual_seed(100 * step + i)).loss
        net.backward(loss) if zero3 else (loss / len(mine)).backward()
        total += float(loss) / len(mine)
    if world > 1:
        t = torch.tensor([total], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        total = float(t) / world
    net.step() if zero3 else opt.step()
    losses.append(total)
weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
if zero3:
    trained = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trained):
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
if rank == 0:
    torch.save(weights, out)
    with open(out + ".json", "w") as f:
        json.dump(losses, f)
if world > 1:
    torch.distributed.destroy_process_group()
"""


def _one_and_two_ranks(tmp_path, torchrun, **two_rank_env) -> tuple[list[float], list[float]]:
    """The worker once in one process and once on two ranks (with `two_rank_env` added); per-step losses of each
    (the final weights land in tmp_path/one.pt and two.pt)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    proc = torchrun([str(script), str(tmp_path / "two.pt")], env={**env, **two_rank_env}, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.report()
    return (json.loads((tmp_path / "one.pt.json").read_text()), json.loads((tmp_path / "two.pt.json").read_text()))


def test_ddp_two_ranks_match_one_process(tmp_path, torchrun):
    one_losses, two_losses = _one_and_two_ranks(tmp_path, torchrun)
    assert len(one_losses) == 3
    for a, b in zip(one_losses, two_losses):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one_losses, two_losses)
    w1 = torch.load(tmp_path / "one.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two.pt", weights_only=True)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.xfail(strict=True, reason="ZeRO-3 still sees different collectives on the two ranks: the generation loss "
                   "of an image with an earlier image runs modules of the diffusion side that one without skips "
                   "(gloo: 'Received data size doesn't match expected size'), see docs/train.md")
def test_zero3_two_ranks_match_one_process(tmp_path, torchrun):
    pytest.importorskip("deepspeed")
    one_losses, two_losses = _one_and_two_ranks(tmp_path, torchrun, DS_ACCELERATOR="cpu", DEEM_TEST_ZERO3="1")
    for a, b in zip(one_losses, two_losses):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one_losses, two_losses)
