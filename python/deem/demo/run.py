"""`deem demo`: the paper's experiment at tiny scale, end to end, on a CPU in minutes.

1. The synthetic world in the real dataset formats (captions, MMC4, LAION, VQAv2, POPE, RobustVQA, ...).
2. Stand-ins for the pretrained components (deem.demo.prefit): Stable Diffusion's VAE and UNet (a
   caption-to-image model, frozen afterwards), the CLIP image encoder (contrastive on captions that omit the
   shapes' colours: the bias the paper says the diffusion feedback corrects) and the LLM (on captions).
3. DEEM and the MM-Interleaved baseline trained identically from those components apart from the diffusion
   feedback: stage 1 (interleaved pre-training) and stage 2 (VQA fine-tuning).
4. Evaluation on held-out images (in distribution and style-shifted), probes of what the image encoder's
   features carry, images drawn by each image decoder with a measured colour check, and a report.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from deem.demo import report
from deem.demo.chance import chance_levels, vqa_by_type
from deem.demo.console import Console
from deem.demo.imagecheck import (
    caption_colour_chance,
    caption_colour_match,
    colour_chance,
    colour_match,
    generate_from_captions,
)
from deem.demo.plan import DIFFUSION_SIZE, ENCODER_SIZE, DemoPlan, demo_model_config
from deem.demo.probe import probe_attributes
from deem.demo.stages import (
    VARIANT_KEYS,
    VARIANTS,
    components_stage,
    recipe,
    run_stage,
    train_config,
    write_configs,
)
from deem.demo.world import load_pixels, load_scenes, pretraining_corpus
from deem.io import atomic_write_text

EVAL_BENCHMARKS = ["coco_caption", "vqav2_val", "vqav2_shift", "pope_random", "pope_adversarial", "robustvqa_a",
                   "robustvqa_r", "robustvqa_v2"]


def _prefit(world: Path, out: Path, plan: DemoPlan, console: Console) -> tuple[str, dict[str, float], list]:
    """The pre-fitted components as one saved model (the first stage's preset and init_from)."""
    from deem.data import load_tokenizer
    from deem.demo import prefit
    from deem.models import DeemModel, tiny

    torch.manual_seed(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    tokenizer = load_tokenizer({"type": "hf", "path": str(world / "tokenizer"), "num_img_token": 4})
    model = DeemModel(demo_model_config(tiny(tokenizer.layout, ENCODER_SIZE)))
    corpus, (pixels, pixels_dec) = pretraining_corpus(plan.seed, plan.pretraining_images,
                                                      (ENCODER_SIZE, DIFFUSION_SIZE))
    pad = tokenizer.special.pad_id
    logs = []
    with console.task("pre-fit: VAE", plan.vae_steps) as step:
        logs.append(prefit.prefit_vae(model, pixels_dec, plan.vae_steps, generator, on_step=step))
    with console.task("pre-fit: UNet (caption-to-image)", plan.unet_steps) as step:
        captions = [tokenizer.encode(ws.scene.caption()) for ws in corpus]
        log, text = prefit.prefit_unet(model, pixels_dec, captions, tokenizer.encode(""), pad, plan.unet_steps,
                                       generator, on_step=step)
        logs.append(log)
    with torch.no_grad():  # the image decoder's negative prompt starts as the empty caption (as in DEEM)
        neg = model.image_decoder.neg_prompt_embeds
        empty = text(prefit.pad_ids([tokenizer.encode("")], pad))[0]
        neg.copy_(empty[torch.arange(neg.shape[1]) % empty.shape[0]][None])
    with console.task("pre-fit: image encoder (caption words, colours left out)", plan.encoder_steps) as step:
        targets, sizes = prefit.caption_targets(corpus, colours=False)
        logs.append(prefit.prefit_encoder(model, pixels, targets, sizes, plan.encoder_steps, generator, on_step=step))
    probes = _probes(model, world)
    export = out / "runs" / "prefit" / "export"
    model.save_pretrained(export)
    tokenizer.hf.save_pretrained(export / "tokenizer")
    return str(export), probes, logs


def _probes(model, world: Path) -> dict[str, float]:
    train, test = load_scenes(world, "train"), load_scenes(world, "test")
    return probe_attributes(model, (load_pixels(world, train, ENCODER_SIZE), train),
                            (load_pixels(world, test, ENCODER_SIZE), test))


def _stage1_readouts(export: str, world: Path, plan: DemoPlan, out: Path, key: str) -> dict[str, Any]:
    """After stage 1: probes of the encoder and the image decoder's drawings of test captions."""
    from deem.data import load_tokenizer
    from deem.models import DeemModel

    model = DeemModel.from_pretrained(export).eval()
    tokenizer = load_tokenizer({"type": "hf", "path": str(Path(export) / "tokenizer"),
                                "num_img_token": model.config.num_img_token})
    probes = _probes(model, world)
    scenes = load_scenes(world, "test")[: plan.generated_images]
    images = generate_from_captions(model, tokenizer, [ws.scene.caption() for ws in scenes], seed=plan.seed)
    accuracy, pairs = colour_match(images, scenes)
    per_caption, dominant = caption_colour_match(images, scenes)
    torch.save({"images": images, "captions": [ws.scene.caption() for ws in scenes], "pairs": pairs,
                "dominant": dominant}, out / f"generated_{key}.pt")
    return {"probes": probes, "colour_match": accuracy, "caption_colour_match": per_caption}


def run_single(out: Path, plan: DemoPlan, console: Console) -> dict[str, Any]:
    """One seed of the experiment; writes <out>/report.md and <out>/metrics.json and returns the metrics."""
    from deem.data.synth import synth_world
    from deem.eval import evaluate

    if (out / "runs").exists():
        shutil.rmtree(out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timings: list[str] = []
    world = out / "world"
    console.say(f"writing the synthetic world to {world} (seed {plan.seed})")
    synth_world(world, seed=plan.seed, num_train=plan.num_train_images, num_test=plan.num_test_images)
    data_config, eval_config = write_configs(world)
    chance = chance_levels(world)
    chance["colour_match"] = colour_chance(load_scenes(world, "train"))
    chance["caption_colour_match"] = caption_colour_chance(load_scenes(world, "test")[: plan.generated_images])

    t = time.time()
    prefit_dir, prefit_probes, prefit_logs = _prefit(world, out, plan, console)
    timings.append(f"pre-fits: {time.time() - t:.0f} s")
    components = run_stage(train_config(out, world, data_config, prefit_dir, components_stage(plan), plan,
                                        prefit_dir), out, "components", timings)

    variants: dict[str, dict[str, Any]] = {}
    for label in VARIANTS:
        key = VARIANT_KEYS[label]
        init = components
        readouts: dict[str, Any] = {}
        for stage in recipe(plan, label):
            init = run_stage(train_config(out, world, data_config, prefit_dir, stage, plan, init), out, stage.name,
                             timings)
            if stage.stage == "pretrain_deem":
                readouts = _stage1_readouts(init, world, plan, out, key)
        t = time.time()
        console.say(f"\n== evaluating {label}")
        scores = evaluate(eval_config, init, out / "eval" / key, benchmarks=EVAL_BENCHMARKS, root=world,
                          overwrite=True, device=device)
        timings.append(f"evaluation of {label}: {time.time() - t:.0f} s")
        variants[label] = {
            "summary": report.summary(scores, readouts),
            "vqa_by_type": vqa_by_type(out / "eval" / key / "vqav2_val" / "predictions.json"),
            "vqa_shift_by_type": vqa_by_type(out / "eval" / key / "vqav2_shift" / "predictions.json"),
            "probes": readouts["probes"],
            "benchmarks": scores,
        }
    payload = {
        "seed": plan.seed,
        "variants": variants,
        "prefit_probes": prefit_probes,
        "prefit_final_losses": {log.name: log.final for log in prefit_logs},
        "chance": chance,
        "plan": {k: v for k, v in plan.__dict__.items() if k != "extra"},
        "device": device,
        "elapsed_s": time.time() - start,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "timings": timings,
    }
    report.write_figures(out, world, prefit_logs)
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=1, default=str))
    atomic_write_text(out / "report.md", report.render([payload], out))
    console.say(f"\nreport: {out / 'report.md'} ({payload['elapsed_s']:.0f} s, peak memory "
                f"{payload['peak_rss_gib']:.2f} GiB)")
    return payload


def run_demo(out_dir: str | Path = "demo_out", plan: DemoPlan | None = None, seeds: int = 1) -> dict[str, Any]:
    """Run the experiment for `seeds` seeds (plan.seed, plan.seed + 1, ...). With one seed everything lands in
    `out_dir`; with several, each seed in `out_dir/seed-K` and `out_dir/report.md` gives mean ± std."""
    from deem.eval.caption_metrics import require_java

    require_java()  # the captioning metrics need it: fail now, not after minutes of training
    plan = plan or DemoPlan()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(out / "demo.log")
    try:
        if seeds == 1:
            return run_single(out, plan, console)
        runs = []
        for k in range(seeds):
            console.say(f"\n#### seed {plan.seed + k} ({k + 1} of {seeds})")
            runs.append(run_single(out / f"seed-{plan.seed + k}", plan.with_seed(plan.seed + k), console))
        payload = {"seeds": [r["seed"] for r in runs], "runs": runs, "aggregate": aggregate(runs)}
        atomic_write_text(out / "metrics.json", json.dumps(payload, indent=1, default=str))
        atomic_write_text(out / "report.md", report.render(runs, out))
        console.say(f"\nreport over {seeds} seeds: {out / 'report.md'}")
        return payload
    finally:
        console.close()


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and standard deviation over the runs of every variant's summary metric."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for label in runs[0]["variants"]:
        rows = runs[0]["variants"][label]["summary"]
        out[label] = {}
        for row in rows:
            values = [r["variants"][label]["summary"][row] for r in runs]
            values = [v for v in values if v is not None]
            if values:
                out[label][row] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out
