"""Repository-relative default locations (never the current folder) and the flags the scripts share."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root: the folder that holds ``src/``.
REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_DATA_DIR = REPO_ROOT / "split_datasets"
DEFAULT_MODELS_DIR = REPO_ROOT / "trained_models"
DEFAULT_RESULTS_DIR = REPO_ROOT / "result_images"
DEFAULT_EXAMPLE_DIR = REPO_ROOT / "dataset_example"


def default_cache_dir() -> Path:
    """Feature-cache folder: ``$HIERNET_CACHE`` if set, else ``<repo>/.cache/hiernet``."""
    env = os.environ.get("HIERNET_CACHE")
    return Path(env) if env else REPO_ROOT / ".cache" / "hiernet"


def add_inference_args(p) -> None:
    """The prediction flags predict.py and evaluate.py share (runtime, device, batching, confidence)."""
    p.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                   help="auto: onnxruntime when src/export.py has exported the current models, else PyTorch")
    p.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto",
                   help="backbone precision: auto = what the models were trained with on a CPU (int8 by default, "
                        "unless the export's int8 guard kept fp32), fp32 on a GPU; "
                        "int8 needs the ONNX runtime")
    p.add_argument("--device", default="cpu", help="torch runtime device: cpu, cuda, mps, auto (default: cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="stop at the deepest node whose path probability stays >= P (0 = always go to a leaf)")
    p.add_argument("--tta-below", type=float, default=None, metavar="P",
                   help="mirror-image averaging only where a node's top probability is below P (default 0.6; 1 = always, 0 = never)")


def check_inference_args(runtime: str, device: str, batch_size: int, min_confidence: float,
                         tta_below: float | None, topk: int = 1) -> str:
    """Check the values of :func:`add_inference_args`' flags; return the device to load models on.

    Errors name the flags: this is the scripts' check, before any library call. A device other than
    ``cpu`` (or any device with ``--runtime torch``) is resolved (``auto``) and checked to exist.

    Raises
    ------
    hiernet.safeio.UserError
        A value out of range, or a device that is not available here.
    """
    from .safeio import UserError

    if topk < 1:
        raise UserError("--topk must be at least 1")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if not 0.0 <= min_confidence <= 1.0:
        raise UserError("--min-confidence must be between 0 and 1")
    if tta_below is not None and not 0.0 <= tta_below <= 1.0:
        raise UserError(f"--tta-below must be between 0 and 1, got {tta_below}")
    if runtime == "torch" or device != "cpu":
        from .runtime import resolve_device

        return resolve_device(device)
    return device
