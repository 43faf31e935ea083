"""deem train on the synthetic world: configs, optimiser groups, exact resume after SIGKILL, atomic
checkpoints, non-finite steps, stage chaining and export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deem.models import DeemModel
from deem.train import ConfigError, TrainConfig, Trainer, export_weights
from deem.train.engine import NonFiniteLossError
from deem.train.optim import param_groups, warmup_cosine

REPO = Path(__file__).resolve().parents[2]


def config(world, out, *overrides):
    base = [f"output_dir={out}", f"data.root={world}", "log.every=1", "log.progress=false",
            "log.tensorboard=false"]
    return TrainConfig.load(REPO / "configs/train/tiny_pretrain.yaml", [*base, *overrides])


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim: unknown keys \['lrr'\]"):
        TrainConfig.from_dict({"output_dir": "x", "optim": {"lrr": 1}, "data": {"dataset": "d"}})
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        TrainConfig.from_dict({"output_dir": "x"})
    with pytest.raises(ConfigError, match=r"run\.precision"):
        TrainConfig.from_dict({"output_dir": "x", "data": {"dataset": "d"}, "run": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match="expected key=value"):
        TrainConfig.load(REPO / "configs/train/tiny_pretrain.yaml", ["optim.lr"])
    cfg = TrainConfig.load(REPO / "configs/train/tiny_pretrain.yaml", ["optim.lr=3e-4", "run.grad_accum=2"])
    assert cfg.optim.lr == 3e-4 and cfg.run.grad_accum == 2


def test_every_real_stage_config_parses():
    for name in ("pretrain_deem", "pretrain_baseline", "sft_caption", "sft_vqa", "sft_referring"):
        cfg = TrainConfig.load(REPO / f"configs/train/{name}.yaml")
        assert cfg.model.preset == "deem_7b" and cfg.model.stage == name
        assert cfg.run.deepspeed and Path(REPO / cfg.run.deepspeed).exists()


def test_7b_architecture_reads_the_synthetic_world_with_vicuna_ids(world):
    """configs/train/synth_7b_pretrain.yaml (run on the GPU): the LLaMA-layout tokenizer gives the deem_7b
    preset's ids, batches come at its resolutions with 77 image tokens; the tiny tokenizer is refused."""
    from deem.data import load_tokenizer
    from deem.train.build import model_config
    from deem.train.data import TrainData

    cfg = TrainConfig.load(REPO / "configs/train/synth_7b_pretrain.yaml", [f"data.root={world}"])
    data = TrainData(cfg.data.config, cfg.data.dataset, cfg.data.root, None, 0, 0, 0, 1)
    model_cfg = model_config(cfg.model, data.tokenizer)
    assert model_cfg.special_tokens == data.tokenizer.special.as_dict()
    batch = next(data.batches(torch.device("cpu")))
    assert batch["image_tensors"].shape[-2:] == (256, 256)
    assert batch["image_tensors_dec"].shape[-2:] == (512, 512)
    image_runs = (batch["text_ids"] == model_cfg.special_tokens["image"]).sum()
    assert image_runs == 77 * batch["image_tensors"].shape[0]
    tiny_tokenizer = load_tokenizer({"type": "hf", "path": str(world / "tokenizer"), "num_img_token": 77})
    with pytest.raises(ValueError, match="special-token ids"):
        model_config(cfg.model, tiny_tokenizer)


def test_param_groups_first_match_and_no_decay():
    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.Linear(2, 2))
    model.add_module("gate_block", torch.nn.Linear(2, 2))
    model.add_module("norm", torch.nn.LayerNorm(2))
    groups = param_groups(model, 1e-3, 0.05, [{"pattern": "gate", "lr": 5e-4, "weight_decay": 0.0},
                                             {"pattern": "a.", "lr": 2e-4}])
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["gate_block.weight"]["lr"] == 5e-4 and by_name["gate_block.weight"]["weight_decay"] == 0
    assert by_name["a.weight"]["lr"] == 2e-4 and by_name["a.weight"]["weight_decay"] == 0.05
    assert by_name["a.bias"]["weight_decay"] == 0.0
    assert by_name["norm.weight"]["lr"] == 1e-3 and by_name["norm.weight"]["weight_decay"] == 0.0


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 110) == 0 and warmup_cosine(5, 10, 110) == 0.5
    assert warmup_cosine(10, 10, 110) == 1.0
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0)


@pytest.mark.slow
def test_loss_falls(world, tmp_path):
    cfg = config(world, tmp_path / "run", "schedule.max_steps=40", "checkpoint.every=40", "optim.lr=3e-3",
                 "schedule.warmup_steps=2")
    Trainer(cfg).run()
    values = losses(tmp_path / "run")
    assert len(values) == 40
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < first - 0.5, (first, last)


