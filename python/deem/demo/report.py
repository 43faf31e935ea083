"""The demo's report: tables against chance (mean ± std over seeds), the mechanism probes, loss curves
(smoothed and raw), sample answers and the drawn images beside their captions."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

ROWS = {
    "caption CIDEr": "caption",
    "VQA accuracy (in distribution)": "vqa",
    "VQA accuracy (style-shifted)": "vqa",
    "POPE accuracy (random / adversarial, mean)": "yesno",
    "POPE yes-ratio (random)": None,
    "RobustVQA-style accuracy (style-shifted, mean)": "yesno",
    "generated images: caption's colour dominant": "caption_colour_match",
    "generated images: colour at each shape's position": "colour_match",
}
RUNS = ("components", "deem_stage1", "deem_stage2_vqa", "baseline_stage1", "baseline_stage2_vqa")


def summary(scores: dict[str, dict[str, Any]], drawn: dict[str, Any]) -> dict[str, float | None]:
    """The headline metrics of one variant from the evaluation engine's scores (%, CIDEr x100)."""

    def get(bench: str, key: str) -> float | None:
        value = scores.get(bench, {}).get(key)
        return None if value is None else float(value)

    def mean(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(values) / len(values)

    yes_ratio = get("pope_random", "yes_ratio")
    return {
        "caption CIDEr": get("coco_caption", "CIDEr"),
        "VQA accuracy (in distribution)": get("vqav2_val", "accuracy"),
        "VQA accuracy (style-shifted)": get("vqav2_shift", "accuracy"),
        "POPE accuracy (random / adversarial, mean)": mean([get("pope_random", "accuracy"),
                                                            get("pope_adversarial", "accuracy")]),
        "POPE yes-ratio (random)": None if yes_ratio is None else yes_ratio,
        "RobustVQA-style accuracy (style-shifted, mean)": mean([get(f"robustvqa_{s}", "accuracy")
                                                                for s in ("a", "r", "v2")]),
        "generated images: caption's colour dominant": drawn["caption_colour_match"],
        "generated images: colour at each shape's position": drawn["colour_match"],
    }


def _cell(values: list[float | None], digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render(runs: list[dict[str, Any]], out: Path) -> str:
    """The markdown report over one or more seeds (figures are those of the first run's directory)."""
    first = runs[0]
    labels = list(first["variants"])
    seeds = [r["seed"] for r in runs]
    many = len(runs) > 1
    base = Path(f"seed-{seeds[0]}") if many else Path(".")
    minutes = statistics.fmean(r["elapsed_s"] for r in runs) / 60
    lines = [
        "# deem demo report",
        "",
        f"Tiny DEEM and the MM-Interleaved baseline, trained identically apart from the diffusion feedback, on the "
        f"synthetic shapes world; evaluated on held-out images ({first['device']}; "
        + (f"{len(runs)} seeds {seeds}: mean ± std; " if many else f"seed {seeds[0]}; ")
        + f"{minutes:.1f} min and {max(r['peak_rss_gib'] for r in runs):.2f} GiB peak memory per run).",
        "",
    ]

    def chance_of(key: str | None) -> str:
        if key is None:
            return "—"
        return _cell([r["chance"][key] for r in runs])

    rows = [[row, *(_cell([r["variants"][label]["summary"][row] for r in runs]) for label in labels),
             chance_of(key)] for row, key in ROWS.items()]
    lines += _table(["metric (%, CIDEr x100)", *labels, "chance"], rows)
    for title, field in (("in distribution", "vqa_by_type"), ("style-shifted", "vqa_shift_by_type")):
        types = sorted(first["chance"]["vqa_by_type"])
        lines += ["", f"VQA accuracy by question type, {title} (%, exact match; chance: the training set's most "
                  "frequent answer of the type):", ""]
        lines += _table(["question type", *labels, "chance"], [
            [t, *(_cell([r["variants"][label][field].get(t) for r in runs]) for label in labels),
             _cell([r["chance"]["vqa_by_type"][t] for r in runs])] for t in types])
    probe_rows = list(first["prefit_probes"])
    lines += ["", "## The mechanism: what the image encoder's features carry", "",
              "Linear probes (ridge classifiers fitted on the training scenes, accuracy % on the test scenes) of the "
              "encoder after its contrastive pre-fit on colour-free captions, and after stage 1 of each variant. "
              "The diffusion feedback is meant to put back what the captions left out (the colours).", ""]
    lines += _table(["attribute", "pre-fitted encoder", *(f"{label} after stage 1" for label in labels)], [
        [row, _cell([r["prefit_probes"][row] for r in runs]),
         *(_cell([r["variants"][label]["probes"][row] for r in runs]) for label in labels)] for row in probe_rows])
    lines += ["", "What the numbers say (as measured, whichever variant is ahead):"]
    for row in ("VQA accuracy (in distribution)", "VQA accuracy (style-shifted)",
                "POPE accuracy (random / adversarial, mean)", "RobustVQA-style accuracy (style-shifted, mean)",
                "colour of a shape (maps)"):
        if row in first["prefit_probes"]:
            a, b = ([r["variants"][label]["probes"][row] for r in runs] for label in labels)
        else:
            a, b = ([r["variants"][label]["summary"][row] for r in runs] for label in labels)
        if None in a or None in b:
            continue
        diff = statistics.fmean(a) - statistics.fmean(b)
        lines.append(f"- {row}: {labels[0]} {_cell(a)} vs {labels[1]} {_cell(b)} "
                     f"({'+' if diff >= 0 else ''}{diff:.1f} points for {labels[0]}).")
    plan = first["plan"]
    lines += [
        "",
        "Chance: VQA, the best answer without the image (the most frequent training answer per question type); "
        "50 % for the balanced yes/no sets; captions, the best of 20 training captions given for every test image "
        "(one template: a blind caption already scores high); the drawn images, the colour most captions name "
        "(per caption) and the most frequent shape colour (per shape).",
        "",
        "## Recipe",
        "",
        f"- world: {plan['num_train_images']} training and {plan['num_test_images']} test images;",
        f"- stand-ins for the pretrained components: VAE ({plan['vae_steps']} steps) and caption-to-image UNet "
        f"({plan['unet_steps']} steps), both frozen afterwards; image encoder pre-fitted contrastively on captions "
        f"without colours, with hue rotations ({plan['encoder_steps']} steps); LLM and image-decoder Q-Former on "
        f"captions with the encoder trunk and UNet frozen ({plan['components_steps']} steps);",
        f"- stage 1 (MMC4 + LAION, LLM and UNet frozen, image encoder trained): {plan['stage1_steps']} steps; "
        f"stage 2 (VQA fine-tuning, LLM trained, encoder trunk frozen): {plan['stage2_steps']} steps; DEEM adds the "
        "feedback loss (weight 5) in both, the baseline does not; batch "
        f"{plan['batch_size']}, lr {plan['lr']};",
        "- timings (first run): " + "; ".join(first["timings"]),
        "",
        "## Loss curves",
        "",
        f"![losses]({base / 'losses.png'})",
        "",
        "## DEEM on test images (question, prediction, ground truth)",
        "",
        f"![samples]({base / 'samples.png'})",
        "",
        "## Images drawn by each variant's image decoder (after stage 1) from test captions",
        "",
        "Top row DEEM, middle row the baseline, bottom row the real test image; the colour check reads the dominant "
        "palette colour in the third of the image where the caption puts each shape.",
        "",
        f"![generated]({base / 'generated.png'})",
        "",
    ]
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], alpha: float = 0.3) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def write_figures(out: Path, world: Path, prefit_logs: list) -> None:
    """losses.png (pre-fits and every training run, raw and smoothed), samples.png, generated.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(prefit_logs) + len(RUNS)
    fig, axes = plt.subplots(2, (panels + 1) // 2, figsize=(3.6 * ((panels + 1) // 2), 6.0))
    axes = axes.flatten()
    for ax, log in zip(axes, prefit_logs):
        ax.plot(log.losses, alpha=0.3, color="C0")
        ax.plot(_smooth(log.losses, 0.05), color="C0")
        ax.set_title(f"pre-fit: {log.name}", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_yscale("log")
    for ax, name in zip(axes[len(prefit_logs):], RUNS):
        path = out / "runs" / name / "log.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        for i, key in enumerate(("loss_txt", "loss_img", "loss_feedback")):
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, alpha=0.3, color=f"C{i}")
                ax.plot(steps, _smooth(list(values)), color=f"C{i}", label=key.replace("loss_", ""))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.legend(fontsize=6)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle("losses (faint: each logged window's mean; solid: smoothed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)
    _samples_figure(out, world, plt)
    _generated_figure(out, world, plt)


def _samples_figure(out: Path, world: Path, plt, n: int = 10) -> None:
    from PIL import Image

    predictions = out / "eval" / "deem" / "vqav2_val" / "predictions.json"
    questions = json.loads((world / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    image_of = {str(q["question_id"]): q["image_id"] for q in questions}
    records = [r for r in json.loads(predictions.read_text()) if str(r["id"]) in image_of][:n]
    fig, axes = plt.subplots(1, len(records), figsize=(2.0 * len(records), 2.8), squeeze=False)
    for ax, rec in zip(axes[0], records):
        ax.imshow(Image.open(world / "coco" / "val2014" / f"COCO_val2014_{image_of[str(rec['id'])]:012d}.jpg"))
        ax.axis("off")
        gt = (rec.get("gt_answers") or [""])[0]
        ok = "✓" if rec["prediction"] == gt else "✗"
        ax.set_title(f"{rec['question'][:28]}\n{ok} pred: {rec['prediction'][:14] or '(empty)'}\ngt: {gt}",
                     fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=110)
    plt.close(fig)


def _generated_figure(out: Path, world: Path, plt, n: int = 8) -> None:
    from deem.demo.world import load_pixels, load_scenes

    drawn = {key: torch.load(out / f"generated_{key}.pt", weights_only=True) for key in ("deem", "baseline")}
    n = min(n, len(drawn["deem"]["captions"]))
    real = load_pixels(world, load_scenes(world, "test")[:n], 64)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6.3), squeeze=False)
    for j in range(n):
        for i, (key, label) in enumerate((("deem", "DEEM"), ("baseline", "baseline"))):
            d = drawn[key]
            ok = sum(a == b for a, b in d["pairs"][j])
            axes[i][j].imshow(d["images"][j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axes[i][j].set_title(f"{label}: {ok}/{len(d['pairs'][j])} colours", fontsize=6)
        axes[2][j].imshow(real[j].permute(1, 2, 0).numpy())
        caption = drawn["deem"]["captions"][j]
        axes[2][j].set_title("\n".join(caption[k : k + 34] for k in range(0, len(caption), 34)), fontsize=5)
        for i in range(3):
            axes[i][j].axis("off")
    fig.tight_layout()
    fig.savefig(out / "generated.png", dpi=110)
    plt.close(fig)
