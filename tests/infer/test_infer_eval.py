"""`deem eval` decodes through the engine; its predictions and scores equal those of the transformers path
(`DeemModel.generate_texts`) on the synthetic world, for greedy, beam and repetition-penalty benchmarks."""

from __future__ import annotations

import json

import pytest

import deem.eval.engine as eval_engine
from deem.data import load_tokenizer
from deem.eval import evaluate
from tests.eval.conftest import NUM_IMG_TOKEN, eval_config, world  # noqa: F401  (the world fixture)
from tests.infer.conftest import make_model

NAMES = ["coco_caption", "image2paragraph", "vqav2", "pope_random", "refcoco_val", "refcocog_referring"]


@pytest.fixture(scope="module")
def awake_checkpoint(world, tmp_path_factory):  # noqa: F811
    tok = load_tokenizer({"type": "hf", "path": str(world / "tokenizer"), "num_img_token": NUM_IMG_TOKEN})
    path = tmp_path_factory.mktemp("eval_ckpt")
    make_model(tok, seed=1).save_pretrained(path)
    return path


def test_eval_scores_are_unchanged_by_the_engine(world, awake_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    cfg = eval_config(world, NAMES)
    engine_run = evaluate(cfg, awake_checkpoint, tmp_path / "engine")
    calls = []

    def transformers_path(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return model.generate_texts(*args, **kwargs)

    monkeypatch.setattr(eval_engine, "generate_texts", transformers_path)
    reference = evaluate(cfg, awake_checkpoint, tmp_path / "transformers")
    assert calls and set(calls) == {"DeemModel"}
    assert engine_run == reference
    answers = []
    for name in NAMES:
        ours = json.loads((tmp_path / "engine" / name / "predictions.json").read_text())
        theirs = json.loads((tmp_path / "transformers" / name / "predictions.json").read_text())
        assert ours == theirs, name
        answers += [json.dumps(r, sort_keys=True) for r in ours]
    assert len(set(answers)) > len(NAMES)  # real, varied answers (not one token repeated everywhere)
