"""Next-token selection on the device for greedy decoding and sampling, each row with its own settings.

The processing follows transformers' `generate` for the same settings (repetition penalty over the generated
tokens, stop tokens forbidden before `min_new_tokens`, then temperature and top-p for sampling). Sampling uses
the exponential-race form of categorical sampling (argmax of p / E, E ~ Exp(1)): no host synchronisation, and one
generator per request, so a request's seed reproduces its samples whatever else is in the batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from deem.infer.request import SamplingParams


def penalize_repetitions(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty: scores of seen tokens divided by `penalty` (multiplied when negative).
    scores [R, V]; seen [R, V] bool; penalty [R, 1]."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def stop_columns(stop_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[V] bool: the stop tokens (EOS, <soi>)."""
    cols = torch.zeros(vocab, dtype=torch.bool)
    cols[list(stop_ids)] = True
    return cols.to(device)


def forbid_stops(scores: torch.Tensor, stop_cols: torch.Tensor, step: int, min_new: torch.Tensor) -> torch.Tensor:
    """Rows that have generated fewer than min_new [R] tokens (`step` so far) cannot pick a stop token."""
    early = (min_new > step)[:, None]
    return scores.masked_fill(early & stop_cols, float("-inf"))


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens outside each row's nucleus: the most probable tokens whose mass before them is < top_p
    (at least one token stays). probs [R, V]; top_p [R, 1]."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def random_seed() -> int:
    return secrets.randbits(62)


class TokenSampler:
    """Selects the next token of `rows` sequences: request i owns rows [i*K, (i+1)*K) (K = samples per request)
    and its `SamplingParams`. Rows past the requests (bucket padding) decode greedily."""

    def __init__(self, params: Sequence[SamplingParams], rows: int, samples: int, vocab: int,
                 stop_ids: Sequence[int], device: torch.device) -> None:
        self.rows, self.samples, self.device = rows, samples, device
        per_row = [p for p in params for _ in range(samples)]
        per_row += [SamplingParams()] * (rows - len(per_row))

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        self.stop_cols = stop_columns(stop_ids, vocab, device)
        self.greedy = column([p.temperature == 0 for p in per_row], torch.bool)
        self.all_greedy = all(p.temperature == 0 for p in per_row)
        self.temperature = column([p.temperature if p.temperature > 0 else 1.0 for p in per_row])[:, None]
        self.top_p = column([p.top_p for p in per_row])[:, None]
        self.any_top_p = any(p.top_p < 1 and p.temperature > 0 for p in per_row)
        self.penalty = column([p.repetition_penalty for p in per_row])[:, None]
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in per_row)
        self.min_new = column([p.min_new_tokens for p in per_row], torch.long)
        self.max_min_new = max(p.min_new_tokens for p in per_row)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device) if self.any_penalty else None
        self.generators: list[tuple[int, torch.Generator]] = []  # (first row, generator) of each sampled request
        for i, p in enumerate(params):
            if p.temperature > 0:
                g = torch.Generator(device=device)
                g.manual_seed(p.seed if p.seed is not None else random_seed())
                self.generators.append((i * samples, g))
        self.noise = None if self.all_greedy else torch.ones(rows, vocab, device=device)

    def process(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The scores greedy decoding takes the argmax of (transformers' logits processors)."""
        scores = logits
        if self.any_penalty:
            scores = penalize_repetitions(scores, self.seen, self.penalty)
        if step < self.max_min_new:
            scores = forbid_stops(scores, self.stop_cols, step, self.min_new)
        return scores

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """logits [rows, V] float32 of the `step`-th generated token -> tokens [rows] (device, no sync)."""
        scores = self.process(logits, step)
        tokens = scores.argmax(-1)
        if not self.all_greedy:
            probs = torch.softmax(scores / self.temperature, dim=-1)
            if self.any_top_p:
                probs = top_p_filter(probs, self.top_p)
            for first, g in self.generators:
                self.noise[first: first + self.samples].exponential_(generator=g)
            sampled = (probs / self.noise.clamp_min(1e-20)).argmax(-1)
            tokens = torch.where(self.greedy, tokens, sampled)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        return tokens
