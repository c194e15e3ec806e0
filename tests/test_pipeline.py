"""End to end: prepare_dataset.py → train_lcpn.sh → predict.py on a tiny generated tree.

One module-scoped run on a 3-level tree with leaves at different depths, a one-child parent
(``apparel/lower`` → ``box``), two sibling classifier nodes (``apparel`` and ``accessories``, two classes
each) and a class name used under two parents (``apparel/lower/box`` and ``accessories/box``), with the
smallest backbone setting (Lite0 at 64 px, a few epochs), exercises every script the README shows.

Assertions do not depend on how well the tiny models learned: the predictor's results are compared with
what each node's own ``model.pth`` gives (``reference``), so a head used for the wrong node, a walk that
stops early or a distribution that is not the node's own makes a test fail.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, REPO, THREE_LEVEL, make_tree, run

# THREE_LEVEL, FAST, run and the session-scoped ``pipeline`` fixture live in conftest.py (shared with
# test_predict_cli.py, so the tiny models are trained once per test session).
LEAVES = ["accessories/box", "accessories/hat", "apparel/lower/box", "apparel/upper/shirt", "apparel/upper/tee"]
NODE_FILES = ["model.pth", "bin/encoder.pickle", "bin/test_transforms.pickle", "bin/inv_normalize.pickle",
              "class_plot.png", "confusion_matrix.png", "error_plot.png", "wrong_plot.png", "performance.txt",
              "metrics.json", "log.csv"]


def predict(pipeline, *args, check=True, models=None):
    return run([sys.executable, str(REPO / "src" / "predict.py"), "--models-dir", str(models or pipeline["models"]),
                *map(str, args)], cwd="/", check=check)


def every_leaf(pipeline, k=2) -> list[str]:
    """``k`` images of every leaf (so every classifier node, two-class heads included, gets images)."""
    return [str(p) for leaf in LEAVES for p in sorted((pipeline["data"] / leaf).glob("*.jpg"))[:k]]


@pytest.fixture(scope="module")
def reference(pipeline):
    """Every classifier node's own distribution on every image, straight from its ``model.pth``.

    Returns ``{"hier": Hierarchy, "dist": {node id: {image path: {child id: probability}}}}``.
    """
    import torch

    from hiernet.artifacts import build_torch_model, load_node
    from hiernet.images import load_rgb, resize_for_model, to_array
    from hiernet.predictor import read_models_hierarchy

    hier, _ = read_models_hierarchy(pipeline["models"])
    paths = [str(p) for p in sorted(pipeline["data"].rglob("*.jpg"))]
    dist, shared = {}, {}
    for nid in hier.classifier_nodes():
        art = load_node(pipeline["models"] / hier.nodes[nid].dataset)
        backbone, head, _ = build_torch_model(art, shared)
        bb = art.config["backbone"]
        x = torch.from_numpy(np.stack([to_array(resize_for_model(load_rgb(p), bb["image_size"], bb["resize"]))
                                       for p in paths]))
        with torch.no_grad():
            p = torch.softmax(head(backbone(x)).double(), dim=1).numpy()
        dist[nid] = {path: dict(zip(art.class_nodes, row)) for path, row in zip(paths, p)}
    return {"hier": hier, "dist": dist}


def walk(reference, path: str) -> list[tuple[str, float, dict]]:
    """The path an image must take: per level (chosen child id, its probability, the node's distribution)."""
    hier, out, cur = reference["hier"], [], ""
    while hier.nodes[cur].children:
        kids = hier.nodes[cur].children
        d = {kids[0]: 1.0} if len(kids) == 1 else reference["dist"][cur][path]
        cur = max(d, key=d.get)
        out.append((cur, d[cur], d))
    return out


def test_prepare_writes_one_dataset_per_classifier_node(pipeline):
    split = pipeline["split"]
    doc = json.loads((split / "hierarchy.json").read_text())
    assert set(doc["datasets"]) == {"parent", "apparel", "apparel__upper", "accessories"}
    assert doc["datasets"]["apparel__upper"]["classes"] == ["shirt", "tee"]
    for ds in ["parent", "apparel", "apparel__upper", "accessories", "flat"]:
        for s in ["train", "val", "test"]:
            assert (split / ds / s).is_dir()
    # one-child parents get no dataset but are in the tree
    nodes = {n["id"]: n for n in doc["tree"]["nodes"]}
    assert nodes["apparel/lower"]["children"] == ["apparel/lower/box"]
    assert "apparel__lower" not in doc["datasets"] and not (split / nodes["apparel/lower"]["dataset"]).exists()
    # the one split: a file's split is the same in every dataset that holds it
    where = {}
    for ds in ["parent", "apparel", "apparel__upper", "accessories", "flat"]:
        for s in ["train", "val", "test"]:
            for f in (split / ds / s).rglob("*.jpg"):
                where.setdefault(f.name, set()).add(s)
    assert where and all(len(v) == 1 for v in where.values())


def test_train_lcpn_writes_every_node_file(pipeline):
    models = pipeline["models"]
    assert "training node 'parent'" in pipeline["train"].stdout.splitlines()[0]
    for ds in ["parent", "apparel", "apparel__upper", "accessories", "flat"]:
        for f in NODE_FILES:
            assert (models / ds / f).is_file(), f"{ds}/{f} missing"
        perf = (models / ds / "performance.txt").read_text()
        assert "accuracy:" in perf and "macro F1:" in perf
        # the default recipe calibrates each head on its validation split (the fit itself: test_models.py)
        cal = json.loads((models / ds / "metrics.json").read_text())["calibration"]
        assert f"calibration: temperature {cal['temperature']:.3f}" in perf
    assert (models / "onnx" / "manifest.json").is_file()
    assert not list(models.glob(".*.tmp-*")), "staging folders left behind"


def test_model_pth_is_plain_weights_with_config(pipeline):
    import torch

    ck = torch.load(pipeline["models"] / "parent" / "model.pth", weights_only=True)
    assert ck["format"] == "fashion-hiernet-node"
    assert ck["config"]["node"]["classes"] == ["accessories", "apparel"]
    assert ck["config"]["backbone"]["name"] == "efficientnet-lite0" and ck["config"]["backbone"]["image_size"] == 64
    assert set(ck["state_dict"]) == {"head"}  # the frozen backbone is shared, not copied per node
    cal = json.loads((pipeline["models"] / "parent" / "metrics.json").read_text())["calibration"]
    assert abs(float(ck["state_dict"]["head"]["temperature"]) - cal["temperature"]) < 1e-6
    # the root's children are parents: its head is trained on the 4 leaves and sums them per child
    head = ck["config"]["head"]
    assert head["n_fine"] == 5 and head["fine_classes"] == LEAVES
    assert ck["state_dict"]["head"]["group"].tolist() == [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]
    leaf_parent = torch.load(pipeline["models"] / "apparel__upper" / "model.pth", weights_only=True)
    assert "n_fine" not in leaf_parent["config"]["head"]  # children are leaves: nothing finer to learn


def test_predict_json_walks_to_a_leaf_of_any_depth(pipeline, reference):
    imgs = every_leaf(pipeline, 3)
    rows = json.loads(predict(pipeline, "-p", *imgs, "--format", "json", "--topk", "2", "--runtime", "torch",
                              "--tta-below", "0").stdout)
    assert [r["path"] for r in rows] == imgs
    for r in rows:
        want = walk(reference, r["path"])
        assert r["complete"] is True and r["node"] == want[-1][0] and r["node"] in LEAVES
        # labels are the true path names from the top level down (routed by node id: 'box' is in two parents)
        assert r["labels"] == r["node"].split("/") == [nid.rsplit("/", 1)[-1] for nid, _, _ in want]
        assert r["probs"] == pytest.approx([p for _, p, _ in want], abs=1e-5)
        assert r["confidence"] == pytest.approx(float(np.prod(r["probs"])), abs=1e-5)
        if r["node"] == "apparel/lower/box":
            assert r["probs"][2] == 1.0  # a one-child parent passes through with probability 1
        # topk: per level, the routed node's K most likely classes, most likely first
        assert len(r["topk"]) == len(r["labels"])
        for level, (top, (nid, p, d)) in enumerate(zip(r["topk"], want)):
            expect = sorted(d.items(), key=lambda kv: -kv[1])[:2]
            assert [t["label"] for t in top] == [c.rsplit("/", 1)[-1] for c, _ in expect]
            assert [t["prob"] for t in top] == pytest.approx([q for _, q in expect], abs=1e-5)
            assert top[0]["label"] == r["labels"][level] and top[0]["prob"] == pytest.approx(r["probs"][level], abs=1e-6)
            assert all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:]))


