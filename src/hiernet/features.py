"""Frozen features: which runner computes them, their cache keys, and what a models folder pins.

* :func:`cached_features` — features of a list of images from the feature cache
  (:class:`hiernet.data.FeatureCache`), computing what it lacks with the fastest runner here
  (onnxruntime on a CPU: the fp32 export of the backbone, :func:`fp32_onnx_backbone`, or the int8 one);
* :func:`int8_feature_backbone` — the int8 backbone calibrated on the tree's training images;
* pins in a models folder, so that adding images does not change every node's inputs (and retrain them
  all): :data:`INT8_PIN` names the int8 backbone (:func:`pin_int8_backbone`), :data:`TREE_STATS` holds the
  tree's feature statistics the heads standardise with (:func:`tree_feature_stats`, :func:`pin_tree_stats`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from . import distributed as dist_utils
from .config import AugmentConfig, TrainConfig
from .data import TRANSFORM_VERSION, FeatureCache, aug_views, eval_views, extract_features
from .hierarchy import FLAT_DATASET
from .models import FeatureExtractor
from .runtime import OrtRunner, TorchRunner, export_onnx, onnx_available
from .safeio import UserError, write_json_atomic

log = logging.getLogger(__name__)


def _runner_key(backbone: FeatureExtractor) -> str:
    """The cache name of the backbone's fp32 ONNX export."""
    doc = ["onnx-v2", backbone.spec.name, backbone.image_size, backbone.weights_fingerprint]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def fp32_onnx_backbone(backbone: FeatureExtractor, cache_dir: Path) -> Path:
    """The backbone exported to ONNX (fp32) in ``cache_dir/onnx/``, exported on first use."""
    onnx_path = Path(cache_dir) / "onnx" / f"backbone-{_runner_key(backbone)}.onnx"
    if not onnx_path.exists():
        import copy

        export_copy = copy.deepcopy(backbone)
        export_copy.set_export_mode()
        export_onnx(export_copy, np.zeros((1, 3, backbone.image_size, backbone.image_size), np.float32), onnx_path)
    return onnx_path


def _feature_runner(backbone, device: str, cache_dir: Path, use_onnx: bool, int8_model: Path | None = None):
    """The fastest way to run the frozen backbone here: onnxruntime on CPU (the int8 model when
    given), else PyTorch."""
    if int8_model is not None:
        return OrtRunner(int8_model)
    if device == "cpu" and use_onnx and onnx_available():
        return OrtRunner(fp32_onnx_backbone(backbone, cache_dir))
    return TorchRunner(backbone, device)


def feature_precision(device: str) -> str:
    """The arithmetic the frozen backbone runs in on ``device``: ``"fp16"`` (autocast on CUDA) or ``"fp32"``."""
    return "fp16" if str(device).startswith("cuda") else "fp32"


def feature_cache_key(backbone: FeatureExtractor, resize: str, kind: str, device: str) -> dict:
    """The feature-cache key of ``kind`` ("eval"/"aug") features; a ``precision`` other than ``"fp32"``
    is part of it (fp16 GPU features never mix with fp32 CPU ones; fp32 keys are those of earlier versions)."""
    key = {
        "backbone": backbone.spec.name, "image_size": backbone.image_size, "weights": backbone.weights_fingerprint,
        "resize": resize, "transform_version": TRANSFORM_VERSION, "kind": kind,
    }
    precision = feature_precision(device)
    if precision != "fp32":
        key["precision"] = precision
    return key


def tree_training_images(data_dir: Path, doc: dict) -> list[Path]:
    """Every training image of the prepared tree (``data_dir/flat/train/<class folder>/<file>``)."""
    folder = dict(zip(doc["flat"]["class_nodes"], doc["flat"]["classes"]))
    return [Path(data_dir) / FLAT_DATASET / "train" / folder[im["leaf"]] / im["file"]
            for im in doc["images"] if im.get("split") == "train" and im.get("leaf") in folder]