def _train_process(world, out, extra=()):
    args = [sys.executable, "-m", "deem", "train", str(REPO / "configs/train/tiny_pretrain.yaml"),
            f"output_dir={out}", f"data.root={world}", "log.every=1", "log.progress=false", "log.tensorboard=false",
            "schedule.max_steps=14", "checkpoint.every=4", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return args, env


def test_sigkill_and_resume_reproduce_an_uninterrupted_run(world, tmp_path):
    args, env = _train_process(world, tmp_path / "whole")
    subprocess.run(args, env=env, check=True, capture_output=True, cwd=REPO)
    reference = losses(tmp_path / "whole")
    assert len(reference) == 14

    args, env = _train_process(world, tmp_path / "killed")
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(log.read_text().splitlines())
    assert 6 <= logged < 14, "the run must be killed part-way"
    subprocess.run([*args, "--resume"], env=env, check=True, capture_output=True, cwd=REPO)
    assert losses(tmp_path / "killed") == reference  # bit-exact on the CPU


def test_crash_during_checkpoint_write_keeps_the_previous_one(world, tmp_path, monkeypatch):
    cfg = config(world, tmp_path / "run", "schedule.max_steps=8", "checkpoint.every=4")
    trainer = Trainer(cfg)
    import deem.train.checkpoint as ckpt_mod

    real_save_file = ckpt_mod.save_file
    calls = {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save_file(*a, **k)
            raise KeyboardInterrupt("simulated crash mid-checkpoint")
        return real_save_file(*a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step-00000004"
    assert (root / ".tmp-step-00000008").exists() and not (root / "step-00000008").exists()
    monkeypatch.setattr(ckpt_mod, "save_file", real_save_file)
    resumed = Trainer(config(world, tmp_path / "run", "schedule.max_steps=8", "checkpoint.every=4"), resume=True)
    assert resumed.step == 4
    resumed.run()
    assert (root / "latest").read_text() == "step-00000008" and not (root / ".tmp-step-00000008").exists()


def test_nonfinite_steps_are_skipped_then_abort(world, tmp_path, monkeypatch):
    cfg = config(world, tmp_path / "run", "schedule.max_steps=6", "checkpoint.every=100", "run.max_nonfinite=2")
    trainer = Trainer(cfg)
    model = trainer.acc.unwrap_model(trainer.model)
    original = type(model).forward
    state = {"calls": 0}

    def forward(self, *a, **k):
        out = original(self, *a, **k)
        state["calls"] += 1
        if state["calls"] in (2, 3, 5):
            out.loss = out.loss * float("nan")
        return out

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(type(model), "forward", forward)
    with pytest.raises(NonFiniteLossError, match="3 steps had a non-finite loss"):
        trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 1, 1, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_stage_chaining_and_export(world, tmp_path):
    Trainer(config(world, tmp_path / "pre", "schedule.max_steps=2", "checkpoint.every=2")).run()
    export = export_weights(tmp_path / "pre", tmp_path / "pre" / "export")
    model = DeemModel.from_pretrained(export)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "pre" / "checkpoints" / "step-00000002" / "weights.safetensors"))
    params = dict(model.named_parameters())
    for name, value in weights.items():
        assert torch.equal(params[name], value), name
    vqa = TrainConfig.load(REPO / "configs/train/tiny_sft_vqa.yaml", [
        f"output_dir={tmp_path / 'vqa'}", f"data.root={world}", f"init_from={export}", "schedule.max_steps=2",
        "log.progress=false", "log.tensorboard=false", "log.every=1", "data.batch_size=4"])
    trainer = Trainer(vqa)
    assert trainer.build_report["init_from"]["loaded"] > 0 and not trainer.build_report["init_from"]["fresh"]
    trainer.run()
    refer = TrainConfig.load(REPO / "configs/train/tiny_pretrain.yaml", [
        f"output_dir={tmp_path / 'ref'}", f"data.root={world}", "model.stage=sft_referring", f"init_from.path={export}",
        "data.dataset=mask_refcoco", "data.batch_size=2", "schedule.max_steps=1", "log.tensorboard=false"])
    from deem.models.loading import CheckpointError

    with pytest.raises(CheckpointError, match=r"init_from\.drop"):
        Trainer(refer)


def test_two_processes_match_one_with_the_same_global_batch(world, tmp_path, torchrun):
    """torchrun with 2 CPU processes (DDP over gloo), each taking half of the global batch, logs the same losses
    as one process taking all of it: the data is sharded without overlap and losses/gradients are averaged."""
    common = ["configs/train/tiny_sft_vqa.yaml", "init_from=null", f"data.root={world}", "schedule.max_steps=3",
              "schedule.warmup_steps=1", "log.every=1", "log.progress=false", "log.tensorboard=false",
              "checkpoint.every=3", "model.overrides.loss_feedback_weight=0.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "deem", "train", *common, f"output_dir={tmp_path / 'one'}",
                    "data.batch_size=4"], env=env, check=True, capture_output=True, cwd=REPO)
    proc = torchrun(["-m", "deem", "train", *common, f"output_dir={tmp_path / 'two'}", "data.batch_size=2"],
                    env=env, cwd=REPO)
    assert proc.returncode == 0, proc.report()
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)


def test_periodic_evaluation_matches_deem_eval_of_the_export(world, tmp_path):
    """eval.every runs the evaluation engine on the model being trained; the last evaluation equals `deem eval`
    of the exported final weights."""
    from deem.eval import evaluate

    cfg = TrainConfig.load(REPO / "configs/train/tiny_sft_vqa.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.root={world}", "init_from=null", "log.progress=false",
        "log.tensorboard=false", "schedule.max_steps=4", "checkpoint.every=4", "eval.config=configs/eval/synth.yaml",
        "eval.every=2", "eval.benchmarks=[vqav2_val]"])
    Trainer(cfg).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert (tmp_path / "run" / "eval" / "step-00000004" / "vqav2_val" / "predictions.json").exists()
    export_weights(tmp_path / "run", tmp_path / "export")
    scored = evaluate(REPO / "configs/eval/synth.yaml", tmp_path / "export", tmp_path / "eval",
                      benchmarks=["vqav2_val"], root=world)
    assert scored["vqav2_val"] == records[-1]["vqav2_val"]
    predictions = [json.loads((d / "vqav2_val" / "predictions.json").read_text())
                   for d in (tmp_path / "run" / "eval" / "step-00000004", tmp_path / "eval")]
    assert predictions[0] and predictions[0] == predictions[1]
