"""The engine against the transformers path (`DeemModel.generate_texts`): token-identical greedy decoding and beam
search, single requests and mixed batches with different numbers of images, and the prefill/decode numerics."""

from __future__ import annotations

import pytest
import torch

from deem.infer import InferenceEngine, Request, SamplingParams
from tests.infer.conftest import make_model


def prompt(cfg, n_images: int, words: list[int], lead: int = 30) -> list[int]:
    sp = cfg.special_tokens
    ids = [sp["bos"]]
    for i in range(n_images):
        ids += [lead + i, sp["soi"], *[sp["image"]] * cfg.num_img_token]
    return ids + words


def left_padded(cfg, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), cfg.special_tokens["pad"])
    att = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        att[i, width - len(r):] = 1
    return ids, att


def transformers_ids(model, rows, counts, images, **gen) -> list[list[int]]:
    """generate_texts' rows cut after the first stop token (the rest is pad)."""
    ids, att = left_padded(model.config, rows)
    device = next(model.parameters()).device  # generate_texts takes its inputs where the model is
    out = model.generate_texts(ids.to(device), att.to(device), images, torch.tensor(counts, device=device), **gen)
    return [_cut(model.config, r) for r in out.tolist()]


def _cut(cfg, row: list[int]) -> list[int]:
    stops = (cfg.special_tokens["eos"], cfg.special_tokens["soi"])
    for k, t in enumerate(row):
        if t in stops:
            return row[: k + 1]
    return row


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def eng(model):
    return InferenceEngine(model)


def engine_ids(eng, model, rows, counts, images, **gen) -> list[list[int]]:
    ids, att = left_padded(model.config, rows)
    out = eng.generate_ids(ids, att, images, torch.tensor(counts), **gen)
    return [_cut(model.config, r) for r in out.tolist()]


GREEDY = dict(num_beams=1, max_new_tokens=12, min_new_tokens=2)


def test_greedy_single_requests_are_token_identical(model, eng, images):
    cfg = model.config
    for n_img, words, imgs in ((1, [40, 41, 42], images[:1]), (2, [50, 51], images[1:3]), (0, [60, 61, 62], None)):
        rows = [prompt(cfg, n_img, words)]
        expected = transformers_ids(model, rows, [n_img], imgs, **GREEDY)
        assert engine_ids(eng, model, rows, [n_img], imgs, **GREEDY) == expected
        assert len(expected[0]) >= 2


def test_greedy_mixed_batch_is_token_identical_and_batch_invariant(model, eng, images):
    cfg = model.config
    rows = [prompt(cfg, 1, [40, 41, 42]), prompt(cfg, 2, [50, 51]), prompt(cfg, 3, [44])]
    expected = transformers_ids(model, rows, [1, 2, 3], images[:6] if images.shape[0] >= 6 else
                                torch.cat([images, images])[:6], **GREEDY)
    pics = torch.cat([images, images])[:6]
    got = engine_ids(eng, model, rows, [1, 2, 3], pics, **GREEDY)
    assert got == expected
    assert len({tuple(r) for r in got}) == 3  # the requests really differ
    # each request decodes as if alone
    first = 0
    for row, n in zip(rows, [1, 2, 3]):
        alone = engine_ids(eng, model, [row], [n], pics[first: first + n], **GREEDY)
        assert alone == [got[rows.index(row)]]
        first += n


def test_text_only_request_in_a_batch_with_images_decodes_as_alone(model, eng, images):
    cfg = model.config
    text_row, image_row = prompt(cfg, 0, [60, 61, 62]), prompt(cfg, 1, [40, 41])
    alone = transformers_ids(model, [text_row], [0], None, **GREEDY)
    mixed = engine_ids(eng, model, [image_row, text_row], [1, 0], images[:1], **GREEDY)
    assert mixed[1] == alone[0]
    assert mixed[0] == transformers_ids(model, [image_row], [1], images[:1], **GREEDY)[0]


def test_images_change_the_answer(model, eng, images):
    """Cross-attention is live in the test model (otherwise every parity test would be blind to it)."""
    row = [prompt(model.config, 1, [40, 41, 42])]
    a = engine_ids(eng, model, row, [1], images[:1], **GREEDY)
    b = engine_ids(eng, model, row, [1], images[1:2], **GREEDY)
    assert a != b


