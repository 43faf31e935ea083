"""`deem export onnx` and `deem export tensorrt` (registered by `add_parser`)."""

from __future__ import annotations

import argparse
import json


def _cmd_onnx(args: argparse.Namespace) -> int:
    from deem.export.onnx_export import export_onnx

    manifest = export_onnx(args.checkpoint, args.out, args.dtype, args.decompose)
    graphs = ", ".join(f"{g['file']} ({', '.join(g['custom_nodes']) or 'standard ops'})"
                       for g in manifest["graphs"].values())
    print(f"wrote {graphs}, tokenizer/ and manifest.json to {args.out}")
    return 0


def _cmd_tensorrt(args: argparse.Namespace) -> int:
    from deem.export.tensorrt import Ranges, build_engines

    def triple(text: str, name: str) -> tuple[int, int, int]:
        from deem.errors import UsageError

        parts = [int(v) for v in text.split(",")] if text.replace(",", "").isdigit() else []
        if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
            raise UsageError(f"--{name} must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
        return parts[0], parts[1], parts[2]

    ranges = Ranges(triple(args.batch, "batch"), triple(args.sequence, "sequence"), triple(args.images, "images"))
    result = build_engines(args.onnx, args.out, args.plugin, ranges, args.workspace_gib)
    print(json.dumps(result, indent=2))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `deem export` with its verbs `onnx` and `tensorrt`."""
    export = subparsers.add_parser("export", help="deployment: ONNX graphs and TensorRT engines")
    verbs = export.add_subparsers(dest="export_command", required=True)
    onnx = verbs.add_parser("onnx", help="write the vision, prefill and decode graphs, the tokenizer and a manifest")
    onnx.add_argument("--checkpoint", required=True, help="a DeemModel directory with tokenizer/ (deem train export)")
    onnx.add_argument("--out", required=True, help="output directory")
    onnx.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and activations")
    onnx.add_argument("--decompose", action="store_true",
                      help="standard ONNX ops only (GridSample) instead of the deem custom nodes")
    onnx.set_defaults(func=_cmd_onnx)
    trt = verbs.add_parser("tensorrt", help="build TensorRT engines from a `deem export onnx` directory")
    trt.add_argument("--onnx", required=True, help="the ONNX export directory")
    trt.add_argument("--out", required=True, help="output directory for the .engine files")
    trt.add_argument("--plugin", help="libdeem_trt_plugins.so (default: the one installed with deem)")
    trt.add_argument("--batch", default="1,1,8", help="MIN,OPT,MAX sequences per batch")
    trt.add_argument("--sequence", default="2,256,2048", help="MIN,OPT,MAX prompt tokens")
    trt.add_argument("--images", default="1,1,8", help="MIN,OPT,MAX images per sequence")
    trt.add_argument("--workspace-gib", type=float, default=8.0, help="builder workspace limit")
    trt.set_defaults(func=_cmd_tensorrt)
    return export
