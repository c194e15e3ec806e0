"""The int8 backbone: onnxruntime static quantisation of the exported fp32 backbone (CPU only).

:func:`int8_backbone` turns the fp32 ONNX backbone into a QDQ model (per-channel int8 weights, uint8
activations) calibrated on :data:`N_CALIBRATION` training images of the tree being trained, chosen
with a seed (:func:`calibration_images`). The result is cached beside the features
(``<cache>/int8/backbone-<key>.onnx``), keyed by :func:`int8_key` (backbone, weights, size, resize,
transform version, the calibration images' content hashes and the onnxruntime version); the first
training process that needs it builds it under a lock, later ones reuse it. Heads are trained on the
features of the backbone they will run with (:func:`resolve_train_precision`).

Importing this module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .safeio import UserError

log = logging.getLogger(__name__)

#: The values of ``--precision``.
PRECISIONS = ("auto", "fp32", "int8")
#: Calibration images per quantised backbone.
N_CALIBRATION = 128
#: A leaf-accuracy drop (validation split, int8 vs fp32 backbone, same heads) above this keeps fp32.
GUARD_MAX_DROP = 0.005


def int8_supported() -> bool:
    """True when onnxruntime's quantisation tools import and the processor has int8 kernels
    (x86-64 or 64-bit ARM): where ``auto`` picks int8."""
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return False
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_train_precision(precision: str, device: str, mode: str, onnx: bool, cache: bool = True) -> str:
    """The precision a training run computes its features with: ``fp32`` or ``int8``.

    ``auto`` is int8 where it runs (frozen features on a CPU with onnxruntime, its quantisation tools,
    an x86-64 or ARM64 processor, a feature cache), else fp32 (GPUs, fine-tuning, PyTorch features).

    Raises
    ------
    UserError
        ``int8`` asked for where it cannot run (GPU, fine-tuning, PyTorch features) or is unknown.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use auto, fp32 or int8")
    usable = device == "cpu" and mode == "frozen" and onnx
    if precision == "auto":
        return "int8" if usable and cache and int8_supported() else "fp32"
    if precision == "int8" and not usable:
        raise UserError("--precision int8 needs frozen features computed on the CPU with onnxruntime "
                        "(--device cpu, --mode frozen, no --no-onnx); use --precision fp32")
    if precision == "int8" and not int8_supported():
        raise UserError("--precision int8 needs onnxruntime's quantisation tools on x86-64 or ARM64; use --precision fp32")
    return precision


def calibration_images(paths: Sequence, n: int = N_CALIBRATION, seed: int = 0) -> list[Path]:
    """A seeded choice of ``n`` of ``paths`` (all of them when fewer), in a stable order."""
    paths = sorted(Path(p) for p in paths)
    if len(paths) <= n:
        return paths
    idx = np.random.default_rng(seed).choice(len(paths), size=n, replace=False)
    return [paths[i] for i in sorted(idx)]


def int8_key(fp32_key: dict, calibration: Sequence) -> str:
    """The cache key of a quantised backbone.

    Parameters
    ----------
    fp32_key : dict
        What identifies the fp32 backbone and its input (backbone, weights, image size, resize, transform).
    calibration : sequence of path
        The calibration images (their content hashes enter the key, not their names).
    """
    import onnxruntime

    from .safeio import sha256_file

    digests = sorted(sha256_file(p) for p in calibration)
    doc = {**fp32_key, "calibration": digests, "onnxruntime": onnxruntime.__version__, "format": "qdq-int8-v2"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _blocking_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` that waits for another holder (dropped if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


class ImageCalibrationReader:
    """An onnxruntime ``CalibrationDataReader``: the calibration images as model inputs, in batches.

    Each :meth:`get_next` returns ``{input_name: float32 (B, 3, size, size) in [0, 1]}``, then ``None``.
    Images that fail to decode are skipped.
    """

    def __init__(self, paths: Sequence, size: int, resize: str, input_name: str = "input", batch_size: int = 16):
        self.paths, self.size, self.resize = list(paths), size, resize
        self.input_name, self.batch_size = input_name, batch_size
        self._next = 0

    def get_next(self) -> dict | None:
        from .images import ImageDecodeError, load_for_model

        while self._next < len(self.paths):
            chunk = self.paths[self._next:self._next + self.batch_size]
            self._next += self.batch_size
            arrays = []
            for p in chunk:
                try:
                    arrays.append(load_for_model(p, self.size, self.resize))
                except ImageDecodeError as exc:
                    log.warning("calibration: skipped %s: %s", p, exc)
            if arrays:
                return {self.input_name: np.stack(arrays)}
        return None

    def rewind(self) -> None:
        self._next = 0


#: What onnxruntime's quantiser logs that says nothing to a user: its advice to pre-process (done here),
#: and one line per weight channel whose scale it widened for the bias (hundreds per backbone).
QUANTIZER_CHATTER = ("pre-processing", "Increased scale[", "Performing symbolic shape inference")


class _QuietQuantizer(logging.Filter):
    """Drops :data:`QUANTIZER_CHATTER` (onnxruntime logs it at INFO, on the root logger or its module's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(c in message for c in QUANTIZER_CHATTER)


def quantize_backbone(fp32_onnx: Path, out: Path, calibration: Sequence, size: int, resize: str) -> Path:
    """Write the QDQ int8 version of ``fp32_onnx`` to ``out`` (atomically), calibrated on ``calibration``.

    Per-channel int8 weights, uint8 activations, MinMax calibration on the images' model inputs
    ``(B, 3, size, size)``.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .safeio import atomic_path

    class Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hush = _QuietQuantizer()
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.shape_inference")]
    for logger in loggers:
        logger.addFilter(hush)
    try:
        with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix=".pre-", dir=out.parent) as work:
            # Shape inference and graph fusion first (BatchNorm folded into Conv, ...): quantising the
            # fused graph halves the int8 backbone's time here (28 -> 56 images/s, Lite1+Lite0 280 px, 2 cores)
            pre = Path(work) / "pre.onnx"
            quant_pre_process(str(fp32_onnx), str(pre))
            quantize_static(str(pre), str(tmp), Reader(calibration, size, resize), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        for logger in loggers:
            logger.removeFilter(hush)
    for leftover in out.parent.glob("augmented_model*.onnx"):  # older onnxruntime left its calibration model
        leftover.unlink(missing_ok=True)
    return out


def int8_backbone(fp32_onnx, cache_dir: Path, key: str, calibration: Sequence, size: int, resize: str) -> Path:
    """The cached int8 backbone ``key``, built from ``fp32_onnx`` (a path, or a callable returning one)
    by the first process that needs it, under a lock; the others wait and reuse it."""
    path = Path(cache_dir) / "int8" / f"backbone-{key}.onnx"
    if path.exists():
        return path
    with _blocking_lock(path.with_suffix(".lock")):
        if not path.exists():
            src = fp32_onnx() if callable(fp32_onnx) else fp32_onnx
            log.info("quantising the backbone to int8 (calibration: %d training images)", len(calibration))
            quantize_backbone(Path(src), path, calibration, size, resize)
    return path


def is_quantized(path: Path) -> bool:
    """True when the ONNX file holds QDQ int8 nodes (``QuantizeLinear``/``DequantizeLinear``)."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return {"QuantizeLinear", "DequantizeLinear"} <= ops

