"""Run networks in PyTorch or onnxruntime behind one call: ``(B, ...) float32 array → (B, K) array``.

Importing this module does not import torch; only :class:`TorchRunner` and :func:`export_onnx` do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def cpu_threads() -> int:
    """Threads to use for CPU inference: all cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(name: str = "auto") -> str:
    """``auto`` → ``cuda`` if available, else ``mps`` if available, else ``cpu``; others are checked.

    Raises
    ------
    hiernet.safeio.UserError
        If the requested device is not available here.
    """
    import torch

    from .safeio import UserError

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available; use --device auto or cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


class TorchRunner:
    """Evaluate a module in inference mode on a device (AMP on CUDA)."""

    def __init__(self, module, device: str = "cpu", amp: bool = True):
        import torch

        self.torch = torch
        self.device = device
        self.module = module.to(device).eval()
        self.amp = amp and device.startswith("cuda")
        if device == "cpu":
            torch.set_num_threads(cpu_threads())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            with torch.autocast("cuda", enabled=self.amp):
                out = self.module(t)
            return out.float().cpu().numpy()


class OrtRunner:
    """Evaluate an ONNX file with onnxruntime on CPU."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or cpu_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def export_onnx(module, example: "np.ndarray", path: str | Path, opset: int = 17) -> Path:
    """Export ``module`` (inputs like ``example``, dynamic batch) to ``path``, atomically.

    efficientnet_pytorch's memory-efficient Swish is not traceable; callers switch backbones to
    export mode first (:meth:`hiernet.backbones.FeatureExtractor.set_export_mode`).
    """
    import warnings

    import torch

    from .safeio import atomic_path

    module = module.cpu().eval()
    x = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(tmp),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def onnx_available() -> bool:
    """True when onnxruntime imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