def test_every_node_scores_with_its_own_model(pipeline, reference):
    """Each classifier node's distribution, on every image, is the one of its own model.pth (no swapped heads)."""
    from hiernet.predictor import HierarchicalPredictor

    imgs = every_leaf(pipeline, 2)
    for runtime in ("torch", "onnx"):
        pred = HierarchicalPredictor.load(pipeline["models"], runtime=runtime, tta_below=0.0)
        prepared = [x for batch in pred.prepared_batches(imgs, 32) for _, x, _ in batch]
        nodes = reference["hier"].classifier_nodes()
        _, scores = pred.predict_and_score(prepared, imgs, {nid: list(range(len(imgs))) for nid in nodes})
        for nid in nodes:
            cols = pred.nodes[nid].class_nodes
            want = np.array([[reference["dist"][nid][p][c] for c in cols] for p in imgs])
            assert np.abs(scores[nid] - want).max() < 1e-4, (runtime, nid)


def test_predict_text_prints_every_level_like_the_original(pipeline, reference):
    imgs = every_leaf(pipeline, 1)
    out = predict(pipeline, "-p", *imgs, "--runtime", "torch", "--tta-below", "0").stdout
    blocks = {b.splitlines()[0]: b for b in ("\n" + out).split("\n== ")[1:]}
    assert "Encoder: {0: 'accessories', 1: 'apparel'}" in out
    deep = 0
    for img in imgs:
        want = [nid.rsplit("/", 1)[-1] for nid, _, _ in walk(reference, img)]
        lines = blocks[img].splitlines()
        assert any(line.startswith(f"Parent class prediction:  {want[0]}  (p=") for line in lines)
        assert any(line.startswith(f"Final Prediction:  {want[-1]}  (p=") for line in lines)
        if len(want) == 3:
            deep += 1
            assert any(line.startswith(f"Level 2 prediction:  {want[1]}  (p=") for line in lines)
            upto = out[:out.index(blocks[img]) + len(blocks[img])]  # each encoder once, before its first use
            assert "Encoder: {0: 'lower', 1: 'upper'}" in upto
            assert want[1] != "upper" or "Encoder: {0: 'shirt', 1: 'tee'}" in upto
        assert lines[-1].startswith(f"Path: {' > '.join(want)}  (confidence ")
    assert deep, "no image reached the third level: the Level 2 line was not checked"
    encoders = [line for line in out.splitlines() if line.startswith("Encoder: ")]
    assert len(encoders) == len(set(encoders)) >= 3  # printed once each (the README's text format)


