"""One stage-1 (DEEM pre-training) training step of the `deem_7b()` architecture with random weights,
in bf16 with gradient checkpointing, at the shape of spec/kernels.md §3.6 (4 sequences x 2048 tokens x
8 images; one image every 256 tokens) or the largest that fits. Records step time, images/s, tokens/s,
peak memory and a per-component breakdown (CUDA events) into <out>/step.json.

    python benchmarks/step.py [--batch 4] [--seq-len 2048] [--images 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from deem.models import DeemModel, deem_7b


def make_batch(cfg, B: int, L: int, n_img: int, device: str, generator: torch.Generator) -> dict:
    sp = cfg.special_tokens
    stride = L // n_img
    if stride < cfg.num_img_token + 2:
        raise ValueError(f"{n_img} images of {cfg.num_img_token} tokens do not fit in {L} tokens")
    ids = torch.randint(100, cfg.base_vocab_size, (B, L), generator=generator)
    ids[:, 0] = sp["bos"]
    for j in range(n_img):
        start = max(1, j * stride)
        ids[:, start] = sp["soi"]
        ids[:, start + 1: start + 1 + cfg.num_img_token] = sp["image"]
    labels = ids.clone()
    labels[(ids == sp["image"]) | (ids == sp["bos"])] = -100
    n_images = B * n_img
    size, dec = cfg.image_encoder["image_size"], cfg.diffusion["image_size"]
    return dict(
        text_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), gt_text_ids=labels.to(device),
        image_tensors=torch.rand(n_images, 3, size, size, generator=generator).to(device),
        image_tensors_dec=torch.rand(n_images, 3, dec, dec, generator=generator).to(device),
        num_image_per_seq=torch.full((B,), n_img, dtype=torch.long, device=device),
        nearest_bos_idxs=torch.zeros(n_images, dtype=torch.long, device=device),
    )


class Timer:
    """CUDA-event ranges per component, accumulated over a step."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextmanager
    def __call__(self, name: str):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.setdefault(name, []).append((start, end))

    def totals(self) -> dict[str, float]:
        torch.cuda.synchronize()
        return {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self.events.items()}


def instrument(model: DeemModel, timer: Timer) -> None:
    """Time the forward of each component with hooks (the backward is timed as a whole)."""
    parts = {"visual_tokenizer (incl. feedback loss)": model.visual_tokenizer, "llm": model.llm,
             "text_head": model.text_head, "image_decoder": model.image_decoder}
    for name, module in parts.items():
        state = {}

        def pre(_m, _a, name=name, state=state):
            state["cm"] = timer(name)
            state["cm"].__enter__()

        def post(_m, _a, _o, state=state):
            state["cm"].__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def run(B: int, L: int, n_img: int, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = deem_7b()
    with torch.device("cuda"):
        model = DeemModel(cfg)
    model = model.to(torch.bfloat16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.995), eps=1e-6, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(cfg, B, L, n_img, "cuda", gen)
    timer = Timer()
    instrument(model, timer)
    torch.cuda.reset_peak_memory_stats()
    times, breakdown = [], []
    for step in range(steps + 1):
        timer.events.clear()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with timer("forward (all)"):
            out = model(**batch)
        with timer("backward"):
            out.loss.backward()
        with timer("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if step > 0:  # the first step warms up (allocator, cuBLAS, kernels)
            times.append(start.elapsed_time(end))
            breakdown.append(timer.totals())
    step_ms = statistics.median(times)
    parts = {k: statistics.median(b[k] for b in breakdown) for k in breakdown[0]}
    return dict(
        batch=B, seq_len=L, images_per_seq=n_img, images=B * n_img, step_ms=step_ms,
        images_per_s=B * n_img / step_ms * 1e3, tokens_per_s=B * L / step_ms * 1e3,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, breakdown_ms=parts,
        losses={"txt": float(out.loss_txt.detach()), "img": float(out.loss_img.detach()),
                "feedback": float(out.loss_feedback.detach())},
        trainable_params=sum(p.numel() for p in params),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    result = None
    for B in range(args.batch, 0, -1):
        try:
            result = run(B, args.seq_len, args.images, args.steps)
            break
        except torch.OutOfMemoryError:
            print(f"batch {B} does not fit; trying {B - 1}", file=sys.stderr)
            torch.cuda.empty_cache()
    if result is None:
        print("no batch size fits", file=sys.stderr)
        return 1
    result.update(card=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                  date=dt.date.today().isoformat(), dtype="bf16", gradient_checkpointing="LLM layers, UNet, MMFSNet")
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "step.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "step.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
