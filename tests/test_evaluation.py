"""Tests for src/evaluate.py, hiernet.evaluation, hiernet.testsets and hiernet.report.

The metric assembly is checked on a hand-built tree with hand-computed values; the prediction loop
with a numpy stand-in for the models (no torch); the real pipeline (prepare, train, evaluate) only
in the ``slow`` test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiernet.evaluation import FLAT_FIELDS, assemble_results, combined_leaves, predict_test_set
from hiernet.routing import path_leaf_probs as lcpn_leaf_probs
from hiernet.metrics import STOPPED, display_order, error_attribution, first_error_level, level_accuracy, score
from hiernet.report import OUTPUT_FILES, render_markdown, summary_lines, verdict, write_outputs
from hiernet.testsets import TestSet, check_known_leaves, load_prepared_test_set, scan_test_tree
from hiernet.hierarchy import Hierarchy
from hiernet.predictor import HierarchicalPredictor, MirrorPolicy, NodeModel
from hiernet.routing import softmax as _softmax
from hiernet.safeio import UserError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

#        a            b
#     x     y      w     z
HIER = Hierarchy.from_leaf_paths(["a/x", "a/y", "b/z", "b/w"])

# Six images, hand-made so that the four headline metrics all differ.
TRUE = ["a/x", "a/y", "b/z", "b/w", "b/z", "a/y"]
PATHS = [
    ["a", "a/x"],  # 1 right
    ["a", "a/x"],  # 2 wrong leaf (sibling), first mistake at level 2
    ["a", "a/y"],  # 3 wrong parent, first mistake at level 1
    ["b"],  # 4 right parent, then stopped by --min-confidence (mistake attributed to level 2)
    ["b", "b/z"],  # 5 right
    [],  # 6 stopped at the root (mistake attributed to level 1)
]
# what each node's own classifier chose on the images truly below it (None elsewhere)
LOCAL = {
    "": ["a", "a", "a", "b", "b", "a"],  # wrong only on image 3: 5/6
    "a": ["a/x", "a/x", None, None, None, "a/y"],  # images 1, 2, 6: right, wrong, right
    "b": [None, None, "b/z", "b/z", "b/z", None],  # images 3, 4, 5: right, wrong, right
}
FLAT = ["a/x", "a/y", "a/y", "b/w", "b/z", "a/x"]  # right on 1, 2, 4, 5


# ------------------------------------------------------------------------------------- pure metrics
@pytest.fixture(scope="module")
def res():
    return assemble_results(HIER, TRUE, PATHS, LOCAL, FLAT)


def test_leaf_vs_level_accuracy(res):
    assert res["n_images"] == 6
    assert res["leaf_accuracy"] == pytest.approx(2 / 6)  # images 1 and 5
    assert res["leaf_error"] == pytest.approx(4 / 6)
    assert res["level_accuracy"] == pytest.approx([4 / 6, 2 / 6])  # level 1: 1, 2, 4, 5; level 2: 1, 5
    assert res["level_support"] == [6, 6]
    assert res["n_mistakes"] == 4 and res["n_stopped"] == 2


def test_error_attribution(res):
    # mistakes: 2 (level 2), 3 (level 1), 4 (stopped before level 2), 6 (stopped before level 1)
    assert res["error_counts"] == [2, 2]
    assert res["error_attribution"] == pytest.approx([0.5, 0.5])
    assert first_error_level(["a", "a/x"], ["a", "a/x"]) is None
    assert first_error_level(["a", "a/x"], ["b", "b/z"]) == 1
    assert first_error_level(["a", "a/x"], ["a"]) == 2


def test_hierarchical_scores_credit_partial_predictions(res):
    # |T ∩ P| = 2 + 1 + 0 + 1 + 2 + 0 = 6, |P| = 2 + 2 + 2 + 1 + 2 + 0 = 9, |T| = 12
    assert res["hierarchical_precision"] == pytest.approx(6 / 9)
    assert res["hierarchical_recall"] == pytest.approx(6 / 12)
    assert res["hierarchical_f1"] == pytest.approx(4 / 7)
    # mistakes: 2 (sibling, 1 edge) and 3 (other parent, 2 edges); 4 and 6 stopped on the true path
    assert res["mistake_severity"] == pytest.approx(1.5)


def test_confidence_calibration_of_the_chain(res):
    # images 1 and 5 are right; every confidence falls in a bin of its own (15 bins)
    conf = [0.9, 0.8, 0.7, 0.6, 0.95, 0.5]
    r = assemble_results(HIER, TRUE, PATHS, LOCAL, FLAT, confidences=conf)
    assert r["mean_confidence"] == pytest.approx(4.45 / 6)
    assert r["confidence_ece"] == pytest.approx((0.1 + 0.8 + 0.7 + 0.6 + 0.05 + 0.5) / 6)
    assert res["confidence_ece"] is None and res["mean_confidence"] is None  # not given: not invented


def test_node_local_and_routed_accuracy(res):
    nodes = res["nodes"]
    assert list(nodes) == ["parent", "a", "b"]
    assert nodes["parent"] == pytest.approx(
        {"node": "root", "local_accuracy": 5 / 6, "routed_accuracy": 5 / 6, "n_true": 6, "n_routed": 6})
    # 'a': truly below = 1, 2, 6; the chain routed 1, 2 (and 3, which is not below 'a')
    assert nodes["a"] == pytest.approx(
        {"node": "a", "local_accuracy": 2 / 3, "routed_accuracy": 1 / 2, "n_true": 3, "n_routed": 2})
    # 'b': truly below = 3, 4, 5; the chain routed 4 and 5
    assert nodes["b"] == pytest.approx(
        {"node": "b", "local_accuracy": 2 / 3, "routed_accuracy": 1 / 2, "n_true": 3, "n_routed": 2})


def test_per_leaf_scores_and_confusion(res):
    assert list(res["per_leaf"]) == ["a/x", "a/y", "b/w", "b/z"]
    assert res["per_leaf"]["a/x"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert res["per_leaf"]["a/y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert res["per_leaf"]["b/w"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert res["per_leaf"]["b/z"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert res["macro_f1"] == pytest.approx((2 / 3 + 0 + 0 + 2 / 3) / 4)
    assert res["confusion"] == {
        "rows": ["a/x", "a/y", "b/w", "b/z"],
        "columns": ["a/x", "a/y", "b/w", "b/z", STOPPED],
        "counts": [[1, 0, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 1, 0, 1, 0]],
    }


def test_flat_baseline_and_paired_comparison(res):
    flat = res["flat"]
    assert flat["leaf_accuracy"] == pytest.approx(4 / 6)
    assert flat["level_accuracy"] == pytest.approx([5 / 6, 4 / 6])
    assert flat["hierarchical_f1"] == pytest.approx(9 / 12)  # |T ∩ P| = 9, |P| = |T| = 12
    assert flat["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 2 / 3) / 4)  # a/x, a/y, b/w, b/z
    c = res["comparison"]
    assert c["difference"] == pytest.approx(2 / 6 - 4 / 6)
    assert (c["a_only"], c["b_only"], c["n"]) == (0, 2, 6)
    assert c["p_value"] == pytest.approx(0.5)
    assert res["verdict"].startswith("No significant difference")


def test_flat_is_scored_by_the_same_score(res):
    # the flat leaf's full path, scored like the chain: same numbers for every field results.json shows
    flat = score(HIER, TRUE, [HIER.path(f) for f in FLAT])
    assert list(res["flat"]) == list(FLAT_FIELDS)
    assert res["flat"] == {k: flat[k] for k in FLAT_FIELDS}
    assert flat["mistake_severity"] == pytest.approx(1.5)  # image 3: 2 edges (other parent); image 6: 1 (sibling)
    assert flat["hierarchical_precision"] == flat["hierarchical_recall"] == pytest.approx(9 / 12)


def test_results_are_strict_json_and_bounded(res):
    json.dumps(res, allow_nan=False)
    for key in ("leaf_accuracy", "hierarchical_precision", "hierarchical_recall", "hierarchical_f1", "macro_f1"):
        assert 0.0 <= res[key] <= 1.0
    for v in res["level_accuracy"] + res["error_attribution"]:
        assert 0.0 <= v <= 1.0


def test_no_mistakes_no_flat():
    r = assemble_results(HIER, ["a/x", "b/z"], [["a", "a/x"], ["b", "b/z"]])
    assert r["leaf_accuracy"] == 1.0 and r["error_attribution"] == [0.0, 0.0]
    assert r["mistake_severity"] is None  # NaN never reaches results.json
    assert r["confusion"]["columns"] == r["confusion"]["rows"]  # no "(stopped)" column without stops
    assert "flat" not in r and "comparison" not in r and "verdict" not in r
    assert r["nodes"]["a"]["local_accuracy"] is None  # no local predictions given
    json.dumps(r, allow_nan=False)


def test_no_images():
    r = assemble_results(HIER, [], [], {}, [])
    assert r["n_images"] == 0 and r["leaf_accuracy"] is None and r["level_accuracy"] == []
    assert r["hierarchical_f1"] is None and r["confusion"]["counts"] == [[0] * 4] * 4
    assert r["verdict"].startswith("No images")
    json.dumps(r, allow_nan=False)


def test_levels_exclude_shallower_leaves():
    hier = Hierarchy.from_leaf_paths(["a/x", "a/y", "b"])  # 'b' is a top-level leaf
    true = ["b", "a/x", "b"]
    paths = [["b"], ["a", "a/y"], ["a", "a/x"]]
    acc, support = level_accuracy(hier, true, paths)
    assert acc == pytest.approx([2 / 3, 0.0]) and support == [3, 1]
    shares, counts = error_attribution(hier, true, paths)
    assert counts == [1, 1] and shares == pytest.approx([0.5, 0.5])


def test_display_order_groups_leaves_by_parent():
    hier = Hierarchy.from_leaf_paths(["b/q", "a-b/y", "a/z", "a/x"])
    assert display_order(hier) == ["a/x", "a/z", "a-b/y", "b/q"]


def test_verdict_wording():
    better = {"difference": 0.1, "p_value": 0.01, "ci95": [0.02, 0.18], "n": 100, "a_only": 14, "b_only": 4}
    worse = {"difference": -0.1, "p_value": 0.01, "ci95": [-0.18, -0.02], "n": 100, "a_only": 4, "b_only": 14}
    same = {"difference": 0.01, "p_value": 0.6, "ci95": [-0.05, 0.07], "n": 100, "a_only": 5, "b_only": 4}
    assert verdict(better).startswith("The hierarchy is better")
    assert verdict(worse).startswith("The hierarchy is worse")
    assert verdict(same).startswith("No significant difference")
    assert "p<0.05" in verdict(better) and "McNemar p = 0.010" in verdict(better)
    assert "14 LCPN, 4 flat" in verdict(better) and "on the 18 of 100 images" in verdict(better)
    for v in (better, worse, same):  # interval and test agree: nothing to explain
        assert "excludes 0" not in verdict(v) and "touches 0" not in verdict(v)
    tiny = verdict({"difference": 0.2, "p_value": 3e-7, "ci95": [0.1, 0.3], "n": 900, "a_only": 30, "b_only": 2})
    assert tiny.startswith("The hierarchy is better") and "+20.0 points" in tiny and "p = 3.0e-07" in tiny


def test_verdict_says_when_interval_and_test_disagree():
    # issue 16, bug 8: 10 images, flat right on 4 more; the bootstrap interval excludes 0, McNemar p = 0.125
    from hiernet.metrics import paired_comparison

    lcpn = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    flat = np.ones(10, bool)
    comp = paired_comparison(lcpn, flat)
    assert comp["p_value"] == pytest.approx(0.125) and comp["ci95"][1] < 0  # the contradiction, as reported
    text = verdict(comp)
    assert text.startswith("No significant difference")
    assert "The interval excludes 0 but the test does not reject" in text
    assert "only 4 disagreements no split of them could reach p<0.05" in text
    assert text.count("McNemar") == 1 and text.count("interval") >= 2
    # with many disagreements the reason is not the count
    many = verdict({"difference": -0.02, "p_value": 0.07, "ci95": [-0.04, -0.001], "n": 1000, "a_only": 40,
                    "b_only": 60})
    assert "excludes 0" in many and "no split" not in many
    border = verdict({"difference": 0.02, "p_value": 0.04, "ci95": [-0.001, 0.04], "n": 1000, "a_only": 60,
                      "b_only": 40})
    assert border.startswith("The hierarchy is better") and "touches 0" in border


def test_summary_prints_the_comparison_once(res):
    lines = summary_lines({**res, "n_unreadable": 0, "runtime": "onnx"})
    assert sum("McNemar" in line for line in lines) == 1
    assert sum("interval" in line for line in lines) == 1
    md = render_markdown({**res, "n_unreadable": 0, "runtime": "onnx"})
    assert md.count("McNemar p =") == 1


@pytest.mark.parametrize("auto, reason", [
    ({"chosen": "combined", "n_images": 87}, "the most accurate decision on 87 validation images when export.py ran"),
    ({"chosen": "lcpn"}, "no current export recorded a choice"),
])
def test_summary_and_markdown_say_what_decision_auto_uses_and_why(res, auto, reason):
    full = {**res, "n_unreadable": 0, "runtime": "onnx", "auto_decision": auto}
    assert f"predict.py --decision auto (its default) uses {auto['chosen']}: {reason}" in summary_lines(full)
    assert f"decides with **{auto['chosen']}**: {reason}." in render_markdown(full)
    assert "--decision auto" not in "\n".join(summary_lines({**full, "auto_decision": None}))


def test_check_known_leaves_names_unknown_classes():
    check_known_leaves(HIER, ["a/x", "b/w"], "--data D")
    with pytest.raises(UserError, match=r"--data D has classes the models were not trained on: a/q, c/x;"):
        check_known_leaves(HIER, ["a/x", "c/x", "a/q"], "--data D")
    with pytest.raises(UserError, match="not trained on: a"):  # an internal node is not a class
        check_known_leaves(HIER, ["a"], "--data D")


def test_markdown_and_summary(res):
    md = render_markdown({**res, "n_unreadable": 0, "runtime": "onnx"})
    for text in ("| leaf accuracy | 0.3333 | 0.6667 |", "| parent | top level | 0.8333 | 6 | 0.8333 | 6 |",
                 "![graph](graph.png)", "![matrix](matrix.png)", "**Verdict:**", "| a/x |"):
        assert text in md
    lines = summary_lines({**res, "n_unreadable": 0, "runtime": "onnx"})
    assert any(line.startswith("leaf accuracy (end-to-end): 0.3333") for line in lines)
    assert any("flat baseline" in line for line in lines)


def test_write_outputs(tmp_path, res):
    files = write_outputs(HIER, {**res, "n_unreadable": 0, "runtime": "onnx"}, tmp_path / "out")
    assert [f.name for f in files] == list(OUTPUT_FILES)
    for f in files:
        assert f.stat().st_size > 0
    for name in ("graph.png", "matrix.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and im.width > 200
    assert json.loads((tmp_path / "out" / "results.json").read_text())["leaf_accuracy"] == pytest.approx(2 / 6)
    assert not list((tmp_path / "out").glob(".*tmp*"))


# ------------------------------------------------------------------------------------- test sets
def _prepare_in_process(src: Path, out: Path) -> dict:
    from hiernet.hierarchy import scan_tree
    from hiernet.splits import assign_splits, materialize

    scan = scan_tree(src)
    assignment, _ = assign_splits(scan.files, (0.5, 0.17, 0.33), 1)
    return materialize(scan.hierarchy, scan.files, assignment, src, out, {"seed": 1})


def test_load_prepared_test_set(two_level_tree, tmp_path):
    doc = _prepare_in_process(two_level_tree, tmp_path / "split")
    test, hier, _ = load_prepared_test_set(tmp_path / "split")
    expected = [(im["path"], im["leaf"]) for im in doc["images"] if im["split"] == "test"]
    assert len(test.paths) == len(expected) > 0
    assert sorted(test.leaves) == sorted(leaf for _, leaf in expected)
    folder = dict(zip(doc["flat"]["class_nodes"], doc["flat"]["classes"]))
    for p, leaf in zip(test.paths, test.leaves):
        assert Path(p).is_file() and Path(p).parent == tmp_path / "split" / "flat" / "test" / folder[leaf]
    assert hier.leaves() == ["angular/box", "angular/tri", "round/circle", "round/plus"]


def test_load_prepared_test_set_missing(tmp_path):
    with pytest.raises(UserError, match="prepare_dataset.py"):
        load_prepared_test_set(tmp_path / "nothing")


def test_scan_test_tree_skips_unreadable(two_level_tree):
    (two_level_tree / "round" / "circle" / "broken.jpg").write_bytes(b"not a jpeg")
    test, hier = scan_test_tree(two_level_tree)
    assert len(test.paths) == 24 and len(set(test.leaves)) == 4
    assert [Path(p).name for p, _ in test.skipped] == ["broken.jpg"]


# ------------------------------------------------------------------------------------- prediction loop
def _numpy_predictor(hier: Hierarchy, min_confidence: float = 0.0, all_heads: bool = False) -> HierarchicalPredictor:
    """A real HierarchicalPredictor whose 'networks' are fixed random linear maps (no torch)."""
    rng = np.random.default_rng(0)
    size = 16

    def backbone(x):  # (B, 3, S, S) -> (B, 6): channel means and spreads
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], 1).astype(np.float32)

    def linear(c):
        w = rng.normal(size=(6, c)).astype(np.float32) * 8
        return lambda f: f @ w

    nodes = {}
    for k, nid in enumerate(hier.classifier_nodes()):
        ch = hier.nodes[nid].children
        nm = NodeModel(hier.nodes[nid].dataset, nid, [hier.nodes[c].name for c in ch], list(ch), size, "squash",
                       tta=k == 1)
        if k == 2 and not all_heads:  # one node with its own network on images
            head = linear(len(ch))
            nm.full = lambda x, head=head: head(backbone(x))
        else:
            nm.backbone, nm.head = "bb0", linear(len(ch))
        nodes[nid] = nm
    leaves = hier.leaves()
    flat = NodeModel("flat", None, leaves, leaves, size, "squash", False, backbone="bb0", head=linear(len(leaves)))
    return HierarchicalPredictor(hier, nodes, {"bb0": (backbone, size, "squash")}, "numpy", flat, min_confidence)


def test_predict_and_score_matches_predict_arrays():
    pred = _numpy_predictor(HIER)
    rng = np.random.default_rng(1)
    inputs = [{(16, "squash"): rng.random((3, 16, 16), dtype=np.float32)} for _ in range(7)]
    names = [f"img{i}" for i in range(7)]
    plain = pred.predict_arrays(inputs, names)
    scored, scores = pred.predict_and_score(inputs, names, {"": list(range(7)), "a": [0, 3], "b": []})
    assert [(p.node_ids, p.probs, p.flat_leaf) for p in plain] == [(p.node_ids, p.probs, p.flat_leaf) for p in scored]
    assert scores["a"].shape == (2, 2) and scores["b"].shape == (0, 2) and scores[""].shape == (7, 2)
    np.testing.assert_allclose(scores[""].sum(1), 1.0, rtol=1e-5)
    for i, p in enumerate(plain):  # the root's own choice is the chain's first decision
        assert pred.nodes[""].class_nodes[int(scores[""][i].argmax())] == p.node_ids[0]

    # expected values computed here, not with the predictor's own softmax and backbone runner
    def feats(x):  # what _numpy_predictor's backbone computes
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], 1).astype(np.float64)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    X = np.stack([x[(16, "squash")] for x in inputs])
    np.testing.assert_allclose(scores[""], softmax(pred.nodes[""].head(feats(X))), rtol=1e-5)
    pred = pred.with_options(mirror=MirrorPolicy(1.0))  # node 'a' (trained with mirrors) averages every image with its mirror
    _, scores = pred.predict_and_score(inputs, names, {"a": [0, 3]})
    head, x = pred.nodes["a"].head, X[[0, 3]]
    expected = (softmax(head(feats(x))) + softmax(head(feats(x[..., ::-1])))) / 2
    np.testing.assert_allclose(scores["a"], expected, rtol=1e-5)
    assert pred.predict_and_score([], []) == ([], {})


def test_the_combined_decision_takes_the_mirror_where_the_flat_model_doubts_only():
    """Combined runs every node on every image; a node is unsure about most images not below it, and each
    would cost a mirror pass. The flat model decides which images get their mirror; every node then averages
    exactly those. Deferred (predict_iter), inline (predict_arrays) and evaluate's combined agree."""
    import dataclasses

    from hiernet.predictor import COMBINED_SCORES, MirrorMode

    pred = _numpy_predictor(HIER, all_heads=True)
    rows_run = []
    run = pred.backbones["bb0"][0]
    bundle = dataclasses.replace(pred.bundle, backbones={"bb0": (lambda x: rows_run.append(len(x)) or run(x), 16, "squash")},
                                 nodes={nid: dataclasses.replace(nm, tta=True) for nid, nm in pred.nodes.items()},
                                 flat=dataclasses.replace(pred.flat, tta=True))
    rng = np.random.default_rng(4)
    inputs = [{(16, "squash"): rng.random((3, 16, 16), dtype=np.float32)} for _ in range(40)]
    names = [f"img{i}" for i in range(40)]
    X = np.stack([x[(16, "squash")] for x in inputs])
    flat_top = _softmax(pred.flat.head(run(X))).max(1)
    below = float(np.quantile(flat_top, 0.3))  # the flat model doubts about a third of the images
    flat_doubts = int(np.sum(flat_top < below))
    assert 0 < flat_doubts < 40
    mirror = MirrorPolicy(below)
    combined = HierarchicalPredictor(bundle, dataclasses.replace(pred.options, decision="combined", mirror=mirror))
    rows_run.clear()
    inline = combined.predict_arrays(inputs, names)
    assert rows_run == [40, flat_doubts]  # one pass, then the mirrors of the flat model's doubts only
    # each node's own doubts would have asked for more mirrors (the cost this avoids)
    lcpn_all = HierarchicalPredictor(bundle, dataclasses.replace(pred.options, mirror=mirror))
    rows_run.clear()
    lcpn_all.predict_and_score(inputs, names, {nid: list(range(40)) for nid in HIER.classifier_nodes()})
    assert sum(rows_run[1:]) > flat_doubts
    # by hand: flat probabilities (mirror-averaged where it doubts) x path probabilities with the same images averaged
    want = flat_top < below

    def probs(head):
        p = _softmax(head(run(X)))
        p[want] = (p[want] + _softmax(head(run(X[want][..., ::-1])))) / 2
        return p

    joint = probs(pred.flat.head) * lcpn_leaf_probs(HIER, {nid: probs(nm.head) for nid, nm in pred.nodes.items()},
                                                    pred.flat.class_nodes, 40)
    expected = [pred.flat.class_nodes[j] for j in joint.argmax(1)]
    assert [p.node for p in inline] == expected
    first, _, batch = combined._run(inputs, names, MirrorMode.DEFER)  # what predict_iter does first
    assert batch.unsure.sum() == flat_doubts  # only the flat model's doubts are set aside for their mirrors
    assert all(p.node == e for p, e, u in zip(first, expected, batch.unsure) if not u)
    idx = np.where(batch.unsure)[0]  # ... then routes them again with their mirrors, in one pass
    again, _, _ = combined._run([inputs[i] for i in idx], [names[i] for i in idx], MirrorMode.ALL,
                                feats={g: f[idx] for g, f in batch.feats.items()})
    assert [p.node for p in again] == [expected[i] for i in idx]
    _, scores = combined.predict_and_score(inputs, names, combined=True)
    assert [pred.flat.class_nodes[j] for j in scores[COMBINED_SCORES].argmax(1)] == expected


