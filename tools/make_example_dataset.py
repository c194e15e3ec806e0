#!/usr/bin/env python3
"""Generate a small, deterministic, SYNTHETIC example catalogue of product photos.

The generator draws simple product-like pictures (tops, bottoms, bags, footwear,
hats) whose *shape* identifies the child category, while colour, pattern fill,
size, rotation, position and background are randomised. Children of the same
parent share a family look (e.g. every top has a torso with a neckline, every
pair of bottoms has a waistband) so that a parent classifier is learnable too.

Two folders are written:

``OUT/<parent>/<child>/<child>_<NNN>.jpg``
    The training catalogue (``--per-leaf`` images per leaf class).
``SAMPLES_OUT/<parent>_<child>_<k>.jpg``
    A few unseen images per leaf class, drawn from a different random stream.

Both folders contain a marker file (``.generated-by-make_example_dataset``).
An existing target folder is only ever replaced when it is empty or carries
that marker; it is built in a hidden temporary sibling folder and swapped in by
``hiernet.safeio.replace_dir`` (the old folder stays until the new one is in
place; leftovers of an interrupted earlier run are removed first).

Only Pillow, numpy, the standard library and ``hiernet.safeio`` (from src/) are
used. Same arguments give byte-identical files.

Examples
--------
Write ``dataset_example/`` and ``sample_images/`` at the repository root::

    python tools/make_example_dataset.py

A tiny version somewhere else::

    python tools/make_example_dataset.py --out /tmp/ds --samples-out /tmp/samples \\
        --per-leaf 3 --size 64
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from hiernet.safeio import remove_stale, replace_dir  # noqa: E402
"""Repository root: the parent of the ``tools/`` folder holding this file."""

MARKER = ".generated-by-make_example_dataset"
"""Name of the marker file written into every output root."""

SUPERSAMPLE = 2
"""Drawing happens at ``SUPERSAMPLE`` times the output size, then is downsampled."""

JPEG_QUALITY = 85

TRAIN_STREAM = 0
SAMPLE_STREAM = 1

Point = Tuple[float, float]


# --------------------------------------------------------------------------- #
# Drawing helpers
# --------------------------------------------------------------------------- #
class _Pen:
    """Draw shapes in unit coordinates onto three greyscale layers.

    Layers are ``body`` (filled with the pattern), ``accent`` (a solid accent
    colour, drawn over the body) and ``detail`` (dark seams and lines, drawn on
    top of everything). Coordinates are in ``[0, 1]``, ``x`` to the right and
    ``y`` downwards; a small margin is kept so outlines are never clipped.

    Parameters
    ----------
    side : int
        Side of the square canvas in pixels.
    """

    LAYERS = ("body", "accent", "detail")

    def __init__(self, side: int) -> None:
        self.side = side
        self.margin = 0.06 * side
        self.scale = side - 2 * self.margin
        self.images = {k: Image.new("L", (side, side), 0) for k in self.LAYERS}
        self.draws = {k: ImageDraw.Draw(v) for k, v in self.images.items()}

    def p(self, x: float, y: float) -> Point:
        """Map a unit coordinate to pixels."""
        return (self.margin + x * self.scale, self.margin + y * self.scale)

    def w(self, t: float) -> int:
        """Map a unit length (line width) to at least one pixel."""
        return max(1, int(round(t * self.scale)))

    def _box(self, x0: float, y0: float, x1: float, y1: float) -> List[float]:
        a, b = self.p(x0, y0)
        c, d = self.p(x1, y1)
        return [min(a, c), min(b, d), max(a, c), max(b, d)]

    def _targets(self, layer: str, erase: bool):
        if erase:
            return [(d, 0) for d in self.draws.values()]
        return [(self.draws[layer], 255)]

    def poly(self, pts: Sequence[Point], layer: str = "body", erase: bool = False) -> None:
        """Fill a polygon given by unit points."""
        px = [self.p(x, y) for x, y in pts]
        for d, v in self._targets(layer, erase):
            d.polygon(px, fill=v)

    def ellipse(self, x0: float, y0: float, x1: float, y1: float,
                layer: str = "body", erase: bool = False) -> None:
        """Fill an ellipse inside a unit bounding box."""
        for d, v in self._targets(layer, erase):
            d.ellipse(self._box(x0, y0, x1, y1), fill=v)

    def rect(self, x0: float, y0: float, x1: float, y1: float, radius: float = 0.0,
             layer: str = "body", erase: bool = False) -> None:
        """Fill a (rounded) rectangle inside a unit bounding box."""
        box = self._box(x0, y0, x1, y1)
        r = radius * self.scale
        for d, v in self._targets(layer, erase):
            if r > 0:
                d.rounded_rectangle(box, radius=r, fill=v)
            else:
                d.rectangle(box, fill=v)

    def chord(self, x0: float, y0: float, x1: float, y1: float, start: float, end: float,
              layer: str = "body") -> None:
        """Fill a chord (ellipse segment) of a unit bounding box."""
        self.draws[layer].chord(self._box(x0, y0, x1, y1), start, end, fill=255)

    def line(self, pts: Sequence[Point], width: float, layer: str = "detail") -> None:
        """Draw a poly-line of unit ``width`` with rounded joints."""
        px = [self.p(x, y) for x, y in pts]
        self.draws[layer].line(px, fill=255, width=self.w(width), joint="curve")
        r = self.w(width) / 2.0
        for x, y in (px[0], px[-1]):
            self.draws[layer].ellipse([x - r, y - r, x + r, y + r], fill=255)

    def arc(self, x0: float, y0: float, x1: float, y1: float, start: float, end: float,
            width: float, layer: str = "detail") -> None:
        """Draw an elliptic arc (degrees, clockwise from 3 o'clock)."""
        self.draws[layer].arc(self._box(x0, y0, x1, y1), start, end, fill=255,
                              width=self.w(width))

    def arrays(self) -> Dict[str, np.ndarray]:
        """Return the layers as float arrays in ``[0, 1]``."""
        return {k: np.asarray(v, dtype=np.float32) / 255.0 for k, v in self.images.items()}


def _bez(p0: Point, p1: Point, p2: Point, n: int = 10) -> List[Point]:
    """Points along a quadratic Bezier curve from ``p0`` to ``p2`` (inclusive)."""
    t = np.linspace(0.0, 1.0, n)
    x = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t ** 2 * p2[0]
    y = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t ** 2 * p2[1]
    return list(zip(x.tolist(), y.tolist()))


def _mirror(pts: Sequence[Point], cx: float = 0.5) -> List[Point]:
    """Mirror points about the vertical line ``x = cx``, reversing their order."""
    return [(2 * cx - x, y) for x, y in reversed(pts)]


# --------------------------------------------------------------------------- #
# Shapes: one function per child class
# --------------------------------------------------------------------------- #
# Each draws a characteristic silhouette with a little random variation of its
# proportions (small enough never to blur the class cue).

def _top_torso(pen: _Pen, rng: np.random.Generator, top: float, hem: float, w: float) -> None:
    cx = 0.5
    torso = [(cx - w - 0.01, top + 0.015), (cx - 0.08, top), (cx + 0.08, top),
             (cx + w + 0.01, top + 0.015), (cx + w, hem), (cx - w, hem)]
    pen.poly(torso)
    # round neckline, cut out, with a collar seam
    pen.ellipse(cx - 0.085, top - 0.06, cx + 0.085, top + 0.07, erase=True)
    pen.arc(cx - 0.1, top - 0.075, cx + 0.1, top + 0.085, 0, 180, 0.018)
    # hem seam
    pen.line([(cx - w + 0.01, hem - 0.035), (cx + w - 0.01, hem - 0.035)], 0.008)


def draw_tshirt(pen: _Pen, rng: np.random.Generator) -> None:
    """Short, wide sleeves sticking out sideways: the classic T silhouette."""
    cx, top = 0.5, 0.12
    hem = rng.uniform(0.84, 0.92)
    w = rng.uniform(0.19, 0.22)
    _top_torso(pen, rng, top, hem, w)
    reach = rng.uniform(0.17, 0.2)
    drop = rng.uniform(0.2, 0.25)
    for s in (-1, 1):
        sh = (cx + s * (w + 0.01), top + 0.015)
        out = (cx + s * (w + reach), top + drop)
        inn = (cx + s * (w + reach - 0.1), top + drop + 0.1)
        pit = (cx + s * (w - 0.005), top + 0.22)
        pen.poly([sh, out, inn, pit])
        # sleeve hem seam
        pen.line([(out[0] - s * 0.02, out[1] + 0.015), (inn[0] - s * 0.02, inn[1] - 0.005)], 0.01)


def draw_longsleeve(pen: _Pen, rng: np.random.Generator) -> None:
    """Long sleeves hanging down to the hem, with cuffs and a visible gap to the torso."""
    cx, top = 0.5, 0.1
    hem = rng.uniform(0.86, 0.93)
    w = rng.uniform(0.17, 0.2)
    _top_torso(pen, rng, top, hem, w)
    for s in (-1, 1):
        sh = (cx + s * (w + 0.01), top + 0.015)
        out = (cx + s * (w + 0.23), hem - 0.04)
        inn = (cx + s * (w + 0.11), hem)
        pit = (cx + s * (w - 0.005), top + 0.19)
        pen.poly([sh, out, inn, pit])
        # cuff: band along the wrist end of the sleeve
        k = 0.12
        c_out = (out[0] + (sh[0] - out[0]) * k, out[1] + (sh[1] - out[1]) * k)
        c_inn = (inn[0] + (pit[0] - inn[0]) * k, inn[1] + (pit[1] - inn[1]) * k)
        pen.poly([c_out, out, inn, c_inn], layer="accent")


def draw_tanktop(pen: _Pen, rng: np.random.Generator) -> None:
    """No sleeves: thin shoulder straps, deep armholes and a deep scoop neck."""
    cx, top = 0.5, 0.06
    hem = rng.uniform(0.86, 0.94)
    w = rng.uniform(0.2, 0.24)
    strap_out = rng.uniform(0.12, 0.14)
    strap_in = strap_out - rng.uniform(0.045, 0.06)
    pit_y = top + rng.uniform(0.3, 0.36)
    neck_y = top + rng.uniform(0.24, 0.3)
    left = [(cx - w, hem), (cx - w, pit_y)]
    left += _bez((cx - w, pit_y), (cx - strap_out - 0.01, pit_y - 0.04), (cx - strap_out, top))[1:]
    left += _bez((cx - strap_in, top), (cx - strap_in + 0.01, neck_y), (cx, neck_y))
    right = _mirror(left)
    pen.poly(left + right[1:])
    # bindings along neck and armholes
    neck = _bez((cx - strap_in, top + 0.01), (cx - strap_in + 0.01, neck_y), (cx, neck_y))
    pen.line(neck + _mirror(neck)[1:], 0.014)
    for s in (-1, 1):
        arm = _bez((cx + s * (w - 0.005), pit_y), (cx + s * (strap_out + 0.005), pit_y - 0.04),
                   (cx + s * (strap_out - 0.005), top + 0.01))
        pen.line(arm, 0.014)
    pen.line([(cx - w + 0.01, hem - 0.035), (cx + w - 0.01, hem - 0.035)], 0.008)


def _waistband(pen: _Pen, rng: np.random.Generator, hw: float, top: float) -> float:
    """Draw the waistband shared by all bottoms; return its lower edge."""
    cx = 0.5
    low = top + 0.07
    pen.rect(cx - hw, top, cx + hw, low, radius=0.01, layer="accent")
    for fx in (-0.7, -0.25, 0.25, 0.7):
        x = cx + fx * hw
        pen.line([(x, top - 0.005), (x, low + 0.01)], 0.012)
    return low


def draw_trousers(pen: _Pen, rng: np.random.Generator) -> None:
    """Two long, separate legs reaching the bottom: a tall silhouette."""
    cx, top = 0.5, 0.02
    hw = rng.uniform(0.16, 0.19)
    wb = _waistband(pen, rng, hw, top)
    crotch = rng.uniform(0.38, 0.42)
    bottom = 0.98
    flare = rng.uniform(-0.02, 0.03)
    gap = rng.uniform(0.03, 0.05)
    left = [(cx - hw, wb), (cx - hw - 0.02, crotch), (cx - hw - flare, bottom),
            (cx - gap, bottom), (cx, crotch)]
    pen.poly(left + _mirror(left)[1:])
    pen.line(_bez((cx, wb), (cx + 0.05, wb + 0.12), (cx, crotch - 0.06)), 0.01)
    for s in (-1, 1):
        pen.line(_bez((cx + s * (hw - 0.01), wb + 0.02), (cx + s * (hw - 0.09), wb + 0.03),
                      (cx + s * (hw + 0.005), wb + 0.12)), 0.01)
        # hem seams
        pen.line([(cx + s * (hw + flare - 0.01), bottom - 0.035), (cx + s * (gap + 0.01), bottom - 0.035)],
                 0.008)


def draw_shorts(pen: _Pen, rng: np.random.Generator) -> None:
    """Two short, wide legs ending well above the knee: a squat silhouette."""
    cx, top = 0.5, 0.2
    hw = rng.uniform(0.2, 0.23)
    wb = _waistband(pen, rng, hw, top)
    crotch = wb + rng.uniform(0.26, 0.3)
    hem = crotch + rng.uniform(0.14, 0.18)
    spread = rng.uniform(0.05, 0.08)
    left = [(cx - hw, wb), (cx - hw - spread, hem - 0.02), (cx - 0.02, hem + 0.02), (cx, crotch)]
    pen.poly(left + _mirror(left)[1:])
    pen.line(_bez((cx, wb), (cx + 0.05, wb + 0.1), (cx, crotch - 0.05)), 0.01)
    for s in (-1, 1):
        # rolled-up cuffs
        a = (cx + s * (hw + spread), hem - 0.02)
        b = (cx + s * 0.02, hem + 0.02)
        pen.poly([(a[0] + s * -0.006, a[1] - 0.06), a, b, (b[0], b[1] - 0.06)], layer="accent")
        pen.line(_bez((cx + s * (hw - 0.01), wb + 0.02), (cx + s * (hw - 0.09), wb + 0.03),
                      (cx + s * (hw + 0.01), wb + 0.12)), 0.01)


def draw_skirt(pen: _Pen, rng: np.random.Generator) -> None:
    """A single flared A-line piece with pleats and a curved hem, no legs."""
    cx, top = 0.5, 0.08
    hw = rng.uniform(0.16, 0.19)
    wb = _waistband(pen, rng, hw, top)
    hem = rng.uniform(0.72, 0.82)
    flare = rng.uniform(0.17, 0.23)
    left = [(cx - hw, wb), (cx - hw - flare, hem)]
    left += _bez((cx - hw - flare, hem), (cx - hw, hem + 0.06), (cx, hem + 0.06))[1:]
    pen.poly(left + _mirror(left)[1:])
    n = int(rng.integers(2, 4))
    for i in range(1, n + 1):
        f = i / (n + 1)
        for s in (-1, 1):
            pen.line([(cx + s * hw * f, wb), (cx + s * (hw + flare) * f, hem + 0.05)], 0.01)
    pen.line([(cx, wb), (cx, hem + 0.05)], 0.01)


def draw_backpack(pen: _Pen, rng: np.random.Generator) -> None:
    """Tall rounded body, small grab loop, big front pocket and side pockets."""
    cx = 0.5
    hw = rng.uniform(0.23, 0.26)
    top = rng.uniform(0.14, 0.18)
    bottom = 0.96
    # grab loop on top
    pen.arc(cx - 0.08, top - 0.1, cx + 0.08, top + 0.1, 180, 360, 0.03, layer="accent")
    pen.rect(cx - hw, top, cx + hw, bottom, radius=0.16)
    # side pockets
    for s in (-1, 1):
        x0, x1 = sorted((cx + s * (hw - 0.03), cx + s * (hw + 0.06)))
        pen.rect(x0, 0.55, x1, bottom - 0.04, radius=0.04, layer="accent")
    # front pocket with zip
    pen.rect(cx - hw + 0.06, 0.56, cx + hw - 0.06, bottom - 0.05, radius=0.07, layer="accent")
    pen.line([(cx - hw + 0.1, 0.61), (cx + hw - 0.1, 0.61)], 0.012)
    pen.rect(cx + hw - 0.13, 0.62, cx + hw - 0.1, 0.69, layer="detail")
    # main zip following the rounded top
    pen.arc(cx - hw + 0.05, top + 0.05, cx + hw - 0.05, top + 0.5, 180, 360, 0.012)


def draw_handbag(pen: _Pen, rng: np.random.Generator) -> None:
    """Wide trapezoid body with a large arched handle and a flap with a clasp."""
    cx = 0.5
    top = rng.uniform(0.48, 0.52)
    bottom = 0.92
    tw = rng.uniform(0.26, 0.3)
    bw = tw + rng.uniform(0.08, 0.12)
    # the big handle
    hh = rng.uniform(0.34, 0.4)
    hwid = rng.uniform(0.16, 0.2)
    pen.arc(cx - hwid, top - hh, cx + hwid, top + hh, 180, 360, 0.045, layer="accent")
    body = [(cx - tw, top), (cx + tw, top), (cx + bw, bottom - 0.05)]
    body += _bez((cx + bw, bottom - 0.05), (cx + bw, bottom), (cx + bw - 0.05, bottom))[1:]
    body = body + _mirror(body[2:])
    pen.poly(body)
    # flap and clasp
    flap = [(cx - tw, top), (cx + tw, top), (cx + tw + 0.02, top + 0.12)]
    flap += _bez((cx + tw + 0.02, top + 0.12), (cx + 0.1, top + 0.2), (cx, top + 0.2))[1:]
    flap = flap + _mirror(flap[2:])
    pen.poly(flap, layer="accent")
    pen.ellipse(cx - 0.035, top + 0.16, cx + 0.035, top + 0.23, layer="detail")
    for s in (-1, 1):
        pen.rect(cx + s * hwid - 0.03, top - 0.04, cx + s * hwid + 0.03, top + 0.01, layer="detail")


def _sole(pen: _Pen, x0: float, x1: float, y0: float, y1: float) -> None:
    pen.rect(x0, y0, x1, y1, radius=min(0.04, (y1 - y0) / 2), layer="accent")
    pen.line([(x0 + 0.02, y0 + (y1 - y0) * 0.55), (x1 - 0.02, y0 + (y1 - y0) * 0.55)], 0.006)


def draw_sneaker(pen: _Pen, rng: np.random.Generator) -> None:
    """Low shoe with a thick sole, padded collar and laces: long and flat."""
    sole_top = rng.uniform(0.6, 0.63)
    sole_h = rng.uniform(0.09, 0.12)
    collar = rng.uniform(0.36, 0.4)
    upper = [(0.07, sole_top + 0.01), (0.06, collar + 0.02)]
    upper += _bez((0.06, collar + 0.02), (0.07, collar - 0.03), (0.16, collar - 0.02))[1:]
    upper += _bez((0.16, collar - 0.02), (0.28, collar + 0.04), (0.36, collar - 0.06))[1:]
    upper += [(0.44, collar - 0.08), (0.47, collar - 0.03)]
    upper += _bez((0.47, collar - 0.03), (0.78, sole_top - 0.14), (0.94, sole_top + 0.01))[1:]
    pen.poly(upper)
    _sole(pen, 0.04, 0.97, sole_top, sole_top + sole_h)
    # laces
    for i in range(4):
        t = 0.15 + 0.2 * i
        x = 0.47 + t * 0.3
        y = collar - 0.03 + t * 0.14
        pen.line([(x - 0.035, y - 0.045), (x + 0.035, y + 0.02)], 0.014)
    # side stripe
    pen.line(_bez((0.22, sole_top - 0.02), (0.38, sole_top - 0.2), (0.6, sole_top - 0.03)), 0.02)


def draw_boot(pen: _Pen, rng: np.random.Generator) -> None:
    """Tall shaft rising far above the foot, heel block: an L silhouette."""
    shaft_top = rng.uniform(0.03, 0.08)
    sole_top = rng.uniform(0.76, 0.8)
    back = rng.uniform(0.2, 0.24)
    front = back + rng.uniform(0.27, 0.31)
    upper = [(back, shaft_top), (front, shaft_top), (front + 0.01, sole_top - 0.28)]
    upper += _bez((front + 0.01, sole_top - 0.28), (front + 0.1, sole_top - 0.2),
                  (0.9, sole_top - 0.08))[1:]
    upper += [(0.93, sole_top), (back - 0.02, sole_top), (back - 0.015, sole_top - 0.3)]
    pen.poly(upper)
    pen.rect(back - 0.005, shaft_top, front + 0.005, shaft_top + 0.08, layer="accent")
    _sole(pen, back - 0.04, 0.95, sole_top, sole_top + 0.06)
    pen.rect(back - 0.04, sole_top + 0.02, back + 0.13, sole_top + 0.15, radius=0.01, layer="accent")
    # side zip / seam
    pen.line([(back + 0.1, shaft_top + 0.1), (back + 0.1, sole_top - 0.05)], 0.012)


def draw_sandal(pen: _Pen, rng: np.random.Generator) -> None:
    """Flat thin sole with a few narrow straps and lots of open space."""
    sole_top = rng.uniform(0.64, 0.68)
    pen.rect(0.05, sole_top - 0.03, 0.95, sole_top + 0.005, radius=0.015)
    _sole(pen, 0.04, 0.96, sole_top, sole_top + 0.06)
    sw = rng.uniform(0.035, 0.045)
    # toe strap and instep strap
    pen.arc(0.56, sole_top - 0.18, 0.86, sole_top + 0.14, 180, 360, sw, layer="body")
    pen.arc(0.34, sole_top - 0.32, 0.68, sole_top + 0.25, 180, 360, sw, layer="body")
    # heel strap rising from the back and ankle strap
    pen.line([(0.13, sole_top - 0.01), (0.16, sole_top - 0.3)], sw * 1.1, layer="body")
    pen.arc(0.14, sole_top - 0.36, 0.5, sole_top - 0.22, 180, 360, sw * 0.9, layer="body")
    pen.ellipse(0.14, sole_top - 0.33, 0.19, sole_top - 0.27, layer="detail")


def draw_cap(pen: _Pen, rng: np.random.Generator) -> None:
    """Low rounded crown with a long flat visor sticking out to one side."""
    h = rng.uniform(0.28, 0.33)
    base = 0.62
    x0, x1 = 0.1, rng.uniform(0.66, 0.7)
    pen.chord(x0, base - h, x1, base + h, 180, 360)
    visor_len = rng.uniform(0.28, 0.32)
    pen.ellipse(x1 - 0.22, base - 0.05, x1 + visor_len, base + 0.07,
                layer="accent" if rng.random() < 0.5 else "body")
    pen.line([(x1 - 0.12, base + 0.005), (x1 + visor_len - 0.02, base + 0.01)], 0.008)
    bx = (x0 + x1) / 2
    pen.ellipse(bx - 0.03, base - h - 0.03, bx + 0.03, base - h + 0.02, layer="accent")
    for dx in (-0.16, 0.0, 0.16):
        pen.line(_bez((bx, base - h), (bx + dx * 1.6, base - h * 0.6), (bx + dx * 1.9, base - 0.01)), 0.009)


def draw_beanie(pen: _Pen, rng: np.random.Generator) -> None:
    """Tall knitted dome with a wide folded ribbed cuff and usually a pom-pom."""
    cx = 0.5
    hw = rng.uniform(0.26, 0.29)
    cuff_top = rng.uniform(0.6, 0.64)
    cuff_bot = cuff_top + rng.uniform(0.2, 0.24)
    crown_h = rng.uniform(0.42, 0.48)
    pen.chord(cx - hw, cuff_top - crown_h, cx + hw, cuff_top + crown_h, 180, 360)
    pen.rect(cx - hw - 0.02, cuff_top - 0.02, cx + hw + 0.02, cuff_bot, radius=0.03, layer="accent")
    n = 9
    for i in range(1, n):
        x = cx - hw - 0.02 + i * (2 * hw + 0.04) / n
        pen.line([(x, cuff_top + 0.01), (x, cuff_bot - 0.02)], 0.008)
    if rng.random() < 0.7:
        r = rng.uniform(0.07, 0.09)
        ty = cuff_top - crown_h
        pen.ellipse(cx - r, ty - 1.6 * r, cx + r, ty + 0.4 * r, layer="accent")


# parent -> child -> drawing function. Order here is the canonical class order.
CATALOGUE: Dict[str, Dict[str, Callable[[_Pen, np.random.Generator], None]]] = {
    "tops": {"t-shirt": draw_tshirt, "longsleeve": draw_longsleeve, "tank-top": draw_tanktop},
    "bottoms": {"trousers": draw_trousers, "shorts": draw_shorts, "skirt": draw_skirt},
    "bags": {"backpack": draw_backpack, "handbag": draw_handbag},
    "footwear": {"sneaker": draw_sneaker, "boot": draw_boot, "sandal": draw_sandal},
    "hats": {"cap": draw_cap, "beanie": draw_beanie},
}


def leaf_classes() -> List[Tuple[str, str]]:
    """Return the ``(parent, child)`` pairs in canonical order.

    Returns
    -------
    list of tuple of str
        Every leaf class of :data:`CATALOGUE`.
    """
    return [(p, c) for p, children in CATALOGUE.items() for c in children]


# --------------------------------------------------------------------------- #
# Colours, patterns, backgrounds
# --------------------------------------------------------------------------- #
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """Convert one HSV colour (all in ``[0, 1]``) to an RGB float array in ``[0, 255]``."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.25, 1.0), rng.uniform(0.2, 0.85))


def _light_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.88, 1.0))


def _pattern(rng: np.random.Generator, side: int, main: np.ndarray) -> np.ndarray:
    """Fill a ``side x side`` RGB float array with plain, stripes, dots or checks."""
    kind = rng.choice(["plain", "stripes", "dots", "checks"], p=[0.3, 0.25, 0.2, 0.25])
    if rng.random() < 0.5:
        second = _random_colour(rng)
    else:  # a lighter or darker shade of the main colour
        second = np.clip(main * rng.choice([0.45, 1.6]) + rng.choice([0.0, 60.0]), 0, 255)
    img = np.empty((side, side, 3), dtype=np.float32)
    img[:] = main
    if kind == "plain":
        return img
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    th = rng.uniform(0, math.pi)
    u = xx * math.cos(th) + yy * math.sin(th)
    v = -xx * math.sin(th) + yy * math.cos(th)
    period = rng.uniform(0.05, 0.11) * side
    if kind == "stripes":
        mask = (u % period) < rng.uniform(0.3, 0.6) * period
    elif kind == "dots":
        r = rng.uniform(0.18, 0.32) * period
        mask = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < r * r
    else:
        mask = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    img[mask] = second
    return img


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A light plain colour, a light gradient or a light smooth-noise texture."""
    kind = rng.choice(["plain", "gradient", "noise"])
    base = _light_colour(rng)
    img = np.empty((side, side, 3), dtype=np.float32)
    img[:] = base
    if kind == "gradient":
        other = _light_colour(rng)
        th = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
        t = xx * math.cos(th) + yy * math.sin(th)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == "noise":
        cells = int(rng.integers(4, 12))
        small = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
        small = (small - small.min()) / max(float(small.max() - small.min()), 1e-6)
        noise = Image.fromarray((small * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        amp = rng.uniform(12, 26)
        img = img - amp * (np.asarray(noise, dtype=np.float32)[..., None] / 255.0)
    return img


# --------------------------------------------------------------------------- #
# One image
# --------------------------------------------------------------------------- #
def _paint_object(parent: str, child: str, rng: np.random.Generator, side: int) -> Image.Image:
    """The product of class ``parent/child`` drawn, coloured and outlined: RGBA, ``side x side``."""
    pen = _Pen(side)
    CATALOGUE[parent][child](pen, rng)
    layers = pen.arrays()

    main = _random_colour(rng)
    pattern = _pattern(rng, side, main)
    # gentle top-to-bottom shading so it looks less flat
    shade = 1.0 - rng.uniform(0.0, 0.15) * np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
    pattern = pattern * shade
    accent = rng.choice([np.array([238, 236, 230], np.float32), np.array([35, 35, 40], np.float32),
                         _random_colour(rng), main * 0.6])
    dark = main * rng.uniform(0.2, 0.4)

    body, acc, det = layers["body"], layers["accent"], layers["detail"]
    union = np.maximum(body, acc)
    k = 2 * max(1, side // 110) + 1
    dil = Image.fromarray((union * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(k))
    outline = np.clip(np.asarray(dil, dtype=np.float32) / 255.0 - union, 0, 1)

    rgb = pattern
    rgb = rgb * (1 - acc[..., None]) + accent * acc[..., None]
    ink = np.maximum(det, outline)[..., None]
    rgb = rgb * (1 - ink) + dark * ink
    alpha = np.maximum(union, np.maximum(det, outline))
    obj = Image.fromarray(np.dstack([np.clip(rgb, 0, 255), alpha * 255]).astype(np.uint8), "RGBA")
    return obj


def _place(obj: Image.Image, rng: np.random.Generator, side: int) -> Image.Image:
    """``obj`` flipped, rotated, scaled and put on a random background (with a shadow): RGB, ``side x side``."""
    if rng.random() < 0.5:
        obj = obj.transpose(Image.FLIP_LEFT_RIGHT)
    obj = obj.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC, expand=True)
    obj = obj.crop(obj.getchannel("A").getbbox())
    frac = rng.uniform(0.6, 0.9)
    scale = frac * side / max(obj.size)
    obj = obj.resize((max(1, round(obj.width * scale)), max(1, round(obj.height * scale))),
                     Image.LANCZOS)
    x = int(rng.integers(0, side - obj.width + 1))
    y = int(rng.integers(0, side - obj.height + 1))

    bg = _background(rng, side)
    if rng.random() < 0.5:  # soft drop shadow
        sh = Image.new("L", (side, side), 0)
        off = int(rng.integers(2, max(3, side // 40)))
        sh.paste(obj.getchannel("A"), (x + off, y + off))
        sh = sh.filter(ImageFilter.GaussianBlur(side / 80))
        bg = bg * (1 - 0.3 * np.asarray(sh, dtype=np.float32)[..., None] / 255.0)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    canvas.paste(obj, (x, y), obj)
    return canvas


def render_image(parent: str, child: str, rng: np.random.Generator, size: int) -> Image.Image:
    """Render one synthetic product photo.

    Parameters
    ----------
    parent, child : str
        The leaf class to draw (a key pair of :data:`CATALOGUE`).
    rng : numpy.random.Generator
        Source of all randomness for this image.
    size : int
        Side of the square output image in pixels.

    Returns
    -------
    PIL.Image.Image
        An RGB image of ``size x size`` pixels.
    """
    side = size * SUPERSAMPLE
    obj = _paint_object(parent, child, rng, side)
    return _place(obj, rng, side).resize((size, size), Image.LANCZOS)


def image_rng(seed: int, stream: int, parent: str, child: str, index: int) -> np.random.Generator:
    """Return the random generator of one image.

    Parameters
    ----------
    seed : int
        Global seed (``--seed``).
    stream : int
        ``0`` for the training catalogue, ``1`` for the unseen sample images.
    parent, child : str
        The leaf class.
    index : int
        Index of the image within its class and stream.

    Returns
    -------
    numpy.random.Generator
        A generator that depends only on the arguments.
    """
    cls = zlib.crc32(f"{parent}/{child}".encode("ascii"))
    return np.random.default_rng(np.random.SeedSequence([seed, stream, cls, index]))


def _save(img: Image.Image, path: Path) -> None:
    img.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=True)


# --------------------------------------------------------------------------- #
# Safe output handling
# --------------------------------------------------------------------------- #
class _Refusal(Exception):
    """A reason not to touch an output folder."""


def _check_target(path: Path) -> None:
    """Raise :class:`_Refusal` unless ``path`` may be (re)placed by this tool."""
    if path.is_symlink():
        raise _Refusal(f"refusing to write {path}: it is a symbolic link")
    if not path.exists():
        return
    if not path.is_dir():
        raise _Refusal(f"refusing to write {path}: it exists and is not a directory")
    if any(path.iterdir()) and not (path / MARKER).is_file():
        raise _Refusal(f"refusing to overwrite {path}: it is not empty and was not created by "
                       f"this tool (no {MARKER} marker)")


def _fresh_tmp(target: Path) -> Path:
    """An empty hidden ``.<name>.tmp-<pid>`` beside ``target``, after removing earlier runs' leftovers."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, target.name)
    for old_style in (f"{target.name}.tmp-*", f"{target.name}.old-*"):  # left by earlier versions
        for p in target.parent.glob(old_style):
            shutil.rmtree(p, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    return tmp


def _marker_text(args: argparse.Namespace, what: str) -> str:
    return (f"Synthetic {what} written by tools/make_example_dataset.py.\n"
            f"This whole folder is replaced when the tool runs again; do not keep other files here.\n"
            f"per_leaf={args.per_leaf} samples_per_leaf={args.samples_per_leaf} "
            f"size={args.size} seed={args.seed}\n")


def _fail(message: str) -> None:
    print(f"make_example_dataset.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _is_within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #
def get_args_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns
    -------
    argparse.ArgumentParser
        Parser for the options of this tool.
    """
    parser = argparse.ArgumentParser(
        description="Generate a small deterministic SYNTHETIC catalogue of product drawings "
                    "(OUT/<parent>/<child>/<child>_<NNN>.jpg) plus unseen sample images "
                    "(SAMPLES_OUT/<parent>_<child>_<k>.jpg).")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "dataset_example",
                        help="output folder of the training catalogue; replaced as a whole "
                             "(default: <repo root>/dataset_example)")
    parser.add_argument("--samples-out", type=Path, default=REPO_ROOT / "sample_images",
                        help="output folder of the unseen sample images; replaced as a whole "
                             "(default: <repo root>/sample_images)")
    parser.add_argument("--per-leaf", type=int, default=45,
                        help="training images per leaf (child) class (default: 45)")
    parser.add_argument("--samples-per-leaf", type=int, default=1,
                        help="unseen sample images per leaf class, drawn from a different random "
                             "stream; 0 leaves --samples-out alone (default: 1)")
    parser.add_argument("--size", type=int, default=192,
                        help="side of the square images in pixels (default: 192)")
    parser.add_argument("--seed", type=int, default=0,
                        help="global random seed, a non-negative integer (default: 0)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Exit with one line (code 2) on an invalid option value."""
    if args.per_leaf < 1:
        _fail("--per-leaf must be at least 1")
    if args.samples_per_leaf < 0:
        _fail("--samples-per-leaf must not be negative")
    if args.size < 32:
        _fail("--size must be at least 32")
    if args.seed < 0:
        _fail("--seed must be a non-negative integer")


def _write_images(folder: Path, args: argparse.Namespace, stream: int, per_leaf: int,
                  name: Callable[[str, str, int], str], what: str) -> int:
    """Draw ``per_leaf`` images of every leaf class from random ``stream`` to ``folder/name(parent,
    child, index)``, then the marker; returns the number of images."""
    n = 0
    for parent, child in leaf_classes():
        for i in range(per_leaf):
            path = folder / name(parent, child, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(render_image(parent, child, image_rng(args.seed, stream, parent, child, i), args.size), path)
            n += 1
    (folder / MARKER).write_text(_marker_text(args, what), encoding="utf-8")
    return n


def _write_catalogue(folder: Path, args: argparse.Namespace) -> int:
    """``folder/<parent>/<child>/<child>_<NNN>.jpg``: the training catalogue."""
    width = max(3, len(str(args.per_leaf - 1)))
    return _write_images(folder, args, TRAIN_STREAM, args.per_leaf,
                         lambda parent, child, i: f"{parent}/{child}/{child}_{i:0{width}d}.jpg", "example catalogue")


def _write_samples(folder: Path, args: argparse.Namespace) -> int:
    """``folder/<parent>_<child>_<k>.jpg``: unseen images from another random stream."""
    return _write_images(folder, args, SAMPLE_STREAM, args.samples_per_leaf,
                         lambda parent, child, k: f"{parent}_{child}_{k}.jpg", "sample images")


def main(args: argparse.Namespace) -> None:
    """Generate the catalogue and the sample images.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options from :func:`get_args_parser`.

    Raises
    ------
    SystemExit
        With code 2 (after one line on stderr) for invalid options or when an
        output folder exists, is not empty and was not made by this tool.
    """
    _check_args(args)
    out = Path(os.path.abspath(args.out))
    samples_out = Path(os.path.abspath(args.samples_out))
    with_samples = args.samples_per_leaf > 0
    targets = [out] + ([samples_out] if with_samples else [])
    if with_samples and (_is_within(out, samples_out) or _is_within(samples_out, out)):
        _fail("--out and --samples-out must be separate folders, neither inside the other")
    try:
        for t in targets:
            _check_target(t)
    except _Refusal as exc:
        _fail(str(exc))

    tmps: List[Path] = []
    try:
        writers = [_write_catalogue] + ([_write_samples] if with_samples else [])
        counts = []
        for target, write in zip(targets, writers):
            tmps.append(_fresh_tmp(target))
            counts.append(write(tmps[-1], args))
        for t in targets:  # re-check right before replacing anything (cheap guard against races)
            _check_target(t)
        for target, tmp in zip(targets, list(tmps)):
            replace_dir(tmp, target)
            tmps.remove(tmp)
    except _Refusal as exc:
        _fail(str(exc))
    finally:
        for t in tmps:
            shutil.rmtree(t, ignore_errors=True)

    msg = f"wrote {counts[0]} images ({len(leaf_classes())} leaf classes in {len(CATALOGUE)} parents) to {out}"
    if with_samples:
        msg += f" and {counts[1]} sample images to {samples_out}"
    print(msg)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
