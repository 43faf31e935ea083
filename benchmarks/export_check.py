"""ONNX export check on the `deem_7b()` architecture with random weights: exports the vision, prefill and decode
graphs (deem custom nodes and decomposed), runs the vision and decode graphs with ONNX Runtime (the CUDA execution
provider when onnxruntime-gpu is installed, else the CPU) and compares them with the PyTorch graph modules in the
same run (relative L2 of every output). Optionally chains the three graphs into greedy decoding next to the engine.

    python benchmarks/export_check.py                      # 8 decoder layers of the 7B shape, fp16, writes
                                                           # benchmarks/results/export_check.json
    python benchmarks/export_check.py --layers 32          # the whole 7B (external-data files, ~14 GB per variant)
    python benchmarks/export_check.py --dtype fp32 --greedy 16
    python benchmarks/export_check.py --tiny               # CPU smoke check of this script (tiny model)

Columns: `rel_l2` of ONNX Runtime against PyTorch (the reference runs in fp32 on the GPU when there is one, so for
--dtype fp16 it includes the fp16 rounding); `seconds` is the wall time of one ORT call after one warm-up call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deem.export.graphs import DecodeGraph, PrefillGraph, VisionGraph
from deem.export.onnx_export import export_model
from deem.export.runtime import OnnxPipeline, session
from deem.models import DeemModel, deem_7b, tiny


def rel_l2(a, b) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(b).double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build_model(args) -> DeemModel:
    cfg = tiny() if args.tiny else deem_7b()
    cfg.diffusion, cfg.image_decoder_resampler = None, None
    if not args.tiny:
        cfg.llm["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    model = DeemModel(cfg).eval()
    with torch.no_grad():
        for cross in model.llm.cross_attention_layers():
            cross.gate.fill_(0.5)  # zero at init: MMFS would not contribute
        if args.tiny:
            model.visual_tokenizer.proj_t.weight.normal_(0, 0.3)
    return model


def providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in have else [
        "CPUExecutionProvider"]


def timed(sess, feed) -> tuple[list, float]:
    sess.run(None, feed)
    t = time.perf_counter()
    out = sess.run(None, feed)
    return out, time.perf_counter() - t


def check_variant(directory: Path, model: DeemModel, ref_device, args, provs) -> dict:
    """Vision and decode graphs of one export directory against the fp32 PyTorch graphs."""
    manifest = json.loads((directory / "manifest.json").read_text())
    np_dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32
    value_type = "float16" if np_dtype == np.float16 else "float"
    cfg = model.config
    r = int(cfg.image_encoder["image_size"])
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(args.images, 3, r, r, generator=g)
    out: dict = {"custom_nodes": {k: v["custom_nodes"] for k, v in manifest["graphs"].items()}}
    ref_model = model.to(ref_device)

    vision = session(directory / "vision.onnx", provs, value_type, threads=args.threads)
    (embeds, feats), seconds = timed(vision, {"pixels": pixels.numpy().astype(np_dtype)})
    with torch.no_grad():
        ref_e, ref_f = VisionGraph(ref_model)(pixels.to(ref_device))
    out["vision"] = {"rel_l2": {"image_embeds": rel_l2(embeds, ref_e), "image_features": rel_l2(feats, ref_f)},
                     "seconds": seconds, "images": args.images}

    # decode after a PyTorch prefill of one request with all images and a text prompt
    sp, nt = cfg.special_tokens, cfg.num_img_token
    ids = [sp["bos"]]
    for _ in range(args.images):
        ids += [sp["soi"]] + [sp["image"]] * nt
    ids += list(range(100, 100 + args.prompt_tokens))
    ids_t = torch.tensor([ids], device=ref_device)
    mask = torch.ones_like(ids_t)
    prefill = PrefillGraph(ref_model)
    with torch.no_grad():
        state = dict(zip(prefill.output_names(), prefill(ids_t, mask, ref_e[None], ref_f[None])))
    decode = DecodeGraph(ref_model)
    names = decode.input_names()
    past = [state[n.replace("past_", "present_")] for n in names if n.startswith("past_")]
    values = [state[n] for n in names if n.startswith("cross_values")]
    token = state["logits"].argmax(-1)[:, None]
    positions = torch.tensor([[len(ids)]], device=ref_device)
    mask1 = torch.ones(1, len(ids) + 1, dtype=torch.long, device=ref_device)
    with torch.no_grad():
        ref = decode(token, positions, mask1, past, values, state["image_visible"], state["has_images"])
    feed = {"input_ids": token.cpu().numpy(), "position_ids": positions.cpu().numpy(), "attention_mask": mask1.cpu()
            .numpy(), "image_visible": state["image_visible"].cpu().numpy(),
            "has_images": state["has_images"].cpu().numpy()}
    for n in names:
        if n.startswith(("past_", "cross_values")):
            feed[n] = state[n.replace("past_", "present_")].cpu().numpy().astype(np_dtype)
    dec = session(directory / "decode.onnx", provs, value_type, threads=args.threads)
    got, seconds = timed(dec, feed)
    out["decode"] = {"rel_l2": {"logits": rel_l2(got[0], ref[0]),
                                "present (worst layer)": max(rel_l2(a, b) for a, b in zip(got[1:], ref[1:]))},
                     "seconds": seconds, "cached_tokens": len(ids)}
    if args.greedy:
        from deem.infer import InferenceEngine, Request, SamplingParams

        pipe = OnnxPipeline(directory, provs, threads=args.threads)
        onnx_tokens = pipe.greedy([ids], [[p.numpy() for p in pixels]], max_new_tokens=args.greedy)[0].tokens
        engine = InferenceEngine(ref_model, cuda_graphs=False)
        want = engine.generate([Request(ids, list(pixels), SamplingParams(max_new_tokens=args.greedy))])
        engine_tokens = want[0].sequences[0].tokens
        same = 0
        while same < min(len(onnx_tokens), len(engine_tokens)) and onnx_tokens[same] == engine_tokens[same]:
            same += 1
        out["greedy"] = {"onnx": onnx_tokens, "engine_fp32": engine_tokens, "equal_prefix": same}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B shape (cross-attention every 4th)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--greedy", type=int, default=0, help="also chain the graphs for N greedy tokens vs the engine")
    p.add_argument("--variants", default="custom,decomposed")
    p.add_argument("--threads", type=int, default=8, help="ONNX Runtime intra-op threads (CPU provider)")
    p.add_argument("--workdir", help="where the exports go (default: a temporary directory)")
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (checks this script)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/export_check[_tiny].json)")
    args = p.parse_args(argv)

    import onnxruntime as ort

    model = build_model(args)
    provs = providers()
    ref_device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    results = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name() if ref_device.type == "cuda" else "cpu",
               "torch": torch.__version__, "onnxruntime": ort.__version__, "providers": provs,
               "model": "tiny" if args.tiny else f"deem_7b shape, {args.layers} decoder layers, random weights",
               "dtype": args.dtype, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        for variant in args.variants.split(","):
            directory = root / variant
            t = time.perf_counter()
            export_model(model, directory, args.dtype, decompose_ops=variant == "decomposed")
            seconds = time.perf_counter() - t
            print(f"[{variant}] exported in {seconds:.1f} s", flush=True)
            res = check_variant(directory, model, ref_device, args, provs)
            res["export_seconds"] = seconds
            model.to("cpu")
            results["variants"][variant] = res
            print(json.dumps({variant: res}, indent=2), flush=True)
    out = Path(args.out or f"benchmarks/results/export_check{'_tiny' if args.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
