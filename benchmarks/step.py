"""One stage-1 (DEEM pre-training) training step of the `deem_7b()` architecture with random weights, in bf16 with
gradient checkpointing, at the shape of spec/kernels.md §3.6 (4 sequences x 2048 tokens x 8 images; one image every
256 tokens) or the largest that fits. Records step time, images/s, tokens/s, peak memory, the forward time of each
component in the step (CUDA events) and a torch.profiler summary into <out>/step.json.

With --baseline the same step is also run with the original building blocks over the same weights, in the same run:
the original MMFS formulation (query repeated per image before `dynamic_offset_mask`, softmax over
n_levels*(P+1) entries, a materialised ignore-token term) with the PyTorch grid_sample reference deformable
attention, in the LLM and in every MMFSNet block, and the eager HF-style Q-Former attention (matmul, softmax,
dropout, matmul). Each component is then also timed in isolation on the inputs it saw in the step (forward;
forward + backward; peak extra memory), for both.

    python benchmarks/step.py [--batch 4] [--seq-len 2048] [--images 8] [--steps 3] [--baseline]
    python benchmarks/step.py --tiny --baseline     # the tiny config on the CPU: a smoke test of this script
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from deem.models import MMFS, DeemModel, deem_7b, tiny, with_stage
from deem.models.mmfs_reference import OriginalMMFS
from deem.models.resampler import set_attention_implementation

VARIANTS = ("ours", "baseline")


# ------------------------------------------------------------------------------------------------ inputs


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


# ------------------------------------------------------------------------------------------------ timing


class Clock:
    """Time ranges on one device: CUDA events on a GPU, wall-clock on the CPU. `ranges` accumulate per name."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.ranges: dict[str, list[tuple[Any, Any]]] = {}

    def mark(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = self.mark()
        yield
        self.ranges.setdefault(name, []).append((start, self.mark()))

    def totals(self) -> dict[str, float]:
        self.sync()
        return {k: sum(self.elapsed_ms(s, e) for s, e in v) for k, v in self.ranges.items()}

    def calls(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.ranges.items()}


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------ components


@dataclasses.dataclass
class Component:
    """A module of the step whose forward is timed in the step (hooks) and, on the inputs it first saw, in isolation."""

    name: str
    module: torch.nn.Module
    captured: tuple[tuple, dict] | None = None


def components(model: DeemModel) -> list[Component]:
    vt = model.visual_tokenizer
    parts = [Component("visual_tokenizer (image encoder + Q-Former + diffusion feedback loss)", vt),
             Component("image encoder (ConvNeXt)", vt.image_encoder),
             Component("Q-Former resampler (visual tokenizer)", vt.perceiver_resampler),
             Component("llm (LLaMA + MMFS layers)", model.llm)]
    cross = model.llm.cross_attention_layers()
    if cross:
        parts.append(Component(f"MMFS cross-attention, first LLM layer (1 of {len(cross)})", cross[0]))
    if model.diffusion is not None:
        parts.append(Component("MMFSNet (UNet feature path, all blocks)", model.diffusion.mmfs_module))
    parts.append(Component("text_head", model.text_head))
    if model.image_decoder is not None:
        parts.append(Component("image decoder Q-Former", model.image_decoder))
    return parts


# which components are also timed in isolation (the ones the baseline changes, plus the Q-Former's neighbours)
ISOLATED = ("Q-Former resampler", "MMFS cross-attention", "MMFSNet", "image decoder Q-Former")


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_map_tensors(x, fn) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(obj, lambda t: found.append(t) or t)
    return found


def instrument(parts: list[Component], clock: Clock, capture: dict[str, bool]) -> list:
    """Forward hooks: time every call of each component (recomputed calls under checkpointing included) and, while
    `capture["on"]`, keep a detached copy of the inputs of its first call."""
    handles = []
    for part in parts:
        state: dict[str, Any] = {}

        def pre(_m, args, kwargs, part=part, state=state):
            if capture["on"] and part.captured is None and part.name.startswith(ISOLATED):
                part.captured = _map_tensors((args, kwargs), lambda t: t.detach().clone())
            state["cm"] = clock(part.name)
            state["cm"].__enter__()

        def post(_m, _a, _k, _o, state=state):
            state["cm"].__exit__(None, None, None)

        handles.append(part.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(part.module.register_forward_hook(post, with_kwargs=True))
    return handles


def time_isolated(part: Component, device: torch.device, reps: int) -> dict[str, float | None]:
    """Median forward and forward + backward time of `part` on its captured inputs, in training mode with autograd
    on (float inputs require grad, as in the step; the backward takes a fixed random output gradient, drawn once
    outside the timed region, and reaches parameters and inputs), plus the peak memory of forward + backward above
    what was allocated before the call."""
    assert part.captured is not None
    clock = Clock(device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    grads: list[torch.Tensor] = []

    def inputs():
        return _map_tensors(part.captured, lambda t: t.detach().requires_grad_(t.is_floating_point()))

    def once(backward: bool) -> tuple[float, int | None]:
        args, kwargs = inputs()
        base = memory_now(device)
        reset_peak(device)
        start = clock.mark()
        out = [t for t in _tensors(part.module(*args, **kwargs)) if t.is_floating_point()]
        pairs = [(t, g) for t, g in zip(out, grads) if t.requires_grad]
        if backward and pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        end = clock.mark()
        clock.sync()
        peak = peak_memory(device)
        del out, pairs
        part.module.zero_grad(set_to_none=True)
        return clock.elapsed_ms(start, end), (None if peak is None else peak - base)

    with torch.no_grad():  # the output gradients, once
        args, kwargs = inputs()
        shapes = [(t.shape, t.dtype) for t in _tensors(part.module(*args, **kwargs)) if t.is_floating_point()]
    grads.extend(torch.randn(shape, generator=gen).to(device, dtype) for shape, dtype in shapes)
    once(False), once(True)  # warm-up
    fwd = [once(False)[0] for _ in range(reps)]
    both = [once(True) for _ in range(reps)]
    fwd_ms, fb_ms = statistics.median(fwd), statistics.median(t for t, _ in both)
    mem = both[-1][1]
    return {"forward_ms": fwd_ms, "forward_backward_ms": fb_ms, "backward_ms (fwd+bwd - fwd)": fb_ms - fwd_ms,
            "peak_extra_memory_mib (fwd+bwd)": None if mem is None else mem / 2**20}


# ------------------------------------------------------------------------------------------------ baseline


class BaselineMMFS(OriginalMMFS):
    """`OriginalMMFS` (grid_sample reference core) accepting one image's level list, as deem's MMFS does."""

    core = "reference"

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index=None,
                attention_mask=None):
        n_img = input_flatten.shape[1]
        shapes = [tuple(int(v) for v in s) for s in torch.as_tensor(input_spatial_shapes).reshape(-1, 2).tolist()]
        if len(shapes) == self.n_levels:
            shapes = shapes * n_img
        if attention_mask is None:
            attention_mask = torch.ones(query.shape[0], n_img, dtype=torch.long, device=query.device)
        return super().forward(query, reference_points, input_flatten, shapes, None, attention_mask)


def use_original_blocks(model: DeemModel) -> dict[str, int]:
    """Switch `model` in place to the original building blocks (same parameters); returns what was switched."""
    mmfs = 0
    for m in model.modules():
        if isinstance(m, MMFS):
            m.__class__ = BaselineMMFS
            mmfs += 1
    return {"MMFS modules -> original formulation + grid_sample reference": mmfs,
            "Q-Former attentions -> eager HF-style": set_attention_implementation(model, "eager")}


def use_our_blocks(model: DeemModel) -> None:
    for m in model.modules():
        if isinstance(m, BaselineMMFS):
            m.__class__ = MMFS
    set_attention_implementation(model, "sdpa")


# ------------------------------------------------------------------------------------------------ the step


def profile_summary(prof: torch.profiler.profile, device: torch.device, rows: int) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    attr_total = "device_time_total" if cuda else "cpu_time_total"
    attr_self = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr_self), reverse=True)[:rows]
    unit = "device" if cuda else "cpu"
    return [{"op": e.key, "calls": e.count, f"self_{unit}_ms": getattr(e, attr_self) / 1e3,
             f"total_{unit}_ms (incl. children)": getattr(e, attr_total) / 1e3} for e in events]


