"""Flat and hierarchical metrics (numpy + scikit-learn; no torch).

Hierarchical precision/recall/F1 follow Kiritchenko et al. (2005): each label is extended with its
ancestors (root excluded); the sets are compared and counts are micro-averaged over images. A partial
prediction (stopped above the leaf) simply has a shorter set.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from .hierarchy import Hierarchy


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 15) -> float:
    """Expected calibration error: the mean |accuracy − confidence| over equal-width confidence bins,
    weighted by the share of predictions in each bin (Guo et al., 2017).

    Parameters
    ----------
    confidence : array-like, shape (N,)
        The probability each prediction was given, in ``[0, 1]``.
    correct : array-like of bool, shape (N,)
        Whether each prediction was right.
    """
    conf, ok = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    if len(conf) == 0:
        return float("nan")
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        m = bins == b
        total += m.sum() * abs(ok[m].mean() - conf[m].mean())
    return float(total / len(conf))


def classification_summary(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Accuracy, macro precision/recall/F1 and a per-class report.

    Returns
    -------
    dict
        ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1``, ``n_images``,
        ``per_class`` ({class: {precision, recall, f1, support}}), ``confusion`` (C×C list).
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    labels = list(range(len(classes)))
    n = len(y_true)
    if n == 0:
        return {"accuracy": float("nan"), "macro_precision": float("nan"), "macro_recall": float("nan"),
                "macro_f1": float("nan"), "n_images": 0, "per_class": {}, "confusion": []}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = s > 0
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "macro_precision": float(p[present].mean()) if present.any() else float("nan"),
        "macro_recall": float(r[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f[present].mean()) if present.any() else float("nan"),
        "n_images": int(n),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def text_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> str:
    """scikit-learn's per-class text report."""
    return classification_report(y_true, y_pred, labels=list(range(len(classes))), target_names=list(classes),
                                 zero_division=0, digits=4)


def hierarchical_prf(hier: Hierarchy, true_leaves: Sequence[str], pred_nodes: Sequence[str]) -> dict:
    """Micro-averaged hierarchical precision, recall and F1.

    Parameters
    ----------
    true_leaves : sequence of str
        True leaf id per image.
    pred_nodes : sequence of str
        Predicted node id per image (a leaf, or an internal node for a partial prediction;
        ``""`` = no prediction).
    """
    inter = n_pred = n_true = 0
    for t, p in zip(true_leaves, pred_nodes):
        ts, ps = hier.ancestors(t), hier.ancestors(p) if p else set()
        inter += len(ts & ps)
        n_pred += len(ps)
        n_true += len(ts)
    hp = inter / n_pred if n_pred else 0.0
    hr = inter / n_true if n_true else 0.0
    hf = 2 * hp * hr / (hp + hr) if hp + hr else 0.0
    return {"hierarchical_precision": hp, "hierarchical_recall": hr, "hierarchical_f1": hf}


def mistake_severity(hier: Hierarchy, true_leaves: Sequence[str], pred_nodes: Sequence[str]) -> float:
    """Mean over mistakes of the number of edges from the true leaf up to its lowest common ancestor
    with the prediction (1 = a sibling confused, 2 = wrong parent in a 2-level tree).

    Partial predictions that are ancestors of the true leaf are not mistakes; neither is ``""`` (the
    walk stopped at the root, which is everyone's ancestor). NaN if no mistakes.
    """
    sev = []
    for t, p in zip(true_leaves, pred_nodes):
        if p == t or not p or p in hier.ancestors(t):
            continue
        pt, pp = hier.path(t), hier.path(p) if p else []
        common = 0
        while common < min(len(pt), len(pp)) and pt[common] == pp[common]:
            common += 1
        sev.append(len(pt) - common)
    return float(np.mean(sev)) if sev else float("nan")


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare two classifiers on the same images.

    Returns
    -------
    dict
        ``difference`` (acc_a − acc_b), a 95 % paired-bootstrap interval ``ci95``, and an exact McNemar
        ``p_value`` over the discordant pairs (``a_only``, ``b_only``).
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    n = len(a)
    diff = float(a.mean() - b.mean()) if n else float("nan")
    rng = np.random.default_rng(seed)
    if n:
        d = a.astype(np.int8) - b.astype(np.int8)
        rows = max(1, min(n_boot, (1 << 22) // n))  # resample in blocks: bounded memory for large test sets
        boots = np.concatenate([d[rng.integers(0, n, size=(min(rows, n_boot - k), n))].mean(1)
                                for k in range(0, n_boot, rows)])
        lo, hi = np.percentile(boots, [2.5, 97.5])
    else:
        lo = hi = float("nan")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = float(binomtest(a_only, a_only + b_only, 0.5).pvalue) if a_only + b_only else 1.0
    return {"difference": diff, "ci95": [float(lo), float(hi)], "p_value": p, "a_only": a_only, "b_only": b_only, "n": n}