def test_predict_csv_folder_recursive_topk_and_output_file(pipeline, tmp_path):
    out = predict(pipeline, "-p", pipeline["data"] / "apparel", "--format", "csv", "--topk", "2").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in (pipeline["data"] / "apparel").rglob("*.jpg"))
    assert all(r["labels"] in LEAVES for r in rows)
    assert all(len(r["topk"].split(" | ")[0].split(";")) == 2 for r in rows)
    assert all(r["node"] == r["labels"] for r in rows)  # the node id column (here the label path)
    target = tmp_path / "sub" / "out.csv"
    proc = predict(pipeline, "-p", pipeline["data"] / "apparel", "--format", "csv", "--topk", "2", "-o", target)
    assert proc.stdout == "" and target.read_text() == out  # -o writes the same table to the file
    bad = predict(pipeline, "-p", pipeline["data"], "--tta-below", "1.5", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--tta-below" in bad.stderr


def test_min_confidence_stops_at_the_deepest_qualifying_node(pipeline, reference):
    imgs = every_leaf(pipeline, 3)
    # a threshold half-way between two path probabilities the models give, away from both
    products = sorted({round(float(np.prod([p for _, p, _ in walk(reference, i)[:d]])), 6)
                       for i in imgs for d in range(1, len(walk(reference, i)) + 1)})
    gaps = [(b - a, (a + b) / 2) for a, b in zip(products, products[1:]) if b - a > 2e-4]
    assert gaps, "the models give no two distinct path probabilities"
    threshold = min(gaps, key=lambda g: abs(g[1] - products[len(products) // 2]))[1]
    rows = json.loads(predict(pipeline, "-p", *imgs, "--format", "json", "--min-confidence", threshold,
                              "--runtime", "torch", "--tta-below", "0").stdout)
    depths = set()
    for r in rows:
        want = walk(reference, r["path"])
        keep = [nid for k, (nid, _, _) in enumerate(want) if np.prod([p for _, p, _ in want[:k + 1]]) >= threshold]
        assert r["node"] == (keep[-1] if keep else "") and r["labels"] == [n.rsplit("/", 1)[-1] for n in keep]
        assert r["complete"] == (len(keep) == len(want))
        assert not keep or r["confidence"] >= threshold  # what is returned meets the threshold ...
        depths.add(len(keep))
    assert len(depths) > 1 and max(depths) > 0  # ... and walks stop at different depths, not all at the root


def test_onnx_and_torch_agree(pipeline):
    from hiernet.predictor import HierarchicalPredictor

    imgs = every_leaf(pipeline, 2)
    a = HierarchicalPredictor.load(pipeline["models"], runtime="onnx", with_flat=True, topk=5, tta_below=1.0,
                                   precision="fp32")
    b = HierarchicalPredictor.load(pipeline["models"], runtime="torch", with_flat=True, topk=5, tta_below=1.0)
    assert a.runtime == "onnx" and b.runtime == "torch"
    pa, pb = a.predict_paths(imgs), b.predict_paths(imgs)
    for x, y in zip(pa, pb):
        assert x.node_ids == y.node_ids
        assert np.max(np.abs(np.array(x.probs) - np.array(y.probs))) < 1e-4
        # every level's full distribution (topk 5 >= any node's class count), not only the chosen class
        assert len(x.topk) == len(y.topk)
        for lx, ly in zip(x.topk, y.topk):
            dx, dy = dict(lx), dict(ly)
            assert set(dx) == set(dy) and max(abs(dx[k] - dy[k]) for k in dx) < 1e-4
        assert x.flat_leaf == y.flat_leaf and abs(x.flat_prob - y.flat_prob) < 1e-4


def test_stale_onnx_export_is_not_used(pipeline, tmp_path):
    import shutil

    from hiernet.predictor import HierarchicalPredictor, onnx_problem, read_models_hierarchy

    models = tmp_path / "models"
    shutil.copytree(pipeline["models"], models)
    hier, _ = read_models_hierarchy(models)
    assert onnx_problem(models, hier) is None
    with open(models / "apparel" / "model.pth", "ab") as fh:  # any change to a model makes the export stale
        fh.write(b"\0")
    assert "older than its model.pth" in onnx_problem(models, hier)
    proc = run([sys.executable, str(REPO / "src" / "predict.py"), "--models-dir", str(models), "--runtime", "onnx",
                "-p", str(next(pipeline["data"].rglob("*.jpg")))], check=False)
    assert proc.returncode == 2 and "export.py" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_models_give_one_line(pipeline, tmp_path):
    proc = run([sys.executable, str(REPO / "src" / "predict.py"), "--models-dir", str(tmp_path / "none"),
                "-p", str(next(pipeline["data"].rglob("*.jpg")))], check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "train_lcpn.sh" in proc.stderr


def test_train_lcpn_help_prints_its_whole_header_then_train_py_flags():
    out = run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--help"]).stdout
    head, _, flags = out.partition("train.py flags:")
    assert head.startswith("Train every local classifier") and "--preset fast" in head
    assert "TORCHRUN_ARGS (torchrun's launch flags" in head and "NO_EXPORT=1" in head  # the header's last lines
    assert "set -euo" not in head and not any(line.startswith("#") for line in head.splitlines())
    assert "--preset {cpu,fast,original}" in flags


@pytest.mark.slow
def test_train_lcpn_spreads_nodes_over_gpu_slots_and_names_a_failed_node(tmp_path):
    """GPUS=a,b runs independent nodes concurrently (one per slot); here the slots are CPU processes."""
    data = make_tree(tmp_path / "catalogue", THREE_LEVEL, per_leaf=5)
    split, models = tmp_path / "split", tmp_path / "models"
    run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(data), "-o", str(split), "-q"])
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=str(split), MODELS_DIR=str(models), GPUS="0,1",
               NO_EXPORT="1")
    proc = run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                *FAST], env=env)
    assert "on GPU 0" in proc.stdout and "on GPU 1" in proc.stdout
    for ds in ["parent", "apparel", "apparel__upper", "flat"]:
        assert (models / ds / "model.pth").is_file()
        assert (models / f".{ds}.train.log").is_file()
    # a node that cannot train is named, and the script fails
    env["NO_FLAT"] = "1"
    bad = run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--device", "cpu", "--epochs", "0"], env=env, check=False)
    assert bad.returncode != 0 and "training failed for node(s):" in bad.stderr