def losses(out: Any) -> dict[str, float]:
    return {k: float(getattr(out, f"loss_{k}").detach()) for k in ("txt", "img", "feedback")
            if getattr(out, f"loss_{k}") is not None}


def run_variant(model: DeemModel, batch: dict, steps: int, reps: int, device: torch.device, profile_rows: int,
                isolate: bool) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.995), eps=1e-6, weight_decay=0.05)
    clock = Clock(device)
    parts = components(model)
    capture = {"on": False}  # inputs are captured in the profiled step, after the peak memory was read
    handles = instrument(parts, clock, capture)

    def step():
        with clock("forward (all)"):
            out = model(**batch, generator=torch.Generator(device=device).manual_seed(0))
        with clock("backward"):
            out.loss.backward()
        with clock("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return out

    times, breakdown, calls, first_losses = [], [], {}, {}
    reset_peak(device)
    for i in range(steps + 1):
        clock.ranges.clear()
        clock.sync()
        start = clock.mark()
        out = step()
        end = clock.mark()
        clock.sync()
        if i == 0:
            first_losses = losses(out)
        else:  # the first step warms up (allocator, cuBLAS, kernels)
            times.append(clock.elapsed_ms(start, end))
            breakdown.append(clock.totals())
            calls = clock.calls()
    peak = peak_memory(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    capture["on"] = True
    with torch.profiler.profile(activities=activities) as prof:
        step()
        clock.sync()
    for h in handles:
        h.remove()
    step_ms = statistics.median(times)
    B, L = batch["text_ids"].shape
    n_images = batch["image_tensors"].shape[0]
    result = dict(
        step_ms=step_ms, images_per_s=n_images / step_ms * 1e3, tokens_per_s=B * L / step_ms * 1e3,
        peak_memory_gib=None if peak is None else peak / 2**30,
        forward_ms_in_step={k: statistics.median(b[k] for b in breakdown) for k in breakdown[0]},
        forward_calls_in_step=calls,
        losses_first_step=first_losses, losses_last_step=losses(out),
        profile_top_ops=profile_summary(prof, device, profile_rows),
    )
    if isolate:
        result["isolated"] = {p.name: time_isolated(p, device, reps) for p in parts if p.captured is not None}
    model.zero_grad(set_to_none=True)
    return result


def build(args: argparse.Namespace, device: torch.device) -> tuple[DeemModel, dict, torch.dtype]:
    torch.manual_seed(0)
    cfg = with_stage(tiny(), "pretrain_deem") if args.tiny else deem_7b()
    with torch.device(device):
        model = DeemModel(cfg)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = model.to(dtype)
    if args.tiny:  # open the zero-initialised gates and convolutions so every path carries a gradient
        with torch.no_grad():
            for cross in model.llm.cross_attention_layers():
                cross.gate.fill_(0.5)
            for block in model.diffusion.mmfs_module.blocks():
                block.conv.weight.normal_(0, 0.1)
    model.train()
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(cfg, args.batch, args.seq_len, args.images, str(device), gen)
    return model, batch, dtype


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, batch, dtype = build(args, device)
    variants: dict[str, Any] = {}
    # both variants start from the same weights (the optimizer steps of the first are undone)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if args.baseline else {}
    variants["ours"] = run_variant(model, batch, args.steps, args.reps, device, args.profile_rows, args.baseline)
    if args.baseline:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        del start
        switched = use_original_blocks(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        variants["baseline"] = run_variant(model, batch, args.steps, args.reps, device, args.profile_rows, True)
        variants["baseline"]["switched"] = switched
        use_our_blocks(model)
    B, L = batch["text_ids"].shape
    result: dict[str, Any] = dict(
        config="tiny" if args.tiny else "deem_7b", batch=B, seq_len=L, images_per_seq=args.images,
        images=batch["image_tensors"].shape[0], dtype=str(dtype).removeprefix("torch."),
        gradient_checkpointing="LLM layers, UNet, MMFSNet blocks",
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        variants=variants,
    )
    if args.baseline:
        result["comparison"] = compare(variants["ours"], variants["baseline"])
        result["baseline_notes"] = (
            "baseline = the same model and weights with the original MMFS formulation + grid_sample reference "
            "deformable attention (LLM layers and every MMFSNet block) and eager HF-style Q-Former attention; the "
            "UNet feature path is per-block (13 value projections) in both variants, and the VAE, UNet, LLaMA "
            "layers, ConvNeXt and loss are shared")
    return result


def compare(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups (baseline time / our time) of the measured figures."""
    def ratio(b: float | None, o: float | None) -> float | None:
        return None if not b or not o else b / o

    rows = {"step": ratio(base["step_ms"], ours["step_ms"])}
    for k, v in ours["forward_ms_in_step"].items():
        rows[f"in-step forward: {k}" if k not in ("backward", "optimizer") else f"in-step {k}"] = ratio(
            base["forward_ms_in_step"].get(k), v)
    for name, o in ours.get("isolated", {}).items():
        b = base.get("isolated", {}).get(name)
        if b:
            rows[f"isolated forward: {name}"] = ratio(b["forward_ms"], o["forward_ms"])
            rows[f"isolated forward+backward: {name}"] = ratio(b["forward_backward_ms"], o["forward_backward_ms"])
    memory = None
    if ours["peak_memory_gib"] and base["peak_memory_gib"]:
        memory = {"ours_gib": ours["peak_memory_gib"], "baseline_gib": base["peak_memory_gib"]}
    return {"speedup (baseline / ours)": rows, "peak_memory": memory}


def table(result: dict[str, Any]) -> str:
    """The component table as Markdown."""
    v = result["variants"]
    names = list(v)
    unit = "ms (CUDA events)" if result.get("device") == "cuda" else "ms (wall clock)"
    lines = [f"step ({unit}): " + ", ".join(f"{n} {v[n]['step_ms']:.1f}" for n in names)]
    head = ["component (in the step, forward of every call incl. recompute)"] + [f"{n} fwd {unit}" for n in names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in v["ours"]["forward_ms_in_step"]:
        lines.append("| " + " | ".join([k] + [f"{v[n]['forward_ms_in_step'].get(k, float('nan')):.2f}"
                                               for n in names]) + " |")
    if "isolated" in v["ours"]:
        head = ["component (isolated, its step inputs)"]
        for n in names:
            head += [f"{n} fwd", f"{n} fwd+bwd", f"{n} bwd (difference)", f"{n} peak extra MiB (fwd+bwd)"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in v["ours"]["isolated"]:
            cells = [k]
            for n in names:
                r = v[n].get("isolated", {}).get(k)
                if r is None:
                    cells += ["-"] * 4
                    continue
                mem = r["peak_extra_memory_mib (fwd+bwd)"]
                cells += [f"{r['forward_ms']:.2f}", f"{r['forward_backward_ms']:.2f}",
                          f"{r['backward_ms (fwd+bwd - fwd)']:.2f}", "-" if mem is None else f"{mem:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="sequences (default 4; tiny: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny: 48)")
    parser.add_argument("--images", type=int, default=None, help="images per sequence (default 8; tiny: 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each isolated component timing")
    parser.add_argument("--baseline", action="store_true", help="also run the original building blocks")
    parser.add_argument("--tiny", action="store_true", help="the tiny config (on the CPU unless --device cuda)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (only with --tiny)")
    parser.add_argument("--profile-rows", type=int, default=25, help="ops kept from the torch.profiler summary")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    defaults = (2, 48, 2) if args.tiny else (4, 2048, 8)
    for name, d in zip(("batch", "seq_len", "images"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, d)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny for the CPU smoke run)")
    if device.type == "cpu" and not args.tiny:
        parser.error("the 7B step runs on a GPU; use --tiny on the CPU")
    result = None
    first_batch = args.batch
    for B in range(first_batch, 0, -1):
        args.batch = B
        try:
            result = run(args, device)
            break
        except torch.OutOfMemoryError:
            print(f"batch {B} does not fit (ours or baseline); trying {B - 1}", file=sys.stderr)
        gc.collect()  # the failed attempt's model is free only now, outside the except block
        torch.cuda.empty_cache()
    if result is None:
        print("no batch size fits", file=sys.stderr)
        return 1
    result.update(device=device.type, date=dt.date.today().isoformat(), torch=torch.__version__,
                  cuda=torch.version.cuda, card=torch.cuda.get_device_name() if device.type == "cuda" else "CPU")
    if result["batch"] != first_batch:
        result["note"] = f"batch {first_batch} did not fit; ran {result['batch']}"
    print(table(result))
    print(json.dumps(result.get("comparison", {}), indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "step_tiny.json" if args.tiny else "step.json"
    tmp = out / f"{name}.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
