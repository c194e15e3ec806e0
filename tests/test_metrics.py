"""Hand-computed checks of src/hiernet/metrics.py (no torch, no images)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hiernet.hierarchy import Hierarchy
from hiernet.metrics import classification_summary, hierarchical_prf, mistake_severity, paired_comparison, text_report

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