def test_selective_mirror_averaging_runs_the_mirror_only_where_unsure(pipeline, reference):
    from hiernet.predictor import HierarchicalPredictor

    imgs = every_leaf(pipeline, 2)
    from hiernet.predictor import MirrorPolicy

    pred = HierarchicalPredictor.load(pipeline["models"], runtime="onnx")
    assert pred.tta_below == HierarchicalPredictor.DEFAULT_TTA_BELOW
    (group, (run, size, resize)), = pred.backbones.items()
    seen = []
    pred.backbones[group] = (lambda x: (seen.append(len(x)), run(x))[1], size, resize)
    results = {}
    for below in (0.0, 1.0, 0.6):
        seen.clear()
        results[below] = pred.with_options(mirror=MirrorPolicy(below)).predict_paths(imgs, batch_size=16)
        results[below, "forwards"] = sum(seen)
    n = len(imgs)
    assert results[0.0, "forwards"] == n  # one backbone pass per image, whatever the depth
    assert results[1.0, "forwards"] == 2 * n  # each image's mirror computed once, shared by every level
    # a mirror exactly for the images some node on their path is unsure about (top probability < 0.6)
    unsure = sum(any(max(d.values()) < 0.6 for _, _, d in walk(reference, i)) for i in imgs)
    assert results[0.6, "forwards"] == n + unsure
    for a, b in zip(results[0.6], results[1.0]):  # where the plain view is sure, the mirror changes nothing
        if min(a.probs) >= 0.99:
            assert a.node_ids == b.node_ids