def _image_test_set(tree: Path) -> TestSet:
    test, _ = scan_test_tree(tree)
    bad = tree / "angular" / "box" / "zz_truncated.jpg"
    bad.write_bytes((tree / "angular" / "box" / "img_000.jpg").read_bytes()[:200])
    return TestSet(test.paths + [str(bad)], test.leaves + ["angular/box"], "fixture")


@pytest.mark.parametrize("min_confidence", [0.0, 0.9])
def test_predict_test_set_with_numpy_models(two_level_tree, tmp_path, min_confidence):
    hier = Hierarchy.from_leaf_paths(["angular/box", "angular/tri", "round/circle", "round/plus"])
    pred = _numpy_predictor(hier, min_confidence)
    test = _image_test_set(two_level_tree)
    preds, local, combined = predict_test_set(pred, test, batch_size=5, workers=2)
    assert [p.path for p in preds] == test.paths
    assert preds[-1].error and not any(p.error for p in preds[:-1])
    # every readable image has a local choice at the root and at its own parent, none elsewhere
    for i, leaf in enumerate(test.leaves[:-1]):
        assert local[""][i] in hier.nodes[""].children
        parent = leaf.split("/")[0]
        assert local[parent][i] in hier.nodes[parent].children
        other = "round" if parent == "angular" else "angular"
        assert local[other][i] is None
        # where the chain went through a node, the node's local choice is the chain's decision there
        ids = preds[i].node_ids
        if ids:
            assert local[""][i] == ids[0]
        if len(ids) == 2 and ids[0] == parent:
            assert local[parent][i] == ids[1]
    assert all(ch[-1] is None for ch in local.values())
    if min_confidence:
        assert any(not p.complete for p in preds[:-1])  # some walks stop above a leaf
    ok = range(len(preds) - 1)
    res = assemble_results(hier, [test.leaves[i] for i in ok], [preds[i].node_ids for i in ok],
                           {n: [c[i] for i in ok] for n, c in local.items()}, [preds[i].flat_leaf for i in ok])
    assert res["n_images"] == 24
    assert res["nodes"]["parent"]["n_true"] == 24 and res["nodes"]["round"]["n_true"] == 12
    for nd in res["nodes"].values():
        assert nd["n_routed"] <= nd["n_true"]
    files = write_outputs(hier, {**res, "n_unreadable": 1, "runtime": "numpy"}, tmp_path / "out")
    assert all(f.exists() for f in files)


