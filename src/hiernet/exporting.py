"""Write ONNX files for what predict runs: each shared backbone once, each node head (or full network).

The export goes to ``trained_models/onnx/`` through a staging folder and a swap. ``manifest.json``
records the SHA-256 of every ``model.pth`` so the predictor can tell a stale export from a current one,
and the export is checked against PyTorch on a random batch before it is published.

Nodes trained on int8 features (``--precision int8``) bring their int8 backbone along: it is copied
from the feature cache (the very file the features came from, checked by SHA-256) beside the fp32 one.
A guard (:func:`validation_checks`) then predicts the validation split with each and keeps fp32 as the
default precision when int8 loses more than :data:`hiernet.quantize.GUARD_MAX_DROP` of leaf accuracy;
the same pass records which decision (LCPN walk, flat head, or combined) is most accurate there, the
one ``--decision auto`` uses.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .bundle import (MANIFEST, ONNX_DIR, ModelBundle, OnnxBackbone, OnnxManifest, OnnxNode, load_torch_bundle, model_sha256,
                     read_models_hierarchy)
from .quantize import GUARD_MAX_DROP
from .routing import softmax
from .safeio import UserError, exclusive_lock, remove_stale, replace_dir, sha256_file, write_json_atomic

log = logging.getLogger(__name__)


def export_models(models_dir: Path, with_flat: bool | None = None, check_batch: int = 4, tolerance: float = 1e-4,
                  cache_dir: Path | None = None, data_dir: Path | None = None, max_drop: float | None = None) -> dict:
    """Export every node of ``models_dir`` (and the flat baseline if trained) to ONNX.

    Parameters
    ----------
    cache_dir : Path, optional
        The feature cache the models were trained with: where their int8 backbone is (if any).
    data_dir : Path, optional
        The prepared datasets: their validation split is what the int8 guard predicts.
    max_drop : float, optional
        The largest leaf-accuracy drop (a fraction) int8 may cost; default :data:`hiernet.quantize.GUARD_MAX_DROP`.

    Returns
    -------
    dict
        The manifest (:meth:`hiernet.bundle.OnnxManifest.to_dict`); its ``max_abs_diff`` is the largest
        probability difference between PyTorch and onnxruntime on a random batch (must be below ``tolerance``).
    """
    import torch

    models_dir = Path(models_dir)
    hier, _ = read_models_hierarchy(models_dir)
    if with_flat is None:
        with_flat = (models_dir / "flat" / "model.pth").exists()
    bundle = load_torch_bundle(models_dir, hier, "cpu", with_flat)
    with exclusive_lock(models_dir / ".onnx.lock", "ONNX export"):
        remove_stale(models_dir, ONNX_DIR)
        stage = models_dir / f".{ONNX_DIR}.tmp-export"
        if stage.exists():
            import shutil

            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        man = OnnxManifest(hier.fingerprint())
        worst = _export_bundle(bundle, models_dir, stage, man, np.random.default_rng(0), check_batch)
        if worst >= tolerance:
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            raise UserError(f"ONNX export differs from PyTorch by {worst:.2e} (limit {tolerance}); not published")
        man.max_abs_diff, man.torch_version = worst, torch.__version__
        if _add_int8_backbones(bundle, models_dir, stage, man, cache_dir):
            man.precision = "int8"
        validation_checks(stage, man, hier, data_dir, GUARD_MAX_DROP if max_drop is None else max_drop)
        write_json_atomic(stage / MANIFEST, man.to_dict())
        replace_dir(stage, models_dir / ONNX_DIR)
    return man.to_dict()


def _export_bundle(bundle: ModelBundle, models_dir: Path, stage: Path, man: OnnxManifest, rng, check_batch: int) -> float:
    """Export each shared backbone and node of the torch ``bundle`` into ``stage``, filling ``man``.

    Returns the largest torch/onnxruntime difference found on random batches of ``check_batch``.
    """
    from .runtime import OrtRunner, export_onnx

    worst = 0.0
    for group, (runner, size, resize) in bundle.backbones.items():
        x = rng.random((check_batch, 3, size, size), dtype=np.float32)
        f = f"{group}.onnx"
        export_onnx(_exportable(runner.module), x[:1], stage / f)
        worst = max(worst, _check(runner, OrtRunner(stage / f), x, probs=False, scale=True))
        man.backbones[group] = OnnxBackbone(f, size, resize)
    for nm in bundle.all_nodes():
        if nm.head is not None:
            runner, mod = nm.head, nm.head.module
            x = rng.standard_normal((check_batch, mod.mean.numel()), dtype=np.float32)
            f = f"{nm.dataset}.head.onnx"
        else:
            runner, mod = nm.full, _exportable(nm.full.module)
            x = rng.random((check_batch, 3, nm.image_size, nm.image_size), dtype=np.float32)
            f = f"{nm.dataset}.full.onnx"
        export_onnx(mod, x[:1], stage / f)
        worst = max(worst, _check(runner, OrtRunner(stage / f), x, probs=True))
        man.nodes[nm.dataset] = OnnxNode(f, nm.backbone, nm.classes, nm.class_nodes, nm.image_size, nm.resize, nm.tta,
                                         model_sha256(models_dir / nm.dataset / "model.pth"))
    return worst


def _exportable(module):
    """A copy of ``module`` with efficientnet_pytorch's traceable Swish switched on."""
    import copy

    m = copy.deepcopy(module).cpu().eval()
    for sub in m.modules():
        if hasattr(sub, "set_export_mode"):
            sub.set_export_mode()
    return m


