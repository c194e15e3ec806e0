"""End to end: prepare_dataset.py → train_lcpn.sh → predict.py on a tiny generated tree.

One module-scoped run on a 3-level tree with leaves at different depths and one-child parents
(``apparel/lower`` → ``box``, ``accessories`` → ``hat``), with the smallest backbone setting
(Lite0 at 64 px, a few epochs), exercises every script the README shows.
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

from conftest import REPO, make_tree

THREE_LEVEL = {
    "apparel": {"upper": {"tee": "ellipse", "shirt": "cross"}, "lower": {"box": "rectangle"}},
    "accessories": {"hat": "triangle"},
}
# fp32: these tests pin predictor behaviour on the tiny models (int8 has its own: tests/test_int8.py)
FAST = ["--backbone", "efficientnet-lite0", "--image-size", "64", "--epochs", "4", "--views", "1", "--precision", "fp32", "-q"]
NODE_FILES = ["model.pth", "bin/encoder.pickle", "bin/test_transforms.pickle", "bin/inv_normalize.pickle",
              "class_plot.png", "confusion_matrix.png", "error_plot.png", "wrong_plot.png", "performance.txt",
              "metrics.json", "log.csv"]


def run(args, cwd=None, check=True, env=None):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    data = make_tree(base / "catalogue", THREE_LEVEL, per_leaf=7)
    split, models, cache = base / "split", base / "models", base / "cache"
    prep = run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(data), "-o", str(split), "-q"], cwd="/")
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=str(split), MODELS_DIR=str(models))
    train = run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--cache-dir", str(cache), *FAST], cwd=str(base), env=env)
    return {"base": base, "data": data, "split": split, "models": models, "cache": cache, "prep": prep, "train": train}


def predict(pipeline, *args, check=True):
    return run([sys.executable, str(REPO / "src" / "predict.py"), "--models-dir", str(pipeline["models"]), *args],
               cwd="/", check=check)


def test_prepare_writes_one_dataset_per_classifier_node(pipeline):
    split = pipeline["split"]
    doc = json.loads((split / "hierarchy.json").read_text())
    assert set(doc["datasets"]) == {"parent", "apparel", "apparel__upper"}
    assert doc["datasets"]["apparel__upper"]["classes"] == ["shirt", "tee"]
    for ds in ["parent", "apparel", "apparel__upper", "flat"]:
        for s in ["train", "val", "test"]:
            assert (split / ds / s).is_dir()
    # one-child parents get no dataset but are in the tree
    nodes = {n["id"]: n for n in doc["tree"]["nodes"]}
    assert nodes["accessories"]["children"] == ["accessories/hat"]
    assert "accessories" not in doc["datasets"] and not (split / nodes["accessories"]["dataset"]).exists()
    # the one split: a file's split is the same in every dataset that holds it
    where = {}
    for ds in ["parent", "apparel", "apparel__upper", "flat"]:
        for s in ["train", "val", "test"]:
            for f in (split / ds / s).rglob("*.jpg"):
                where.setdefault(f.name, set()).add(s)
    assert where and all(len(v) == 1 for v in where.values())


def test_train_lcpn_writes_every_node_file(pipeline):
    models = pipeline["models"]
    assert "training node 'parent'" in pipeline["train"].stdout.splitlines()[0]
    for ds in ["parent", "apparel", "apparel__upper", "flat"]:
        for f in NODE_FILES:
            assert (models / ds / f).is_file(), f"{ds}/{f} missing"
        perf = (models / ds / "performance.txt").read_text()
        assert "accuracy:" in perf and "macro F1:" in perf
        # the default recipe calibrates each head on its validation split; the temperature is in the weights
        cal = json.loads((models / ds / "metrics.json").read_text())["calibration"]
        assert cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"] + 1e-9
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
    assert head["n_fine"] == 4 and head["fine_classes"] == ["accessories/hat", "apparel/lower/box",
                                                            "apparel/upper/shirt", "apparel/upper/tee"]
    assert ck["state_dict"]["head"]["group"].tolist() == [[1, 0], [0, 1], [0, 1], [0, 1]]
    leaf_parent = torch.load(pipeline["models"] / "apparel__upper" / "model.pth", weights_only=True)
    assert "n_fine" not in leaf_parent["config"]["head"]  # children are leaves: nothing finer to learn


def test_predict_json_walks_to_a_leaf_of_any_depth(pipeline):
    imgs = sorted(pipeline["data"].rglob("*.jpg"))[::3]
    out = predict(pipeline, "-p", *map(str, imgs), "--format", "json")
    rows = json.loads(out.stdout)
    assert len(rows) == len(imgs)
    for r in rows:
        assert r["complete"] is True
        assert len(r["labels"]) == len(r["probs"]) == len(r["node"].split("/"))
        assert r["node"] in {"apparel/upper/tee", "apparel/upper/shirt", "apparel/lower/box", "accessories/hat"}
        assert r["confidence"] == pytest.approx(float(np.prod(r["probs"])), abs=1e-5)
        if r["node"] == "accessories/hat":
            assert r["probs"][1] == 1.0  # a one-child parent passes through with probability 1
    # the tree is learnable: most training images come back with their own leaf
    truth = [str(p.parent.relative_to(pipeline["data"])) for p in imgs]
    acc = np.mean([r["node"] == t for r, t in zip(rows, truth)])
    assert acc >= 0.6


def test_predict_text_prints_both_phases_like_the_original(pipeline):
    img = next((pipeline["data"] / "apparel" / "upper" / "tee").glob("*.jpg"))
    out = predict(pipeline, "-p", str(img)).stdout
    assert "Encoder: {0: 'accessories', 1: 'apparel'}" in out
    assert "Parent class prediction:  " in out
    assert "Final Prediction:  " in out


def test_predict_csv_folder_recursive_and_topk(pipeline):
    out = predict(pipeline, "-p", str(pipeline["data"] / "apparel"), "--format", "csv", "--topk", "2").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3 * 7
    assert all(r["labels"].startswith(("apparel/", "accessories/")) for r in rows)
    assert all(len(r["topk"].split(" | ")[0].split(";")) == 2 for r in rows)
    assert all(r["node"] == r["labels"] for r in rows)  # the node id column (here the label path)


def test_min_confidence_stops_early(pipeline):
    imgs = sorted(pipeline["data"].rglob("*.jpg"))[:8]
    rows = json.loads(predict(pipeline, "-p", *map(str, imgs), "--format", "json", "--min-confidence", "0.999999").stdout)
    partial = [r for r in rows if not r["complete"]]
    assert partial, "a near-1 threshold must stop some walks above the leaf"
    for r in partial:
        assert r["confidence"] >= 0.999999 or not r["labels"]


def test_onnx_and_torch_agree(pipeline):
    from hiernet.predictor import HierarchicalPredictor

    imgs = [str(p) for p in sorted(pipeline["data"].rglob("*.jpg"))[:12]]
    a = HierarchicalPredictor.load(pipeline["models"], runtime="onnx", with_flat=True, precision="fp32")
    b = HierarchicalPredictor.load(pipeline["models"], runtime="torch", with_flat=True)
    assert a.runtime == "onnx" and b.runtime == "torch"
    pa, pb = a.predict_paths(imgs), b.predict_paths(imgs)
    for x, y in zip(pa, pb):
        assert x.node_ids == y.node_ids
        assert np.max(np.abs(np.array(x.probs) - np.array(y.probs))) < 1e-4
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


def test_selective_mirror_averaging_runs_the_mirror_only_where_unsure(pipeline):
    from hiernet.predictor import HierarchicalPredictor

    imgs = [str(p) for p in sorted(pipeline["data"].rglob("*.jpg"))[:10]]
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
    assert results[0.0, "forwards"] == 10  # one backbone pass per image, whatever the depth
    assert results[1.0, "forwards"] == 20  # each image's mirror computed once, shared by every level
    assert 10 <= results[0.6, "forwards"] <= 20
    for a, b in zip(results[0.6], results[1.0]):  # where the plain view is sure, the mirror changes nothing
        if min(a.probs) >= 0.99:
            assert a.node_ids == b.node_ids


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
    imgs = [str(p) for p in sorted(pipeline["data"].rglob("*.jpg"))[:9]] + [str(bad)]
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

    imgs = [str(p) for p in sorted(pipeline["data"].rglob("*.jpg"))[:14]]
    loaded = HierarchicalPredictor.load(pipeline["models"], runtime="onnx", with_flat=True)
    plain = loaded.with_options(mirror=MirrorPolicy(0.0)).predict_paths(imgs)
    # a threshold that makes about half of the images unsure somewhere on their path
    pred = loaded.with_options(mirror=MirrorPolicy(float(np.median([min(p.probs + [p.flat_prob]) for p in plain])) + 1e-6))
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
    assert 0 < unsure < len(imgs)
    assert sum(calls) == len(imgs) + unsure  # one pass per image, one mirror per unsure image, never more
    # the mirrors go in full batches, not one small pass per batch and level
    assert len(calls) <= n_batches + -(-unsure // batch_size)


def test_predict_speed_bench_reports_every_figure(pipeline, tmp_path):
    out = tmp_path / "speed.md"
    run([sys.executable, str(REPO / "bench" / "predict_speed.py"), "--images", str(pipeline["data"]), "--n", "12",
         "--models-dir", str(pipeline["models"]), "--repeats", "1", "--first-repeats", "1", "--seed-style-n", "4",
         "--batch-size", "4", "--out", str(out)], cwd="/")
    rep = json.loads(out.with_suffix(".json").read_text())
    raw, steady, whole = rep["raw"]["images_per_s"], rep["in_process"]["images_per_s"], rep["predict"]["images_per_s"]
    assert rep["n_images"] == 12 and raw > 0 and steady > 0 and whole > 0
    assert abs(rep["overhead"] - (raw / steady - 1)) < 1e-9 and abs(rep["overhead_process"] - (raw / whole - 1)) < 1e-9
    assert [t["name"] for t in rep["targets"]][2].startswith("decoding, routing and hierarchy")
    md = out.read_text()
    for row in ("a. predict.py, whole process", "b. predict.py, 1 image", "c. raw network forwards",
                "d. seed-style", "e. prediction in-process", "overhead of the whole predict.py process"):
        assert row in md
