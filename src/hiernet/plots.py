"""Figures written next to each model and by evaluate.py (matplotlib Agg; no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .images import ImageDecodeError, load_rgb  # noqa: E402
from .safeio import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def image_grid(items: Sequence[tuple[Path, str]], path: Path, title: str, cols: int = 6, color=None) -> None:
    """A grid of thumbnails with a caption each (class_plot.png / wrong_plot.png)."""
    n = max(1, len(items))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img_path, caption) in zip(axes.flat, items):
        try:
            img = load_rgb(img_path, min_size=160)
            img.thumbnail((160, 160))
            ax.imshow(np.asarray(img))
        except ImageDecodeError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        ax.set_title(caption, fontsize=8, color=color or "black")
    if not items:
        axes.flat[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(title)
    _save(fig, path)


def loss_curves(history: Sequence[dict], path: Path, title: str) -> None:
    """Train and validation loss per epoch (error_plot.png)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], label="train loss", marker="o", ms=3)
    ax.plot(ep, [h["val_loss"] for h in history], label="val loss", marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str, groups: Sequence[str] | None = None,
              *, columns: Sequence[str] | None = None) -> None:
    """Row-normalised confusion matrix heat-map with counts annotated (seaborn).

    Parameters
    ----------
    cm : array, shape (C, K)
        Counts, rows = true class, columns = predicted class (``K == C`` unless ``columns``).
    classes : sequence of str, length C
        Row labels (and column labels when ``columns`` is not given).
    groups : sequence of str, length C, optional
        One parent name per class (classes sorted by it): draws separators between parents.
    columns : sequence of str, length K, optional
        Column labels when they differ from the rows, e.g. ``classes + ["(stopped)"]``; columns past
        the ``C`` classes are set off by a separator.
    """
    import seaborn as sns

    cm = np.asarray(cm, dtype=float)
    columns = list(classes) if columns is None else list(columns)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n, k = len(classes), len(columns)
    longest = max((len(str(c)) for c in list(classes) + columns), default=1)
    cell = 0.5 if max(n, k) <= 20 else (0.4 if max(n, k) <= 40 else 0.3)
    width, height = max(4.5, cell * k + 2.5), max(4.0, cell * n + 1.5)
    fig, ax = plt.subplots(figsize=(width + 0.07 * longest, height + 0.07 * longest))
    annot = np.array([[f"{int(c)}" if c else "" for c in row] for row in cm]) if max(n, k) <= 40 else False
    sns.heatmap(norm, annot=annot, fmt="", cmap="Blues", vmin=0, vmax=1, xticklabels=columns, yticklabels=list(classes),
                cbar_kws={"label": "share of the true class's images", "shrink": 0.8}, ax=ax, square=True,
                linewidths=0.3, linecolor="white", annot_kws={"fontsize": 8 if max(n, k) <= 20 else 6})
    if groups:
        starts = [0] + [i for i in range(1, n) if groups[i] != groups[i - 1]]
        for i in starts[1:]:
            ax.axhline(i, color="black", lw=1.2)
            if i < k:
                ax.axvline(i, color="black", lw=1.2)
    if k > n:
        ax.axvline(n, color="dimgray", lw=1.2, ls="--")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    ax.tick_params(labelsize=8 if max(n, k) <= 20 else (7 if max(n, k) <= 40 else 6))
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    plt.setp(ax.get_yticklabels(), rotation=0)
    _save(fig, path)


def accuracy_bars(labels: Sequence[str], values: Sequence[float], path: Path, title: str, highlight: Sequence[int] = (),
                  *, legend: tuple[str, str] | None = None) -> None:
    """Horizontal bar chart of accuracies (graph.png): node-local ones beside end-to-end ones.

    Parameters
    ----------
    labels, values : sequences of length B
        Bar names and accuracies in ``[0, 1]``, drawn top to bottom.
    highlight : sequence of int
        Indices of bars drawn in the second colour (the end-to-end ones).
    legend : (str, str), optional
        Legend names of the plain and the highlighted bars; a dotted line separates the two kinds
        where they meet.
    """
    highlight = set(highlight)
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(labels) + 1.4))
    colors = ["tab:orange" if i in highlight else "tab:blue" for i in range(len(labels))]
    y = np.arange(len(labels))
    ax.barh(y, values, color=colors)
    for yi, v in zip(y, values):
        ax.text(min(v, 1.0) + 0.005, yi, f"{v:.3f}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("accuracy on the test images")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if legend:
        for i in range(1, len(labels)):
            if (i in highlight) != (i - 1 in highlight):
                ax.axhline(i - 0.5, color="gray", lw=0.8, ls=":")
        from matplotlib.patches import Patch

        handles = [Patch(color="tab:blue", label=legend[0]), Patch(color="tab:orange", label=legend[1])]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / max(1, len(labels))),
                  ncol=2, frameon=False, fontsize=8)
    _save(fig, path)
