"""`deem generate`, `deem chat` and `deem serve` (registered by `add_infer_commands`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a DeemModel directory with its tokenizer/ (deem train export)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU if there is one)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on the GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first request)")


def _sampling_options(p: argparse.ArgumentParser, max_new: int = 128, temperature: float = 0.0) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length ** this")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass")
    p.add_argument("--seed", type=int, help="sampling: reproduce a sample")
    p.add_argument("--stop", action="append", default=[], help="a string that ends the answer (repeatable)")
    p.add_argument("--system", help="replace the system prompt")


def _params(args: argparse.Namespace, n: int = 1):
    from deem.infer.request import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed, num_beams=args.num_beams,
                          length_penalty=args.length_penalty, repetition_penalty=args.repetition_penalty, n=n,
                          stop=tuple(args.stop))


def _engine(args: argparse.Namespace, **kwargs):
    from deem.infer.engine import InferenceEngine

    return InferenceEngine.from_checkpoint(args.checkpoint, args.device, args.dtype,
                                           cuda_graphs=False if args.no_cuda_graphs else None, compile=args.compile,
                                           **kwargs)


def _fail(command: str, exc: Exception) -> int:
    print(f"deem {command}: error: {exc}", file=sys.stderr)
    return 2


def _cmd_generate(args: argparse.Namespace) -> int:
    from deem.infer.inputs import Turn, user_parts
    from deem.infer.request import InferenceError

    try:
        params = _params(args, args.n)
        engine = _engine(args)
        images = [engine.prepare_image(p, p) for p in args.image]
        request = engine.chat_request([Turn("user", user_parts(args.prompt, images))], params, args.system)
        stream = args.stream and params.n == 1 and params.num_beams == 1

        def on_event(ev) -> None:
            sys.stdout.write(ev.text)
            sys.stdout.flush()

        completion = engine.generate([request], on_event=on_event if stream else None)[0]
    except InferenceError as exc:
        return _fail("generate", exc)
    if stream:
        print()
    elif params.n == 1:
        print(completion.text)
    else:
        for k, seq in enumerate(completion.sequences):
            print(f"[{k}] {seq.text}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from deem.infer.chat import run_chat
    from deem.infer.request import InferenceError

    try:
        params, engine = _params(args), _engine(args)
    except InferenceError as exc:
        return _fail("chat", exc)
    return run_chat(engine, params, args.system)


def _cmd_serve(args: argparse.Namespace) -> int:
    from deem.infer.request import InferenceError
    from deem.infer.server import serve

    try:
        engine = _engine(args, max_batch_size=args.max_batch_size)
    except InferenceError as exc:
        return _fail("serve", exc)
    name = args.model_name or Path(args.checkpoint).resolve().name
    roots = args.file_root or ["."]
    roots = None if "/" in roots else [Path(r) for r in roots]
    serve(engine, args.host, args.port, log_level=args.log_level, model_name=name,
          max_batch_size=args.max_batch_size, default_max_tokens=args.max_tokens, max_n=args.max_n,
          max_images=args.max_images, file_roots=roots)
    return 0


def add_infer_commands(sub) -> None:
    """Register generate, chat and serve on the `deem` subparsers."""
    g = sub.add_parser("generate", help="answer one prompt about images")
    _engine_options(g)
    g.add_argument("--image", action="append", default=[], help="an image file (repeatable; <image> in the "
                   "prompt places it, else the images come first)")
    g.add_argument("--prompt", required=True)
    _sampling_options(g)
    g.add_argument("--n", type=int, default=1, help="answers to generate (samples, or the best beams)")
    g.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("chat", help="a multi-turn conversation in the terminal (/image PATH attaches images)")
    _engine_options(c)
    _sampling_options(c, max_new=256)
    c.set_defaults(func=_cmd_chat)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)")
    _engine_options(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", help="the model id clients see (default: the checkpoint directory's name)")
    s.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    s.add_argument("--max-n", type=int, default=8, help="the largest `n` a request may ask for")
    s.add_argument("--max-images", type=int, help="images per request (default: the model's limit)")
    s.add_argument("--file-root", action="append", help="a directory file:// image URLs may read from (repeatable; "
                   "default: the current directory; '/' allows any file)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=_cmd_serve)
