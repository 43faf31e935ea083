"""The fused resampler and loss ops against the building blocks they replace, in one run (issue 16 targets):

* masked-MSE loss (spec/kernels.md §7.2, target <= 10 µs for B <= 64): `deem.ops.masked_mse` vs the model's eager
  `feedback_loss` formula on [B, 4, 64, 64] bf16 predictions, fp32 targets and a binary latent mask;
* Q-Former attention, one module at the Q-Former's shapes (12 heads x 64, qk-LayerNorm; cross 77 x 257, self 77 x 77):
  `deem.ops.qformer_attention` vs LayerNorm + SDPA (the previous formulation) vs the eager matmul/softmax/matmul;
* the whole Q-Former (12 layers, 77 queries over 257 keys) at B images: ours (fused projections + the fused
  op) vs HF layers with SDPA vs HF layers with the eager attention (the original), in train mode (dropout 0.1).

Medians of CUDA events; "fwd" is the forward, "fwd+bwd" one forward and one backward from a fixed output gradient;
with --graph the fwd+bwd of ours is also timed as one CUDA-graph replay. Writes <out>/fused_ops.json.

    python benchmarks/fused_ops.py [--images 8 32] [--reps 50] [--graph]
    python benchmarks/fused_ops.py --device cpu --tiny      # a smoke run of this script
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import timer

from deem.models.resampler import PerceiverResampler, QFormerConfig, set_attention_implementation
from deem.ops import masked_mse
from deem.ops.resampler import cuda_fits, qformer_attention


def graph_timer(device: torch.device, fn: Callable[[], object], reps: int) -> float | str:
    """Median milliseconds of one replay of `fn` captured in a CUDA graph (or why it could not be captured)."""
    if device.type != "cuda":
        return "n/a (CPU)"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # reported in the results, not hidden
        return f"capture failed: {type(err).__name__}: {err}"
    return timer(device, graph.replay, reps)


def fwd_bwd(make: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]], grad_like: bool = True):
    """fwd() and fwd+bwd() closures over `make`, which returns (output, leaves)."""
    def fwd():
        with torch.no_grad():
            return make()[0]

    def both():
        out, leaves = make()
        g = torch.ones_like(out) if grad_like else None
        return torch.autograd.grad(out, leaves, g)

    return fwd, both


def time_variants(device, reps, graph, variants) -> dict:
    """fwd / fwd+bwd (and CUDA-graph fwd+bwd) timings of each (name, make) in `variants`."""
    row = {}
    for name, make in variants:
        fwd, both = fwd_bwd(make)
        row[f"{name} fwd ms"] = timer(device, fwd, reps)
        row[f"{name} fwd+bwd ms"] = timer(device, both, reps)
        if graph:
            row[f"{name} fwd+bwd ms (CUDA graph)"] = graph_timer(device, both, reps)
    return row


def masked_mse_case(device, dtype, B, reps, graph) -> dict:
    g = torch.Generator(device="cpu").manual_seed(B)
    pred = torch.randn(B, 4, 64, 64, generator=g).to(device, dtype).requires_grad_()
    target = torch.randn(B, 4, 64, 64, generator=g).to(device)
    mask = (torch.rand(B, 1, 64, 64, generator=g) > 0.3).to(device)
    maskf = mask.float()

    def eager():
        loss = (pred.float() - target) ** 2
        scale = (64 * 64) / (maskf.sum(dim=(1, 2, 3)) + 1e-8)
        return (loss * maskf * scale.view(B, 1, 1, 1)).mean(), [pred]

    def ours():
        return masked_mse(pred, target, mask), [pred]

    row = {"case": f"masked_mse B={B} [B,4,64,64] {str(dtype).removeprefix('torch.')}"}
    return {**row, **time_variants(device, reps, graph, (("eager", eager), ("deem", ours)))}


def bench_masked_mse(device, dtype, batches, reps, graph):
    return [masked_mse_case(device, dtype, B, reps, graph) for B in batches]


def attention_case(device, dtype, B, kind, Lk, reps, graph, heads, d) -> dict:
    g = torch.Generator(device="cpu").manual_seed(B + Lk)
    q = torch.randn(B, 77, heads * d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, Lk, heads * d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, Lk, heads * d, generator=g).to(device, dtype).requires_grad_()
    qn = torch.nn.LayerNorm(d, eps=1e-12).to(device, dtype)
    kn = torch.nn.LayerNorm(d, eps=1e-12).to(device, dtype)
    leaves = [q, k, v, qn.weight, qn.bias, kn.weight, kn.bias]

    def split(t):
        return t.view(B, -1, heads, d).transpose(1, 2)

    def eager():
        qh, kh = qn(split(q)), kn(split(k))
        p = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, -1)
        return (p @ split(v)).permute(0, 2, 1, 3).contiguous().flatten(-2), leaves

    def sdpa():
        qh = qn(q.view(B, -1, heads, d)).transpose(1, 2)
        kh = kn(k.view(B, -1, heads, d)).transpose(1, 2)
        return F.scaled_dot_product_attention(qh, kh, split(v)).transpose(1, 2).flatten(-2), leaves

    def ours():
        return qformer_attention(q, k, v, heads, q_norm=(qn.weight, qn.bias), k_norm=(kn.weight, kn.bias)), leaves

    row = {"case": f"attention {kind} B={B} H={heads} d={d}", "deem CUDA kernel": cuda_fits(q, k, heads)}
    return {**row, **time_variants(device, reps, graph, (("eager", eager), ("LN+SDPA", sdpa), ("deem", ours)))}


def bench_attention(device, dtype, batches, reps, graph, heads, d):
    return [attention_case(device, dtype, B, kind, Lk, reps, graph, heads, d)
            for B in batches for kind, Lk in (("cross 77x257", 257), ("self 77x77", 77))]


def configure(model: PerceiverResampler, impl: str, fused: bool) -> None:
    set_attention_implementation(model, impl)
    model.fused_projections = fused
    for m in model.modules():
        if hasattr(m, "fused_op"):
            m.fused_op = fused


def qformer_case(device, dtype, model, B, reps, graph) -> dict:
    cfg = model.config
    enc = torch.randn(B, 257, cfg.encoder_width, device=device, dtype=dtype, requires_grad=True)
    leaves = [enc, *(p for p in model.parameters() if p.requires_grad)]

    def make():
        return model(enc), leaves

    row = {"case": f"visual-tokenizer Q-Former B={B} ({cfg.num_layers} layers, train mode, dropout {cfg.dropout})"}
    for name, impl, fused in (("eager (original)", "eager", False), ("HF+SDPA", "sdpa", False), ("deem", "sdpa", True)):
        configure(model, impl, fused)
        row.update(time_variants(device, reps, graph and name == "deem", ((name, make),)))
    configure(model, "sdpa", True)
    return row


def bench_qformer(device, dtype, batches, reps, graph, cfg):
    torch.manual_seed(0)
    model = PerceiverResampler(cfg).to(device, dtype).train()
    return [qformer_case(device, dtype, model, B, reps, graph) for B in batches]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[8, 32], help="Q-Former / attention batches")
    parser.add_argument("--loss-batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--graph", action="store_true", help="also time CUDA-graph replays")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke run of this script)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --device cpu --tiny)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = QFormerConfig.visual_tokenizer_7b()
    heads, d = 12, 64
    if args.tiny:
        cfg = QFormerConfig.visual_tokenizer_7b(num_layers=2, hidden=64, heads=1, encoder_width=32, intermediate=128)
        args.images, args.loss_batches, args.reps, heads = [2], [2], 2, 1
    result = {
        "masked_mse": bench_masked_mse(device, dtype, args.loss_batches, args.reps, args.graph),
        "attention": bench_attention(device, dtype, args.images, args.reps, args.graph, heads, d),
        "qformer": bench_qformer(device, dtype, args.images, max(args.reps // 5, 2), args.graph, cfg),
        "device": device.type, "card": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."),
        "date": dt.date.today().isoformat(),
    }
    for section in ("masked_mse", "attention", "qformer"):
        for row in result[section]:
            print(json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "fused_ops_tiny.json" if args.tiny else "fused_ops.json"
    (out / name).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