def _check(torch_runner, ort_runner, x: np.ndarray, probs: bool, scale: bool = False) -> float:
    """Largest difference between the runtimes (of probabilities, or of features relative to their scale)."""
    a, b = torch_runner(x), ort_runner(x)
    if probs:
        return float(np.abs(softmax(a) - softmax(b)).max())
    diff = float(np.abs(a - b).max())
    return diff / max(1.0, float(np.abs(a).max())) if scale else diff


def _add_int8_backbones(bundle: ModelBundle, models_dir: Path, stage: Path, man: OnnxManifest, cache_dir: Path | None) -> bool:
    """Copy the int8 backbone of each shared-backbone group whose nodes were all trained on int8 features
    into ``stage`` (as ``<group>.int8.onnx``); True when every group has one."""
    import shutil

    from .artifacts import load_node
    from .paths import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    records: dict = {}
    for nm in bundle.all_nodes():
        if nm.backbone is not None:
            bb = load_node(models_dir / nm.dataset).config["backbone"]
            records.setdefault(nm.backbone, set()).add((bb.get("int8_model"), bb.get("int8_sha256")))
    for group, recs in records.items():
        name, digest = next(iter(recs)) if len(recs) == 1 else (None, None)
        if name is None:
            log.info("backbone %s: nodes not all trained on one int8 backbone; fp32 only", group)
            continue
        src = cache / "int8" / name
        if not src.exists() or sha256_file(src) != digest:
            log.warning("the int8 backbone %s the models were trained with is not in %s; prediction will use "
                        "fp32 (export with the training's --cache-dir, or retrain)", name, cache / "int8")
            continue
        shutil.copyfile(src, stage / f"{group}.int8.onnx")
        man.backbones[group].int8_file = f"{group}.int8.onnx"
    return bool(man.backbones) and all(b.int8_file for b in man.backbones.values())


def validation_checks(onnx_dir: Path, man: OnnxManifest, hier, data_dir: Path | None, max_drop: float) -> None:
    """Predict the validation split once per backbone precision of the export and record what it shows.

    With an int8 backbone, the guard (``man.guard``, :func:`guard_verdict`) keeps fp32 as ``man.precision``
    when int8 loses more than ``max_drop`` of LCPN leaf accuracy. Then ``man.decision``
    (:func:`choose_decision`) names the decision with the best leaf accuracy at that precision: what
    ``--decision auto`` uses. Nothing is recorded when ``data_dir`` holds no validation split of this tree.
    """
    paths, leaves = validation_split(data_dir, hier)
    if not paths:
        log.info("validation checks skipped: no validation split of this tree in %s", data_dir)
        return
    from .bundle import onnx_bundle
    from .hierarchy import FLAT_DATASET
    from .predictor import HierarchicalPredictor

    precisions = ("fp32", "int8") if man.precision == "int8" else ("fp32",)
    with_flat = FLAT_DATASET in man.nodes
    acc = {p: validation_accuracies(HierarchicalPredictor(onnx_bundle(onnx_dir, man, hier, with_flat, p)), paths, leaves)
           for p in precisions}
    if "int8" in acc:
        man.guard = guard_verdict(acc["fp32"]["lcpn"], acc["int8"]["lcpn"], len(paths), max_drop)
        man.precision = man.guard["kept"]
    man.decision = choose_decision(acc[man.precision], len(paths), man.precision)