@pytest.mark.slow  # two networks trained twice and exported: minutes on 2 cores
def test_composite_backbone_trains_exports_and_predicts_with_one_pass(tmp_path):
    """The default recipe's kind of backbone (two networks on one input), at the smallest setting."""
    from hiernet.predictor import HierarchicalPredictor

    data = make_tree(tmp_path / "cat", {"tops": {"tee": "ellipse", "shirt": "cross"}, "bottoms": {"skirt": "triangle"}},
                     per_leaf=6)
    split, models = tmp_path / "split", tmp_path / "models"
    run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(data), "-o", str(split), "-q"])
    fast = ["--backbone", "efficientnet-lite0+efficientnet-lite1", "--image-size", "64", "--epochs", "3", "--views", "1", "-q"]
    for ds in ("parent", "tops"):
        run([sys.executable, str(REPO / "src" / "train.py"), "-d", ds, "--data-dir", str(split), "--output-dir", str(models),
             "--cache-dir", str(tmp_path / "cache"), *fast], cwd="/")
    cfg = json.loads((models / "tops" / "metrics.json").read_text())
    assert cfg["node"] == "tops"
    run([sys.executable, str(REPO / "src" / "export.py"), "--models-dir", str(models)], cwd="/")
    imgs = [str(p) for p in sorted(data.rglob("*.jpg"))]
    a = HierarchicalPredictor.load(models, runtime="onnx")
    b = HierarchicalPredictor.load(models, runtime="torch")
    assert a.runtime == "onnx" and len(a.backbones) == 1  # both nodes share the one composite pass
    for x, y in zip(a.predict_paths(imgs), b.predict_paths(imgs)):
        assert x.complete and x.node_ids == y.node_ids
        assert np.max(np.abs(np.array(x.probs) - np.array(y.probs))) < 1e-4


def test_decoding_ahead_or_batch_by_batch_gives_the_same_predictions(pipeline, tmp_path):
    from hiernet.predictor import HierarchicalPredictor

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    imgs = every_leaf(pipeline, 2) + [str(bad)]
    pred = HierarchicalPredictor.load(pipeline["models"], runtime="onnx")
    assert pred.prefetch_batches == 0  # CPU: no decoding threads competing with onnxruntime's
    now = pred.predict_paths(imgs, batch_size=4)
    ahead = pred.with_options(prefetch_batches=2).predict_paths(imgs, batch_size=4)
    assert [p.path for p in now] == [p.path for p in ahead] == imgs
    assert [p.node_ids for p in now] == [p.node_ids for p in ahead]
    assert not now[-1].complete and now[-1].error and all(p.complete for p in now[:-1])


