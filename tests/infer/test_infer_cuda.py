"""GPU checks of the engine (run with `-m cuda`): CUDA-graph decoding equals eager decoding, graphs are captured once
per bucket, and greedy tokens equal the transformers path on the 7B-shaped random model in fp32.

The 7B parity test uses every layer of `deem_7b()` by default (~28 GB of fp32 weights); DEEM_PARITY_LAYERS=N keeps
the first N decoder layers (each of the 7B shape, cross-attention every 4th) when memory or time is short."""

from __future__ import annotations

import os

import pytest
import torch

from deem.infer import InferenceEngine, Request, SamplingParams
from tests.infer.conftest import make_model
from tests.infer.test_infer_parity import engine_ids, prompt, transformers_ids

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _requests(cfg, images, **params):
    rows = [prompt(cfg, 1, [40, 41, 42]), prompt(cfg, 2, [50, 51]), prompt(cfg, 0, [60, 61, 62, 63])]
    imgs = [list(images[:1]), list(images[1:3]), []]
    return [Request(r, i, SamplingParams(**params)) for r, i in zip(rows, imgs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_decode_exactly_like_eager(cuda_device, dtype):
    model = make_model().to(cuda_device, dtype)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(cuda_device, dtype)
    graphed = InferenceEngine(model, cuda_graphs=True)
    eager = InferenceEngine(model, cuda_graphs=False)
    for params in (dict(max_new_tokens=24, min_new_tokens=24), dict(max_new_tokens=12, temperature=1.0, seed=3, n=2),
                   dict(max_new_tokens=10, num_beams=3, length_penalty=0.0),
                   dict(max_new_tokens=16, repetition_penalty=1.3)):
        reqs = _requests(model.config, images, **params)
        g = [[s.tokens for s in c.sequences] for c in graphed.generate(reqs)]
        e = [[s.tokens for s in c.sequences] for c in eager.generate(reqs)]
        assert g == e, params
    assert graphed.graphs.graphs  # something was captured
    captured = dict(graphed.graphs.graphs)
    graphed.generate(_requests(model.config, images, max_new_tokens=24))
    assert all(graphed.graphs.graphs[b] is captured[b] for b in captured)  # replayed, not recaptured


def test_graph_logits_equal_eager_logits(cuda_device):
    model = make_model().to(cuda_device)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(cuda_device)
    engine = InferenceEngine(model, cuda_graphs=True)
    reqs = _requests(model.config, images, max_new_tokens=8)
    inp = engine._decode_inputs(engine._bucket(reqs))
    logits, lengths = engine._prefill(reqs, inp)
    tokens = logits.argmax(-1)
    graph_logits = engine._feed(inp, tokens, lengths, 0).clone()
    eager_logits = engine.forward.decode(inp)  # same inputs, same cache column
    assert torch.equal(graph_logits, eager_logits)


def test_engine_on_the_gpu_matches_transformers_on_the_tiny_model(cuda_device):
    model = make_model().to(cuda_device)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(cuda_device)
    engine = InferenceEngine(model)
    rows = [prompt(model.config, 1, [40, 41, 42]), prompt(model.config, 2, [50, 51])]
    for gen in (dict(num_beams=1, max_new_tokens=16, min_new_tokens=2), dict(num_beams=5, max_new_tokens=8)):
        assert engine_ids(engine, model, rows, [1, 2], images, **gen) == transformers_ids(model, rows, [1, 2],
                                                                                           images, **gen)


def _random_7b(device, layers: int | None):
    from deem.models import DeemModel, deem_7b

    cfg = deem_7b()
    cfg.diffusion, cfg.image_decoder_resampler = None, None
    if layers:
        cfg.llm["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = DeemModel(cfg)
    model.eval()
    with torch.no_grad():
        for cross in model.llm.cross_attention_layers():
            cross.gate.fill_(0.5)
    return model


def test_greedy_parity_on_the_7b_shaped_random_model_fp32(cuda_device):
    layers = int(os.environ.get("DEEM_PARITY_LAYERS", "0")) or None
    model = _random_7b(cuda_device, layers)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    size = cfg.image_encoder["image_size"]
    images = torch.rand(3, 3, size, size, generator=g).to(cuda_device)
    text = torch.randint(100, cfg.base_vocab_size - 1, (600,), generator=g).tolist()
    long_row = prompt(cfg, 1, text)
    engine = InferenceEngine(model)
    gen = dict(num_beams=1, max_new_tokens=32, min_new_tokens=32)
    expected = transformers_ids(model, [long_row], [1], images[:1], **gen)
    assert engine_ids(engine, model, [long_row], [1], images[:1], **gen) == expected
    # a mixed batch: different prompt lengths and image counts
    rows = [long_row, prompt(cfg, 2, text[:300])]
    gen = dict(num_beams=1, max_new_tokens=16, min_new_tokens=16)
    assert engine_ids(engine, model, rows, [1, 2], images, **gen) == transformers_ids(model, rows, [1, 2], images,
                                                                                       **gen)
    gen = dict(num_beams=3, max_new_tokens=8, min_new_tokens=0, length_penalty=0.0)
    assert engine_ids(engine, model, rows[:1], [1], images[:1], **gen) == transformers_ids(model, rows[:1], [1],
                                                                                            images[:1], **gen)


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(cuda_device):
    model = make_model().to(cuda_device)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(cuda_device)
    for params in (dict(max_new_tokens=12), dict(max_new_tokens=8, num_beams=3)):
        reqs = _requests(model.config, images, **params)
        compiled = InferenceEngine(model, compile=True).generate(reqs)
        eager = InferenceEngine(model, cuda_graphs=False).generate(reqs)
        assert [c.sequences[0].tokens for c in compiled] == [c.sequences[0].tokens for c in eager]
