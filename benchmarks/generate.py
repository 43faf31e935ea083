"""Text generation latency: the inference engine against the transformers `generate` path
(`DeemModel.generate_texts`) in the same run, on the `deem_7b()` architecture with random weights (bf16, SDPA)
and one image plus a `--prompt-tokens` text prompt per request.

Every row generates exactly `--new-tokens` tokens (min_new_tokens = max_new_tokens, so EOS cannot end it early):

* TTFT: wall time of the same request with max_new_tokens=1 (image encoding, prefill, first token on the host);
* decode tokens/s per sequence: (N - 1) / (T(N) - T(1)), T(k) the wall time of a request of k new tokens;
  tokens/s all sequences: that times the batch size;
* peak memory: torch.cuda.max_memory_allocated over the row (weights included).

Engine rows run after one warm-up request of the same shape (it captures the CUDA graph of the bucket; the
capture time is reported separately). Medians over `--repeats` runs (transformers: `--hf-repeats`).

    python benchmarks/generate.py                      # GPU, writes benchmarks/results/generate.json
    python benchmarks/generate.py --no-compile         # without the torch.compile'd engine rows
    python benchmarks/generate.py --tiny               # CPU smoke check (tiny model), generate_tiny.json

Engine rows: "CUDA graphs" (eager kernels captured per bucket), "compile + CUDA graphs" (the decoder layer
compiled by torch.compile, default mode, then captured), "eager" (no graph, for reference).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from deem.infer import InferenceEngine, Request, SamplingParams
from deem.models import DeemModel, deem_7b, tiny


def build_model(args) -> DeemModel:
    if args.tiny:
        torch.manual_seed(0)
        return DeemModel(tiny()).eval()
    cfg = deem_7b()
    cfg.diffusion = None  # generation does not use the diffusion model
    cfg.image_decoder_resampler = None
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeemModel(cfg)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():  # open the cross-attention gates (zero at init: MMFS would be a no-op)
        for cross in model.llm.cross_attention_layers():
            cross.gate.fill_(0.5)
    return model


def make_inputs(model, batch: int, prompt_tokens: int, device, seed: int = 0):
    cfg = model.config
    sp = cfg.special_tokens
    g = torch.Generator().manual_seed(seed)
    size = cfg.image_encoder["image_size"]
    prompts = []
    for _ in range(batch):
        text = torch.randint(100, cfg.base_vocab_size - 1, (prompt_tokens,), generator=g).tolist()
        prompts.append([sp["bos"], sp["soi"], *[sp["image"]] * cfg.num_img_token, *text])
    images = torch.rand(batch, 3, size, size, generator=g).to(device, next(model.parameters()).dtype)
    return prompts, images


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_runner(engine, prompts, images, beams: int):
    def run(new_tokens: int):
        params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams)
        out = engine.generate([Request(p, [images[k]], params) for k, p in enumerate(prompts)])
        assert all(len(s.tokens) == new_tokens for c in out for s in c.sequences)
    return run


def hf_runner(model, prompts, images, beams: int):
    ids = torch.tensor(prompts, device=images.device)
    att = torch.ones_like(ids)
    counts = torch.ones(len(prompts), dtype=torch.long, device=images.device)

    def run(new_tokens: int):
        out = model.generate_texts(ids, att, images, counts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   num_beams=beams, length_penalty=1.0)
        assert out.shape[1] == new_tokens
    return run


def measure(name: str, run, batch: int, beams: int, args, device, repeats: int, extra=None) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = timed(lambda: run(1), device, repeats)
    tn = timed(lambda: run(args.new_tokens), device, repeats)
    per_seq = (args.new_tokens - 1) / (tn - t1)
    rec = {"path": name, "mode": "greedy" if beams == 1 else f"beam {beams}", "batch": batch,
           "new_tokens": args.new_tokens, "ttft_ms": t1 * 1e3, "total_s": tn,
           "decode_tokens_per_s_per_sequence": per_seq, "decode_tokens_per_s_all_sequences": per_seq * batch,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           **(extra or {})}
    print(f"  {name:<28} {rec['mode']:<7} batch {batch}: TTFT {rec['ttft_ms']:.1f} ms, decode "
          f"{per_seq:.1f} tok/s/seq", flush=True)
    return rec


def table(records: list[dict]) -> str:
    base = {(r["mode"], r["batch"]): r["decode_tokens_per_s_per_sequence"] for r in records
            if r["path"] == "transformers generate"}
    head = ("| path | mode | batch | TTFT ms (request with max_new_tokens=1: image, prefill, 1st token on host) | "
            "decode tok/s per sequence ((N-1)/(T(N)-T(1))) | decode tok/s all sequences | peak memory GiB | "
            "decode speed-up vs transformers |")
    lines = [head, "|" + "---|" * 8]
    for r in records:
        ref = base.get((r["mode"], r["batch"]))
        speed = f"{r['decode_tokens_per_s_per_sequence'] / ref:.1f}x" if ref else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['path']} | {r['mode']} | {r['batch']} | {r['ttft_ms']:.1f} | "
                     f"{r['decode_tokens_per_s_per_sequence']:.1f} | {r['decode_tokens_per_s_all_sequences']:.1f} | "
                     f"{mem} | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a smoke check)")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--prompt-tokens", type=int, help="text tokens after the image run (default 600; tiny 40)")
    p.add_argument("--new-tokens", type=int, help="default 128; tiny 16")
    p.add_argument("--beams", type=int, default=5, help="also a batch-1 beam-search row with this many beams (0: no)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-repeats", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the engine rows with torch.compile'd layers")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", type=Path, help="the JSON file (or a folder for generate.json)")
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.tiny else [1, 8])
    args.prompt_tokens = args.prompt_tokens or (40 if args.tiny else 600)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    out = args.out or Path(__file__).parent / "results" / ("generate_tiny.json" if args.tiny else "generate.json")
    if out.is_dir():  # a folder: the default file name inside it
        out = out / ("generate_tiny.json" if args.tiny else "generate.json")
    if not args.tiny and not torch.cuda.is_available():
        print("benchmarks/generate.py needs a GPU (or --tiny for the CPU smoke check)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny else "cuda")
    model = build_model(args)
    llm_bytes = sum(t.numel() * t.element_size() for m in (model.llm, model.text_head) for t in m.parameters())
    engines = {"engine (CUDA graphs)": dict(cuda_graphs=True), "engine (eager)": dict(cuda_graphs=False)}
    if args.tiny:
        engines = {"engine (CPU)": dict(cuda_graphs=False)}
    if not args.no_compile:
        engines["engine (compile + CUDA graphs)" if not args.tiny else "engine (compile)"] = dict(
            cuda_graphs=not args.tiny, compile=True)
    cases = [(b, 1) for b in args.batch_sizes] + ([(1, args.beams)] if args.beams > 1 else [])
    records = []
    for batch, beams in cases:
        prompts, images = make_inputs(model, batch, args.prompt_tokens, device)
        print(f"batch {batch}, {'greedy' if beams == 1 else f'{beams} beams'}:", flush=True)
        for name, kw in engines.items():
            engine = InferenceEngine(model, None, max_batch_size=max(8, batch), **kw)
            run = engine_runner(engine, prompts, images, beams)
            start = time.perf_counter()
            run(args.new_tokens)  # warm-up: captures the bucket's graph (and compiles)
            sync(device)
            warm = time.perf_counter() - start
            extra = {"warmup_s": warm, "graph_capture_s": engine.graphs.capture_seconds if engine.graphs else None,
                     "cache_arena_gib": engine.arena.bytes / 2**30}
            records.append(measure(name, run, batch, beams, args, device, args.repeats, extra))
            del engine, run
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not args.skip_transformers:
            run = hf_runner(model, prompts, images, beams)
            run(2)  # warm-up
            records.append(measure("transformers generate", run, batch, beams, args, device, args.hf_repeats))
    import transformers

    result = {
        "benchmark": "generate", "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "model": "tiny" if args.tiny else "deem_7b (random weights, no diffusion model)",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attention": model.llm.config._attn_implementation, "images_per_request": 1,
        "prompt_tokens": args.prompt_tokens + 1 + 1 + model.config.num_img_token,
        "prompt_text_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "llm_and_head_weight_bytes": llm_bytes, "records": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{result['device']}, torch {result['torch']}, transformers {result['transformers']}, {result['dtype']}, "
          f"{result['attention']} attention; prompt {result['prompt_tokens']} tokens (1 image run + "
          f"{args.prompt_tokens} text), {args.new_tokens} new tokens; LLM + head weights "
          f"{llm_bytes / 1e9:.2f} GB")
    print(table(records))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
