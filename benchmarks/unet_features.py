"""MMFSNet feature extraction (issue 16): the per-block path (each block's LayerNorm + value projection, MMFS core,
output projection, 1x1 conv, residual add) against the fused path of deem.models.diffusion.fused_features (one
normalisation and one batched value GEMM for all blocks, then each block's MMFS core, conv + bias + residual in one
baddbmm), same parameters.

Shapes: "7b" = the SD-2.1 UNet's 13 MMFSNet blocks (widths 320/640/1280/1280, 2 layers per block, 64x64 latents)
reading [B, 1, 1024, 64/32/16/8] vision features (attn 1024, 16 heads, 8 points); "tiny" = DiffusionConfig.tiny().
Timed: "fwd_ms" the MMFSNet forward under no_grad; "fwd_bwd_ms" one forward and one backward (gradients of the
parameters, the skip tensors and the features) from fixed output gradients. Medians of CUDA events (wall clock on
the CPU). Writes <out>/unet_features.json.

    python benchmarks/unet_features.py --out results            # GPU, bf16, 7b + tiny
    python benchmarks/unet_features.py --device cpu --shapes tiny --dtype float32 --reps 3   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
from timing import timer

from deem.models.diffusion import MMFSNet

SHAPES = {
    "7b": dict(blocks=(320, 640, 1280, 1280), layers=2, latent=64, feat_dim=1024, attn_dim=1024, heads=16, points=8,
               sides=(64, 32, 16, 8)),
    "tiny": dict(blocks=(8, 16), layers=1, latent=16, feat_dim=32, attn_dim=32, heads=4, points=8, sides=(8, 4, 2, 1)),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, batch: int, checkpointing: bool):
    s = SHAPES[shape]
    torch.manual_seed(0)
    net = MMFSNet(s["blocks"], s["layers"], s["latent"], feat_dim=s["feat_dim"], attn_dim=s["attn_dim"],
                  num_heads=s["heads"], n_points=s["points"], n_levels=len(s["sides"]), spatial_shapes=s["sides"])
    with torch.no_grad():  # non-zero convs, as after training (zero convs would make the backward trivially sparse)
        for b in net.blocks():
            b.conv.weight.normal_(std=0.02)
    net = net.to(device, dtype).train()
    net.set_trainable()
    net.set_gradient_checkpointing(checkpointing)
    g = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    skips = [rand(batch, c, side, side) for c, side in net.layout[:-1]]
    c, side = net.layout[-1]
    mid = rand(batch, c, side, side)
    feats = [rand(batch, 1, s["feat_dim"], k, k) for k in s["sides"]]
    grads = [rand(*x.shape) for x in (*skips, mid)]
    return net, skips, mid, feats, grads


def time_path(net, skips, mid, feats, grads, fused: bool, device, reps) -> dict:
    net.fused_features = fused
    leaves = [x.detach().requires_grad_() for x in (*skips, mid, *feats)]
    n = len(skips)

    def fwd():
        with torch.no_grad():
            net(skips, mid, feats)

    def fwd_bwd():
        out_skips, out_mid = net(leaves[:n], leaves[n], leaves[n + 1:])
        torch.autograd.backward([*out_skips, out_mid], grads)
        net.zero_grad(set_to_none=True)
        for x in leaves:
            x.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = {"fwd_ms": timer(device, fwd, reps), "fwd_bwd_ms": timer(device, fwd_bwd, reps)}
    if device.type == "cuda":
        row["fwd_bwd_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shapes", nargs="+", default=["7b", "tiny"], choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=8, help="images (UNet batch) per call")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--checkpointing", action="store_true", help="MMFSNet gradient checkpointing on (the config's "
                   "default in training); off by default")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = []
    print(f"{'shapes':6} {'B':>3} {'path':9} {'fwd_ms':>9} {'fwd_bwd_ms':>11} {'fwd_bwd_peak_GiB':>16}")
    for shape in args.shapes:
        net, skips, mid, feats, grads = build(shape, device, dtype, args.batch, args.checkpointing)
        rows = {}
        for path in ("per_block", "fused"):
            rows[path] = r = time_path(net, skips, mid, feats, grads, path == "fused", device, args.reps)
            mem = f"{r['fwd_bwd_peak_mem_gib']:16.2f}" if "fwd_bwd_peak_mem_gib" in r else f"{'n/a':>16}"
            print(f"{shape:6} {args.batch:3d} {path:9} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:11.3f} {mem}")
        speedup = {k: rows["per_block"][k] / rows["fused"][k] for k in ("fwd_ms", "fwd_bwd_ms")}
        print(f"{shape:6} {args.batch:3d} {'speedup':9} {speedup['fwd_ms']:8.2f}x {speedup['fwd_bwd_ms']:10.2f}x "
              "(per_block / fused)")
        results.append(dict(shapes=shape, config=SHAPES[shape], batch=args.batch, blocks=len(net.blocks()), **rows,
                            speedup_per_block_over_fused=speedup))
        del net, skips, mid, feats, grads
    meta = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", dtype=args.dtype,
                reps=args.reps, gradient_checkpointing=args.checkpointing,
                timed="fwd_ms: MMFSNet forward (no_grad); fwd_bwd_ms: forward + backward")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "unet_features.json"
    out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
