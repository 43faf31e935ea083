"""Beam search on the device: the algorithm of transformers' `generate` (its vectorised beam search) with its
defaults (`early_stopping=False`), so the engine returns the same beams as `DeemModel.generate_texts`.

Each step: log-softmax, the logits processors (repetition penalty over a beam's generated tokens, stop tokens
forbidden before `min_new_tokens`), the top (1 + #stop tokens) x beams candidates over all beams of a request,
the best non-finished candidates continue, finished ones (a stop token or the length limit) enter a request's
`beams` best hypotheses scored sum(log p) / length ** length_penalty, and a request stops improving once its best
running beam cannot beat its worst hypothesis. Everything stays on the device; `done` is read by the host with
a lag of one step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deem.infer.sampling import forbid_stops, penalize_repetitions, stop_columns

NEG = -1.0e9  # transformers' "impossible" score


class BeamSearch:
    """Beam state of `batch` requests x `beams` rows (row b * beams + k); the first `real` requests count for
    stopping (the rest pad a bucket)."""

    def __init__(self, batch: int, beams: int, real: int, vocab: int, max_new: int, min_new: int,
                 length_penalty: float, repetition_penalty: float, stop_ids: Sequence[int],
                 device: torch.device) -> None:
        B, K = batch, beams
        self.B, self.K, self.real, self.V = B, K, real, vocab
        self.max_new, self.length_penalty = max_new, float(length_penalty)
        self.width = max(2, 1 + len(stop_ids)) * K
        self.stop_cols = stop_columns(stop_ids, vocab, device)
        self.min_new = torch.full((B * K,), min_new, dtype=torch.long, device=device)
        self.max_min_new = min_new
        self.penalty = torch.full((B * K, 1), float(repetition_penalty), device=device)
        self.seen = torch.zeros(B * K, vocab, dtype=torch.bool, device=device) if repetition_penalty != 1 else None
        self.running = torch.zeros(B, K, max_new, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(B, K, device=device)
        self.running_scores[:, 1:] = NEG  # the beams start identical: only the first one's candidates count
        self.sequences = torch.zeros(B, K, max_new, dtype=torch.long, device=device)
        self.scores = torch.full((B, K), NEG, device=device)
        self.lengths = torch.zeros(B, K, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        self.top_mask = (torch.arange(self.width, device=device) < K)[None]
        self.row_offset = (torch.arange(B, device=device) * K)[:, None]
        self.done = torch.zeros((), dtype=torch.bool, device=device)

    def __call__(self, logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B*K, V] float32 of the `step`-th token -> (tokens to feed [B*K], the row each new beam
        continues [B*K]: reorder the generated cache segment by it before feeding)."""
        B, K, V, W = self.B, self.K, self.V, self.width
        logp = torch.log_softmax(logits, dim=-1)
        if self.seen is not None:
            logp = penalize_repetitions(logp, self.seen, self.penalty)
        if step < self.max_min_new:
            logp = forbid_stops(logp, self.stop_cols, step, self.min_new)
        total = (logp.view(B, K, V) + self.running_scores[:, :, None]).view(B, K * V)
        top_scores, top_index = torch.topk(total, W)
        source = top_index // V
        tokens = top_index % V
        candidates = torch.take_along_dim(self.running, source[:, :, None], dim=1)
        candidates[:, :, step] = tokens
        hits = self.stop_cols[tokens] | (step + 1 >= self.max_new)

        # the best candidates that did not stop continue
        running_scores = top_scores + hits.float() * NEG
        keep = torch.topk(running_scores, K).indices
        self.running = torch.take_along_dim(candidates, keep[:, :, None], dim=1)
        self.running_scores = torch.take_along_dim(running_scores, keep, dim=1)
        rows = (self.row_offset + torch.take_along_dim(source, keep, dim=1)).view(B * K)

        # stopped candidates among the first K may replace worse hypotheses
        norm = float(step + 1) ** self.length_penalty
        just = hits & self.top_mask
        cand_scores = top_scores / norm + (~self.improvable).float() * NEG + (~just).float() * NEG
        merged = torch.cat([self.scores, cand_scores], dim=1)
        best = torch.topk(merged, K).indices
        self.sequences = torch.take_along_dim(torch.cat([self.sequences, candidates], dim=1), best[:, :, None], dim=1)
        self.scores = torch.take_along_dim(merged, best, dim=1)
        self.finished = torch.take_along_dim(torch.cat([self.finished, just], dim=1), best, dim=1)
        lengths = torch.cat([self.lengths, torch.full_like(just, step + 1, dtype=torch.long)], dim=1)
        self.lengths = torch.take_along_dim(lengths, best, dim=1)

        # can the running beams still beat the worst hypothesis?
        best_running = self.running_scores[:, :1] / norm
        worst = torch.where(self.finished, self.scores.min(dim=1, keepdim=True).values, NEG)
        self.improvable = self.improvable & (best_running > worst).any(dim=-1, keepdim=True)
        r = self.real
        self.done = ~(self.improvable[:r].any() & ~hits[:r].all())

        fed = self.running[:, :, step].reshape(B * K)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, rows)
            self.seen.scatter_(1, fed[:, None], True)
        return fed, rows

    def best(self, n: int) -> list[list[list[int]]]:
        """The `n` best hypotheses of each real request (token lists, stop token included), best first."""
        seqs = self.sequences[: self.real, :n].tolist()
        lengths = self.lengths[: self.real, :n].tolist()
        return [[s[:ln] for s, ln in zip(rs, rl)] for rs, rl in zip(seqs, lengths)]