@pytest.mark.parametrize("gen", [
    dict(num_beams=3, max_new_tokens=10, min_new_tokens=0, length_penalty=0.0),  # the VQA setting
    dict(num_beams=5, max_new_tokens=9, min_new_tokens=3, length_penalty=1.0),  # the caption setting
    dict(num_beams=5, max_new_tokens=8, min_new_tokens=8, repetition_penalty=1.2),  # image2paragraph's penalty
    dict(num_beams=3, max_new_tokens=6, min_new_tokens=0, num_return_sequences=2),
])
def test_beam_search_matches_generate_texts(model, eng, images, gen):
    cfg = model.config
    rows = [prompt(cfg, 1, [40, 41, 42]), prompt(cfg, 2, [50, 51])]
    assert engine_ids(eng, model, rows, [1, 2], images[:3], **gen) == transformers_ids(model, rows, [1, 2],
                                                                                        images[:3], **gen)


def test_beam_search_finishes_early_on_stop_tokens(model, images):
    """A model whose best continuation is EOS after two tokens: beams end before max_new_tokens, as in HF."""
    m = make_model(seed=3)
    eos = m.config.special_tokens["eos"]
    with torch.no_grad():
        m.text_head.head.bias[eos] += 10.0
    e = InferenceEngine(m)
    rows = [prompt(m.config, 1, [40, 41, 42])]
    gen = dict(num_beams=3, max_new_tokens=12, min_new_tokens=2, length_penalty=1.0)
    expected = transformers_ids(m, rows, [1], images[:1], **gen)
    assert engine_ids(e, m, rows, [1], images[:1], **gen) == expected
    assert expected[0][-1] == eos and len(expected[0]) < 12


def test_greedy_repetition_penalty_matches(model, eng, images):
    rows = [prompt(model.config, 1, [40, 41])]
    gen = dict(num_beams=1, max_new_tokens=10, min_new_tokens=4, repetition_penalty=1.3)
    assert engine_ids(eng, model, rows, [1], images[:1], **gen) == transformers_ids(model, rows, [1], images[:1],
                                                                                     **gen)


def test_grouped_query_attention_matches():
    m = make_model(num_key_value_heads=2)
    e = InferenceEngine(m)
    imgs = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    rows = [prompt(m.config, 1, [40, 41, 42])]
    for gen in (GREEDY, dict(num_beams=3, max_new_tokens=6, min_new_tokens=0)):
        assert engine_ids(e, m, rows, [1], imgs, **gen) == transformers_ids(m, rows, [1], imgs, **gen)


def test_prefill_and_decode_logits_match_a_full_forward(model, eng, images):
    """The engine's first and later logits equal the training forward's logits at the same positions."""
    cfg = model.config
    row = prompt(cfg, 2, [50, 51, 52])
    req = Request(row, list(images[:2]), SamplingParams(max_new_tokens=4))
    got = eng.generate([req])[0].sequences[0].tokens
    full = torch.tensor([row + got])
    with torch.no_grad():
        logits = model(full, torch.ones_like(full), images[:2], num_image_per_seq=torch.tensor([2]),
                       loss_img_weight=0.0).logits[0]
    assert logits[len(row) - 1:].argmax(-1)[: len(got)].tolist() == got


def test_generate_texts_positions_follow_the_attention_mask(model, images):
    """Left-padded prompts get positions cumsum(mask) - 1 (not counting pads), so padding changes nothing."""
    seen = []
    hook = model.llm.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("position_ids")),
                                               with_kwargs=True)
    try:
        row = prompt(model.config, 1, [40, 41])
        ids, att = left_padded(model.config, [row, row[:-1]])
        model.generate_texts(ids, att, images[:2], torch.tensor([1, 1]), num_beams=1, max_new_tokens=2,
                             min_new_tokens=0)
    finally:
        hook.remove()
    assert seen[0] is not None
    assert seen[0].tolist() == (att.cumsum(-1) - 1).clamp_min(0).masked_fill(att == 0, 0).tolist()
    assert seen[1].view(-1).tolist() == [len(row), len(row) - 1]
