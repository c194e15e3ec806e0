"""Hand-computed checks of src/hiernet/metrics.py (no torch, no images)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hiernet.hierarchy import Hierarchy
from hiernet.metrics import (STOPPED, classification_summary, hierarchical_prf, mistake_severity, paired_comparison,
                             score, text_report)

TWO = Hierarchy.from_leaf_paths(["a/x", "a/y", "b/z"])
#          c                        i
#      d       g                    j
#    e   f     h                    k
THREE = Hierarchy.from_leaf_paths(["c/d/e", "c/d/f", "c/g/h", "i/j/k"])


# ------------------------------------------------------------------------------ hierarchical P/R/F1
def test_hierarchical_prf_two_levels_with_partial_prediction():
    true = ["a/x", "a/x", "b/z", "a/y"]
    pred = ["a/x", "a/y", "b", "b/z"]  # right, sibling, stopped at the right parent, wrong parent
    # |T ∩ P| = 2 + 1 + 1 + 0 = 4, |P| = 2 + 2 + 1 + 2 = 7, |T| = 8
    r = hierarchical_prf(TWO, true, pred)
    assert r["hierarchical_precision"] == pytest.approx(4 / 7)
    assert r["hierarchical_recall"] == pytest.approx(4 / 8)
    assert r["hierarchical_f1"] == pytest.approx(8 / 15)


def test_hierarchical_prf_three_levels():
    true = ["c/d/e", "c/d/f", "i/j/k"]
    pred = ["c/g/h", "c/d", ""]  # shares only 'c'; stopped one level short; no prediction at all
    # |T ∩ P| = 1 + 2 + 0 = 3, |P| = 3 + 2 + 0 = 5, |T| = 9
    r = hierarchical_prf(THREE, true, pred)
    assert r["hierarchical_precision"] == pytest.approx(3 / 5)
    assert r["hierarchical_recall"] == pytest.approx(3 / 9)
    assert r["hierarchical_f1"] == pytest.approx(2 * (3 / 5) * (1 / 3) / (3 / 5 + 1 / 3))


def test_hierarchical_prf_perfect_and_empty():
    assert hierarchical_prf(THREE, ["c/d/e"], ["c/d/e"]) == {
        "hierarchical_precision": 1.0, "hierarchical_recall": 1.0, "hierarchical_f1": 1.0}
    assert hierarchical_prf(THREE, [], []) == {
        "hierarchical_precision": 0.0, "hierarchical_recall": 0.0, "hierarchical_f1": 0.0}


def test_partial_prediction_keeps_precision_but_loses_recall():
    r = hierarchical_prf(THREE, ["c/d/e"], ["c"])
    assert r["hierarchical_precision"] == 1.0
    assert r["hierarchical_recall"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ mistake severity
def test_mistake_severity_three_levels():
    true = ["c/d/e"] * 7
    pred = [
        "c/d/f",  # sibling: 1 edge up to 'c/d'
        "c/g/h",  # cousin: 2 edges up to 'c'
        "i/j/k",  # other top-level branch: 3 edges up to the root
        "c/g",  # partial prediction down the wrong branch: 2 edges up to 'c'
        "c/d",  # partial prediction on the true path: not a mistake
        "",  # stopped at the root: not a mistake
        "c/d/e",  # right
    ]
    assert mistake_severity(THREE, true, pred) == pytest.approx((1 + 2 + 3 + 2) / 4)


def test_mistake_severity_two_levels_and_no_mistakes():
    assert mistake_severity(TWO, ["a/x", "a/x"], ["a/y", "b/z"]) == pytest.approx(1.5)
    assert math.isnan(mistake_severity(TWO, ["a/x", "b/z"], ["a/x", "b"]))


# ------------------------------------------------------------------------------ paired comparison
def test_paired_comparison_mcnemar_and_difference():
    a = np.ones(10, bool)
    b = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], bool)
    r = paired_comparison(a, b)
    assert r["difference"] == pytest.approx(0.6)
    assert (r["a_only"], r["b_only"], r["n"]) == (6, 0, 10)
    assert r["p_value"] == pytest.approx(2 * 0.5**6)  # exact two-sided binomial on 6 discordant pairs
    lo, hi = r["ci95"]
    assert 0.0 < lo <= 0.6 <= hi <= 1.0


def test_paired_comparison_is_symmetric_and_seeded():
    rng = np.random.default_rng(3)
    a, b = rng.random(200) < 0.8, rng.random(200) < 0.7
    r1, r2 = paired_comparison(a, b, seed=5), paired_comparison(a, b, seed=5)
    assert r1 == r2
    flipped = paired_comparison(b, a, seed=5)
    assert flipped["difference"] == pytest.approx(-r1["difference"])
    assert flipped["p_value"] == pytest.approx(r1["p_value"])
    assert (flipped["a_only"], flipped["b_only"]) == (r1["b_only"], r1["a_only"])


def test_paired_comparison_mixed_discordance():
    a = np.array([1, 1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 0, 1], bool)
    r = paired_comparison(a, b)
    assert r["difference"] == pytest.approx(1 / 6)
    assert (r["a_only"], r["b_only"]) == (2, 1)
    assert r["p_value"] == pytest.approx(1.0)  # 2 vs 1 of 3 discordant pairs: P(X<=1)+P(X>=2) = 1


def test_paired_comparison_identical_and_empty():
    same = np.array([1, 0, 1], bool)
    r = paired_comparison(same, same)
    assert r["difference"] == 0.0 and r["ci95"] == [0.0, 0.0] and r["p_value"] == 1.0
    e = paired_comparison(np.array([], bool), np.array([], bool))
    assert e["n"] == 0 and math.isnan(e["difference"]) and e["p_value"] == 1.0


# ------------------------------------------------------------------------------ flat summary
def test_classification_summary_hand_computed():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    s = classification_summary(y_true, y_pred, ["a", "b", "c", "d"])  # 'd' has no test image
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["n_images"] == 5
    pc = s["per_class"]
    assert pc["a"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert pc["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert pc["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert pc["d"]["support"] == 0
    # macro averages skip classes without test images ('d')
    assert s["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert s["macro_recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert s["macro_f1"] == pytest.approx((1 / 2 + 0.8 + 0) / 3)
    assert s["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_classification_summary_empty():
    s = classification_summary([], [], ["a", "b"])
    assert s["n_images"] == 0 and math.isnan(s["accuracy"]) and s["per_class"] == {} and s["confusion"] == []


def test_text_report_names_every_class():
    rep = text_report([0, 1, 1], [0, 1, 0], ["alpha", "beta"])
    assert "alpha" in rep and "beta" in rep


def test_expected_calibration_error_on_hand_made_bins():
    from hiernet.metrics import expected_calibration_error

    # bin 0.9: 1 of 2 right (|0.5 - 0.9| = 0.4); bin 0.6: 2 of 2 right (|1 - 0.6| = 0.4) -> 0.4
    assert abs(expected_calibration_error([0.9, 0.9, 0.6, 0.6], [True, False, True, True]) - 0.4) < 1e-9
    # perfectly calibrated: 3 of 4 right at 0.75
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) < 1e-9
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0  # confidence 1 falls in the top bin
    assert np.isnan(expected_calibration_error([], []))


# ------------------------------------------------------------------------------ score(): one model's whole evaluation
#      a          s           t
#    x   y        o        u     z
#                        v   w
# 's' has one child (no classifier); 't/u' makes a third level; 't/z' is a leaf at level 2.
MIX = Hierarchy.from_leaf_paths(["a/x", "a/y", "s/o", "t/u/v", "t/u/w", "t/z"])
MIX_TRUE = ["a/x", "s/o", "t/u/v", "t/u/w", "t/u/v", "a/y", "s/o"]
MIX_PATHS = [
    ["a", "a/x"],  # 1 right
    ["s", "s/o"],  # 2 right (through the one-child parent)
    ["t", "t/u", "t/u/w"],  # 3 sibling at level 3
    ["t", "t/u"],  # 4 stopped above the leaf, on the true path
    ["t", "t/z"],  # 5 wrong at level 2 (a leaf one level higher than the true one)
    [],  # 6 stopped at the root
    ["a", "a/x"],  # 7 wrong at level 1
]
MIX_CONF = [0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.5]
MIX_LOCAL = {  # root and 't/u' only: 'a' and 't' get no local accuracy
    "": ["a", "s", "t", "t", "t", "a", "a"],  # wrong only on 7
    "t/u": [None, None, "t/u/w", "t/u/w", "t/u/v", None, None],  # images 3, 4, 5: wrong, right, right
}


@pytest.fixture(scope="module")
def mix():
    return score(MIX, MIX_TRUE, MIX_PATHS, confidences=MIX_CONF, local_children=MIX_LOCAL)


def test_score_counts_and_levels(mix):
    assert mix["n_images"] == 7 and mix["n_mistakes"] == 5 and mix["n_stopped"] == 2  # stopped: 4 and 6
    assert mix["leaf_accuracy"] == pytest.approx(2 / 7) and mix["leaf_error"] == pytest.approx(5 / 7)
    # level 3 counts only images 3, 4, 5 (the others' leaves are at level 2), all wrong there
    assert mix["level_accuracy"] == pytest.approx([5 / 7, 4 / 7, 0.0]) and mix["level_support"] == [7, 7, 3]
    # first mistakes: 3 and 4 at level 3, 5 at level 2, 6 and 7 at level 1
    assert mix["error_counts"] == [2, 1, 2] and mix["error_attribution"] == pytest.approx([0.4, 0.2, 0.4])


def test_score_hierarchical_and_severity(mix):
    # |T ∩ P| = 2+2+2+2+1+0+0 = 9, |P| = 2+2+3+2+2+0+2 = 13, |T| = 2+2+3+3+3+2+2 = 17
    assert mix["hierarchical_precision"] == pytest.approx(9 / 13)
    assert mix["hierarchical_recall"] == pytest.approx(9 / 17)
    assert mix["hierarchical_f1"] == pytest.approx(0.6)  # 2·9 / (13 + 17)
    # mistakes: 3 (1 edge up to t/u), 5 (2 edges up to t), 7 (2 edges up to the root); 4 and 6 are not
    assert mix["mistake_severity"] == pytest.approx(5 / 3)


def test_score_confidence(mix):
    assert mix["mean_confidence"] == pytest.approx(4.2 / 7)
    # 15 bins: every confidence alone in its bin; right: 0.9 and 0.8
    assert mix["confidence_ece"] == pytest.approx((0.1 + 0.2 + 0.7 + 0.4 + 0.6 + 0.3 + 0.5) / 7)


def test_score_leaves_and_confusion(mix):
    assert list(mix["per_leaf"]) == ["a/x", "a/y", "s/o", "t/u/v", "t/u/w", "t/z"]
    assert mix["per_leaf"]["a/x"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert mix["per_leaf"]["s/o"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert mix["per_leaf"]["t/z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert mix["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3 + 0 + 0) / 5)  # t/z has no image: left out
    assert mix["confusion"]["columns"] == mix["confusion"]["rows"] + [STOPPED]
    assert mix["confusion"]["counts"] == [
        [1, 0, 0, 0, 0, 0, 0],  # a/x
        [0, 0, 0, 0, 0, 0, 1],  # a/y: stopped at the root
        [1, 0, 1, 0, 0, 0, 0],  # s/o
        [0, 0, 0, 0, 1, 1, 0],  # t/u/v
        [0, 0, 0, 0, 0, 0, 1],  # t/u/w: stopped at t/u
        [0, 0, 0, 0, 0, 0, 0],  # t/z
    ]


def test_score_nodes(mix):
    assert list(mix["nodes"]) == ["parent", "a", "t", "t__u"]  # no classifier for the one-child 's'
    assert mix["nodes"]["parent"] == pytest.approx(
        {"node": "root", "local_accuracy": 6 / 7, "routed_accuracy": 6 / 7, "n_true": 7, "n_routed": 7})
    # t/u: truly below = 3, 4, 5; routed there = 3, 4 (5 went to t/z)
    assert mix["nodes"]["t__u"] == pytest.approx(
        {"node": "t/u", "local_accuracy": 2 / 3, "routed_accuracy": 1 / 2, "n_true": 3, "n_routed": 2})
    assert mix["nodes"]["a"] == {"node": "a", "local_accuracy": None, "routed_accuracy": None,
                                 "n_true": 2, "n_routed": 1}  # only 1 reached 'a' among 1 and 6
    assert mix["nodes"]["t"]["n_true"] == mix["nodes"]["t"]["n_routed"] == 3


def test_score_of_a_flat_model_uses_the_same_rules():
    flat = ["a/x", "s/o", "t/u/v", "t/z", "t/u/w", "a/y", "s/o"]  # wrong on 4 and 5
    r = score(MIX, MIX_TRUE, [MIX.path(f) for f in flat])
    assert r["leaf_accuracy"] == pytest.approx(5 / 7) and r["n_stopped"] == 0
    assert r["level_accuracy"] == pytest.approx([1.0, 6 / 7, 1 / 3])
    assert r["mistake_severity"] == pytest.approx(1.5)  # 4: 2 edges up to t; 5: 1 edge up to t/u
    assert r["confusion"]["columns"] == r["confusion"]["rows"]  # nothing stopped: no stopped column
    assert r["mean_confidence"] is None and r["confidence_ece"] is None


def test_score_without_images_or_mistakes():
    r = score(MIX, [], [])
    assert r["n_images"] == 0 and r["leaf_accuracy"] is None and r["hierarchical_f1"] is None
    assert r["mistake_severity"] is None and r["level_accuracy"] == []
    r = score(MIX, ["t/z"], [["t", "t/z"]], confidences=[1.0])
    assert r["leaf_accuracy"] == 1.0 and r["mistake_severity"] is None and r["confidence_ece"] == 0.0
    with pytest.raises(ValueError):
        score(MIX, ["t/z"], [])
