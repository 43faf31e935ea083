"""What a caller asks the engine for (`Request` with its `SamplingParams`) and what it gets back (`Completion`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class InferenceError(ValueError):
    """A request the engine cannot serve (bad parameters, too many images, prompt beyond the context, ...); the
    message names what is wrong. The server answers it with HTTP 400."""


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt.

    temperature 0 is greedy decoding; > 0 samples (after `top_p` nucleus filtering) from a generator seeded with
    `seed` (random when None), so a seed reproduces a sample. `num_beams` > 1 is beam search (transformers'
    algorithm: `length_penalty`, EOS or `<soi>` ends a beam, `n` best beams returned); sampling does not apply
    then. `repetition_penalty` divides (multiplies, if negative) the scores of already generated tokens, as in
    transformers (for beams: the log-probabilities). `min_new_tokens` forbids the stop tokens before that many
    tokens. `stop`: strings that end a sequence (not included in its text). `n`: sequences per request."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InferenceError(what)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        need(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
             f"got {self.min_new_tokens!r}")
        need(_finite(self.temperature) and self.temperature >= 0,
             f"temperature must be a number >= 0, got {self.temperature!r}")
        need(_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
             f"seed must be an integer, got {self.seed!r}")
        need(isinstance(self.num_beams, int) and self.num_beams >= 1,
             f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        need(_finite(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty!r}")
        need(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(self.num_beams == 1 or self.n <= self.num_beams,
             f"n={self.n} sequences need at least as many beams (num_beams={self.num_beams})")
        need(self.num_beams == 1 or self.temperature == 0,
             "beam search is deterministic: use temperature 0 with num_beams > 1")
        need(all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings: {self.stop!r}")

    @property
    def rows(self) -> int:
        """Sequences the engine decodes for this request (beams or samples)."""
        return self.num_beams if self.num_beams > 1 else self.n

    @property
    def greedy(self) -> bool:
        return self.num_beams == 1 and self.temperature == 0

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


@dataclass
class Request:
    """One prompt: token ids with one image run (`<soi>` + image tokens) per image, the images' encoder views
    ([3, R, R] float in [0, 1], in the order of their runs), optional region masks ([1, R, R]), the settings."""

    prompt_ids: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    image_masks: list[torch.Tensor] | None = None


@dataclass
class GeneratedSequence:
    """One generated sequence: its tokens (without the stop token), text and why it ended ("stop" or "length")."""

    tokens: list[int]
    text: str
    finish_reason: str
    stop_token: int | None = None  # the EOS / <soi> that ended it, if one did


@dataclass
class Completion:
    """The `n` sequences of a request, best first for beam search."""

    sequences: list[GeneratedSequence]
    prompt_tokens: int

    @property
    def text(self) -> str:
        return self.sequences[0].text

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)


def group_key(params: SamplingParams) -> tuple:
    """Requests with the same key decode in one batch: the same number of rows each, and for beam search the
    same settings (the beam state is batched)."""
    if params.num_beams > 1:
        return ("beam", params.num_beams, params.length_penalty, params.repetition_penalty, params.min_new_tokens,
                params.max_new_tokens)
    return ("sample", params.n)


def batches(requests: Sequence[Request], max_batch: int) -> list[list[int]]:
    """Indices of `requests` grouped by `group_key`, in first-seen order, at most `max_batch` per group."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(group_key(r.params), []).append(i)
    out = []
    for idx in groups.values():
        out.extend(idx[k: k + max_batch] for k in range(0, len(idx), max_batch))
    return out
