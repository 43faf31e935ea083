"""Sampling (seeded, reproducible, per-request generators, top-p), stop strings and incremental text, request
validation, streaming events, and the engine's other generation paths."""

from __future__ import annotations

import pytest
import torch

from deem.infer import InferenceError, Request, SamplingParams, Turn
from deem.infer.sampling import TokenSampler, top_p_filter
from deem.infer.text import SequenceText


def _request(engine, text="a red circle on a", images=(), **params):
    return engine.chat_request([Turn("user", [*images, text])], SamplingParams(**params))


def _tokens(completion):
    return [s.tokens for s in completion.sequences]


def test_sampling_is_reproducible_with_a_seed_and_independent_of_the_batch(engine):
    a = engine.generate([_request(engine, temperature=1.0, seed=7, max_new_tokens=12)])[0]
    b = engine.generate([_request(engine, temperature=1.0, seed=7, max_new_tokens=12)])[0]
    c = engine.generate([_request(engine, temperature=1.0, seed=8, max_new_tokens=12)])[0]
    assert _tokens(a) == _tokens(b) != _tokens(c)
    # in a batch with other requests (greedy and sampled ones) the seeded request samples the same tokens
    batch = engine.generate([_request(engine, "two blue squares", temperature=1.0, seed=3, max_new_tokens=12),
                             _request(engine, temperature=1.0, seed=7, max_new_tokens=12),
                             _request(engine, "a green square", max_new_tokens=12)])
    assert _tokens(batch[1]) == _tokens(a)
    greedy = engine.generate([_request(engine, "a green square", max_new_tokens=12)])[0]
    assert _tokens(batch[2]) == _tokens(greedy)


def test_n_samples_differ_and_tiny_top_p_is_greedy(engine):
    out = engine.generate([_request(engine, temperature=1.5, seed=1, n=3, max_new_tokens=10)])[0]
    assert len(out.sequences) == 3 and len({tuple(t) for t in _tokens(out)}) > 1
    greedy = engine.generate([_request(engine, max_new_tokens=10)])[0]
    nucleus = engine.generate([_request(engine, temperature=1.0, top_p=1e-6, seed=2, max_new_tokens=10)])[0]
    assert _tokens(nucleus) == _tokens(greedy)


def test_the_exponential_race_samples_the_softmax_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]]).repeat(20000, 1)
    logits[:, 4] = float("-inf")  # impossible tokens are never drawn
    params = [SamplingParams(temperature=1.0, seed=0)]
    sampler = TokenSampler(params, rows=20000, samples=20000, vocab=5, stop_ids=[4], device=torch.device("cpu"))
    counts = torch.bincount(sampler(logits, 0), minlength=5).float() / 20000
    expected = torch.softmax(logits[0], -1)
    assert counts[4] == 0
    assert torch.allclose(counts, expected, atol=0.015)


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, torch.tensor([[0.7]]))
    assert torch.equal(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, torch.tensor([[1e-9]])), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))


def test_min_new_tokens_forbids_the_stop_tokens():
    sp = SamplingParams(min_new_tokens=2, max_new_tokens=5)
    logits = torch.tensor([[0.0, 0.0, 9.0]])  # token 2 (a stop token) is the best
    sampler = TokenSampler([sp], rows=1, samples=1, vocab=3, stop_ids=[2], device=torch.device("cpu"))
    assert sampler(logits, 0).item() != 2 and sampler(logits, 1).item() != 2 and sampler(logits, 2).item() == 2


def test_incremental_text_equals_the_full_decode(tokenizer):
    ids = tokenizer.encode("two red circles and a blue square on a grey background.", add_bos=False)
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
    text = SequenceText(decode)
    shown = "".join(text.push(t) for t in ids) + text.finish()
    assert shown == decode(ids) == text.text


