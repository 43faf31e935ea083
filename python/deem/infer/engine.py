"""`InferenceEngine`: low-latency text generation over a loaded `DeemModel`.

Per batch of requests: the visual tokenizer and every cross-attention layer's value projection run once
(prefill), the prompts' K/V go into a preallocated static cache, then each token costs one decode step (a
replayed CUDA graph on the GPU) and a few device ops for the choice of the next token; the host reads tokens
one step behind the device, so it never stalls it (streaming, stop strings and EOS are handled there).

    engine = InferenceEngine.from_checkpoint("ckpt/")
    request = engine.chat_request([Turn("user", [engine.prepare_image("cat.jpg"), "What is this?"])])
    print(engine.generate([request])[0].text)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deem.infer.beam import BeamSearch
from deem.infer.cache import Bucket, CacheArena, CacheDims
from deem.infer.forward import DecodeInputs, DecoderForward
from deem.infer.graphs import StepGraphs
from deem.infer.inputs import ImagePreparer, Turn, chat_request
from deem.infer.request import Completion, GeneratedSequence, InferenceError, Request, SamplingParams, batches
from deem.infer.sampling import TokenSampler
from deem.infer.text import SequenceText

log = logging.getLogger("deem.infer")


@dataclass
class TokenEvent:
    """Streaming: new text of sequence `sequence` of request `request`; `finish_reason` is set on its last event."""

    request: int
    sequence: int
    text: str
    token: int | None = None
    finish_reason: str | None = None


EventFn = Callable[[TokenEvent], None]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


class InferenceEngine:
    """Generation over `model` (a `DeemModel`, moved to its device and dtype beforehand); `tokenizer` (a
    `DeemTokenizer`) gives texts and stop strings. `cuda_graphs` (default: on a GPU) captures the decode step per
    bucket; `compile` runs its layers through torch.compile first. `max_batch_size`: requests decoded together."""

    def __init__(self, model, tokenizer=None, *, cuda_graphs: bool | None = None, compile: bool = False,
                 max_batch_size: int = 8) -> None:
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tokenizer = tokenizer
        cfg = model.config
        sp = cfg.special_tokens
        self.special = sp
        self.stop_ids = [sp["eos"], sp["soi"]]
        self.vocab = cfg.text_vocab_size
        self.context = int(model.llm.config.max_position_embeddings)
        self.max_images = int(cfg.mmfs_settings.max_num_image_per_seq) - 1
        self.num_img_token = int(cfg.num_img_token)
        self.image_size = int(cfg.image_encoder["image_size"])
        self.max_batch_size = int(max_batch_size)
        self.forward = DecoderForward(model)
        self.arena = CacheArena(CacheDims.of(model.llm), self.device, self.dtype)
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if use_graphs and self.device.type != "cuda":
            raise InferenceError("CUDA graphs need the model on a CUDA device")
        if use_graphs and not self.forward.graph_safe:
            log.warning("the MMFS feature maps are not proportional to their spatial_shapes: decoding without "
                        "CUDA graphs (the per-level MMFS path copies a scale table to the device)")
            use_graphs = False
        if compile:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.forward.compile_layers()
        self.graphs = StepGraphs(self.forward.decode) if use_graphs else None
        self._inputs: dict[Bucket, DecodeInputs] = {}
        self._inputs_version = -1
        self._host: torch.Tensor | None = None
        self.prepare_image = ImagePreparer(self.image_size)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, **kwargs: Any) -> InferenceEngine:
        """Load `DeemModel.from_pretrained(path)` and its tokenizer (`path/tokenizer`) onto `device` (default: the
        GPU if there is one) in `dtype` (default bf16 on a GPU, fp32 on the CPU)."""
        from deem.infer.inputs import load_checkpoint

        model, tokenizer = load_checkpoint(path, device, dtype)
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------ requests
    def chat_request(self, turns: Sequence[Turn], params: SamplingParams | None = None,
                     system: str | None = None) -> Request:
        """A request for a conversation (`Turn`s whose images are `prepare_image` tensors)."""
        if self.tokenizer is None:
            raise InferenceError("chat prompts need the engine's tokenizer")
        return chat_request(self.tokenizer, turns, params, system)

    def check(self, request: Request) -> None:
        """Raise `InferenceError` naming what is wrong with a request."""
        p = request.params
        p.validate()
        ids = request.prompt_ids
        if not ids:
            raise InferenceError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab for t in ids):
            raise InferenceError(f"prompt token ids must be integers in [0, {self.vocab})")
        soi, img = self.special["soi"], self.special["image"]
        starts = [i for i, t in enumerate(ids) if t == soi]
        n = len(request.images)
        runs_ok = sum(t == img for t in ids) == n * self.num_img_token and all(
            ids[s + 1: s + 1 + self.num_img_token] == [img] * self.num_img_token for s in starts)
        if len(starts) != n or not runs_ok:
            raise InferenceError(f"the prompt holds {len(starts)} image runs (<soi> + {self.num_img_token} image "
                                 f"tokens) for {n} images")
        if n > self.max_images:
            raise InferenceError(f"{n} images in one request; this model takes at most {self.max_images}")
        shape = (3, self.image_size, self.image_size)
        for k, t in enumerate(request.images):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
                raise InferenceError(f"image {k}: expected a float tensor of shape {shape}, got "
                                     f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if request.image_masks is not None and len(request.image_masks) != n:
            raise InferenceError(f"{len(request.image_masks)} image masks for {n} images")
        if len(ids) + p.max_new_tokens > self.context:
            raise InferenceError(f"the prompt has {len(ids)} tokens; with max_new_tokens={p.max_new_tokens} that "
                                 f"exceeds the model's context of {self.context} tokens")
        if p.stop and self.tokenizer is None:
            raise InferenceError("stop strings need the engine's tokenizer")

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], on_event: EventFn | None = None) -> list[Completion]:
        """Complete every request; batches requests with compatible settings (`request.group_key`). `on_event`
        receives the text of each sequence as it grows (sampling/greedy; beam results arrive at the end)."""
        for r in requests:
            self.check(r)
        out: list[Completion | None] = [None] * len(requests)
        for group in batches(requests, self.max_batch_size):
            done = self._run([requests[i] for i in group], group, on_event)
            for i, c in zip(group, done):
                out[i] = c
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ one batch
    def _bucket(self, reqs: Sequence[Request]) -> Bucket:
        G, K = len(reqs), reqs[0].params.rows
        L = max(len(r.prompt_ids) for r in reqs)
        T = max(r.params.max_new_tokens for r in reqs)
        N = max(len(r.images) for r in reqs)
        if self.graphs is None:  # exact shapes: nothing is captured
            return Bucket(G, K, L, T, N)
        return Bucket(max(G, min(_pow2(G), self.max_batch_size)), K, _round_up(L, 64), _round_up(T, 32),
                      _pow2(N) if N else 0)

    def _decode_inputs(self, bucket: Bucket) -> DecodeInputs:
        views = self.arena.views(bucket)  # may grow the arena: every older view and graph is then stale
        if self._inputs_version != self.arena.version:
            self._inputs, self._inputs_version = {}, self.arena.version
        inp = self._inputs.get(bucket)
        if inp is None:
            inp = DecodeInputs.allocate(bucket, views, self.forward.cross, self.device, self.dtype)
            self._inputs[bucket] = inp
        return inp

    def _prefill(self, reqs: Sequence[Request], inp: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the images, fill the caches and the decode inputs; returns the first logits [rows, V] and the
        prompt length of every row [rows]."""
        b, dev, sp = inp.bucket, self.device, self.special
        G, K = len(reqs), b.beams
        lengths = torch.tensor([len(r.prompt_ids) for r in reqs], device=dev)
        L = int(max(len(r.prompt_ids) for r in reqs))
        text_ids = torch.full((G, L), sp["pad"], dtype=torch.long)
        for g, r in enumerate(reqs):
            text_ids[g, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        text_ids = text_ids.to(dev)
        counts = torch.tensor([len(r.images) for r in reqs], device=dev)
        images = [t for r in reqs for t in r.images]
        pixels = torch.stack(images).to(dev, self.dtype) if images else None
        masks = None
        if images and any(r.image_masks is not None for r in reqs):
            masks = torch.stack([m for r in reqs for m in (r.image_masks if r.image_masks is not None
                                                           else [torch.ones(1, *t.shape[1:]) for t in r.images])])
            masks = masks.to(dev, self.dtype)
        embeds, _, context = self.model._embed(text_ids, pixels, None, masks, counts, False)
        inp.prompt_bias.fill_(float("-inf"))
        inp.prompt_bias[:, ..., :1] = 0.0  # bucket-padding rows attend to one (finite) cache entry
        for g, r in enumerate(reqs):
            inp.prompt_bias[g, ..., : len(r.prompt_ids)] = 0.0
        inp.has_images.zero_()
        inp.visible.zero_()
        visible = None
        if context is not None and b.images > 0:
            n = context.features.shape[1]
            for c, values in enumerate(self.forward.image_values(context.features)):
                inp.views.values[c, :G].view(G, b.images, -1, *values.shape[-2:])[:, :n].copy_(
                    values.view(G, n, -1, *values.shape[-2:]))
            visible = torch.zeros(G, L, b.images, dtype=torch.bool, device=dev)
            visible[:, :, :n] = context.visibility > 0
            inp.visible[:G] = visible[torch.arange(G, device=dev), lengths - 1][:, None, :]
            inp.has_images[:G, 0, 0] = (counts > 0).to(self.dtype)
            for (off, logit), (new_off, new_logit) in zip(inp.terms, self.forward.relpos_terms(inp.visible[:, :1])):
                off.copy_(new_off)
                logit.copy_(new_logit)
        logits = self.forward.prefill(embeds, lengths, inp.views, visible, inp.has_images[:G, 0, 0])
        rows = torch.zeros(b.rows, self.vocab, device=dev)
        rows[: G * K] = logits.repeat_interleave(K, dim=0)
        row_lengths = torch.ones(b.rows, dtype=torch.long, device=dev)
        row_lengths[: G * K] = lengths.repeat_interleave(K)
        return rows, row_lengths

    def _step(self, inp: DecodeInputs) -> torch.Tensor:
        if self.graphs is not None:
            return self.graphs.run(inp, self.arena.version)
        return self.forward.decode(inp)

    def _feed(self, inp: DecodeInputs, tokens: torch.Tensor, row_lengths: torch.Tensor, step: int) -> torch.Tensor:
        inp.tokens.copy_(tokens)
        torch.add(row_lengths, step, out=inp.positions)
        inp.step.fill_(step)
        return self._step(inp)

    def _host_buffer(self, steps: int, rows: int) -> torch.Tensor:
        need = steps * rows
        if self._host is None or self._host.numel() < need:
            self._host = torch.empty(need, dtype=torch.long, pin_memory=self.device.type == "cuda")
        return self._host[:need].view(steps, rows)

    def _to_host(self, dst: torch.Tensor, src: torch.Tensor):
        dst.copy_(src, non_blocking=True)
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _run(self, reqs: Sequence[Request], indices: Sequence[int], on_event: EventFn | None) -> list[Completion]:
        bucket = self._bucket(reqs)
        inp = self._decode_inputs(bucket)
        logits, row_lengths = self._prefill(reqs, inp)
        if reqs[0].params.num_beams > 1:
            return self._run_beams(reqs, indices, inp, logits, row_lengths, on_event)
        return self._run_samples(reqs, indices, inp, logits, row_lengths, on_event)

    def _decoder(self):
        tok = self.tokenizer
        return None if tok is None else (lambda ids: tok.decode(ids, skip_special_tokens=True))

    def _run_samples(self, reqs, indices, inp, logits, row_lengths, on_event) -> list[Completion]:
        b = inp.bucket
        K = b.beams
        sampler = TokenSampler([r.params for r in reqs], b.rows, K, self.vocab, self.stop_ids, self.device)
        decode = self._decoder()
        texts = [SequenceText(decode or (lambda ids: ""), r.params.stop) for r in reqs for _ in range(K)]
        limits = [r.params.max_new_tokens for r in reqs for _ in range(K)]
        reasons: list[str | None] = [None] * len(texts)
        stops: list[int | None] = [None] * len(texts)
        steps = max(limits)
        host = self._host_buffer(steps, b.rows)
        tokens = sampler(logits, 0)
        s = 0
        while True:
            event = self._to_host(host[s], tokens)
            if s + 1 < steps:  # queue the next step before reading this one back: the device never waits
                next_tokens = sampler(self._feed(inp, tokens, row_lengths, s), s + 1)
            if event is not None:
                event.synchronize()
            for row, tok in enumerate(host[s, : len(texts)].tolist()):
                if reasons[row] is not None:
                    continue
                text = texts[row]
                if tok in self.stop_ids:
                    reasons[row], stops[row], delta = "stop", tok, text.finish()
                else:
                    delta = text.push(tok)
                    if text.stopped:
                        reasons[row] = "stop"
                    elif len(text.tokens) >= limits[row]:
                        reasons[row] = "length"
                        delta += text.finish()
                if on_event is not None and (delta or reasons[row] is not None):
                    on_event(TokenEvent(indices[row // K], row % K, delta, tok, reasons[row]))
            if all(r is not None for r in reasons) or s + 1 >= steps:
                break
            tokens, s = next_tokens, s + 1
        seqs = [GeneratedSequence(t.tokens, t.text, r or "length", st) for t, r, st in zip(texts, reasons, stops)]
        return [Completion(seqs[g * K: (g + 1) * K], len(r.prompt_ids)) for g, r in enumerate(reqs)]

    def _run_beams(self, reqs, indices, inp, logits, row_lengths, on_event) -> list[Completion]:
        b = inp.bucket
        p = reqs[0].params
        beam = BeamSearch(b.batch, b.beams, len(reqs), self.vocab, p.max_new_tokens, p.min_new_tokens,
                          p.length_penalty, p.repetition_penalty, self.stop_ids, self.device)
        steps = p.max_new_tokens
        host = self._host_buffer(steps, 1)
        tokens, rows = beam(logits, 0)
        s = 0
        while True:
            event = self._to_host(host[s], beam.done.view(1).long())
            if s + 1 < steps:
                if s > 0:  # at step 0 the generated segment is still empty
                    inp.views.reorder(rows)
                next_tokens, next_rows = beam(self._feed(inp, tokens, row_lengths, s), s + 1)
            if event is not None:
                event.synchronize()
            if bool(host[s, 0]) or s + 1 >= steps:
                break  # a step queued after `done` cannot change the hypotheses (no request can improve)
            tokens, rows, s = next_tokens, next_rows, s + 1
        decode = self._decoder()
        out = []
        for g, (r, hyps) in enumerate(zip(reqs, beam.best(p.n))):
            seqs = []
            for k, ids in enumerate(hyps):
                stop = ids[-1] if ids and ids[-1] in self.stop_ids else None
                ids = ids[:-1] if stop is not None else ids
                text = SequenceText(decode or (lambda _: ""), r.params.stop)
                for t in ids:
                    text.push(t)
                text.finish()
                reason = "stop" if stop is not None or text.stopped else "length"
                seqs.append(GeneratedSequence(ids, text.text, reason, stop))
                if on_event is not None:
                    on_event(TokenEvent(indices[g], k, text.text, None, reason))
            out.append(Completion(seqs, len(r.prompt_ids)))
        return out

    # ------------------------------------------------------------------ drop-in for DeemModel.generate_texts
    @torch.no_grad()
    def generate_ids(self, text_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_tensors: torch.Tensor | None = None, num_image_per_seq: torch.Tensor | None = None,
                     image_tensors_mask: torch.Tensor | None = None, max_new_tokens: int = 30, min_new_tokens: int = 8,
                     num_beams: int = 5, length_penalty: float = 1.0, do_sample: bool = False, top_p: float = 0.9,
                     temperature: float = 1.0, repetition_penalty: float = 1.0, num_return_sequences: int = 1,
                     seed: int | None = None, **_: object) -> torch.Tensor:
        """`DeemModel.generate_texts`' interface and output (generated ids, stop token included, pad after it,
        [B * num_return_sequences, T]) through the engine."""
        params = SamplingParams(max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens),
                                temperature=float(temperature) if do_sample else 0.0,
                                top_p=float(top_p) if do_sample else 1.0, seed=seed, num_beams=int(num_beams),
                                length_penalty=float(length_penalty), repetition_penalty=float(repetition_penalty),
                                n=int(num_return_sequences))
        counts = [0] * text_ids.shape[0] if num_image_per_seq is None else [int(c) for c in num_image_per_seq]
        if image_tensors is None and any(counts):
            raise InferenceError("num_image_per_seq counts images but no image_tensors were given")
        reqs, first = [], 0
        for row, mask, n in zip(text_ids, attention_mask.bool(), counts):
            images = list(image_tensors[first: first + n]) if n else []
            masks = list(image_tensors_mask[first: first + n]) if image_tensors_mask is not None and n else None
            reqs.append(Request(row[mask].tolist(), images, params, masks))
            first += n
        rows = []
        for completion in self.generate(reqs):
            for seq in completion.sequences:
                rows.append(seq.tokens + ([seq.stop_token] if seq.stop_token is not None else []))
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.special["pad"], dtype=torch.long, device=text_ids.device)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    # ------------------------------------------------------------------ the model's other generation paths
    def generate_images(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`DeemModel.generate_images` (the diffusion image decoder) on the engine's model."""
        return self.model.generate_images(*args, **kwargs)

    def test_time_adaptation(self, *args: Any, **kwargs: Any):
        """`DeemModel.test_time_adaptation` (a context manager): requests generated inside it use the adapted visual
        tokenizer (it runs per request at prefill; the LLM and the captured graphs are unchanged)."""
        return self.model.test_time_adaptation(*args, **kwargs)


def engine_for(model, tokenizer=None) -> InferenceEngine:
    """The engine cached on `model` (built on first use, rebuilt when the model changed device or dtype). Its
    weight-derived constants are refreshed on every call, so a model trained between calls decodes with its
    current weights. `release_engine(model)` frees its caches."""
    param = next(model.parameters())
    engine = model.__dict__.get("_deem_engine")
    if engine is None or (engine.device, engine.dtype) != (param.device, param.dtype):
        engine = InferenceEngine(model, tokenizer)
        model.__dict__["_deem_engine"] = engine
    engine.forward.refresh()
    if tokenizer is not None:
        engine.tokenizer = tokenizer
    return engine


def release_engine(model) -> None:
    """Drop the engine cached on `model` (its static caches and CUDA graphs)."""
    model.__dict__.pop("_deem_engine", None)
