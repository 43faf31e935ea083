"""Running an ONNX export with ONNX Runtime: the three graphs chained into greedy generation.

    pipe = OnnxPipeline("export_dir")                      # CPU; providers=["CUDAExecutionProvider", ...] on a GPU
    answers = pipe.greedy([prompt_ids], [[pixels]], max_new_tokens=32)

`pixels` are the model's eval view ([3, R, R] float in [0, 1], `deem.infer.ImagePreparer`); prompts hold one image
run (`<soi>` + num_img_token image tokens) per image. Graphs with `deem` custom nodes run through
onnxruntime-extensions ops over deem's kernels (`ort_ops.py`); decomposed graphs need nothing but onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deem.export.lowering import ExportError
from deem.export.onnx_export import GRAPHS, load_manifest
from deem.export.schemas import DOMAIN

_NP = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class GreedyResult:
    """Generated ids (without the stop token) and why generation ended ("stop" or "length")."""

    tokens: list[int]
    finish_reason: str


def session(path: str | Path, providers: Sequence[str] | None = None, value_type: str = "float", threads: int = 1):
    """An onnxruntime InferenceSession over an exported graph, with the deem custom nodes bound when it has any."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    providers = list(providers or ["CPUExecutionProvider"])
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)  # weights stay on disk (graphs may exceed 2 GB)
    if not any(n.domain == DOMAIN for n in model.graph.node):
        return ort.InferenceSession(str(path), opts, providers=providers)
    try:
        from deem.export.ort_ops import bind_custom_nodes, register_ops
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError(f"{path} has deem custom nodes: running it needs onnxruntime-extensions "
                          f"(pip install 'deem[export]'): {exc}") from exc
    opts.register_custom_ops_library(register_ops())
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(bind_custom_nodes(model, value_type).SerializeToString(), opts, providers=providers)


