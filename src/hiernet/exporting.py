"""Write ONNX files for what predict runs: each shared backbone once, each node head (or full network).

The export goes to ``trained_models/onnx/`` through a staging folder and a swap. ``manifest.json``
records the SHA-256 of every ``model.pth`` so the predictor can tell a stale export from a current one,
and the export is checked against PyTorch on a random batch before it is published.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .bundle import MANIFEST, ONNX_DIR, ModelBundle, OnnxBackbone, OnnxManifest, OnnxNode, load_torch_bundle, read_models_hierarchy
from .routing import softmax
from .safeio import UserError, exclusive_lock, remove_stale, replace_dir, sha256_file, write_json_atomic

log = logging.getLogger(__name__)


def export_models(models_dir: Path, with_flat: bool | None = None, check_batch: int = 4, tolerance: float = 1e-4) -> dict:
    """Export every node of ``models_dir`` (and the flat baseline if trained) to ONNX.

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
                                         sha256_file(models_dir / nm.dataset / "model.pth"))
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