def validation_accuracies(predictor, paths: list[str], leaves: list[str]) -> dict[str, float]:
    """Leaf accuracy of each decision of ``predictor`` on ``paths`` (``N`` images, true ``leaves``; an
    unreadable image counts as wrong) from one backbone pass (:func:`hiernet.evaluation.predict_test_set`).

    Returns
    -------
    dict
        ``{"lcpn": a}``, plus ``"flat"`` when the flat baseline is loaded and ``"combined"`` when the
        combined decision can be computed (the flat baseline and every node a head on a shared backbone).
    """
    from .evaluation import predict_test_set
    from .predictor import default_workers
    from .testsets import TestSet

    preds, _, combined = predict_test_set(predictor, TestSet(list(paths), list(leaves), "validation split"),
                                          workers=default_workers())
    acc = {"lcpn": float(np.mean([p.error is None and p.node == leaf for p, leaf in zip(preds, leaves)]))}
    if predictor.flat is not None:
        acc["flat"] = float(np.mean([p.error is None and p.flat_leaf == leaf for p, leaf in zip(preds, leaves)]))
    if combined is not None:
        acc["combined"] = float(np.mean([c is not None and c == leaf for c, leaf in zip(combined, leaves)]))
    return acc


def guard_verdict(fp32_accuracy: float, int8_accuracy: float, n_images: int, max_drop: float) -> dict:
    """The int8 guard's record: ``kept`` is ``"fp32"`` when int8 loses more than ``max_drop`` (a fraction)
    of leaf accuracy, else ``"int8"``."""
    kept = "fp32" if fp32_accuracy - int8_accuracy > max_drop else "int8"
    return {"n_images": n_images, "fp32_leaf_accuracy": fp32_accuracy, "int8_leaf_accuracy": int8_accuracy,
            "max_drop": max_drop, "kept": kept}


def choose_decision(accuracy: dict[str, float], n_images: int, precision: str) -> dict:
    """The decision ``--decision auto`` uses: the best validation leaf accuracy in ``accuracy``
    (decision → accuracy); among equals the first of :data:`hiernet.bundle.DECISIONS` (LCPN first).

    Returns
    -------
    dict
        ``{"chosen", "leaf_accuracy", "n_images", "precision"}`` (``OnnxManifest.decision``).
    """
    from .bundle import DECISIONS

    chosen = max((d for d in DECISIONS if d in accuracy), key=lambda d: accuracy[d])  # max keeps the first of equals
    return {"chosen": chosen, "leaf_accuracy": {d: accuracy[d] for d in DECISIONS if d in accuracy},
            "n_images": n_images, "precision": precision}


def validation_split(data_dir: Path | None, hier) -> tuple[list[str], list[str]]:
    """Validation images of the prepared tree ``hier`` in ``data_dir`` and their true leaves (empty
    lists when ``data_dir`` holds no prepared datasets of this tree)."""
    import json

    from .hierarchy import FLAT_DATASET

    if data_dir is None or not (Path(data_dir) / "hierarchy.json").exists():
        return [], []
    try:
        doc = json.loads((Path(data_dir) / "hierarchy.json").read_text(encoding="utf-8"))
        if doc.get("fingerprint") != hier.fingerprint():
            return [], []
        folder = dict(zip(doc["flat"]["class_nodes"], doc["flat"]["classes"]))
        val = [im for im in doc["images"] if im.get("split") == "val" and im.get("leaf") in folder]
    except (OSError, ValueError, KeyError, TypeError):
        return [], []
    return [str(Path(data_dir) / FLAT_DATASET / "val" / folder[im["leaf"]] / im["file"]) for im in val], \
        [str(im["leaf"]) for im in val]
