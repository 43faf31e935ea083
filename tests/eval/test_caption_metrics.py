"""Captioning metrics through pycocoevalcap (Java: PTBTokenizer, METEOR), all references per image."""

from __future__ import annotations

import shutil

import pytest

from deem.eval.metrics import caption_scores

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer/METEOR need Java")

PREDS = {"1": "a man riding a horse on a beach", "2": "two dogs playing in the snow",
         "3": "a plate of food with broccoli"}
REFS = {"1": ["a man rides a horse along the beach", "a person riding a horse on the sand",
              "a horse and rider on a beach"],
        "2": ["two dogs play in the snow", "a pair of dogs running through snow", "dogs playing outside in winter"],
        "3": ["a plate with broccoli and rice", "a dish of food with vegetables",
              "broccoli and chicken on a white plate"]}


@pytest.fixture(scope="module")
def golden() -> dict[str, float]:
    return caption_scores(PREDS, REFS)


def test_cider_golden_value(golden):
    # Provenance: pycocoevalcap 1.2 (PyPI), computed once on this example with its own API:
    #   g = PTBTokenizer().tokenize(refs); r = PTBTokenizer().tokenize(preds); Cider().compute_score(g, r)[0]
    #   -> 2.5521886691921734, Bleu(4).compute_score(g, r)[0][3] -> 0.39922065303646653 (Java 17).
    assert golden["CIDEr"] == pytest.approx(2.5521886691921734, rel=1e-12, abs=1e-12)
    assert golden["BLEU_4"] == pytest.approx(0.39922065303646653, rel=1e-12, abs=1e-12)
    assert set(golden) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert 0.0 < golden["METEOR"] < 1.0 and 0.0 < golden["ROUGE_L"] < 1.0


def test_identical_candidates_reach_the_maximum(golden):
    refs = {k: [v[0]] * 3 for k, v in REFS.items()}
    best = caption_scores({k: v[0] for k, v in REFS.items()}, refs)
    assert best["CIDEr"] == pytest.approx(10.0)  # CIDEr-D's maximum (10 x cosine 1, no length penalty)
    for key in ("BLEU_4", "ROUGE_L", "METEOR"):
        assert best[key] == pytest.approx(1.0, abs=1e-8)
        assert best[key] > golden[key]


def test_every_reference_counts():
    # a candidate equal to the SECOND reference is a perfect BLEU match only if all references are used
    preds = {k: v[1] for k, v in REFS.items()}
    all_refs = caption_scores(preds, REFS, metrics=("BLEU", "CIDEr"))
    first_only = caption_scores(preds, {k: v[:1] for k, v in REFS.items()}, metrics=("BLEU", "CIDEr"))
    assert all_refs["BLEU_4"] == pytest.approx(1.0, abs=1e-8)
    assert first_only["BLEU_4"] < 0.5
    assert all_refs["CIDEr"] > first_only["CIDEr"]


def test_tokenisation_is_applied_and_inputs_checked():
    # PTB tokenisation lower-cases and drops punctuation: these score like the plain versions
    plain = caption_scores({"1": "two dogs play in the snow"}, {"1": ["two dogs play in the snow"]},
                           metrics=("BLEU",))
    noisy = caption_scores({"1": "Two dogs play in the snow."}, {"1": ["two dogs, play in the snow"]},
                           metrics=("BLEU",))
    assert noisy == plain
    with pytest.raises(ValueError, match="no references"):
        caption_scores({"1": "x"}, {"1": []})
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores({}, {})
