"""Feature cache and deterministic views."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import draw_image
from hiernet.data import FeatureCache, aug_views, eval_views, extract_features


def _paths(tmp_path, n=5):
    return [draw_image(tmp_path / f"img{i}.png", "ellipse", i) for i in range(n)]


class CountingRunner:
    """Stand-in backbone: mean colour per channel, repeated; counts the images it sees."""

    def __init__(self, dim=6):
        self.dim, self.seen = dim, 0

    def __call__(self, x):
        self.seen += len(x)
        return np.tile(x.mean(axis=(2, 3)), (1, self.dim // 3)).astype(np.float32)


def test_views_are_deterministic_and_shaped():
    img = Image.new("RGB", (50, 30), (10, 200, 30))
    ev = eval_views(img, 32, "crop")
    assert ev.shape == (2, 3, 32, 32) and ev.dtype == np.float32 and 0 <= ev.min() and ev.max() <= 1
    a, b = aug_views(img, 32, 3, seed=7), aug_views(img, 32, 3, seed=7)
    assert a.shape == (3, 3, 32, 32) and np.array_equal(a, b)
    assert not np.array_equal(a, aug_views(img, 32, 3, seed=8))


def test_features_are_computed_once_then_read_from_cache(tmp_path):
    paths = _paths(tmp_path)
    cache = FeatureCache(tmp_path / "cache", {"k": 1}, n_views=2, dim=6)
    run = CountingRunner()
    make = lambda img, s: eval_views(img, 32, "crop")  # noqa: E731
    f1, ok = extract_features(paths, run, cache, make, 32, progress=False)
    assert f1.shape == (5, 2, 6) and ok.all() and run.seen == 10
    f2, _ = extract_features(paths, run, cache, make, 32, progress=False)
    assert run.seen == 10 and np.array_equal(f1, f2)
    # another key (backbone, size, transform...) is another cache
    other = FeatureCache(tmp_path / "cache", {"k": 2}, n_views=2, dim=6)
    extract_features(paths, run, other, make, 32, progress=False)
    assert run.seen == 20


def test_corrupted_entry_is_detected_and_rebuilt(tmp_path):
    paths = _paths(tmp_path, 2)
    cache = FeatureCache(tmp_path / "cache", {"k": 1}, n_views=2, dim=6)
    run = CountingRunner()
    make = lambda img, s: eval_views(img, 32, "crop")  # noqa: E731
    f1, _ = extract_features(paths, run, cache, make, 32, progress=False)
    entry = next(cache.root.rglob("*.f32"))
    raw = bytearray(entry.read_bytes())
    raw[40] ^= 0xFF  # flip a bit in the payload
    entry.write_bytes(bytes(raw))
    f2, _ = extract_features(paths, run, cache, make, 32, progress=False)
    assert run.seen == 4 + 2 and np.array_equal(f1, f2)
    entry.write_bytes(b"short")  # truncated
    extract_features(paths, run, cache, make, 32, progress=False)
    assert run.seen == 8


def test_same_content_shares_a_cache_entry_and_bad_images_are_masked(tmp_path):
    paths = _paths(tmp_path, 2)
    copy = tmp_path / "copy.png"
    copy.write_bytes(paths[0].read_bytes())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    cache = FeatureCache(tmp_path / "cache", {"k": 1}, n_views=2, dim=6)
    run = CountingRunner()
    extract_features(paths, run, cache, lambda img, s: eval_views(img, 32, "crop"), 32, progress=False)
    f, ok = extract_features([copy, bad], run, cache, lambda img, s: eval_views(img, 32, "crop"), 32, progress=False)
    assert ok.tolist() == [True, False] and run.seen == 4


def test_feature_cache_key_separates_gpu_half_precision_from_cpu_features(tmp_path):
    """fp16 features (autocast on CUDA) and fp32 CPU ones never share cache entries; CPU keys are unchanged."""
    from types import SimpleNamespace

    from hiernet.data import TRANSFORM_VERSION, FeatureCache
    from hiernet.features import feature_cache_key

    bb = SimpleNamespace(spec=SimpleNamespace(name="efficientnet-lite0"), image_size=64, weights_fingerprint="abc")
    cpu = feature_cache_key(bb, "crop", "eval", "cpu")
    assert cpu == {"backbone": "efficientnet-lite0", "image_size": 64, "weights": "abc", "resize": "crop",
                   "transform_version": TRANSFORM_VERSION, "kind": "eval"}  # the fields of earlier versions
    gpu = feature_cache_key(bb, "crop", "eval", "cuda:1")
    assert gpu["precision"] == "fp16" and feature_cache_key(bb, "crop", "eval", "mps") == cpu
    assert FeatureCache(tmp_path, cpu, 2, 8).key != FeatureCache(tmp_path, gpu, 2, 8).key