# ------------------------------------------------------------------------------------- the script
def test_script_refuses_unknown_classes(two_level_tree, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    trained = Hierarchy.from_leaf_paths(["angular/box", "angular/tri", "round/circle"])
    (models / "hierarchy.json").write_text(json.dumps({"tree": trained.to_dict()}))
    r = subprocess.run([PY, str(REPO / "src" / "evaluate.py"), "--models-dir", str(models), "--data", str(two_level_tree),
                        "--output", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "not trained on: round/plus" in r.stderr
    assert r.stderr.startswith(f"error: --data: the folder tree {two_level_tree} has classes")  # the script's flag
    assert not (tmp_path / "out" / "results.json").exists()


def test_evaluate_without_prepared_data(tmp_path):
    from hiernet.evaluation import evaluate

    models = tmp_path / "models"
    models.mkdir()
    (models / "hierarchy.json").write_text(json.dumps({"tree": HIER.to_dict()}))
    with pytest.raises(UserError, match="prepare_dataset.py") as err:
        evaluate(models, data_dir=tmp_path / "split")
    assert err.value.arg == "data_dir" and "--" not in str(err.value).split("; run:")[0]  # no flag in the library
    with pytest.raises(UserError, match="no trained models"):
        evaluate(tmp_path / "no-models", data_dir=tmp_path / "split")


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_prepare_train_evaluate(two_level_tree, tmp_path):
    split, models, cache, out = tmp_path / "split", tmp_path / "models", tmp_path / "cache", tmp_path / "out"

    def run(*argv, timeout=900):
        r = subprocess.run([PY, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
        assert r.returncode == 0, f"{argv}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        return r

    run(REPO / "prepare_dataset.py", "-p", two_level_tree, "-o", split, "-q")
    nodes = run(REPO / "src" / "train.py", "--list-nodes", "--data-dir", split).stdout.split()
    assert nodes == ["parent", "angular", "round"]
    for node in nodes + ["flat"]:
        run(REPO / "src" / "train.py", "-d", node, "--data-dir", split, "--output-dir", models, "--cache-dir", cache,
            "--backbone", "efficientnet-lite0", "--image-size", "64", "--epochs", "3", "--views", "0", "-q")
    r = run(REPO / "src" / "evaluate.py", "--data-dir", split, "--models-dir", models, "--output", out, "-q")
    assert "leaf accuracy (end-to-end)" in r.stdout and "flat baseline" in r.stdout

    for name in OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    keys = {"leaf_accuracy", "level_accuracy", "nodes", "error_attribution", "hierarchical_precision",
            "hierarchical_recall", "hierarchical_f1", "mistake_severity", "leaf_error", "per_leaf", "macro_f1",
            "n_images", "n_unreadable", "runtime", "flat", "comparison", "verdict", "mean_confidence", "confidence_ece"}
    assert keys <= set(res)
    assert 0 < res["mean_confidence"] <= 1 and 0 <= res["confidence_ece"] <= 1
    doc = json.loads((split / "hierarchy.json").read_text())
    assert res["n_images"] == sum(1 for im in doc["images"] if im["split"] == "test") > 0
    assert res["n_unreadable"] == 0

    fractions = [res[k] for k in ("leaf_accuracy", "leaf_error", "hierarchical_precision", "hierarchical_recall",
                                  "hierarchical_f1", "macro_f1")]
    fractions += res["level_accuracy"] + res["error_attribution"]
    fractions += [nd["local_accuracy"] for nd in res["nodes"].values()]
    for nd in res["nodes"].values():  # undefined (None) only when the chain routed none of its images there
        assert (nd["routed_accuracy"] is None) == (nd["n_routed"] == 0)
        fractions += [nd["routed_accuracy"]] if nd["n_routed"] else []
    fractions += [res["flat"][k] for k in ("leaf_accuracy", "macro_f1", "hierarchical_f1")] + res["flat"]["level_accuracy"]
    fractions += [s[k] for s in res["per_leaf"].values() for k in ("precision", "recall", "f1")]
    fractions += [res["comparison"]["p_value"]]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in fractions), res
    assert set(res["nodes"]) == {"parent", "angular", "round"}
    assert res["nodes"]["parent"]["n_true"] == res["n_images"]
    assert -1.0 <= res["comparison"]["difference"] <= 1.0
    md = (out / "results.md").read_text()
    assert "![graph](graph.png)" in md and "![matrix](matrix.png)" in md


def test_nodes_vs_flat_hand_computed(res):
    # parent: LOCAL wrong only on image 3 (5/6); flat's leaves mapped to top level: a,a,a,b,b,a -> wrong on 3 (5/6)
    # a (images 1, 2, 6): LOCAL x,x,y -> right, wrong, right (2/3); flat x,y,x -> right, right, wrong (2/3)
    # b (images 3, 4, 5): LOCAL z,z,z -> right, wrong, right (2/3); flat a/y (outside b), w, z -> wrong, right, right
    rows = res["nodes_vs_flat"]
    assert list(rows) == ["parent", "a", "b"]
    assert rows["parent"]["node"] == "root" and rows["parent"]["n"] == 6
    assert rows["parent"]["lcpn_accuracy"] == rows["parent"]["flat_accuracy"] == pytest.approx(5 / 6)
    assert rows["parent"]["winner"] == "tie" and rows["parent"]["lcpn_only"] == rows["parent"]["flat_only"] == 0
    assert (rows["a"]["lcpn_only"], rows["a"]["flat_only"]) == (1, 1) and rows["a"]["winner"] == "tie"
    assert rows["b"]["lcpn_accuracy"] == rows["b"]["flat_accuracy"] == pytest.approx(2 / 3)
    assert (rows["b"]["lcpn_only"], rows["b"]["flat_only"]) == (1, 1)
    # a node where one side wins
    one = assemble_results(HIER, ["a/x", "a/y", "a/y"], [["a", "a/x"]] * 3,
                           {"": ["a", "a", "a"], "a": ["a/x", "a/y", "a/y"], "b": [None] * 3}, ["a/x", "a/x", "b/z"])
    a = one["nodes_vs_flat"]["a"]
    assert (a["lcpn_accuracy"], a["flat_accuracy"], a["winner"]) == (1.0, pytest.approx(1 / 3), "lcpn")
    assert (a["lcpn_only"], a["flat_only"]) == (2, 0) and a["p_value"] == pytest.approx(0.5)
    b = one["nodes_vs_flat"]["b"]
    assert b["n"] == 0 and b["winner"] is None and b["lcpn_accuracy"] is None
    md = render_markdown({**one, "n_unreadable": 0, "runtime": "onnx"})
    assert "## Does the hierarchy pay, node by node?" in md
    assert "| a | 3 | 1.0000 | 0.3333 | 0.6667 | 2 | 0 | 0.500 | LCPN (not significant) |" in md
    json.dumps(one, allow_nan=False)


def test_results_md_says_which_node_accuracy_it_is(res):
    # issue 16, bug 9: performance.txt (full mirror averaging) and evaluate (selective, as predict) differ
    md = render_markdown({**res, "n_unreadable": 0, "runtime": "onnx"})
    assert "local accuracy (as predict routes it, selective mirror)" in md
    assert "`performance.txt`" in md and "averages every test image with its mirror image" in md
    lines = summary_lines({**res, "n_unreadable": 0, "runtime": "onnx"})
    node_line = next(line for line in lines if line.startswith("each node's decision, LCPN vs flat: "))
    assert "parent 0.833 vs 0.833, a 0.667 vs 0.667, b 0.667 vs 0.667" in node_line
    assert "performance.txt mirror-averages every image" in node_line


# ------------------------------------------------------------------------------------- the script on tiny models
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny trained pipeline: prepare, then each node and flat with Lite0 at 64 px (a few seconds each)."""
    from conftest import TWO_LEVEL, make_tree

    base = tmp_path_factory.mktemp("tiny")
    data = make_tree(base / "data", TWO_LEVEL)
    split, models, cache = base / "split", base / "models", base / "cache"

    def run(*argv):
        r = subprocess.run([PY, *map(str, argv)], capture_output=True, text=True, timeout=600, cwd=base)
        assert r.returncode == 0, f"{argv}\n{r.stdout}\n{r.stderr}"

    run(REPO / "prepare_dataset.py", "-p", data, "-o", split, "-q")
    for node in ("parent", "angular", "round", "flat"):
        run(REPO / "src" / "train.py", "-d", node, "--data-dir", split, "--output-dir", models, "--cache-dir", cache,
            "--backbone", "efficientnet-lite0", "--image-size", "64", "--epochs", "2", "--views", "0", "-q")
    return {"base": base, "data": data, "split": split, "models": models}


def _evaluate_cli(tiny, *args):
    return subprocess.run([PY, str(REPO / "src" / "evaluate.py"), "--models-dir", str(tiny["models"]), "-q", *args],
                          capture_output=True, text=True, timeout=600, cwd=tiny["base"])


@pytest.mark.slow  # trains tiny models (~1-2 min on 2 cores)
def test_cli_default_output_keeps_the_published_results(tiny):
    # issue 16, bug 6: no --output used to overwrite the tracked result_images/ with these models' results
    published = {f: (REPO / "result_images" / f).read_bytes() for f in ("results.json", "results.md", "graph.png",
                                                                        "matrix.png")}
    r = _evaluate_cli(tiny, "--data-dir", tiny["split"])
    assert r.returncode == 0, r.stderr
    wrote = next(line for line in r.stdout.splitlines() if line.startswith("wrote "))
    run_dir = Path(wrote.split()[1].rstrip(",")).parent
    try:
        assert run_dir.parent == REPO / "result_images" / "runs"
        for f, data in published.items():
            assert (REPO / "result_images" / f).read_bytes() == data, f"{f} was overwritten"
        res = json.loads((run_dir / "results.json").read_text())
        assert run_dir.name.endswith("-" + res["models_fingerprint"][:8]) and len(res["models_fingerprint"]) == 16
        assert (run_dir / "report.html").stat().st_size > 0
        assert subprocess.run(["git", "check-ignore", "-q", str(run_dir / "results.json")], cwd=REPO).returncode == 0
        assert res["nodes"]["parent"]["node"] == "root" and set(res["nodes_vs_flat"]) == {"parent", "angular", "round"}
        assert len(res["images"]) == res["n_images"] and res["seen_in_training"] == {}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.slow  # trains tiny models (~1-2 min on 2 cores)
def test_cli_data_warns_about_training_images(tiny, tmp_path):
    out = tmp_path / "out"
    doc = json.loads((tiny["split"] / "hierarchy.json").read_text())
    n_train = sum(im["split"] == "train" for im in doc["images"])
    n_val = sum(im["split"] == "val" for im in doc["images"])
    # the whole original tree: its train and val images were training data (relative paths: messages resolve them)
    r = _evaluate_cli(tiny, "--data", "data", "--data-dir", "split", "--output", str(out))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "training data" in line]
    assert warnings == [f"warning: {n_train + n_val} of the {len(doc['images'])} images of {tiny['data']} were in "
                        f"the training data of {tiny['split']} ({n_train} train, {n_val} val; same file content): "
                        "their scores are optimistic"]
    res = json.loads((out / "results.json").read_text())
    assert res["seen_in_training"] == {"train": n_train, "val": n_val}
    # only the test images, copied into a tree of their own: no warning
    folder = dict(zip(doc["flat"]["class_nodes"], doc["flat"]["classes"]))
    fresh = tmp_path / "fresh"
    for im in doc["images"]:
        if im["split"] == "test":
            (fresh / im["leaf"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny["split"] / "flat" / "test" / folder[im["leaf"]] / im["file"], fresh / im["leaf"] / im["file"])
    r = _evaluate_cli(tiny, "--data", str(fresh), "--data-dir", str(tiny["split"]), "--output", str(out))
    assert r.returncode == 0 and "training data" not in r.stderr, r.stderr
    assert json.loads((out / "results.json").read_text())["seen_in_training"] == {"train": 0, "val": 0}


@pytest.mark.slow  # trains tiny models (~1-2 min on 2 cores)
def test_cli_messages_show_absolute_paths(tiny, tmp_path):
    r = _evaluate_cli(tiny, "--models-dir", "no-such-models", "--data-dir", str(tiny["split"]))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"no trained models in {tiny['base'] / 'no-such-models'}" in r.stderr


def test_combined_decision_hand_computed():
    # one image; root: a 0.6, b 0.4; a: x 0.5, y 0.5; b: z 0.9, w 0.1
    ch = {nid: HIER.nodes[nid].children for nid in ("", "a", "b")}
    given = {"": {"a": 0.6, "b": 0.4}, "a": {"a/x": 0.5, "a/y": 0.5}, "b": {"b/z": 0.9, "b/w": 0.1}}
    probs = {nid: np.array([[given[nid][c] for c in ch[nid]]]) for nid in ch}
    leaves = ["a/x", "a/y", "b/z", "b/w"]
    np.testing.assert_allclose(lcpn_leaf_probs(HIER, probs, leaves), [[0.3, 0.3, 0.36, 0.04]])
    # LCPN alone: b/z (0.36); flat alone: a/y (0.5); combined: a/y (0.3*0.5=0.15 > 0.36*0.2=0.072)
    assert combined_leaves(HIER, probs, np.array([[0.1, 0.5, 0.2, 0.2]]), leaves) == ["a/y"]
    # a flat model that agrees with LCPN's leaf keeps it
    assert combined_leaves(HIER, probs, np.array([[0.25, 0.25, 0.25, 0.25]]), leaves) == ["b/z"]
    res = assemble_results(HIER, TRUE, PATHS, LOCAL, FLAT, combined_leaves=["a/x", "a/y", "b/z", "b/w", "b/z", "a/x"])
    assert res["combined"]["leaf_accuracy"] == pytest.approx(5 / 6)  # wrong on image 6 only
    assert (res["combined"]["vs_lcpn"]["a_only"], res["combined"]["vs_lcpn"]["b_only"]) == (3, 0)  # images 2, 3, 4
    md = render_markdown({**res, "n_unreadable": 0, "runtime": "onnx"})
    assert "| leaf accuracy | 0.3333 | 0.6667 | 0.8333 |" in md
    assert any(line.startswith("combined decision (flat leaf probability x LCPN path probability") for line in summary_lines(res))


def test_predict_test_set_combined_matches_path_products(two_level_tree):
    hier = Hierarchy.from_leaf_paths(["angular/box", "angular/tri", "round/circle", "round/plus"])
    test = _image_test_set(two_level_tree)
    assert predict_test_set(_numpy_predictor(hier), test, batch_size=5)[2] is None  # a node with its own network
    pred = _numpy_predictor(hier, all_heads=True)
    preds, local, combined = predict_test_set(pred, test, batch_size=5, workers=2)
    assert combined[-1] is None and preds[-1].error
    inputs = [x for _, x, _ in next(iter(pred.prepared_batches(test.paths[:-1], batch_size=100)))]
    classifiers = hier.classifier_nodes()
    _, scores = pred.predict_and_score(inputs, test.paths[:-1], {nid: list(range(len(inputs))) for nid in classifiers})
    images = np.stack([x[(16, "squash")] for x in inputs])
    flat_probs = _softmax(pred.flat.head(pred.backbones["bb0"][0](images)))  # the flat head has no mirror
    for i in range(len(inputs)):
        joint = {}
        for j, leaf in enumerate(pred.flat.class_nodes):
            top, _ = leaf.split("/")
            p_top = scores[""][i][hier.nodes[""].children.index(top)]
            p_leaf = scores[top][i][hier.nodes[top].children.index(leaf)]
            joint[leaf] = p_top * p_leaf * flat_probs[i][j]
        assert combined[i] == max(joint, key=joint.get)
    assert len(set(combined[:-1])) > 1


@pytest.mark.parametrize("script", ["evaluate.py", "export.py"])
def test_help_has_no_restructuredtext_leftovers(script):
    r = subprocess.run([PY, str(REPO / "src" / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Example" in r.stdout
    assert "::" not in r.stdout and "``" not in r.stdout


def test_markdown_shows_display_names_of_a_catalogue_tree(res):
    display = {"a": "Alpha & co", "b/z": "Zed | Z"}
    md = render_markdown({**res, "n_unreadable": 0, "runtime": "onnx", "display": display})
    assert "| Alpha & co / x |" in md and "| b / Zed \\| Z |" in md  # per leaf, escaped for the table
    assert "| a | below Alpha & co |" in md  # per node: what the classifier sorts
    assert "| parent (top level) |" in md and "| a (Alpha & co) |" in md  # node by node vs flat
    plain = render_markdown({**res, "n_unreadable": 0, "runtime": "onnx"})
    assert "| a/x |" in plain and "| a | below `a` |" in plain and "Alpha" not in plain


def test_evaluate_shows_the_display_names_of_the_models_tree(pipeline, tmp_path):
    """evaluate.py on models whose hierarchy.json has display names (as a catalogue CSV's has): results.json
    records them, results.md and report.html show them; numbers and ids are those of the plain models."""
    import json
    import shutil

    models = tmp_path / "models"
    shutil.copytree(pipeline["models"], models)
    doc = json.loads((models / "hierarchy.json").read_text())
    doc["display"] = {"apparel": "Apparel & Co", "apparel/upper/tee": "T-Shirts / Tops"}
    (models / "hierarchy.json").write_text(json.dumps(doc))
    outs = {}
    for name, folder in (("plain", pipeline["models"]), ("shop", models)):
        r = subprocess.run([PY, str(REPO / "src" / "evaluate.py"), "--models-dir", str(folder), "--data-dir",
                            str(pipeline["split"]), "--output", str(tmp_path / name), "-q"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        outs[name] = {f: (tmp_path / name / f).read_text(encoding="utf-8") for f in ("results.json", "results.md", "report.html")}
    plain, shop = json.loads(outs["plain"]["results.json"]), json.loads(outs["shop"]["results.json"])
    assert "display" not in plain and shop["display"] == doc["display"]
    assert shop["leaf_accuracy"] == plain["leaf_accuracy"] and list(shop["per_leaf"]) == list(plain["per_leaf"])
    assert "| Apparel & Co / upper / T-Shirts / Tops |" in outs["shop"]["results.md"]
    assert "| apparel/upper/tee |" in outs["plain"]["results.md"] and "Apparel & Co" not in outs["plain"]["results.md"]
    assert "<b>Apparel &amp; Co</b>" in outs["shop"]["report.html"] and "T-Shirts / Tops" in outs["shop"]["report.html"]
