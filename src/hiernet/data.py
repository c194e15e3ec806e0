"""Datasets, deterministic augmentation and the on-disk feature cache.

Training a head on a frozen backbone only needs each image's feature vector (and those of a few
augmented views). They are computed once and cached, keyed by the image's content hash, the
backbone and its weights, the input size and the transform; any change gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from .config import AugmentConfig
from .images import ImageDecodeError, load_rgb, resize_for_model, to_array
from .safeio import sha256_file

log = logging.getLogger(__name__)

#: Bump when preprocessing or augmentation code changes meaning (invalidates cached features).
TRANSFORM_VERSION = 3


# ----------------------------------------------------------------------------------- augmentation
def augment(img: Image.Image, size: int, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> Image.Image:
    """One random view of ``img`` at ``size × size``; the same ``rng`` state gives the same view."""
    w, h = img.size
    area = w * h
    box = (0, 0, w, h)
    for _ in range(10):
        target = area * rng.uniform(*cfg.scale)
        log_r = rng.uniform(np.log(cfg.ratio[0]), np.log(cfg.ratio[1]))
        aspect = float(np.exp(log_r))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (left, top, left + cw, top + ch)
            break
    out = img.resize((size, size), Image.BILINEAR, box=box)
    if rng.random() < cfg.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    for enh, amount in ((ImageEnhance.Brightness, cfg.brightness), (ImageEnhance.Contrast, cfg.contrast), (ImageEnhance.Color, cfg.saturation)):
        if amount:
            out = enh(out).enhance(float(rng.uniform(1 - amount, 1 + amount)))
    return out


def eval_views(img: Image.Image, size: int, policy: str) -> np.ndarray:
    """The evaluation input of an image and its mirror image.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(2, 3, size, size)`` in ``[0, 1]``: view 0 is what prediction sees.
    """
    base = resize_for_model(img, size, policy)
    return np.stack([to_array(base), to_array(base.transpose(Image.FLIP_LEFT_RIGHT))])


def aug_views(img: Image.Image, size: int, n: int, seed: int, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """``n`` random augmented views (deterministic for a given ``seed``), shape ``(n, 3, size, size)``."""
    rng = np.random.default_rng(seed)
    return np.stack([to_array(augment(img, size, rng, cfg)) for _ in range(n)])


# ----------------------------------------------------------------------------------- class folders
def read_split(folder: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """``folder/<class>/<images>`` → list of (path, class index) in ``classes`` order, sorted by path."""
    from .images import is_image_name

    items = []
    for idx, cls in enumerate(classes):
        d = folder / cls
        if d.is_dir():
            items.extend((d / f, idx) for f in sorted(os.listdir(d)) if is_image_name(f))
    return items


# ----------------------------------------------------------------------------------- feature cache
class FeatureCache:
    """Per-image feature arrays on disk, one file per (content hash, cache key).

    Each file holds a 32-byte SHA-256 of the payload, then the float32 payload of shape
    ``(n_views, dim)``. A file whose length or digest is wrong is treated as missing (and rebuilt).
    """

    def __init__(self, root: Path | None, key: dict, n_views: int, dim: int):
        self.key_dict = key
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.n_views, self.dim = n_views, dim
        self.root = None if root is None else Path(root) / "features" / self.key
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            info = self.root / "key.json"
            if not info.exists():
                from .safeio import write_json_atomic

                write_json_atomic(info, key)

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.f32"

    def get(self, digest: str) -> np.ndarray | None:
        """The cached ``(n_views, dim)`` array, or ``None`` if absent or corrupted."""
        if self.root is None:
            return None
        p = self._path(digest)
        try:
            raw = p.read_bytes()
        except OSError:
            return None
        want = 32 + 4 * self.n_views * self.dim
        if len(raw) != want or hashlib.sha256(raw[32:]).digest() != raw[:32]:
            log.warning("feature cache entry %s is corrupted; recomputing it", p)
            return None
        return np.frombuffer(raw[32:], dtype=np.float32).reshape(self.n_views, self.dim).copy()

    def put(self, digest: str, arr: np.ndarray) -> None:
        if self.root is None:
            return
        payload = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        p = self._path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_bytes(hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, p)


def bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Sequence, ahead: int):
    """Like ``pool.map`` but with at most ``ahead`` results computed before they are consumed."""
    from collections import deque

    queue: deque = deque()
    it = iter(items)
    for item in it:
        queue.append(pool.submit(fn, item))
        if len(queue) >= ahead:
            break
    while queue:
        fut = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append(pool.submit(fn, nxt))
        yield fut.result()




def extract_features(
    paths: Sequence[Path],
    runner: Callable[[np.ndarray], np.ndarray],
    cache: FeatureCache,
    make_views: Callable[[Image.Image, int], np.ndarray],
    size: int,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image (all cached views), computing only what the cache lacks.

    Parameters
    ----------
    paths : sequence of Path
        Image files.
    runner : callable
        ``(B, 3, S, S) float32 → (B, D) float32``: the backbone in PyTorch or onnxruntime.
    cache : FeatureCache
        Where features are looked up and stored.
    make_views : callable
        ``(RGB image, per-image seed) → (n_views, 3, S, S)`` float32 views to encode.
    size : int
        Input side (used to decode JPEGs at reduced size).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Features of shape ``(N, n_views, D)`` (zeros where decoding failed) and a bool mask ``(N,)`` of
        images that decoded.
    """
    n, v, d = len(paths), cache.n_views, cache.dim
    feats = np.zeros((n, v, d), dtype=np.float32)
    ok = np.ones(n, dtype=bool)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(sha256_file, paths))
        todo = []
        for i, dg in enumerate(digests):
            got = cache.get(dg)
            if got is None:
                todo.append(i)
            else:
                feats[i] = got
        if todo:
            _compute_missing(todo, paths, digests, runner, cache, make_views, size, batch_size, workers, pool,
                             feats, ok, progress, desc)
    return feats, ok


def _compute_missing(todo, paths, digests, runner, cache, make_views, size, batch_size, workers, pool,
                     feats: np.ndarray, ok: np.ndarray, progress: bool, desc: str) -> None:
    """Decode, encode and cache the images ``todo`` (indices), filling ``feats`` and ``ok`` in place."""
    from tqdm import tqdm

    v, d = cache.n_views, cache.dim

    def prep(i: int):
        try:
            img = load_rgb(paths[i], min_size=size)
        except ImageDecodeError as exc:
            log.warning("skipped %s: %s", paths[i], exc)
            return i, None
        return i, make_views(img, int(digests[i][:12], 16))

    per_batch = max(1, batch_size // v)
    chunks = [todo[k : k + per_batch] for k in range(0, len(todo), per_batch)]
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False)
    for prepared in bounded_map(pool, lambda ch: [prep(i) for i in ch], chunks, ahead=2 * max(1, workers)):
        good = [(i, x) for i, x in prepared if x is not None]
        for i, x in prepared:
            if x is None:
                ok[i] = False
        if good:
            batch = np.concatenate([x for _, x in good])
            out = np.asarray(runner(batch), dtype=np.float32).reshape(len(good), v, d)
            for (i, _), f in zip(good, out):
                feats[i] = f
                cache.put(digests[i], f)
        bar.update(len(prepared))
    bar.close()
