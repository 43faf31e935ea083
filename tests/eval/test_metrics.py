"""POPE / RobustVQA yes-no scoring, MMVP, VisDial ranking and box grounding on hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deem.eval.metrics import (
    box_iou,
    grounding_scores,
    mmvp_choice,
    mmvp_scores,
    parse_box,
    parse_mmvp_options,
    pope_scores,
    robustvqa_scores,
    scores_to_ranks,
    visdial_scores,
    yes_no,
)
from deem.eval.postprocess import clean_referring


@pytest.mark.parametrize("text, expected", [
    ("yes", "yes"), (" Yes, there is.", "yes"), ("No.", "no"), ("no", "no"), ("There is not a dog", "no"),
    ("I think so", "yes"),            # neither: counts as yes (the POPE script's rule)
    ("Nope", "yes"),                  # whole words only
    ("Not sure", "yes"),              # "Not" is not in the script's word list
    ("yes. no", "yes"),               # only the first sentence
    ("no,", "no"),
])
def test_pope_yes_no_extraction(text, expected):
    assert yes_no(text) == expected


def test_pope_scores_by_hand():
    preds = ["Yes, there is.", "No.", "yes", "There is not a dog", "I think so", "no"]
    labels = ["yes", "no", "no", "yes", "no", "No"]
    # predicted Y N Y N Y N vs gold Y N N Y N N: TP 1, FP 2, TN 2, FN 1
    out = pope_scores(preds, labels)
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 2)
    assert out["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert out["yes_ratio"] == pytest.approx(3 / 6)
    none_yes = pope_scores(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5
    with pytest.raises(ValueError, match="yes' or 'no"):
        pope_scores(["yes"], ["maybe"])


def test_robustvqa_per_subset_and_mean():
    out = robustvqa_scores({"a": (["yes", "no"], ["yes", "yes"]), "r": (["no", "No."], ["no", "no"]),
                            "v2": (["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])})
    assert out == {"accuracy_a": 0.5, "accuracy_r": 1.0, "accuracy_v2": 0.5, "accuracy_mean": pytest.approx(2 / 3)}


def test_mmvp_choice_and_pairs():
    opts = "(a) Open (b) Closed"
    assert parse_mmvp_options(opts) == {"a": "open", "b": "closed"}
    assert mmvp_choice("(a) Open", opts) == "a"
    assert mmvp_choice(" b", opts) == "b"
    assert mmvp_choice("B.", opts) == "b"
    assert mmvp_choice("The answer is (b)", opts) == "b"
    assert mmvp_choice("it looks closed to me", opts) == "b"
    assert mmvp_choice("c", opts) is None
    assert mmvp_choice("open or closed", opts) is None  # both options named: no choice
    out = mmvp_scores({"1": "a", "2": "b", "3": "a", "4": "a", "5": "b"},
                      {"1": "(a)", "2": "(b)", "3": "(a)", "4": "(b)", "5": "(b)"})
    assert out["accuracy"] == pytest.approx(4 / 5)
    assert out["pair_accuracy"] == 0.5 and out["num_pairs"] == 2  # (1,2) right, (3,4) wrong, 5 incomplete
    with pytest.raises(ValueError, match="1-based integer"):
        mmvp_scores({"x": "a"}, {"x": "a"})


def test_visdial_metrics_by_hand():
    scores = np.array([[0.1, 0.9, 0.5, 0.3, 0.7], [5, 4, 3, 2, 1]], dtype=float)
    assert scores_to_ranks(scores).tolist() == [[5, 1, 3, 4, 2], [1, 2, 3, 4, 5]]
    relevance = np.array([[1.0, 0.0, 0.5, 0.0, 1.0], [0, 0, 0, 0, 1.0]])
    out = visdial_scores(scores, relevance, gt_index=[4, 0])
    # round 1: k = 3, ranked relevances (0, 1, 0.5), ideal (1, 1, 0.5); round 2: k = 1, top option irrelevant
    d = [1.0, 1 / math.log2(3), 0.5]
    ndcg1 = (0 * d[0] + 1 * d[1] + 0.5 * d[2]) / (1 * d[0] + 1 * d[1] + 0.5 * d[2])
    assert out["ndcg"] == pytest.approx((ndcg1 + 0.0) / 2)
    assert out["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert (out["r@1"], out["r@5"], out["r@10"], out["mean_rank"]) == (0.5, 1.0, 1.0, 1.5)
    perfect = visdial_scores(relevance + 1e-3 * np.arange(5)[::-1], relevance)
    assert perfect["ndcg"] == pytest.approx(1.0)
    assert set(visdial_scores(scores, relevance)) == {"ndcg"}
    with pytest.raises(ValueError, match="shape"):
        visdial_scores(scores, relevance[:, :3])


def test_box_parsing_and_iou():
    assert parse_box("(100,200)(300,400)", 999, 999) == (100, 200, 300, 400)
    x1, y1, x2, y2 = parse_box(" (000,999) (999, 000)</box>", 200, 100)  # swapped corners are ordered
    assert (x1, y1, x2, y2) == (0, 0, 200, 100)
    assert parse_box("<box>(499,499)(1200,999)", 999, 999)[2] == 999  # clamped to the grid
    assert parse_box("no box here", 10, 10) is None
    assert parse_box("(1,2)", 10, 10) is None
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


def test_grounding_accuracy():
    gt = [(0, 0, 10, 10), (0, 0, 1, 1), (0, 0, 10, 10), (0, 0, 10, 10)]
    pred = [(0, 0, 10, 10), None, (5, 5, 15, 15), (0, 0, 10, 5)]  # IoU 1, -, 1/7, exactly 0.5
    out = grounding_scores(pred, gt)
    assert out["accuracy"] == pytest.approx(2 / 4)
    assert out["mean_iou"] == pytest.approx((1 + 0 + 1 / 7 + 0.5) / 4)
    assert out["parse_failure_rate"] == pytest.approx(1 / 4)


def test_referring_cleanup():
    assert clean_referring("## user: a red circle on the left #") == "a red circle on the left"
    assert clean_referring("asistant: the square") == "the square"
