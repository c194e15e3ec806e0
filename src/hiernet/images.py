"""Safe image decoding: every odd-but-valid image becomes RGB, every broken one a clear reason.

Handles EXIF rotation, CMYK, palette and alpha (composited on white), 16-bit and float greyscale,
animated images (first frame), tiny and very wide images. Pillow's decompression-bomb guard stays on:
an image over ``Image.MAX_IMAGE_PIXELS`` is refused instead of decoded. No torch here.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

#: File extensions treated as images (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

# Truncated files must fail, not decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(Exception):
    """The file is not a decodable image; ``str(err)`` is a short reason."""


def is_image_name(name: str | os.PathLike) -> bool:
    """True for a non-hidden file name with an image extension (any case)."""
    base = os.path.basename(os.fspath(name))
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            arr = arr / 257.0
        elif im.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif arr.size and np.nanmax(arr) > 255:
            arr = arr / max(float(np.nanmax(arr)), 1.0) * 255.0
        arr = np.nan_to_num(np.clip(arr, 0, 255)).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


_OPEN_LOCK = threading.Lock()


def _open_first_frame(path) -> Image.Image:
    """``Image.open`` on frame 0 with the decompression-bomb guard on, raising instead of warning.

    Only headers are read here. It runs under a lock because the warnings filter that turns
    Pillow's ``DecompressionBombWarning`` into an error is process-wide state: decoding threads
    entering and leaving ``catch_warnings`` at once could otherwise leave it set or drop it. The size
    is also checked explicitly, so the guard holds even if something else resets the filters.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(path)
        try:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise Image.DecompressionBombError(
                    f"Image size ({im.width * im.height} pixels) exceeds limit of {limit} pixels"
                )
            if getattr(im, "is_animated", False):
                im.seek(0)
        except BaseException:
            im.close()
            raise
        return im


def load_rgb(path: str | os.PathLike, min_size: int | None = None) -> Image.Image:
    """Decode ``path`` to an upright RGB image.

    Parameters
    ----------
    path : path-like
        The image file.
    min_size : int, optional
        If given, JPEGs are decoded in draft mode at the smallest scale (1/2, 1/4, 1/8) whose shorter
        side is still at least ``min_size`` pixels: much faster, same result after resizing.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``, EXIF orientation applied, shape ``(H, W, 3)`` as an array.

    Raises
    ------
    ImageDecodeError
        Missing, unreadable, truncated, not an image, or larger than Pillow's decompression-bomb limit.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ImageDecodeError("is a folder, not a file")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise ImageDecodeError("not a regular file (a pipe or device)")
    return _decode(path, min_size)


def decode_rgb(data: bytes, min_size: int | None = None) -> Image.Image:
    """:func:`load_rgb` on an image's bytes held in memory (an upload): same checks, same result."""
    return _decode(io.BytesIO(data), min_size)


def _decode(source, min_size: int | None) -> Image.Image:
    """Decode a path or binary file object (see :func:`load_rgb`); every failure is an ImageDecodeError."""
    try:
        with _open_first_frame(source) as im:
            if min_size and im.format == "JPEG":
                w, h = im.size
                scale = min(w, h) / float(min_size)
                if scale >= 2:
                    im.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a folder, not a file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"too large, refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image Pillow can identify") from None
    except OSError as exc:
        if exc.errno is not None and exc.filename is not None:
            raise ImageDecodeError(f"cannot read: {exc.strerror}") from None
        raise ImageDecodeError(f"corrupt or truncated image ({exc})") from None
    except Exception as exc:  # Pillow plugins raise many odd types on hostile bytes
        raise ImageDecodeError(f"cannot decode ({type(exc).__name__}: {exc})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageDecodeError("image has no pixels")
    return rgb


def check_image(path: str | os.PathLike) -> str | None:
    """Return ``None`` if ``path`` decodes to RGB, else a short reason why not."""
    try:
        load_rgb(path)
    except ImageDecodeError as exc:
        return str(exc)
    return None


#: How images are made square for a backbone (see :func:`resize_for_model`).
RESIZE_POLICIES = ("crop", "squash", "pad")


def resize_for_model(img: Image.Image, size: int, policy: str = "squash") -> Image.Image:
    """Resize an RGB image to ``size × size`` for a backbone.

    Parameters
    ----------
    img : PIL.Image.Image
        RGB input of any shape.
    size : int
        Output side in pixels.
    policy : {"squash", "crop", "pad"}
        ``squash`` stretches the whole image (keeps the full garment), ``crop`` resizes the shorter
        side and centre-crops, ``pad`` letterboxes on white.

    Returns
    -------
    PIL.Image.Image
        RGB, ``size × size``.
    """
    w, h = img.size
    if policy == "squash":
        return img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    if policy == "crop":  # resample only the centred square (one pass, no work on pixels cut away)
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=None)
    if policy == "pad":
        r = size / max(w, h)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise ValueError(f"unknown resize policy {policy!r}; use squash, crop or pad")


def to_array(img: Image.Image) -> np.ndarray:
    """RGB image → float32 array of shape ``(3, H, W)`` in ``[0, 1]`` (normalisation is in the model)."""
    arr = np.asarray(img)  # (H, W, 3) uint8: transpose the bytes, then convert once
    out = arr.transpose(2, 0, 1).astype(np.float32, order="C")
    out *= np.float32(1.0 / 255.0)
    return out


def load_for_model(path: str | os.PathLike, size: int, policy: str = "squash") -> np.ndarray:
    """Decode, resize and convert one image: the evaluation-time input of every model.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(3, size, size)``, values in ``[0, 1]``.
    """
    return to_array(resize_for_model(load_rgb(path, min_size=size), size, policy))


def list_images(folder: Path) -> list[Path]:
    """Image files (by extension, hidden ones skipped) anywhere under ``folder``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_name(f))
    return out
