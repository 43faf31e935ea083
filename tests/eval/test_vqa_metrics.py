"""The official VQA accuracy and normalisation, VizWiz and GQA, on hand-checked cases."""

from __future__ import annotations

import pytest

from deem.eval.metrics import (
    gqa_scores,
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    vizwiz_scores,
    vqa_accuracy,
    vqa_scores,
)
from deem.eval.postprocess import first_line, original_extract_answer


@pytest.mark.parametrize("raw, expected", [
    ("yes", "yes"),
    ("Yes.", "yes"),                      # case, final period
    ("two", "2"),                         # number words
    ("none", "0"),
    ("Ten dogs", "10 dogs"),
    ("a dog", "dog"),                     # articles dropped
    ("the red one", "red 1"),
    ("an apple", "apple"),
    ("dont", "don't"),                    # contractions
    ("isnt it", "isn't it"),
    ("whats up", "what's up"),
    ("3.5", "3.5"),                       # a period followed by a digit stays
    ("1,000", "1000"),                    # digit,digit: punctuation deleted, not spaced
    ("hello,world", "hello world"),       # otherwise replaced by a space
    ("red, white", "red white"),          # "p " present: deleted
    ("left-hand", "left hand"),
    ("yes!", "yes"),
    ("(b)", "b"),
    ("t-shirt", "t shirt"),
    ("mr. smith", "mr smith"),
    ("  new\tyork\n", "new york"),        # tabs/newlines are spaces
])
def test_official_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_punctuation_and_digit_rules_separately():
    assert process_punctuation("a/b") == "a b"
    assert process_punctuation("a / b") == "a  b"
    assert process_punctuation("3 . 5.") == "3  5"  # "." not followed by a digit is removed
    assert process_digit_article("The Two Cats") == "2 cats"


@pytest.mark.parametrize("n_match, expected", [
    (0, 0.0),
    (1, 0.3),      # 9 subsets see 1 match (1/3), 1 subset sees 0: 9/30
    (2, 0.6),      # 8 x 2/3 + 2 x 1/3 = 18/3 -> /10
    (3, 0.9),      # 7 x 1 + 3 x 2/3 = 9 -> /10
    (4, 1.0),      # every leave-one-out subset keeps >= 3 matches
    (10, 1.0),
])
def test_accuracy_leave_one_out(n_match, expected):
    gts = ["cat"] * n_match + [f"other{i}" for i in range(10 - n_match)]
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)
    assert vqa_accuracy("The cat.", gts) == pytest.approx(expected)  # the prediction is normalised


def test_unanimous_answers_are_not_normalised():
    # the official code punctuation-normalises ground truths only when they are not all identical
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0
    # and never lower-cases them (annotation files are already lower-case)
    assert vqa_accuracy("yes", ["Yes"] * 9 + ["no"]) == 0.0


def test_vqa_scores_and_answer_types():
    preds = {"1": "two", "2": "blue", "3": "yes"}
    gts = {"1": ["2"] * 10, "2": ["red"] * 10, "3": ["yes"] * 2 + ["no"] * 8}
    out = vqa_scores(preds, gts, {"1": "number", "2": "other", "3": "yes/no"})
    assert out["accuracy"] == pytest.approx((1.0 + 0.0 + 0.6) / 3)
    assert out["accuracy_number"] == 1.0 and out["accuracy_other"] == 0.0
    assert out["accuracy_yes_no"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="several human answers"):
        vqa_accuracy("x", ["x"])


def test_vizwiz_unanswerable():
    gts = {"a": ["unanswerable"] * 10, "b": ["red"] * 6 + ["dark red"] * 4, "c": ["unanswerable"] * 5 + ["blue"] * 5}
    preds = {"a": "Unanswerable.", "b": "dark red", "c": "blue"}
    out = vizwiz_scores(preds, gts, {"a": "unanswerable", "b": "other", "c": "other"})
    assert out["accuracy_unanswerable"] == 1.0
    assert out["accuracy_other"] == pytest.approx((1.0 + 1.0) / 2)
    assert out["accuracy"] == pytest.approx(1.0)
    assert vizwiz_scores({"a": "blue"}, gts)["accuracy"] == 0.0


def test_gqa_exact_match():
    out = gqa_scores({"1": "Yes.", "2": "left", "3": "a man"}, {"1": "yes", "2": "right", "3": "man"})
    assert out["accuracy"] == pytest.approx(1 / 3)


def test_answer_postprocessing():
    assert first_line("\n  red\nbecause it is") == "red"
    # the original heuristics (parity mode): substring tests hit inside words ("pizza " contains "a ")
    assert original_extract_answer('"The answer is pizza slice."') == "slice"
    assert original_extract_answer("a cup of tea") == "cup"
    assert original_extract_answer("red or blue") == "red"


