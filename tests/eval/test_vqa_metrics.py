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
