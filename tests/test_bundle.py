"""The ONNX manifest schema, the bundle loader's checks, and a predictor on a hand-built bundle (no torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hiernet.bundle import (MANIFEST, ONNX_DIR, Backbone, ModelBundle, NodeModel, OnnxBackbone, OnnxManifest, OnnxNode,
                            load_bundle, onnx_problem)
from hiernet.hierarchy import Hierarchy
from hiernet.predictor import HierarchicalPredictor, MirrorPolicy, PredictOptions
from hiernet.safeio import UserError, sha256_file

HIER = Hierarchy.from_leaf_paths(["round/circle", "round/plus", "solo/only"])  # 'solo' has one child


def exported(tmp_path):
    """A models folder with fake model.pth / ONNX files and the manifest an export would write for them."""
    models = tmp_path / "models"
    (models / ONNX_DIR).mkdir(parents=True)
    (models / "hierarchy.json").write_text(json.dumps({"tree": HIER.to_dict()}))
    man = OnnxManifest(HIER.fingerprint(), {"bb0": OnnxBackbone("bb0.onnx", 64, "crop")})
    (models / ONNX_DIR / "bb0.onnx").write_bytes(b"backbone")
    for nid in HIER.classifier_nodes():
        ds = HIER.nodes[nid].dataset
        (models / ds).mkdir()
        (models / ds / "model.pth").write_bytes(ds.encode())
        (models / ONNX_DIR / f"{ds}.head.onnx").write_bytes(b"head")
        children = HIER.nodes[nid].children
        man.nodes[ds] = OnnxNode(f"{ds}.head.onnx", "bb0", [HIER.nodes[c].name for c in children], list(children), 64,
                                 "crop", True, sha256_file(models / ds / "model.pth"))
    return models, man


def test_manifest_round_trips_through_its_document(tmp_path):
    _, man = exported(tmp_path)
    man.max_abs_diff, man.torch_version = 1e-6, "2.x"
    doc = json.loads(json.dumps(man.to_dict()))
    assert list(doc) == ["version", "hierarchy_fingerprint", "precision", "backbones", "nodes", "max_abs_diff",
                         "torch_version"]
    assert list(doc["nodes"]["round"]) == ["file", "backbone", "classes", "class_nodes", "image_size", "resize", "tta",
                                           "model_sha256"]
    assert OnnxManifest.from_dict(doc) == man and doc["precision"] == "fp32"
    man.precision, man.backbones["bb0"].int8_file = "int8", "bb0.int8.onnx"
    man.guard = {"n_images": 3, "fp32_leaf_accuracy": 1.0, "int8_leaf_accuracy": 1.0, "max_drop": 0.005, "kept": "int8"}
    doc = json.loads(json.dumps(man.to_dict()))
    assert doc["guard"] == man.guard and doc["backbones"]["bb0"]["int8_file"] == "bb0.int8.onnx"
    assert OnnxManifest.from_dict(doc) == man
    with pytest.raises(ValueError):
        OnnxManifest.from_dict({**doc, "precision": "int4"})


def test_a_missing_int8_backbone_makes_the_export_unusable(tmp_path):
    models, man = exported(tmp_path)
    man.backbones["bb0"].int8_file = "bb0.int8.onnx"
    assert "bb0.int8.onnx is missing" in man.problem(models, HIER, with_flat=False)
    (models / ONNX_DIR / "bb0.int8.onnx").write_bytes(b"int8")
    assert man.problem(models, HIER, with_flat=False) is None
    man.backbones["bb0"].int8_file = "../bb0.int8.onnx"
    assert "malformed" in man.problem(models, HIER, with_flat=False)


def test_a_current_export_has_no_problem(tmp_path):
    models, man = exported(tmp_path)
    assert man.problem(models, HIER, with_flat=False) is None
    assert "'flat' is missing" in man.problem(models, HIER, with_flat=True)


@pytest.mark.parametrize("spoil, problem", [
    (lambda m, man: setattr(man, "hierarchy_fingerprint", "0" * 16), "another hierarchy"),
    (lambda m, man: (m / "round" / "model.pth").write_bytes(b"retrained"), "older than its model.pth"),
    (lambda m, man: setattr(man.nodes["round"], "resize", "stretch"), "entry of node 'round' is malformed"),
    (lambda m, man: setattr(man.nodes["round"], "class_nodes", ["round/plus", "round/circle"]), "malformed"),
    (lambda m, man: setattr(man.nodes["round"], "backbone", "bb9"), "malformed"),
    (lambda m, man: setattr(man.nodes["parent"], "file", "../x.onnx"), "entry of node 'parent' is malformed"),
    (lambda m, man: (m / ONNX_DIR / "round.head.onnx").unlink(), "round.head.onnx is missing"),
    (lambda m, man: setattr(man.backbones["bb0"], "image_size", 4), "manifest is malformed"),
    (lambda m, man: (m / ONNX_DIR / "bb0.onnx").unlink(), "bb0.onnx is missing"),
])
def test_each_kind_of_stale_or_malformed_export_is_named(tmp_path, spoil, problem):
    models, man = exported(tmp_path)
    spoil(models, man)
    (models / ONNX_DIR / MANIFEST).write_text(json.dumps(man.to_dict()))
    assert problem in onnx_problem(models, HIER)


def test_each_model_is_hashed_once_per_version_and_a_retrained_one_is_seen(tmp_path, monkeypatch):
    import os
    import time

    import hiernet.bundle

    models, man = exported(tmp_path)
    calls = []
    monkeypatch.setattr(hiernet.bundle, "sha256_file", lambda p: calls.append(p) or sha256_file(p))
    assert man.problem(models, HIER, with_flat=False) is None and man.problem(models, HIER, with_flat=False) is None
    assert len(calls) == len(HIER.classifier_nodes())  # the second check reuses the digests
    # retrained: a model.pth of the same size swapped in (as training publishes), then one rewritten in place
    new = models / "round" / "model.new"
    new.write_bytes(b"ROUND")
    os.replace(new, models / "round" / "model.pth")
    assert "node 'round' is older than its model.pth" in man.problem(models, HIER, with_flat=False)
    man.nodes["round"].model_sha256 = sha256_file(models / "round" / "model.pth")
    assert man.problem(models, HIER, with_flat=False) is None
    time.sleep(0.05)  # past the file system's timestamp tick (at most 10 ms), as any later rewrite is
    (models / "parent" / "model.pth").write_bytes(b"PARENT")
    assert "node 'parent' is older than its model.pth" in man.problem(models, HIER, with_flat=False)


def test_unreadable_manifest_and_unknown_runtime(tmp_path):
    models, man = exported(tmp_path)
    doc = man.to_dict()
    doc["nodes"]["round"]["extra"] = 1
    (models / ONNX_DIR / MANIFEST).write_text(json.dumps(doc))
    assert "unreadable" in onnx_problem(models, HIER)
    (models / ONNX_DIR / MANIFEST).write_text("{")
    assert "unreadable" in onnx_problem(models, HIER)
    with pytest.raises(UserError, match="export.py"):
        load_bundle(models, runtime="onnx")
    with pytest.raises(UserError, match="unknown runtime"):
        load_bundle(models, runtime="tensorrt")


# ---------------------------------------------------------------------- a predictor on a hand-built bundle
def numpy_bundle(runtime: str = "numpy", device: str = "cpu") -> ModelBundle:
    """Root: logits from the image mean (bright → 'solo'); 'round': from the left/right halves."""
    def backbone(x):  # (B, 3, 8, 8) -> (B, 2): mean of the left and of the right half
        return np.stack([x[..., :4].mean(axis=(1, 2, 3)), x[..., 4:].mean(axis=(1, 2, 3))], 1).astype(np.float32)

    root = NodeModel("parent", "", ["round", "solo"], ["round", "solo"], 8, "crop", False, "bb0",
                     head=lambda f: np.stack([-f.sum(1), f.sum(1)], 1) * 10)
    rnd = NodeModel("round", "round", ["circle", "plus"], ["round/circle", "round/plus"], 8, "crop", True, "bb0",
                    head=lambda f: np.stack([f[:, 0], f[:, 1]], 1) * 10)
    return ModelBundle(HIER, {"": root, "round": rnd}, {"bb0": Backbone(backbone, 8, "crop")}, runtime, None, device)


def image(left: float, right: float) -> dict:
    x = np.zeros((3, 8, 8), np.float32)
    x[..., :4], x[..., 4:] = left, right
    return {(8, "crop"): x}


def test_predictor_labels_routes_and_mirrors_as_its_options_say():
    bundle = numpy_bundle()
    inputs = [image(0.6, 0.5), image(-0.3, 0.1)]  # bright → solo/only; dark, right side brighter → round/plus
    plain = HierarchicalPredictor(bundle, PredictOptions(topk=2, mirror=MirrorPolicy(0.0)))
    a, b = plain.predict_arrays(inputs, ["a", "b"])
    assert a.labels == ["solo", "only"] and a.node_ids == ["solo", "solo/only"] and a.probs[1] == 1.0
    assert b.labels == ["round", "plus"] and b.topk[1][0][0] == "plus" and len(b.topk[1]) == 2
    # the mirror swaps left and right: averaging makes 'round' a coin toss for b
    mirrored = plain.with_options(mirror=MirrorPolicy(1.0)).predict_arrays(inputs, ["a", "b"])[1]
    assert mirrored.probs[1] == pytest.approx(0.5) and mirrored.probs[0] == pytest.approx(b.probs[0])
    stopped = plain.with_options(min_confidence=0.99).predict_arrays(inputs, ["a", "b"])[1]
    assert not stopped.complete and len(stopped.labels) < 2
    assert plain.predict_paths([]) == []


def test_options_are_checked_and_fixed_at_construction():
    with pytest.raises(UserError, match="between 0 and 1"):
        MirrorPolicy(1.5)
    with pytest.raises(UserError, match="between 0 and 1"):
        PredictOptions(min_confidence=-0.1)
    with pytest.raises(UserError, match="at least 1"):
        PredictOptions(topk=0)
    assert HierarchicalPredictor(numpy_bundle("onnx")).prefetch_batches == 0
    assert HierarchicalPredictor(numpy_bundle("torch", "cpu")).prefetch_batches == 0
    assert HierarchicalPredictor(numpy_bundle("torch", "cuda")).prefetch_batches == 2  # decode ahead of a GPU
    assert HierarchicalPredictor(numpy_bundle("torch", "cuda"), PredictOptions(prefetch_batches=0)).prefetch_batches == 0
    pred = HierarchicalPredictor(numpy_bundle())
    with pytest.raises(AttributeError):
        pred.tta_below = 0.2  # set at construction only
    with pytest.raises(AttributeError):
        pred.options.mirror.below = 0.2  # frozen


def test_auto_runtime_on_a_gpu_device_runs_torch_there_not_the_cpu_export(tmp_path, monkeypatch):
    """After train_lcpn.sh (which exports ONNX), `predict --device cuda` must still run on the GPU."""
    from hiernet import bundle

    monkeypatch.setattr(bundle, "read_models_hierarchy", lambda m: (HIER, {}))
    monkeypatch.setattr(bundle, "onnx_problem", lambda m, h, f: None)  # a current export exists
    monkeypatch.setattr(bundle, "load_onnx_bundle", lambda m, h, f, p="auto": ("onnx", "cpu"))
    monkeypatch.setattr(bundle, "load_torch_bundle", lambda m, h, d, f: ("torch", d))
    assert bundle.load_bundle(tmp_path, "auto", "cuda") == ("torch", "cuda")
    with pytest.raises(UserError, match="on the CPU only"):  # int8 cannot follow auto onto the GPU's torch runtime
        bundle.load_bundle(tmp_path, "auto", "cuda", precision="int8")
    assert bundle.load_bundle(tmp_path, "auto", "cuda:1") == ("torch", "cuda:1")
    assert bundle.load_bundle(tmp_path, "auto", "cpu") == ("onnx", "cpu")
    assert bundle.load_bundle(tmp_path, "onnx", "cuda") == ("onnx", "cpu")  # asked for explicitly
    assert bundle.load_bundle(tmp_path, "torch", "cpu") == ("torch", "cpu")


def test_decision_accuracies_phrase_keeps_the_records_order():
    from hiernet.bundle import decision_accuracies

    assert decision_accuracies({"leaf_accuracy": {"lcpn": 0.9098, "flat": 0.90254}}) == "lcpn 90.98 %, flat 90.25 %"
    assert decision_accuracies({}) == ""