def test_stop_strings_truncate_and_are_never_streamed(tokenizer):
    ids = tokenizer.encode("a red circle. then a blue square", add_bos=False)
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
    text = SequenceText(decode, stop=("circle.",))
    pieces = []
    for t in ids:
        pieces.append(text.push(t))
        if text.stopped:
            break
    pieces.append(text.finish())
    assert text.stopped and text.text == "a red " and "".join(pieces) == "a red "
    assert not any("circ" in p for p in pieces)


def test_engine_stop_strings_and_streamed_events(engine):
    free = engine.generate([_request(engine, max_new_tokens=16)])[0].sequences[0]
    assert len(free.text) > 4
    stop = free.text[2:5]
    events = []
    out = engine.generate([_request(engine, max_new_tokens=16, stop=(stop,))], on_event=events.append)[0]
    seq = out.sequences[0]
    assert seq.finish_reason == "stop" and seq.text == free.text[: free.text.index(stop)]
    assert "".join(e.text for e in events) == seq.text
    assert events[-1].finish_reason == "stop" and sum(e.finish_reason is not None for e in events) == 1
    # streamed text equals the final text without stop strings too
    events.clear()
    plain = engine.generate([_request(engine, max_new_tokens=16)], on_event=events.append)[0].sequences[0]
    assert "".join(e.text for e in events) == plain.text == free.text
    assert plain.finish_reason == ("length" if len(plain.tokens) == 16 else "stop")


def test_bad_requests_name_the_problem(engine, image_files):
    img = engine.prepare_image(image_files[0])
    with pytest.raises(InferenceError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InferenceError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InferenceError, match="beams"):
        SamplingParams(num_beams=2, n=3)
    with pytest.raises(InferenceError, match="context"):
        engine.check(_request(engine, "a " * 400, max_new_tokens=200))
    with pytest.raises(InferenceError, match="at most"):
        engine.check(_request(engine, images=[img] * (engine.max_images + 1)))
    with pytest.raises(InferenceError, match="image runs"):
        engine.check(Request(_request(engine, images=[img]).prompt_ids, [], SamplingParams()))
    with pytest.raises(InferenceError, match="corrupt image"):
        engine.prepare_image(b"not an image at all", "upload.png")
    with pytest.raises(InferenceError, match="not found"):
        engine.prepare_image(image_files[0].with_name("missing.png"))


def test_generate_images_and_test_time_adaptation_through_the_engine(engine, image_files):
    sp = engine.special
    img = engine.prepare_image(image_files[0])
    ids = torch.tensor([[*engine.tokenizer.encode("a red circle"), sp["soi"], *[sp["image"]] * engine.num_img_token]])
    pics = engine.generate_images(ids, torch.ones_like(ids), img[None], torch.tensor([1]), num_inference_steps=2,
                                  generator=torch.Generator().manual_seed(0))
    assert pics.shape[:2] == (1, 3) and 0 <= pics.min() <= pics.max() <= 1
    request = _request(engine, "what is it?", images=[img], max_new_tokens=8)
    before = engine.generate([request])[0]
    size = engine.model.config.diffusion["image_size"]
    dec = torch.nn.functional.interpolate(img[None], size=(size, size))
    with engine.test_time_adaptation(img[None], dec, steps=2, samples=2, lr=5e-2,
                                     generator=torch.Generator().manual_seed(0)) as losses:
        adapted = engine.generate([request])[0]
    assert len(losses) == 2
    after = engine.generate([request])[0]
    assert _tokens(after) == _tokens(before)  # the weights are restored exactly
    assert _tokens(adapted) != _tokens(before)  # generation inside used the adapted visual tokenizer


@pytest.mark.slow
def test_compiled_decode_step_matches_eager_on_the_cpu(engine):
    from deem.infer import InferenceEngine

    compiled = InferenceEngine(engine.model, engine.tokenizer, compile=True)
    for params in (dict(max_new_tokens=10), dict(max_new_tokens=6, num_beams=3)):
        req = [_request(engine, **params)]
        assert _tokens(compiled.generate(req)[0]) == _tokens(engine.generate(req)[0])
