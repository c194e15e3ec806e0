"""Write ONNX files for what predict runs: each shared backbone once, each node head (or full network).

The export goes to ``trained_models/onnx/`` through a staging folder and a swap. ``manifest.json``
records the SHA-256 of every ``model.pth`` so the predictor can tell a stale export from a current one,
and the export is checked against PyTorch on a random batch before it is published.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .predictor import MANIFEST, ONNX_DIR, HierarchicalPredictor, _softmax, read_models_hierarchy, sha256_file
from .safeio import UserError, exclusive_lock, remove_stale, replace_dir, write_json_atomic

log = logging.getLogger(__name__)


def export_models(models_dir: Path, with_flat: bool | None = None, check_batch: int = 4, tolerance: float = 1e-4) -> dict:
    """Export every node of ``models_dir`` (and the flat baseline if trained) to ONNX.

    Returns
    -------
    dict
        The manifest, plus ``max_abs_diff``: the largest probability difference between PyTorch and
        onnxruntime on a random batch (must be below ``tolerance``).
    """
    import torch

    from .runtime import OrtRunner, export_onnx

    models_dir = Path(models_dir)
    hier, _ = read_models_hierarchy(models_dir)
    if with_flat is None:
        with_flat = (models_dir / "flat" / "model.pth").exists()
    pred = HierarchicalPredictor._load_torch(models_dir, hier, None, "cpu", 0.0, 1, with_flat)
    with exclusive_lock(models_dir / ".onnx.lock", "ONNX export"):
        remove_stale(models_dir, ONNX_DIR)
        stage = models_dir / f".{ONNX_DIR}.tmp-export"
        if stage.exists():
            import shutil

            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        man = {"version": 1, "hierarchy_fingerprint": hier.fingerprint(), "backbones": {}, "nodes": {}}
        rng = np.random.default_rng(0)
        worst = 0.0
        for group, (runner, size, resize) in pred.backbones.items():
            module = _exportable(runner.module)
            x = rng.random((check_batch, 3, size, size), dtype=np.float32)
            f = f"{group}.onnx"
            export_onnx(module, x[:1], stage / f)
            worst = max(worst, _check(runner, OrtRunner(stage / f), x, softmax=False, scale=True))
            man["backbones"][group] = {"file": f, "image_size": size, "resize": resize}
        all_nodes = list(pred.nodes.values()) + ([pred.flat] if pred.flat else [])
        for nm in all_nodes:
            if nm.head is not None:
                mod, dim = nm.head.module, nm.head.module.mean.numel()
                x = rng.standard_normal((check_batch, dim), dtype=np.float32)
                f = f"{nm.dataset}.head.onnx"
                runner = nm.head
            else:
                mod = _exportable(nm.full.module)
                x = rng.random((check_batch, 3, nm.image_size, nm.image_size), dtype=np.float32)
                f = f"{nm.dataset}.full.onnx"
                runner = nm.full
            export_onnx(mod, x[:1], stage / f)
            worst = max(worst, _check(runner, OrtRunner(stage / f), x, softmax=True))
            man["nodes"][nm.dataset] = {
                "file": f, "backbone": nm.backbone, "classes": nm.classes, "class_nodes": nm.class_nodes,
                "image_size": nm.image_size, "resize": nm.resize, "tta": nm.tta,
                "model_sha256": sha256_file(models_dir / nm.dataset / "model.pth"),
            }
        if worst >= tolerance:
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            raise UserError(f"ONNX export differs from PyTorch by {worst:.2e} (limit {tolerance}); not published")
        man["max_abs_diff"] = worst
        man["torch_version"] = torch.__version__
        write_json_atomic(stage / MANIFEST, man)
        replace_dir(stage, models_dir / ONNX_DIR)
    return man


def _exportable(module):
    """A copy of ``module`` with efficientnet_pytorch's traceable Swish switched on."""
    import copy

    m = copy.deepcopy(module).cpu().eval()
    for sub in m.modules():
        if hasattr(sub, "set_export_mode"):
            sub.set_export_mode()
    return m


def _check(torch_runner, ort_runner, x: np.ndarray, softmax: bool, scale: bool = False) -> float:
    """Largest difference between the runtimes (of probabilities, or of features relative to their scale)."""
    a, b = torch_runner(x), ort_runner(x)
    if softmax:
        return float(np.abs(_softmax(a) - _softmax(b)).max())
    diff = float(np.abs(a - b).max())
    return diff / max(1.0, float(np.abs(a).max())) if scale else diff


def describe(man: dict) -> str:
    return json.dumps({k: v for k, v in man.items() if k in ("backbones", "max_abs_diff")}, indent=1)
