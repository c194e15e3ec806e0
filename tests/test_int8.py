"""The int8 backbone: quantisation, feature-cache keys, training on int8 features, export, guard, prediction."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import conftest
from conftest import REPO, make_tree

pytest.importorskip("onnxruntime.quantization")

TREE = {"round": {"circle": "ellipse", "plus": "cross"}, "angular": {"box": "rectangle", "tri": "triangle"}}
FAST = ["--backbone", "efficientnet-lite0", "--image-size", "64", "--epochs", "3", "--views", "1", "-q"]


run = functools.partial(conftest.run, cwd="/")  # paths resolve from the arguments, not the working folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tree prepared and trained with ``--precision int8`` (what ``auto`` picks on a CPU), exported."""
    base = tmp_path_factory.mktemp("int8")
    data = make_tree(base / "catalogue", TREE, per_leaf=8)
    split, models, cache = base / "split", base / "models", base / "cache"
    run([sys.executable, REPO / "prepare_dataset.py", "-p", data, "-o", split, "-q"])
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=str(split), MODELS_DIR=str(models), NO_FLAT="1")
    train = run(["bash", REPO / "src" / "train_lcpn.sh", "--cache-dir", cache, *FAST, "--precision", "int8"], env=env)
    return {"data": data, "split": split, "models": models, "cache": cache, "train": train}


def _images(trained, n=12):
    return [str(p) for p in sorted(trained["data"].rglob("*.jpg"))[:n]]


def test_quantised_backbone_is_int8_smaller_and_close_to_fp32(trained, tmp_path):
    from hiernet.images import load_for_model
    from hiernet.quantize import is_quantized
    from hiernet.runtime import OrtRunner

    (q,) = (trained["cache"] / "int8").glob("backbone-*.onnx")
    (f,) = (trained["cache"] / "onnx").glob("backbone-*.onnx")
    assert is_quantized(q) and not is_quantized(f)
    assert q.stat().st_size < 0.5 * f.stat().st_size  # int8 weights
    x = np.stack([load_for_model(p, 64, "crop") for p in _images(trained, 16)])
    a, b = OrtRunner(f)(x), OrtRunner(q)(x)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # 64 px flat drawings are a hard case (clothing photos at 224 px: mean cosine 0.93); a broken model is far below
    assert cos.mean() > 0.6 and not np.allclose(a, b)


def test_nodes_record_int8_and_the_export_carries_it_with_the_guard(trained):
    from hiernet.artifacts import load_node
    from hiernet.quantize import is_quantized

    models = trained["models"]
    for ds in ("parent", "round", "angular"):
        cfg = load_node(models / ds).config
        assert cfg["train"]["precision"] == cfg["backbone"]["precision"] == "int8"
        assert (trained["cache"] / "int8" / cfg["backbone"]["int8_model"]).is_file()
    man = json.loads((models / "onnx" / "manifest.json").read_text())
    (group,) = man["backbones"].values()
    assert is_quantized(models / "onnx" / group["int8_file"]) and not is_quantized(models / "onnx" / group["file"])
    guard = man["guard"]
    assert guard["n_images"] > 0 and guard["max_drop"] == 0.005
    assert man["precision"] == guard["kept"] == ("fp32" if guard["fp32_leaf_accuracy"] - guard["int8_leaf_accuracy"] > 0.005 else "int8")
    assert "int8 guard: validation leaf accuracy" in trained["train"].stdout


def test_the_int8_backbone_is_built_once_and_reused_from_the_cache(trained):
    (q,) = (trained["cache"] / "int8").glob("backbone-*.onnx")
    keys = [json.loads(p.read_text()) for p in (trained["cache"] / "features").glob("*/key.json")]
    assert keys and all(k["precision"] == "int8" and k["int8_model"] == q.stem for k in keys)