def int8_feature_backbone(backbone: FeatureExtractor, resize: str, cache_dir: Path, images: list, seed: int,
                          pin: Path | None = None) -> Path:
    """The int8 backbone of ``backbone`` calibrated on a seeded choice of ``images`` (the tree's training
    images), from the cache or built now (:func:`hiernet.quantize.int8_backbone`).

    ``pin``: a models folder's ``int8.json`` (:func:`pin_int8_backbone`). When it names a backbone of the
    same fp32 model that is still in the cache, that one is used, whatever ``images`` now are: adding
    images to the tree does not recalibrate (which would change every node's features and retrain
    them all); ``--force`` (no pin) recalibrates on the current images.
    """
    from .quantize import calibration_images, int8_backbone, int8_key

    if cache_dir is None:
        raise UserError("int8 features need a feature cache folder (--cache-dir); or use --precision fp32")
    fp32_key = _fp32_backbone_key(backbone, resize)
    pinned = _pinned_int8(pin, fp32_key, Path(cache_dir))
    if pinned is not None:
        return pinned
    calibration = calibration_images(images, seed=seed)
    return int8_backbone(lambda: fp32_onnx_backbone(backbone, cache_dir), cache_dir, int8_key(fp32_key, calibration),
                         calibration, backbone.image_size, resize)


#: The file in a models folder that names the int8 backbone its nodes were trained with.
INT8_PIN = "int8.json"


def _fp32_backbone_key(backbone: FeatureExtractor, resize: str) -> dict:
    """What identifies the fp32 backbone and its input (the part of the int8 key that is not calibration)."""
    return {"backbone": backbone.spec.name, "image_size": backbone.image_size, "resize": resize,
            "weights": backbone.weights_fingerprint, "transform_version": TRANSFORM_VERSION}


def _pin_entries(pin: Path | None, field: str) -> dict:
    """``{key hash: entry}`` under ``field`` of a models folder's pin file (:data:`INT8_PIN`: ``models``,
    :data:`TREE_STATS`: ``stats``); empty when there is none or it is unreadable."""
    if pin is None:
        return {}
    try:
        entries = json.loads(Path(pin).read_text(encoding="utf-8"))[field]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return dict(entries) if isinstance(entries, dict) else {}


def _write_pin_entry(pin: Path, field: str, key: str, entry) -> None:
    """Set ``key`` to ``entry`` under ``field`` of the pin file ``pin``, keeping its other entries."""
    entries = _pin_entries(pin, field)
    entries[key] = entry
    write_json_atomic(pin, {"version": 1, field: entries})


def _pinned_int8(pin: Path | None, fp32_key: dict, cache_dir: Path) -> Path | None:
    """The cached int8 backbone ``pin`` names for ``fp32_key`` (``None``: no pin, another model, or gone)."""
    name = _pin_entries(pin, "models").get(config_hash(fp32_key))
    if name is None:
        return None
    path = cache_dir / "int8" / str(name)
    if not path.is_file() or path.name != str(name):
        log.info("the int8 backbone %s the earlier nodes were trained with is not in %s: recalibrating", name, cache_dir)
        return None
    return path


def pin_int8_backbone(pin: Path, backbone: FeatureExtractor, resize: str, model: Path) -> None:
    """Record in ``pin`` (a models folder's :data:`INT8_PIN`) that ``model`` is the int8 version of ``backbone``."""
    _write_pin_entry(pin, "models", config_hash(_fp32_backbone_key(backbone, resize)), Path(model).name)


#: The file in a models folder that holds the tree's feature statistics its heads standardise with.
TREE_STATS = "tree_stats.json"