@pytest.mark.parametrize("batch_size", [3, 16])
def test_mirror_passes_are_gathered_across_batches_with_the_same_results(pipeline, batch_size):
    from hiernet.predictor import HierarchicalPredictor, MirrorPolicy

    imgs = every_leaf(pipeline, 3)[:14]
    loaded = HierarchicalPredictor.load(pipeline["models"], runtime="onnx", with_flat=True)
    plain = loaded.with_options(mirror=MirrorPolicy(0.0)).predict_paths(imgs)
    # a threshold half-way between two images' lowest probabilities: about half of them are unsure somewhere
    lows = sorted({min(p.probs + [p.flat_prob]) for p in plain})
    assert len(lows) >= 2, "every image has the same lowest probability"
    pred = loaded.with_options(mirror=MirrorPolicy((lows[len(lows) // 2 - 1] + lows[len(lows) // 2]) / 2))
    inline = []  # the reference: every batch routed with its mirror passes inline
    for prepared in pred.prepared_batches(imgs, batch_size):
        inline += pred.predict_arrays([x for _, x, _ in prepared], [imgs[i] for i, _, _ in prepared])
    (group, (run, size, resize)), = pred.backbones.items()
    calls = []
    pred.backbones[group] = (lambda x: (calls.append(len(x)), run(x))[1], size, resize)
    gathered = pred.predict_paths(imgs, batch_size=batch_size)
    assert [p.path for p in gathered] == imgs
    for a, b in zip(gathered, inline):
        assert a.node_ids == b.node_ids and a.flat_leaf == b.flat_leaf
        assert np.allclose(a.probs, b.probs, atol=1e-6) and abs(a.flat_prob - b.flat_prob) < 1e-6
    n_batches = -(-len(imgs) // batch_size)
    unsure = sum(1 for p in plain if min(p.probs + [p.flat_prob]) < pred.tta_below)
    assert 0 < unsure < len(imgs)  # by the choice of the threshold
    assert sum(calls) == len(imgs) + unsure  # one pass per image, one mirror per unsure image, never more
    # the mirrors go in full batches, not one small pass per batch and level
    assert len(calls) <= n_batches + -(-unsure // batch_size)


@pytest.mark.slow  # a benchmark's helper: ~30 s
def test_predict_speed_bench_reports_every_figure(pipeline, tmp_path):
    out = tmp_path / "speed.md"
    run([sys.executable, str(REPO / "bench" / "predict_speed.py"), "--images", str(pipeline["data"]), "--n", "12",
         "--models-dir", str(pipeline["models"]), "--repeats", "1", "--first-repeats", "1", "--seed-style-n", "4",
         "--batch-size", "4", "--out", str(out)], cwd="/")
    rep = json.loads(out.with_suffix(".json").read_text())
    raw, steady, whole = rep["raw"]["images_per_s"], rep["in_process"]["images_per_s"], rep["predict"]["images_per_s"]
    assert rep["n_images"] == 12 and raw > 0 and steady > 0 and whole > 0
    assert [t["name"] for t in rep["targets"]][2].startswith("decoding, routing and hierarchy")
    md = out.read_text()
    for row in ("a. predict.py, whole process", "b. predict.py, 1 image", "c. raw network forwards",
                "d. seed-style", "e. prediction in-process", "overhead of the whole predict.py process"):
        assert row in md


def test_readme_chain_evaluate_counts_what_predict_returns(pipeline, tmp_path):
    """prepare → train_lcpn.sh (the fixture) → predict → evaluate, all through the CLIs, on the test split."""
    doc = json.loads((pipeline["split"] / "hierarchy.json").read_text())
    test = [im for im in doc["images"] if im["split"] == "test"]
    assert {im["leaf"] for im in test} == set(LEAVES)
    imgs = [pipeline["data"] / im["path"] for im in test]
    rows = json.loads(predict(pipeline, "-p", *imgs, "--format", "json").stdout)
    assert [r["path"] for r in rows] == [str(p) for p in imgs]
    assert all(r["labels"] == r["node"].split("/") and r["node"] in LEAVES for r in rows)  # true path names
    right = sum(r["node"] == im["leaf"] for im, r in zip(test, rows))
    evaluate = [sys.executable, str(REPO / "src" / "evaluate.py"), "--models-dir", str(pipeline["models"]), "-q"]
    run([*evaluate, "--data-dir", str(pipeline["split"]), "-o", str(tmp_path / "split")], cwd="/")
    res = json.loads((tmp_path / "split" / "results.json").read_text())
    assert res["n_images"] == len(test) and res["leaf_accuracy"] == pytest.approx(right / len(test))
    for f in ("results.md", "graph.png", "matrix.png"):
        assert (tmp_path / "split" / f).is_file()
    # any tree of the same hierarchy (--data DIR), with --min-confidence: a stopped walk is not a right leaf
    rows = json.loads(predict(pipeline, "-p", pipeline["data"], "--format", "json", "--min-confidence", "0.9").stdout)
    truth = {str(p): str(p.parent.relative_to(pipeline["data"])) for p in pipeline["data"].rglob("*.jpg")}
    right = sum(r["complete"] and r["node"] == truth[r["path"]] for r in rows)
    run([*evaluate, "--data", str(pipeline["data"]), "--min-confidence", "0.9", "-o", str(tmp_path / "tree")], cwd="/")
    res = json.loads((tmp_path / "tree" / "results.json").read_text())
    assert res["n_images"] == len(truth) == len(rows) and res["leaf_accuracy"] == pytest.approx(right / len(truth))


def test_auto_runtime_falls_back_to_torch_on_a_stale_export(pipeline, reference, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(pipeline["models"], models)
    man = json.loads((models / "onnx" / "manifest.json").read_text())
    man["nodes"]["accessories"]["model_sha256"] = "0" * 64  # exported from another accessories/model.pth
    (models / "onnx" / "manifest.json").write_text(json.dumps(man))
    imgs = every_leaf(pipeline, 1)
    auto = predict(pipeline, "-p", *imgs, "--format", "json", "-v", "--tta-below", "0", models=models)
    assert "runtime: torch" in auto.stderr
    for r in json.loads(auto.stdout):  # what each node's model.pth gives
        assert r["node"] == walk(reference, r["path"])[-1][0]
        assert r["probs"] == pytest.approx([p for _, p, _ in walk(reference, r["path"])], abs=1e-5)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_onnx_file_gives_one_line(pipeline, tmp_path, damage):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(pipeline["models"], models)
    man = json.loads((models / "onnx" / "manifest.json").read_text())
    f = models / "onnx" / man["nodes"]["apparel__upper"]["file"]
    data = f.read_bytes()
    f.write_bytes({"garbage": b"\x08\x07not onnx" * 50, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    for runtime in ("onnx", "auto"):
        proc = predict(pipeline, "-p", every_leaf(pipeline, 1)[0], "--runtime", runtime, models=models, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
        assert f.name in proc.stderr and "damaged" in proc.stderr and "export.py" in proc.stderr


def test_export_is_not_published_past_its_tolerance(pipeline, tmp_path):
    import shutil

    from hiernet.exporting import export_models
    from hiernet.safeio import UserError

    models = tmp_path / "models"
    shutil.copytree(pipeline["models"], models)
    before = {p.name: p.read_bytes() for p in (models / "onnx").iterdir()}
    limit = json.loads((models / "onnx" / "manifest.json").read_text())["max_abs_diff"]
    assert 0 <= limit < 1e-4  # what the published export measured
    with pytest.raises(UserError, match="not published"):
        export_models(models, tolerance=limit / 2 if limit > 0 else 0.0)  # the same export, a stricter limit
    assert {p.name: p.read_bytes() for p in (models / "onnx").iterdir()} == before  # the previous export stays
    assert not [p for p in models.iterdir() if p.name.startswith(".onnx") and p.is_dir()]  # no staging left


@pytest.mark.slow  # three trainings (one fine-tuning a whole network) and an export
def test_fine_tuned_node_is_exported_and_predicted(tmp_path):
    """A node with its own fine-tuned network (``--mode finetune``) beside heads on the shared backbone."""
    import torch

    from conftest import TWO_LEVEL
    from hiernet.artifacts import build_torch_model, load_node
    from hiernet.predictor import HierarchicalPredictor

    data = make_tree(tmp_path / "cat", TWO_LEVEL, per_leaf=5)
    split, models = tmp_path / "split", tmp_path / "models"
    run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(data), "-o", str(split), "-q"], cwd="/")
    common = ["--data-dir", str(split), "--output-dir", str(models), "--cache-dir", str(tmp_path / "cache"),
              "--backbone", "efficientnet-lite0", "--image-size", "64", "--views", "0", "-q"]
    for ds, extra in (("parent", ["--epochs", "2"]), ("round", ["--epochs", "2"]),
                      ("angular", ["--mode", "finetune", "--epochs", "1", "--batch-size", "4"])):
        run([sys.executable, str(REPO / "src" / "train.py"), "-d", ds, *common, *extra], cwd="/")
    run([sys.executable, str(REPO / "src" / "export.py"), "--models-dir", str(models)], cwd="/")
    man = json.loads((models / "onnx" / "manifest.json").read_text())
    assert man["nodes"]["angular"]["backbone"] is None and man["nodes"]["parent"]["backbone"] is not None
    imgs = [str(p) for p in sorted(data.rglob("*.jpg"))]
    a = HierarchicalPredictor.load(models, runtime="onnx", topk=2, tta_below=0.0)
    b = HierarchicalPredictor.load(models, runtime="torch", topk=2, tta_below=0.0)
    assert a.nodes["angular"].full is not None and b.nodes["angular"].full is not None
    for x, y in zip(a.predict_paths(imgs), b.predict_paths(imgs)):
        assert x.complete and x.node_ids == y.node_ids
        for lx, ly in zip(x.topk, y.topk):
            dx, dy = dict(lx), dict(ly)
            assert set(dx) == set(dy) and max(abs(dx[k] - dy[k]) for k in dx) < 1e-4
    # the fine-tuned node scores every image with its own network, as its model.pth gives it
    backbone, head, own = build_torch_model(load_node(models / "angular"))
    assert own
    prepared = [x for batch in a.prepared_batches(imgs, 32) for _, x, _ in batch]
    _, scores = a.predict_and_score(prepared, imgs, {"angular": list(range(len(imgs)))})
    x = torch.from_numpy(np.stack([p[(64, "crop")] for p in prepared]))
    with torch.no_grad():
        want = torch.softmax(head(backbone(x)).double(), dim=1).numpy()
    assert np.abs(scores["angular"] - want).max() < 1e-4


FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for the interpreter: records which GPU each node got and when, sleeps per node
shift  # the script path (train.py / export.py)
case " $* " in
  *" --list-nodes "*) printf '%s\n' a b c d e; exit 0 ;;
esac
node=""
while (( $# )); do if [[ "$1" == "-d" ]]; then node="$2"; fi; shift; done
[[ -n "$node" ]] || exit 0
dur="${DURATIONS_default}"; var="DURATIONS_$node"; dur="${!var:-$dur}"
start=$(date +%s.%N)
trap 'kill $child 2>/dev/null; exit 143' TERM
sleep "$dur" & child=$!
# the pid file last: a TERM after it always finds the trap and the child (else an orphaned sleep would
# keep the test's pipes open under load)
echo $$ > "$LOGDIR/$node.pid"
wait $child
echo "$node $CUDA_VISIBLE_DEVICES $start $(date +%s.%N)" >> "$LOGDIR/runs.txt"
"""


def _fake_env(tmp_path, **extra):
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    logdir = tmp_path / "log"
    logdir.mkdir()
    env = dict(os.environ, PYTHON=str(fake), LOGDIR=str(logdir), DATA_DIR=str(tmp_path / "split"),
               MODELS_DIR=str(tmp_path / "models"), NO_FLAT="1", NO_EXPORT="1")
    env.update({"DURATIONS_default": "0.3", **extra})
    return env, logdir


def test_gpus_give_each_node_a_gpu_that_is_free(tmp_path):
    """A long node keeps its GPU: the next nodes go to the GPU that became free, never onto a busy one."""
    env, logdir = _fake_env(tmp_path, GPUS="0,1", DURATIONS_b="2")
    proc = run(["bash", str(REPO / "src" / "train_lcpn.sh")], env=env)
    runs = [line.split() for line in (logdir / "runs.txt").read_text().splitlines()]
    assert sorted(r[0] for r in runs) == ["a", "b", "c", "d", "e"], proc.stdout
    assert {r[1] for r in runs} == {"0", "1"}
    for i, (n1, g1, s1, e1) in enumerate(runs):
        for n2, g2, s2, e2 in runs[i + 1:]:
            overlap = float(s1) < float(e2) and float(s2) < float(e1)
            assert not (overlap and g1 == g2), f"nodes {n1} and {n2} ran on GPU {g1} at once"


def test_gpus_and_nproc_per_node_together_are_refused(tmp_path):
    env, logdir = _fake_env(tmp_path, GPUS="0,1", NPROC_PER_NODE="2")
    proc = run(["bash", str(REPO / "src" / "train_lcpn.sh")], env=env, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not both" in proc.stderr
    assert not (logdir / "runs.txt").exists()


def test_interrupting_train_lcpn_stops_the_running_nodes(tmp_path):
    import signal
    import time

    env, logdir = _fake_env(tmp_path, GPUS="0,1", DURATIONS_default="60")
    # SIGINT at its default in the child whatever this process ignores (bash cannot trap a signal ignored
    # on entry; pytest's process may ignore SIGINT after other tests, which made this time out in CI)
    proc = subprocess.Popen(["bash", str(REPO / "src" / "train_lcpn.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 30
    while len(list(logdir.glob("*.pid"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in logdir.glob("*.pid")]
    assert len(pids) == 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err

    def alive(pid):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    deadline = time.time() + 10  # signalled before the script exited; give a loaded machine time to act
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    survivors = [p for p in pids if alive(p)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "a node training outlived train_lcpn.sh"