def test_predict_uses_the_manifest_precision_and_fp32_on_request(trained):
    from hiernet.bundle import OnnxManifest
    from hiernet.predictor import HierarchicalPredictor

    models = trained["models"]
    man = OnnxManifest.read(models)
    auto = HierarchicalPredictor.load(models)
    fp32 = HierarchicalPredictor.load(models, precision="fp32")
    int8 = HierarchicalPredictor.load(models, precision="int8")
    assert auto.bundle.precision == man.precision and fp32.bundle.precision == "fp32" and int8.bundle.precision == "int8"
    imgs = _images(trained)
    p8, p32 = int8.predict_paths(imgs), fp32.predict_paths(imgs)
    assert all(p.complete for p in p8 + p32)
    assert any(a.probs != b.probs for a, b in zip(p8, p32))  # really two backbones
    torch_ = HierarchicalPredictor.load(models, runtime="torch", precision="auto")  # torch: fp32
    for a, b in zip(p32, torch_.predict_paths(imgs)):
        assert a.node_ids == b.node_ids and np.max(np.abs(np.array(a.probs) - np.array(b.probs))) < 1e-4
    out = run([sys.executable, REPO / "src" / "predict.py", "--models-dir", models, "--precision", "int8", "-v",
               "-p", imgs[0], "--format", "json"])
    assert "precision: int8" in out.stderr + out.stdout


def test_the_guard_keeps_fp32_when_int8_loses_too_much(trained, tmp_path):
    import shutil

    from hiernet.bundle import OnnxManifest
    from hiernet.predictor import HierarchicalPredictor

    models = tmp_path / "models"
    shutil.copytree(trained["models"], models)
    # any drop is "too much" below a negative limit: the forced case
    out = run([sys.executable, REPO / "src" / "export.py", "--models-dir", models, "--cache-dir", trained["cache"],
               "--data-dir", trained["split"], "--int8-max-drop", "-101", "-q"])
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("int8 guard:")]
    assert len(lines) == 1 and "prediction keeps fp32" in lines[0]
    man = OnnxManifest.read(models)
    assert man.precision == "fp32" and man.guard["kept"] == "fp32"
    assert all(b.int8_file for b in man.backbones.values())  # still there for --precision int8
    assert HierarchicalPredictor.load(models).bundle.precision == "fp32"
    assert HierarchicalPredictor.load(models, precision="int8").bundle.precision == "int8"
    # the default limit (0.5 point) on the same models agrees with the recorded accuracies
    out = run([sys.executable, REPO / "src" / "export.py", "--models-dir", models, "--cache-dir", trained["cache"],
               "--data-dir", trained["split"], "-q"])
    man = OnnxManifest.read(models)
    drop = man.guard["fp32_leaf_accuracy"] - man.guard["int8_leaf_accuracy"]
    assert man.precision == ("fp32" if drop > 0.005 else "int8")


def test_without_the_int8_file_the_export_keeps_fp32(trained, tmp_path):
    from hiernet.bundle import OnnxManifest
    from hiernet.exporting import export_models
    import shutil

    models = tmp_path / "models"
    shutil.copytree(trained["models"], models)
    man = export_models(models, cache_dir=tmp_path / "empty-cache", data_dir=trained["split"])
    assert man["precision"] == "fp32" and "guard" not in man
    assert all("int8_file" not in b or b["int8_file"] is None for b in man["backbones"].values())
    from hiernet.safeio import UserError
    from hiernet.bundle import load_bundle

    with pytest.raises(UserError, match="not trained with int8"):
        load_bundle(models, precision="int8")
    assert OnnxManifest.read(models).precision == "fp32"


def test_fp32_training_keeps_the_old_feature_cache_keys(trained, tmp_path):
    """--precision fp32 computes and caches exactly what earlier versions did (same key, same runner)."""
    from hiernet.artifacts import load_node
    from hiernet.backbones import create_backbone
    from hiernet.data import TRANSFORM_VERSION, FeatureCache
    from hiernet.features import cached_features

    models = tmp_path / "models"
    run([sys.executable, REPO / "src" / "train.py", "-d", "parent", "--data-dir", trained["split"], "--output-dir", models,
         "--cache-dir", trained["cache"], "--precision", "fp32", *FAST])
    cfg = load_node(models / "parent").config
    assert cfg["train"]["precision"] == cfg["backbone"]["precision"] == "fp32" and "int8_model" not in cfg["backbone"]
    bb = create_backbone("efficientnet-lite0", image_size=64)
    old_key = {"backbone": bb.spec.name, "image_size": 64, "weights": bb.weights_fingerprint, "resize": "crop",
               "transform_version": TRANSFORM_VERSION, "kind": "eval"}
    old_dir = trained["cache"] / "features" / FeatureCache(None, old_key, 2, 1).key
    assert json.loads((old_dir / "key.json").read_text()) == old_key  # written by the fp32 training
    paths = _images(trained, 6)
    f32, _ = cached_features(paths, bb, "crop", "cpu", trained["cache"], "eval", 0, 0, False)
    (q,) = (trained["cache"] / "int8").glob("backbone-*.onnx")
    f8, _ = cached_features(paths, bb, "crop", "cpu", trained["cache"], "eval", 0, 0, False, precision="int8", int8_model=q)
    assert not np.allclose(f32, f8)  # never served from each other's entries
    digest = hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest()
    assert np.array_equal(FeatureCache(trained["cache"], old_key, 2, bb.spec.feature_dim).get(digest), f32[0])


