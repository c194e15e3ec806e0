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


def confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str, groups: Sequence[str] | None = None) -> None:
    """Row-normalised confusion matrix heat-map with counts annotated (seaborn).

    ``groups`` (one parent name per class) draws separators between parents.
    """
    import seaborn as sns

    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    size = max(4.5, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    annot = np.array([[f"{int(c)}" if c else "" for c in row] for row in cm]) if n <= 40 else False
    sns.heatmap(norm, annot=annot, fmt="", cmap="Blues", vmin=0, vmax=1, xticklabels=classes, yticklabels=classes,
                cbar_kws={"label": "share of true class"}, ax=ax, square=True, linewidths=0.3, linecolor="white")
    if groups:
        for i in range(1, n):
            if groups[i] != groups[i - 1]:
                ax.axhline(i, color="black", lw=1.2)
                ax.axvline(i, color="black", lw=1.2)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    _save(fig, path)


def accuracy_bars(labels: Sequence[str], values: Sequence[float], path: Path, title: str, highlight: Sequence[int] = ()) -> None:
    """Horizontal bar chart of accuracies (graph.png): node-local ones beside end-to-end ones."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    colors = ["tab:orange" if i in highlight else "tab:blue" for i in range(len(labels))]
    y = np.arange(len(labels))
    ax.barh(y, values, color=colors)
    for yi, v in zip(y, values):
        ax.text(min(v, 1.0) + 0.005, yi, f"{v:.3f}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("accuracy on the test images")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
