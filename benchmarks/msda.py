"""Time deem's deformable-attention kernels and the MMFS layer against the PyTorch reference.

Three separately measured columns for every implementation:
  forward           the op (or layer) forward alone;
  backward          the backward alone: for the core op, its backward op given the saved forward inputs and an
                    output gradient; for the MMFS layer, autograd backward through a saved forward graph
                    (retain_graph), i.e. no forward work inside the timed region;
  forward+backward  one loop that runs the forward and then its backward, timed as a whole.

GPU (default): the inputs of spec/kernels.md §2.3 (random values, locations uniform in [-0.1, 1.1],
softmaxed random weights), cases llm_8img, llm_2img, unet_64, unet_16, fp16 and bf16; medians of CUDA events
over CUDA-graph replays where the measured function can be captured (else back-to-back eager calls; the
record says which, per column); deem (each d(value) strategy) and the grid_sample reference in the same run;
then the whole MMFS layer at the LLM shape (B=4, Lq=2048, 8 images, causal visibility): deem.models.MMFS
against the original formulation.
The MMFS core op (deem::mmfs_core) is timed per strategy at the LLM layer's shape (mmfs_core_llm_8img: B=4,
Lq=2048, 8 images, causal visibility, random locations). Every deem backward row carries the problem features
that benchmarks/strategy_table.py turns into the table behind the 'auto' strategy.
CPU (--device cpu): the unet_16 shape (and a small LLM shape) in float32, wall-clock medians.

Writes <out>/msda_<device>.json (one record per case, dtype, implementation) and prints a table.

    python benchmarks/msda.py                 # GPU
    python benchmarks/msda.py --device cpu    # CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import deem
from deem.models import MMFS
from deem.models.mmfs_reference import OriginalMMFS
from deem.ops import grad_value_strategy, mmfs_core, ms_deform_attn, ms_deform_attn_reference

LLM_IMAGE = [(32, 32), (16, 16), (8, 8)]
UNET = [(64, 64), (32, 32), (16, 16), (8, 8)]
CASES = {
    "llm_8img": dict(N=4, Lq=2048, shapes=LLM_IMAGE * 8),
    "llm_2img": dict(N=4, Lq=2048, shapes=LLM_IMAGE * 2),
    "unet_64": dict(N=4, Lq=4096, shapes=UNET),
    "unet_16": dict(N=4, Lq=256, shapes=UNET),
    "llm_2img_n1": dict(N=1, Lq=512, shapes=LLM_IMAGE * 2),  # small CPU case
}
M, D, P = 16, 64, 8
STRATEGIES = ["atomic", "owner", "tensor", "auto"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(case: dict, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = torch.tensor(case["shapes"], dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    N, Lq, L = case["N"], case["Lq"], len(case["shapes"])
    value = torch.randn(N, int(sizes.sum()), M, D, generator=g).to(device, dtype)
    loc = (torch.rand(N, Lq, M, L, P, 2, generator=g) * 1.2 - 0.1).to(device)
    weights = torch.randn(N, Lq, M, L * P, generator=g).softmax(-1).view(N, Lq, M, L, P).to(device, dtype)
    return value, shapes, starts, loc, weights


# ---------------------------------------------------------------------------------------- timing

def time_cuda(fn: Callable[[], object], reps: int, use_graph: bool = True, label: str = "",
              stream: torch.cuda.Stream | None = None) -> tuple[float, str]:
    """Median milliseconds of `fn` on the GPU: CUDA-graph replays when `fn` can be captured
    (no launch gaps), else back-to-back eager calls between CUDA events. `stream` is the side stream to
    warm up and capture on (a backward must be captured on the stream its forward ran on)."""
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    runner, mode = fn, "eager"
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                fn()
            graph.replay()
            torch.cuda.synchronize()
            runner, mode = graph.replay, "graph"
        except Exception as err:  # not capturable (host syncs, host-to-device copies): time it eagerly
            print(f"  {label}: not graph-capturable, timed eagerly ({type(err).__name__}: {str(err)[:120]})",
                  file=sys.stderr)
            torch.cuda.synchronize()
    times = []
    with torch.cuda.stream(stream):
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times), mode


def time_cpu(fn: Callable[[], object], reps: int) -> tuple[float, str]:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "wall"


# ------------------------------------------------------------------------------------ core op

def record(case: str, dtype: str, impl: str, strategy: str | None, fwd: tuple[float, str] | None,
           bwd: tuple[float, str] | None, fwd_bwd: tuple[float, str] | None, **extra) -> dict:
    """One result row: each column a separate measurement (milliseconds, timing mode)."""
    def ms(m):
        return None if m is None else m[0]

    def mode(m):
        return None if m is None else m[1]

    return dict(case=case, dtype=dtype, impl=impl, strategy=strategy, fwd_ms=ms(fwd), bwd_ms=ms(bwd),
                fwd_bwd_ms=ms(fwd_bwd), fwd_timing=mode(fwd), bwd_timing=mode(bwd), fwd_bwd_timing=mode(fwd_bwd),
                **extra)


def bench_core(case_name: str, dtype_name: str, device: str, reps: int, strategies: list[str] = STRATEGIES,
               reference: bool = True) -> list[dict]:
    case = CASES[case_name]
    dtype = DTYPES[dtype_name]
    value, shapes, starts, loc, weights = make_inputs(case, dtype, device)
    label = f"{case_name} {dtype_name}"
    if device == "cuda":
        def timer(f, r=reps, what="", graph=True):
            return time_cuda(f, r, use_graph=graph, label=f"{label} {what}")
    else:
        def timer(f, r=reps, what="", graph=True):
            return time_cpu(f, r)
    N, Lq = case["N"], case["Lq"]
    # CPU random numbers only: an aborted graph capture must not disturb the CUDA generator
    grad = torch.randn(N, Lq, M * D, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    leaves = [value.clone().requires_grad_(), loc.clone().requires_grad_(), weights.clone().requires_grad_()]
    records = []

    fwd = timer(lambda: ms_deform_attn(value, shapes, starts, loc, weights), what="deem fwd")
    backward = torch.ops.deem.ms_deform_attn_backward

    def forward_backward():
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        return torch.autograd.grad(out, leaves, grad)

    features = dict(op="msda", points_per_query=len(case["shapes"]) * P, slice_rows=value.shape[1], queries=Lq)
    for strategy in strategies if device == "cuda" else ["auto"]:
        with grad_value_strategy(strategy):
            try:
                bwd = timer(lambda: backward(grad, value, shapes, starts, loc, weights), what=f"deem bwd {strategy}")
                fb = timer(forward_backward, what=f"deem fwd+bwd {strategy}")
            except ValueError as err:  # strategy does not fit this shape
                print(f"  {case_name} {dtype_name} {strategy}: {err}", file=sys.stderr)
                continue
        records.append(record(case_name, dtype_name, "deem", strategy, fwd, bwd, fb, **features))

    if not reference:
        return records
    ref_reps = max(3, reps // 4)
    ref_fwd = timer(lambda: ms_deform_attn_reference(value, shapes, starts, loc, weights), ref_reps, "reference fwd")
    out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    # autograd of the reference is not reliably capturable; it runs for milliseconds, so eager timing is exact enough
    ref_bwd = timer(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), ref_reps, "reference bwd",
                    graph=False)
    ref_fb = timer(lambda: torch.autograd.grad(ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1],
                                                                        leaves[2]), leaves, grad),
                   ref_reps, "reference fwd+bwd", graph=False)
    records.append(record(case_name, dtype_name, "reference", None, ref_fwd, ref_bwd, ref_fb))
    return records


# ---------------------------------------------------------------------------------- MMFS core

def bench_mmfs_core(dtype_name: str, reps: int, strategies: list[str] = STRATEGIES, n_img: int = 8, B: int = 4,
                    Lq: int = 2048) -> list[dict]:
    """deem::mmfs_core at the LLM layer's shape, each d(value) strategy: forward, backward, forward+backward."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(3)
    shapes = torch.tensor(LLM_IMAGE, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(LLM_IMAGE)
    value = torch.randn(B, n_img * S, M, D, generator=g).to("cuda", dtype)
    loc = (torch.rand(B, Lq, n_img, M, P, 2, generator=g) * 1.2 - 0.1).cuda()
    logits = torch.randn(B, Lq, n_img, M, L, P, generator=g).cuda()
    image_start = torch.arange(n_img) * (Lq // n_img)
    visible = (image_start[None, None, :] <= torch.arange(Lq)[None, :, None]).expand(B, Lq, n_img).contiguous().cuda()
    ignore = torch.randn(M, D, generator=g).to("cuda", dtype)
    grad = torch.randn(B, Lq, M * D, generator=g).to("cuda", dtype)
    args = (value, shapes, starts, loc, logits, visible, ignore)
    leaves = [value.clone().requires_grad_(), loc.clone().requires_grad_(), logits.clone().requires_grad_()]
    _, lse = torch.ops.deem.mmfs_core(*args)
    backward = torch.ops.deem.mmfs_core_backward
    label = f"mmfs_core {dtype_name}"
    fwd = time_cuda(lambda: mmfs_core(*args), reps, label=f"{label} fwd")

    def forward_backward():
        out = mmfs_core(leaves[0], shapes, starts, leaves[1], leaves[2], visible, ignore)
        return torch.autograd.grad(out, leaves, grad)

    features = dict(op="mmfs", points_per_query=L * P, slice_rows=S, queries=Lq,
                    visible_fraction=round(visible.float().mean().item(), 3))
    records = []
    for strategy in strategies:
        with grad_value_strategy(strategy):
            bwd = time_cuda(lambda: backward(grad, *args, lse), reps, label=f"{label} bwd {strategy}")
            fb = time_cuda(forward_backward, reps, label=f"{label} fwd+bwd {strategy}")
        records.append(record(f"mmfs_core_llm_{n_img}img", dtype_name, "deem", strategy, fwd, bwd, fb, **features))
    return records


# ------------------------------------------------------------------------------- MMFS layer

def llm_mmfs_config() -> dict:
    return dict(d_model=4096, d_query=4096, d_value=1024, d_out=4096, n_levels=3, n_heads=16, n_points=8,
                ratio=0.25, offset_init_magnitude=3, spatial_shapes=(32, 16, 8), base_spatial_shape=16,
                max_num_image_per_seq=50, ignore_token_trainable=True)


def bench_mmfs_layer(dtype_name: str, reps: int, n_img: int = 8, B: int = 4, Lq: int = 2048) -> list[dict]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    deem_layer = MMFS(**llm_mmfs_config())
    with torch.no_grad():  # trained-looking offsets: query-dependent locations (not all the same point)
        deem_layer.sampling_offsets.weight.normal_(0, 0.02)
        deem_layer.attention_weights.weight.normal_(0, 0.02)
        deem_layer.dynamic_offset_mask.weight.normal_(0, 0.02)
    deem_layer = deem_layer.cuda().to(dtype)
    layers = {"deem": deem_layer}
    for core in ("deem", "reference"):
        original = OriginalMMFS(**llm_mmfs_config(), core=core).cuda().to(dtype)
        original.load_state_dict(deem_layer.state_dict())
        layers[f"original+{core}_op"] = original
    S = sum(h * w for h, w in LLM_IMAGE)
    cpu = torch.Generator().manual_seed(2)
    query = torch.randn(B, Lq, 4096, generator=cpu).to("cuda", dtype)
    feats = torch.randn(B, n_img, S, 1024, generator=cpu).to("cuda", dtype)
    ref = torch.full((1, Lq, 1, 2), 0.5, device="cuda", dtype=dtype)
    image_start = torch.arange(n_img, device="cuda") * (Lq // n_img)
    mask = (image_start[None, None, :] <= torch.arange(Lq, device="cuda")[None, :, None]).expand(B, Lq, n_img)
    mask = mask.to(dtype).contiguous()
    shapes = LLM_IMAGE * n_img
    grad = torch.randn(B, Lq, 4096, generator=cpu).to("cuda", dtype)
    records = []
    for name, layer in layers.items():
        q = query.clone().requires_grad_()
        r = reps if name == "deem" else max(3, reps // 4)
        stream = torch.cuda.Stream()  # the saved forward and its timed backward share one stream

        def forward(layer=layer):
            with torch.no_grad():
                return layer(query, ref, feats, shapes, None, mask)

        def forward_backward(layer=layer, q=q):
            out = layer(q, ref, feats, shapes, None, mask)
            torch.autograd.backward(out, grad)

        fwd = time_cuda(forward, r, label=f"layer {name} fwd")
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            saved = layer(q, ref, feats, shapes, None, mask)  # the graph the backward column walks
        bwd = time_cuda(lambda saved=saved: torch.autograd.backward(saved, grad, retain_graph=True), r,
                        label=f"layer {name} bwd", stream=stream)
        del saved
        fb = time_cuda(forward_backward, r, label=f"layer {name} fwd+bwd")
        layer.zero_grad(set_to_none=True)
        records.append(record("mmfs_layer_llm_8img", dtype_name, name, "auto", fwd, bwd, fb,
                              visible_fraction=round(mask.float().mean().item(), 3)))
    return records


def profile(dtype_name: str) -> None:
    """Per-kernel CUDA times (torch.profiler) of the llm_8img backward (each strategy) and of one
    MMFS layer forward + backward, to see where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    value, shapes, starts, loc, weights = make_inputs(CASES["llm_8img"], DTYPES[dtype_name], "cuda")
    grad = torch.randn(4, 2048, M * D, generator=torch.Generator().manual_seed(1)).to("cuda", DTYPES[dtype_name])
    for strategy in ("atomic", "owner", "tensor"):
        with grad_value_strategy(strategy):
            for _ in range(2):
                torch.ops.deem.ms_deform_attn_backward(grad, value, shapes, starts, loc, weights)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    torch.ops.deem.ms_deform_attn_backward(grad, value, shapes, starts, loc, weights)
                torch.cuda.synchronize()
        print(f"--- llm_8img {dtype_name} backward, strategy {strategy}: per-call CUDA ms by kernel")
        for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]:
            if event.device_time_total > 0:
                print(f"  {event.device_time_total / 5e3:8.3f}  {event.key[:100]}")


# ------------------------------------------------------------------------------------- output

def environment(device: str) -> dict:
    env = dict(torch=torch.__version__, deem=deem.__version__, date=dt.date.today().isoformat(),
               host=platform.node(), python=platform.python_version())
    if device == "cuda":
        env.update(card=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    else:
        env.update(card=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def print_table(records: list[dict]) -> None:
    """Each column is its own measurement; "x" columns are the speed-up over the baseline of the same run
    (the grid_sample reference for the core op, the original formulation with it for the MMFS layer)."""
    def base_of(r):
        impl = "original+reference_op" if r["case"].startswith("mmfs_layer") else "reference"
        return next((x for x in records if x["case"] == r["case"] and x["dtype"] == r["dtype"]
                     and x["impl"] == impl), None)

    def num(v, width):
        return f"{v:>{width}.3f}" if v is not None else f"{'-':>{width}}"

    def ratio(b, v, width=9):
        return f"{b / v:>{width - 1}.1f}x" if b is not None and v else f"{'':>{width}}"

    print(f"{'case':<22}{'dtype':<6}{'impl':<24}{'strategy':<9}{'fwd ms':>10}{'bwd ms':>10}{'fwd+bwd ms':>12}"
          f"{'fwd x':>9}{'bwd x':>9}{'f+b x':>9}")
    for r in records:
        base = base_of(r) or {}
        print(f"{r['case']:<22}{r['dtype']:<6}{r['impl']:<24}{r['strategy'] or '':<9}{num(r['fwd_ms'], 10)}"
              f"{num(r['bwd_ms'], 10)}{num(r['fwd_bwd_ms'], 12)}{ratio(base.get('fwd_ms'), r['fwd_ms'])}"
              f"{ratio(base.get('bwd_ms'), r['bwd_ms'])}{ratio(base.get('fwd_bwd_ms'), r['fwd_bwd_ms'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--cases", default=None, help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--dtypes", default=None, help="comma-separated subset of fp16,bf16,fp32")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--no-layer", action="store_true", help="skip the MMFS layer benchmark (GPU)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="d(value) strategies to time (GPU)")
    parser.add_argument("--no-reference", action="store_true", help="skip the grid_sample reference")
    parser.add_argument("--out", default=os.environ.get("DEEM_BENCH_OUT", "benchmarks/results"))
    parser.add_argument("--profile", action="store_true", help="print per-kernel times of the llm_8img backward")
    args = parser.parse_args(argv)
    if args.profile:
        profile((args.dtypes or "bf16").split(",")[0])
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --device cpu")
    if args.device == "cuda":
        cases = args.cases.split(",") if args.cases else ["llm_8img", "llm_2img", "unet_64", "unet_16"]
        dtypes = args.dtypes.split(",") if args.dtypes else ["fp16", "bf16"]
        reps = args.reps or 20
    else:
        cases = args.cases.split(",") if args.cases else ["unet_16", "llm_2img_n1"]
        dtypes = args.dtypes.split(",") if args.dtypes else ["fp32"]
        reps = args.reps or 5
    strategies = args.strategies.split(",")
    records = []
    for case in cases:
        for dtype in dtypes:
            print(f"timing {case} {dtype} ...", file=sys.stderr, flush=True)
            records += bench_core(case, dtype, args.device, reps, strategies, not args.no_reference)
    if args.device == "cuda":
        for dtype in dtypes:
            print(f"timing the MMFS core {dtype} ...", file=sys.stderr, flush=True)
            records += bench_mmfs_core(dtype, reps, strategies)
    if args.device == "cuda" and not args.no_layer:
        for dtype in dtypes:
            print(f"timing the MMFS layer {dtype} ...", file=sys.stderr, flush=True)
            records += bench_mmfs_layer(dtype, reps)
    env = environment(args.device)
    for r in records:
        r.update(env)
    print(f"\n{env['card']}, torch {env['torch']}, CUDA {env.get('cuda', '-')}, {env['date']}")
    print_table(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"msda_{args.device}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