class OnnxPipeline:
    """The vision, prefill and decode graphs of an export directory as one greedy generator."""

    def __init__(self, directory: str | Path, providers: Sequence[str] | None = None, threads: int = 1) -> None:
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.facts: dict[str, Any] = self.manifest["model"]
        self.dtype = _NP[self.manifest["dtype"]]
        value_type = "float16" if self.dtype == np.float16 else "float"
        self.sessions = {name: session(self.directory / f"{name}.onnx", providers, value_type, threads)
                         for name in GRAPHS}
        sp = self.facts["special_tokens"]
        self.stop_ids = (sp["eos"], sp["soi"])
        self.decode_inputs = [i.name for i in self.sessions["decode"].get_inputs()]
        self.prefill_outputs = [o.name for o in self.sessions["prefill"].get_outputs()]

    # ------------------------------------------------------------------ graphs
    def vision(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """pixels [n, 3, R, R] -> image_embeds [n, num_img_token, hidden], image_features [n, S, vision_width]."""
        embeds, feats = self.sessions["vision"].run(None, {"pixels": np.asarray(pixels, dtype=self.dtype)})
        return embeds, feats

    def pack_images(self, images: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Each row's images through the vision graph, packed [B, I, ...] (zeros in unused slots; one empty slot when
        no row has images: the graphs then gate cross-attention off)."""
        f = self.facts
        B = len(images)
        slots = max(1, max((len(r) for r in images), default=0))
        embeds = np.zeros((B, slots, f["num_img_token"], f["hidden"]), dtype=self.dtype)
        feats = np.zeros((B, slots, f["image_rows"], f["vision_width"]), dtype=self.dtype)
        flat = [np.asarray(p) for r in images for p in r]
        if flat:
            e, v = self.vision(np.stack(flat))
            k = 0
            for b, row in enumerate(images):
                embeds[b, : len(row)] = e[k: k + len(row)]
                feats[b, : len(row)] = v[k: k + len(row)]
                k += len(row)
        return embeds, feats

    def check(self, prompts: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]],
              max_new_tokens: int) -> None:
        f, sp = self.facts, self.facts["special_tokens"]
        if len(prompts) != len(images):
            raise ExportError(f"{len(prompts)} prompts but {len(images)} image lists")
        for b, (ids, row) in enumerate(zip(prompts, images)):
            if not ids:
                raise ExportError(f"prompt {b} is empty")
            if any(not 0 <= int(t) < f["vocab"] for t in ids):
                raise ExportError(f"prompt {b}: token ids must be in [0, {f['vocab']})")
            starts = [i for i, t in enumerate(ids) if t == sp["soi"]]
            runs_ok = sum(t == sp["image"] for t in ids) == len(row) * f["num_img_token"] and all(
                list(ids[s + 1: s + 1 + f["num_img_token"]]) == [sp["image"]] * f["num_img_token"] for s in starts)
            if len(starts) != len(row) or not runs_ok:
                raise ExportError(f"prompt {b} holds {len(starts)} image runs (<soi> + {f['num_img_token']} image "
                                  f"tokens) for {len(row)} images")
            if len(row) > f["max_images"]:
                raise ExportError(f"prompt {b}: {len(row)} images; the model takes at most {f['max_images']}")
            if len(ids) + max_new_tokens > f["context"]:
                raise ExportError(f"prompt {b}: {len(ids)} tokens + {max_new_tokens} new exceed the context of "
                                  f"{f['context']}")

    def prefill(self, prompts: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
        """The prefill graph's outputs by name for right-padded prompts, plus the lengths."""
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = np.full((B, L), self.facts["special_tokens"]["pad"], dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
            mask[b, : len(p)] = 1
        embeds, feats = self.pack_images(images)
        out = self.sessions["prefill"].run(None, {"input_ids": ids, "attention_mask": mask, "image_embeds": embeds,
                                                  "image_features": feats})
        result = dict(zip(self.prefill_outputs, out))
        result["attention_mask"], result["lengths"] = mask, mask.sum(1)
        return result

    def decode_step(self, state: dict[str, Any], tokens: np.ndarray, step: int) -> np.ndarray:
        """Feed `tokens` [B] at generated position `step`; updates `state` (caches, mask); returns logits [B, V]."""
        B = tokens.shape[0]
        state["attention_mask"] = np.concatenate([state["attention_mask"], np.ones((B, 1), np.int64)], axis=1)
        feed = {"input_ids": tokens.reshape(B, 1).astype(np.int64),
                "position_ids": (state["lengths"] + step).reshape(B, 1).astype(np.int64)}
        for name in self.decode_inputs:
            if name not in feed:
                feed[name] = state[name.replace("past_", "present_")] if name.startswith("past_") else state[name]
        out = self.sessions["decode"].run(None, feed)
        names = [o.name for o in self.sessions["decode"].get_outputs()]
        for name, value in zip(names[1:], out[1:]):
            state[name] = value
        return out[0]

    # ------------------------------------------------------------------ generation
    def greedy(self, prompts: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]] | None = None,
               max_new_tokens: int = 32, min_new_tokens: int = 0) -> list[GreedyResult]:
        """Greedy decoding of a batch of prompts (argmax; `<eos>` or `<soi>` ends a sequence, not before
        `min_new_tokens` tokens), as the engine's greedy `SamplingParams`."""
        images = images if images is not None else [[] for _ in prompts]
        self.check(prompts, images, max_new_tokens)
        state = self.prefill(prompts, images)
        logits = state["logits"]
        B = len(prompts)
        results = [GreedyResult([], "length") for _ in range(B)]
        done = np.zeros(B, dtype=bool)
        stops = list(self.stop_ids)
        for step in range(max_new_tokens):
            scores = logits.astype(np.float32)
            if step < min_new_tokens:
                scores[:, stops] = -np.inf
            tokens = scores.argmax(-1)
            for b in range(B):
                if done[b]:
                    continue
                if int(tokens[b]) in self.stop_ids:
                    done[b], results[b].finish_reason = True, "stop"
                else:
                    results[b].tokens.append(int(tokens[b]))
            if done.all() or step + 1 >= max_new_tokens:
                break
            logits = self.decode_step(state, tokens, step)
        return results
