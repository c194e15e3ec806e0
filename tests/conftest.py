"""Shared fixtures: tiny generated image trees (no real dataset needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# Property tests are reproducible (same examples every run) and write no example database; hypothesis's
# other caches go to the temporary folder, not into the work tree.
settings.register_profile("hiernet", derandomize=True, database=None, print_blob=True)
settings.load_profile("hiernet")
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "hiernet-hypothesis")

SHAPES = ("ellipse", "rectangle", "triangle", "cross", "diamond")


def draw_image(path: Path, shape: str, seed: int, size: int = 64) -> Path:
    """A simple coloured shape on a light background (class = shape), saved as JPEG/PNG by suffix."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 150, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    m = int(rng.integers(4, 12))
    box = (m, m, size - m, size - m)
    if shape == "ellipse":
        d.ellipse(box, fill=fg)
    elif shape == "rectangle":
        d.rectangle(box, fill=fg)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=fg)
    elif shape == "diamond":
        d.polygon([(size // 2, m), (size - m, size // 2), (size // 2, size - m), (m, size // 2)], fill=fg)
    else:
        w = size // 6
        d.rectangle((size // 2 - w, m, size // 2 + w, size - m), fill=fg)
        d.rectangle((m, size // 2 - w, size - m, size // 2 + w), fill=fg)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def noise_images(folder: Path, n: int = 3, bad_at: int = 1) -> list[Path]:
    """``n`` random 48 × 40 PNG photos in ``folder`` and, at index ``bad_at``, a ``.jpg`` that is not an image."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    bad = folder / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    paths.insert(bad_at, bad)
    return paths


def pattern_maps(n: int = 60, classes: int = 3, channels: int = 192, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Feature maps ``(n, 3 views, channels, 2, 2)`` whose class (``y = arange(n) % classes``) shows only
    in a per-class channel pattern over noise, and ``y``: what tuning a tail must learn."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    pattern = rng.normal(0, 1, (classes, channels, 1, 1)).astype(np.float32)
    return (rng.normal(0, 1, (n, 3, channels, 2, 2)) + 2.0 * pattern[y][:, None]).astype(dtype), y


def make_tree(root: Path, layout: dict, per_leaf: int = 6, size: int = 64) -> Path:
    """Write ``layout`` ({"a": {"x": "ellipse", ...}, ...}; a string value is a leaf's shape) as images."""
    def walk(node: dict, prefix: Path, seed_base: int) -> None:
        for k, (name, sub) in enumerate(sorted(node.items())):
            if isinstance(sub, dict):
                walk(sub, prefix / name, seed_base * 10 + k + 1)
            else:
                for i in range(per_leaf):
                    draw_image(prefix / name / f"img_{i:03d}.jpg", sub, seed_base * 1000 + k * 100 + i, size)

    walk(layout, root, 1)
    return root


TWO_LEVEL = {
    "round": {"circle": "ellipse", "plus": "cross"},
    "angular": {"box": "rectangle", "tri": "triangle"},
}


@pytest.fixture
def two_level_tree(tmp_path: Path) -> Path:
    """A 2-level tree: 2 parents × 2 children × 6 images of 64 px."""
    return make_tree(tmp_path / "data", TWO_LEVEL)


class Payload:
    """A pickle that calls ``func(*args)`` when loaded: what a malicious model or pickle file carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


NOBODY = 65534


def run_unprivileged(args: list, **kw) -> subprocess.CompletedProcess:
    """Run ``args`` as an ordinary user, so file permissions apply even when the tests run as root (CI).

    As root the child runs as ``nobody`` (uid/gid 65534, no capabilities) through util-linux ``setpriv``;
    otherwise it runs as is.
    """
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    args = [str(a) for a in args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop privileges")
        args = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args]
    return subprocess.run(args, **kw)


def python_unprivileged(code: str, *argv) -> subprocess.CompletedProcess:
    """Run Python ``code`` (with ``src/`` importable) as an ordinary user; see :func:`run_unprivileged`."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONDONTWRITEBYTECODE="1")
    return run_unprivileged([sys.executable, "-c", code, *argv], env=env, cwd="/")


@pytest.fixture
def open_tmp():
    """A temporary folder every user can enter (pytest's own tmp_path is private to its owner)."""
    d = Path(tempfile.mkdtemp(prefix="hiernet-test-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:  # undo any chmod 0 so the folder can be removed
        if not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d)


def readline_within(proc: subprocess.Popen, seconds: float = 60.0) -> str:
    """The next line of ``proc.stdout``, or a test failure (and the process killed) after ``seconds``."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    if not ready:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"no output from the child process within {seconds} s")
    return proc.stdout.readline()


# ------------------------------------------------------------------ the tiny trained pipeline
THREE_LEVEL = {
    "apparel": {"upper": {"tee": "ellipse", "shirt": "cross"}, "lower": {"box": "rectangle"}},
    "accessories": {"hat": "triangle", "box": "diamond"},
}
FAST = ["--backbone", "efficientnet-lite0", "--image-size", "64", "--epochs", "4", "--views", "1", "-q"]


def run(args, cwd=None, check=True, env=None):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """prepare_dataset.py → train_lcpn.sh on THREE_LEVEL (7 images per leaf), trained once per session."""
    base = tmp_path_factory.mktemp("pipeline")
    data = make_tree(base / "catalogue", THREE_LEVEL, per_leaf=7)
    split, models, cache = base / "split", base / "models", base / "cache"
    prep = run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(data), "-o", str(split), "-q"], cwd="/")
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=str(split), MODELS_DIR=str(models))
    # fp32: the predictor tests pin behaviour on the tiny models (int8 has its own: tests/test_int8.py)
    train = run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--cache-dir", str(cache), *FAST, "--precision", "fp32"],
                cwd=str(base), env=env)
    return {"base": base, "data": data, "split": split, "models": models, "cache": cache, "prep": prep, "train": train}


