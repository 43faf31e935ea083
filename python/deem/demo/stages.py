"""The demo's training stages, each a real `deem train` run (the same Trainer, configs and checkpoints as the
7B stages), chained with `init_from` exactly like configs/train/*.yaml."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deem.configs import SYNTH_DATA, SYNTH_EVAL
from deem.demo.plan import DIFFUSION_SIZE, ENCODER_SIZE, DemoPlan

VARIANTS = {
    # DEEM: stage 1 and the VQA fine-tuning with the diffusion feedback (feedback loss, weight 5)
    "DEEM": {"loss_feedback_weight": 5.0},
    # the MM-Interleaved recipe trained identically, without the feedback
    "MM-Interleaved baseline": {"loss_feedback_weight": 0.0},
}
VARIANT_KEYS = {"DEEM": "deem", "MM-Interleaved baseline": "baseline"}
STAGE1_TOKENIZER_LR = 0.1  # x plan.lr, the visual tokenizer in stage 1 (its encoder trunk: 0.2 x that)


def _resized(source: Path, out: Path, what: str) -> Path:
    raw = yaml.safe_load(Path(source).read_text(encoding="utf-8"))

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("transform"), dict):
                node["transform"] = {**node["transform"], "resolution": ENCODER_SIZE, "resolution_dec": DIFFUSION_SIZE}
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(raw)
    raw = {k: v for k, v in raw.items() if not k.startswith("x-")}
    out.write_text(f"# written by deem demo: {what} with the image encoder at {ENCODER_SIZE} px and the diffusion "
                   f"view at {DIFFUSION_SIZE} px\n" + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return out


def write_configs(world: Path) -> tuple[Path, Path]:
    """The synthetic world's data and evaluation configs at the demo model's image sizes (in the world dir)."""
    return (_resized(SYNTH_DATA, world / "demo_data.yaml", "configs/data/synth.yaml"),
            _resized(SYNTH_EVAL, world / "demo_eval.yaml", "configs/eval/synth.yaml"))


@dataclass
class Stage:
    """One training run of the recipe."""

    name: str  # run directory under <out>/runs
    stage: str  # the DeemConfig stage preset (which modules train)
    dataset: str  # the data config's train entry
    steps: int
    overrides: dict[str, Any]


def recipe(plan: DemoPlan, variant: str) -> list[Stage]:
    """Stage 1 (interleaved pre-training: LLM frozen, image encoder trained, UNet frozen) and stage 2 (VQA
    fine-tuning: LLM trained, encoder trunk frozen) of one variant."""
    key, extra = VARIANT_KEYS[variant], VARIANTS[variant]
    return [
        Stage(f"{key}_stage1", "pretrain_deem", "pretrain", plan.stage1_steps, dict(extra)),
        Stage(f"{key}_stage2_vqa", "sft_vqa", "sft_vqa", plan.stage2_steps, dict(extra)),
    ]


def components_stage(plan: DemoPlan) -> Stage:
    """The LLM (and the image decoder's Q-Former) pre-fitted on captions with the pre-fitted encoder trunk and
    UNet frozen: the stand-in for Vicuna and for the components MM-Interleaved starts from."""
    return Stage("components", "pretrain_baseline", "coco_caption_karpathy", plan.components_steps,
                 {"freeze_llm": False, "freeze_image_encoder": True, "freeze_unet": True, "freeze_text_head": False,
                  "loss_feedback_weight": 0.0})


def train_config(out: Path, world: Path, data_config: Path, preset: str, stage: Stage, plan: DemoPlan,
                 init: str) -> Any:
    from deem.train import TrainConfig

    steps = stage.steps
    tokenizer_scale = STAGE1_TOKENIZER_LR if stage.stage == "pretrain_deem" else 1.0
    raw: dict[str, Any] = {
        "output_dir": str(out / "runs" / stage.name),
        "model": {"preset": preset, "stage": stage.stage, "overrides": stage.overrides},
        "data": {"config": str(data_config), "root": str(world), "dataset": stage.dataset,
                 "batch_size": plan.batch_size, "seed": plan.seed},
        # the cross-attention gates start at 0 (tanh(0): no image in the LLM) and open by about lr per step;
        # in a few hundred steps they need a larger rate than the rest, as gates get their own group in the 7B recipe
        "optim": {"lr": plan.lr, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0, "groups": [
            {"pattern": "llama_cross_attn.gate", "lr": 10 * plan.lr, "weight_decay": 0.0},
            # the 7B recipe's ratios (configs/train/pretrain_deem.yaml): offsets at 0.1x, the encoder trunk at 0.2x
            {"pattern": "sampling_offsets", "lr": 0.1 * plan.lr, "weight_decay": 0.0},
            {"pattern": "visual_tokenizer.image_encoder.trunk", "lr": 0.2 * plan.lr * tokenizer_scale},
            # stage 1 trains the pre-fitted visual tokenizer through a frozen LLM: at the full rate its tokens lost
            # what the pre-fit put there (a shape's kind per position 58 -> 42 %, the background 97 -> 62 %)
            {"pattern": "visual_tokenizer", "lr": plan.lr * tokenizer_scale},
        ]},
        "schedule": {"warmup_steps": min(20, max(1, steps // 10)), "max_steps": steps},
        "run": {"precision": "fp32", "seed": plan.seed},
        "checkpoint": {"every": steps, "keep": 1},
        "log": {"every": max(1, min(10, steps // 5)), "tensorboard": False, "progress": True},
        "init_from": init,
    }
    return TrainConfig.from_dict(raw)


def run_stage(cfg: Any, out: Path, name: str, timings: list[str]) -> str:
    """Train, export the weights; returns the export directory."""
    from deem.train import Trainer, export_weights

    start = time.time()
    print(f"\n== {name} ({cfg.model.stage}, {cfg.data.dataset}, {cfg.schedule.max_steps} steps)", flush=True)
    Trainer(cfg).run()
    export = export_weights(out / "runs" / name, out / "runs" / name / "export")
    timings.append(f"{name}: {cfg.schedule.max_steps} steps in {time.time() - start:.0f} s")
    return str(export)
