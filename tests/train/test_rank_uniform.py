"""Rank-uniform module calls (issue 17): on several ranks a batch without images still runs the visual tokenizer,
its feedback loss and the image decoder on a blank image, weighted 0, so every rank's collectives (ZeRO-3 gathers,
DDP buckets) are the same. That path must add exactly zero loss and zero gradient, and nothing where images are."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_deem_model import make_batch, make_model, wake_zero_inits

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model, batch, rank_uniform):
    model.zero_grad(set_to_none=True)
    model.rank_uniform = rank_uniform
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_no_change_where_the_batch_has_images():
    model = make_model()
    wake_zero_inits(model)
    model.train()
    batch = make_batch(model.config)
    plain, g_plain = _grads(model, batch, False)
    uniform, g_uniform = _grads(model, batch, True)
    assert torch.equal(plain.loss, uniform.loss)
    assert g_plain.keys() == g_uniform.keys()
    assert all(torch.equal(g_plain[n], g_uniform[n]) for n in g_plain)


def test_the_dummy_path_runs_every_image_module_and_adds_exactly_zero():
    model = make_model()
    wake_zero_inits(model)
    model.train()
    batch = make_batch(model.config)
    text_only = {k: batch[k] for k in ("text_ids", "attention_mask", "gt_text_ids")}
    text_only["text_ids"] = torch.where(text_only["text_ids"] == model.special["image"], 30, text_only["text_ids"])
    plain, g_plain = _grads(model, text_only, False)
    uniform, g_uniform = _grads(model, text_only, True)
    assert torch.equal(plain.loss, uniform.loss)
    for name, grad in g_plain.items():
        assert torch.equal(grad, g_uniform[name]), name
    extra = set(g_uniform) - set(g_plain)
    assert all(torch.count_nonzero(g_uniform[n]) == 0 for n in extra)
    # the modules a text-only batch skips now take part in the backward
    for prefix in ("visual_tokenizer.", "image_decoder.", "context_feat_proj.", "diffusion.", "llm."):
        assert any(n.startswith(prefix) for n in extra), prefix
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trained - set(g_uniform))
    assert all("ignore_token" in n or "query_relpos" in n for n in missing), missing