def test_precision_is_resolved_where_it_can_run():
    from hiernet.config import TrainConfig
    from hiernet.quantize import resolve_train_precision
    from hiernet.safeio import UserError

    assert resolve_train_precision("auto", "cpu", "frozen", True) == "int8"  # the default where it runs
    assert resolve_train_precision("auto", "cpu", "frozen", True, cache=False) == "fp32"  # int8 is cached
    for device, mode, onnx in (("cuda", "frozen", True), ("cpu", "finetune", True), ("cpu", "frozen", False)):
        assert resolve_train_precision("auto", device, mode, onnx) == "fp32"
    assert resolve_train_precision("int8", "cpu", "frozen", True) == "int8"
    assert resolve_train_precision("fp32", "cpu", "frozen", True) == "fp32"
    for device, mode in (("cuda", "frozen"), ("cpu", "finetune")):
        with pytest.raises(UserError, match="--precision fp32"):
            resolve_train_precision("int8", device, mode, True)
    assert TrainConfig.from_dict(TrainConfig().override({"precision": "int8"}).to_dict()).precision == "int8"


def test_int8_with_the_torch_runtime_is_one_clear_line(trained):
    proc = run([sys.executable, REPO / "src" / "predict.py", "--models-dir", trained["models"], "--runtime", "torch",
                "--precision", "int8", "-p", _images(trained, 1)[0]], check=False)
    assert proc.returncode == 2 and "onnxruntime on the CPU only" in proc.stderr and "Traceback" not in proc.stderr


def test_calibration_choice_is_seeded_and_bounded(tmp_path):
    from hiernet.quantize import calibration_images

    paths = [tmp_path / f"{i:03d}.jpg" for i in range(300)]
    a, b, c = calibration_images(paths, seed=0), calibration_images(list(reversed(paths)), seed=0), calibration_images(paths, seed=1)
    assert len(a) == 128 and a == b and a != c and a == sorted(a)
    assert calibration_images(paths[:5]) == sorted(paths[:5])


def test_quantising_keeps_onnxruntimes_chatter_out_of_the_log(tmp_path, monkeypatch):
    """onnxruntime logs a line per widened weight scale (hundreds for a backbone) and its shape-inference
    steps at INFO: dropped while quantising, the suite's own lines kept, nothing dropped afterwards."""
    import logging

    import onnxruntime.quantization as ortq
    import torch

    from conftest import draw_image
    from hiernet.quantize import quantize_backbone
    from hiernet.runtime import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    fp32 = export_onnx(net, np.zeros((1, 3, 32, 32), np.float32), tmp_path / "fp32.onnx")
    images = [draw_image(tmp_path / f"{i}.jpg", "ellipse", i, 40) for i in range(3)]
    real = ortq.quantize_static

    def chatty(*a, **k):  # what onnxruntime logs while quantising a real backbone
        logging.info("Increased scale[11] for weight `onnx::Conv_902` by ratio 18.29 to ensure bias input `b` has a valid scale.")
        logging.getLogger("onnxruntime.quantization.shape_inference").info("Performing symbolic shape inference...")
        logging.getLogger("hiernet.quantize").info("the suite's own line")
        return real(*a, **k)

    monkeypatch.setattr(ortq, "quantize_static", chatty)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root, keep = logging.getLogger(), Keep(logging.INFO)
    old_level = root.level
    root.addHandler(keep)
    root.setLevel(logging.INFO)
    try:
        quantize_backbone(fp32, tmp_path / "int8.onnx", images, 32, "crop")
        assert (tmp_path / "int8.onnx").is_file()
        assert "the suite's own line" in seen
        assert not [m for m in seen if "Increased scale" in m or "symbolic shape inference" in m], seen
        logging.info("Increased scale[1] after quantising")  # the filter is gone again
        assert seen[-1] == "Increased scale[1] after quantising"
    finally:
        root.removeHandler(keep)
        root.setLevel(old_level)