def tree_feature_stats(cfg: TrainConfig, backbone: FeatureExtractor, data, device: str,
                       cache_dir: Path | None, progress: bool, int8_model: Path | None = None,
                       pin: Path | None = None) -> dict:
    """Mean and std ``(D,)`` of the features (eval view and mirror) of every training image of the tree
    (``data``: a :class:`hiernet.training.NodeData` of it, for its ``data_dir`` and ``doc``).

    ``pin``: a models folder's :data:`TREE_STATS` (:func:`pin_tree_stats`). When it holds statistics of the
    same features (backbone, input, precision), those are used, whatever the tree's images now are: adding
    images does not change every head's standardisation (which would retrain them all). Otherwise they are
    computed from the feature cache (the root node has just cached them all); ``--force`` (no pin) does so.

    Returns
    -------
    dict
        ``{"key": the features' key, "n_images", "mean": (D,) float32, "std": (D,) float32}``.
    """
    key = config_hash({**_fp32_backbone_key(backbone, cfg.resize), "precision": cfg.precision,
                        "int8": None if int8_model is None else Path(int8_model).name})
    pinned = _pin_entries(pin, "stats").get(key)
    try:
        mean, std = np.asarray(pinned["mean"], np.float32), np.asarray(pinned["std"], np.float32)
        if mean.ndim == 1 and mean.shape == std.shape:
            return {"key": key, "n_images": pinned.get("n_images"), "mean": mean, "std": std}
    except (TypeError, KeyError, ValueError):  # none pinned, or a malformed entry: compute them
        pass
    f, ok = cached_features(tree_training_images(data.data_dir, data.doc), backbone, cfg.resize, device, cache_dir,
                            "eval", 0, cfg.fit.seed, progress, cfg.onnx, cfg.augment, cfg.precision, int8_model)
    if ok.sum() < 2:
        raise UserError("fewer than two readable training images in the tree to standardise features with; "
                        "check the prepared datasets")
    mean, std = feature_stats(f[ok])
    return {"key": key, "n_images": int(ok.sum()), "mean": mean, "std": std}


def feature_stats(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std ``(D,)`` (float32; the std with one degree of freedom less) over every image and view of
    ``views`` ``(N, V, D)``, computed in float64."""
    x = views.reshape(-1, views.shape[-1]).astype(np.float64)
    return x.mean(0).astype(np.float32), x.std(0, ddof=1).astype(np.float32)


def pin_tree_stats(pin: Path, stats: dict) -> None:
    """Record :func:`tree_feature_stats`'s ``stats`` in ``pin`` (a models folder's :data:`TREE_STATS`)."""
    _write_pin_entry(pin, "stats", stats["key"], {"n_images": stats["n_images"], "mean": np.asarray(stats["mean"]).tolist(),
                                                  "std": np.asarray(stats["std"]).tolist()})


def cached_features(paths: list, backbone: FeatureExtractor, resize: str, device: str, cache_dir: Path | None,
                    kind: str, n_aug: int, seed: int, progress: bool, onnx: bool = True,
                    augment: AugmentConfig = AugmentConfig(), precision: str = "fp32",
                    int8_model: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``paths`` from the feature cache, computing what it lacks.

    Parameters
    ----------
    kind : {"eval", "aug"}
        "eval": 2 views (the evaluation input and its mirror); "aug": ``n_aug`` augmented views.
    seed : int
        Seeds the augmented views (part of the cache key for "aug").
    precision : {"fp32", "int8"}
        "int8": computed by ``int8_model`` (:func:`int8_feature_backbone`); the cache key records the
        precision (and the int8 model), so int8 and fp32 features never share entries.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(N, V, D)`` float32 features and a bool mask ``(N,)`` of images that decoded.
    """
    size = backbone.image_size
    key = feature_cache_key(backbone, resize, kind, device)
    if precision != "fp32":  # fp32 keys stay those of earlier versions
        if int8_model is None:
            raise ValueError(f"precision {precision!r} needs the int8 model")
        key.update({"precision": precision, "int8_model": Path(int8_model).stem})
    if kind == "aug":
        key.update({"augment": augment.key(), "seed": seed, "n": n_aug})
        n_views = n_aug

        def make(img, s):
            return aug_views(img, size, n_aug, s ^ seed, augment)
    else:
        n_views = 2

        def make(img, s):
            return eval_views(img, size, resize)

    cache = FeatureCache(cache_dir, key, n_views, backbone.spec.feature_dim)
    runner = None

    def run(batch):
        nonlocal runner
        if runner is None:
            runner = _feature_runner(backbone, device, cache_dir, onnx, int8_model)
        return runner(batch)

    if dist_utils.is_distributed():  # each rank fills its share of the cache, then all read it
        r, w = dist_utils.rank(), dist_utils.world_size()
        extract_features(paths[r::w], run, cache, make, size, progress=False)
        dist_utils.barrier()
    return extract_features(paths, run, cache, make, size, progress=progress and dist_utils.is_main(), desc=f"{kind} features")


def config_hash(d: dict) -> str:
    """16 hex digits of SHA-256 over ``d`` as sorted JSON (a cache or resume key)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