# Cases where the official rules (GT-Vision-Lab vqaEval.py) and the original DEEM code's variant
# (uni_interleaved/utils/vqav2_metrics_src) differ, each worked out from the rules by hand:
#   official: prediction always whitespace+punctuation+digit/article normalised; ground truths punctuation-only and
#             only when not all identical;
#   original: both sides whitespace-stripped; both sides fully normalised only when the ground truths are not all
#             identical, otherwise nothing more.
DIFFERING = [
    # prediction, ground truths, official, original
    ("Yes", ["yes"] * 10, 1.0, 0.0),                      # unanimous: the original leaves "Yes" as it is
    ("yes.", ["yes"] * 10, 1.0, 0.0),                     # ... and its final period
    ("two", ["2"] * 10, 1.0, 0.0),                        # ... and its number word
    ("2", ["two"] * 8 + ["2"] * 2, 0.6, 1.0),             # official: ground truths keep "two" (8 x 2/3 + 2 x 1/3)
    ("dog", ["the dog"] * 8 + ["dog"] * 2, 0.6, 1.0),     # official: ground truths keep their article
    ("dont", ["dont"] * 8 + ["no"] * 2, 0.0, 1.0),        # official: only the prediction becomes "don't"
    ("red", ["Red"] * 8 + ["blue"] * 2, 0.0, 1.0),        # official: ground truths are never lower-cased
    ("yes", ["yes "] * 10, 0.0, 1.0),                     # official: ground truths are never stripped
]


@pytest.mark.parametrize("prediction, gts, official, original", DIFFERING)
def test_official_and_original_variants_differ_where_the_rules_do(prediction, gts, official, original):
    assert vqa_accuracy(prediction, gts) == pytest.approx(official)  # the default is the official one
    assert vqa_accuracy(prediction, gts, metric="official") == pytest.approx(official)
    assert vqa_accuracy(prediction, gts, metric="original") == pytest.approx(original)


@pytest.mark.parametrize("n_match, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_both_variants_share_the_leave_one_out_formula(n_match, expected):
    gts = ["cat"] * n_match + [f"other{i}" for i in range(10 - n_match)]
    for metric in ("official", "original"):
        assert vqa_accuracy("The cat.", gts, metric=metric) == pytest.approx(expected)


def test_original_variant_unanimous_and_mixed_answers():
    assert vqa_accuracy("yes", ["yes."] * 10, metric="original") == 0.0  # nothing normalised when unanimous
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"], metric="original") == 1.0
    assert vqa_accuracy("yes", ["Yes"] * 9 + ["no"], metric="original") == 1.0  # lower-cased when mixed
    out = vqa_scores({"1": "Yes", "2": "2"}, {"1": ["yes"] * 10, "2": ["two"] * 8 + ["2"] * 2}, metric="original")
    assert out["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"unknown vqa_metric 'lavis'.*official.*original"):
        vqa_scores({"1": "yes"}, {"1": ["yes"] * 10}, metric="lavis")


def test_vizwiz_normalises_only_the_prediction():
    # the VizWiz API (and the original) never touch the ground truths, unlike the VQA rule for mixed answers
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0
    assert vizwiz_scores({"q": "yes"}, {"q": ["yes."] * 9 + ["no"]})["accuracy"] == 0.0
    assert vizwiz_scores({"q": "Yes."}, {"q": ["yes"] * 9 + ["no"]})["accuracy"] == 1.0


def test_eval_config_selects_the_variant():
    from deem.eval.config import load_eval_config
    from deem.eval.errors import EvalError
    from deem.eval.tasks import Context

    def cfg(**extra):
        bench = {"name": "v", "dataset": {"type": "vqav2", "questions": "q.json", "annotations": "a.json"}}
        pope = {"name": "p", "dataset": {"type": "pope", "annotation": "p.json"}}
        return {"benchmarks": [{**bench, **extra.pop("bench", {})}, pope], **extra}

    assert [b.vqa_metric for b in load_eval_config(cfg()).benchmarks] == ["official", "official"]
    assert load_eval_config(cfg(vqa_metric="original")).benchmarks[0].vqa_metric == "original"
    assert load_eval_config(cfg(vqa_metric="original", bench={"vqa_metric": "official"})).benchmarks[0].vqa_metric \
        == "official"
    with pytest.raises(EvalError, match=r"vqa_metric must be one of \['official', 'original'\], got 'x'"):
        load_eval_config(cfg(vqa_metric="x"))
    bad = cfg()
    bad["benchmarks"][1]["vqa_metric"] = "original"
    with pytest.raises(EvalError, match="vqa_metric applies to VQAv2-style benchmarks"):
        load_eval_config(bad)
    kind = load_eval_config(cfg()).benchmarks[0].kind
    records = [{"id": "1", "prediction": "Yes", "gt_answers": ["yes"] * 10}]
    assert kind.score(records, Context("v")) == {"accuracy": 100.0}
    assert kind.score(records, Context("v", vqa_metric="original")) == {"accuracy": 0.0}
