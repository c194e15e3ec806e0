"""Flat and hierarchical metrics (numpy + scikit-learn; no torch).

Hierarchical precision/recall/F1 follow Kiritchenko et al. (2005): each label is extended with its
ancestors (root excluded); the sets are compared and counts are micro-averaged over images. A partial
prediction (stopped above the leaf) simply has a shorter set.

:func:`score` computes every number of one model's evaluation (the chained LCPN predictor and the
flat baseline alike) from true leaves and predicted paths; adding a metric means adding it there
(and a line in :mod:`hiernet.report` to show it).

Conventions
-----------
* A *predicted path* is the list of node ids from the top level down to the deepest predicted node
  (``Prediction.node_ids``). It is shorter than the true path when ``--min-confidence`` stopped the
  walk above a leaf (a *partial* prediction).
* Leaf accuracy counts an image as right only when the path reaches the true leaf. A partial
  prediction is therefore wrong for leaf accuracy, for the per-leaf scores and for the paired
  comparison with the flat baseline; hierarchical precision/recall/F1 credit its correct part, and
  mistake severity does not count it as a mistake when it is an ancestor of the true leaf.
* In the leaf confusion matrix, partial predictions get their own column ``"(stopped)"``; it is
  only present when at least one prediction stopped. Rows are normalised over all of a true leaf's
  images, so a row's shares (stopped column included) sum to one.
* Values that are undefined (no images to average over) are ``None`` in :func:`score`'s result
  (``null`` in JSON), never NaN.
"""

from __future__ import annotations

from typing import Sequence

import math

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from .hierarchy import ROOT_ID, Hierarchy

#: Column of the leaf confusion matrix for predictions that stopped above a leaf.
STOPPED = "(stopped)"


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
        # tree_distance = (depth t - depth lca) + (depth p - depth lca); keep the true leaf's side
        sev.append((hier.tree_distance(t, p) + hier.depth(t) - hier.depth(p)) // 2)
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


# ------------------------------------------------------------------------------ hierarchical scoring
def ratio(num: float, den: float) -> float | None:
    """``num / den`` as a float, ``None`` when ``den`` is 0."""
    return float(num) / float(den) if den else None


def json_ready(obj):
    """NaN/inf → ``None``, numpy scalars → Python numbers, tuples → lists (recursively)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def display_order(hier: Hierarchy) -> list[str]:
    """Leaf ids in depth-first tree order: grouped by top-level parent, children in class order."""
    out: list[str] = []

    def walk(nid: str) -> None:
        node = hier.nodes[nid]
        if not node.children:
            if nid != ROOT_ID:
                out.append(nid)
            return
        for c in node.children:
            walk(c)

    walk(ROOT_ID)
    return out


def level_accuracy(hier: Hierarchy, true_leaves: Sequence[str], pred_paths: Sequence[Sequence[str]]
                   ) -> tuple[list[float | None], list[int]]:
    """Accuracy per level, top level first.

    At level ``L`` (1 = top), an image counts as right when its predicted path holds the true node
    at depth ``L``; images whose true leaf is shallower than ``L`` are left out at ``L``; a path
    that stopped above ``L`` is wrong at ``L``.

    Parameters
    ----------
    true_leaves : sequence of str, shape (N,)
    pred_paths : sequence of sequences of str, shape (N, variable)

    Returns
    -------
    (list, list)
        Accuracy per level (``None`` where no image reaches the level) and the number of images
        counted at each level; both of length ``max depth of true_leaves``.
    """
    true_paths = [hier.path(t) for t in true_leaves]
    n_levels = max((len(p) for p in true_paths), default=0)
    acc, support = [], []
    for level in range(1, n_levels + 1):
        right = total = 0
        for tp, pp in zip(true_paths, pred_paths):
            if len(tp) < level:
                continue
            total += 1
            right += int(len(pp) >= level and pp[level - 1] == tp[level - 1])
        acc.append(ratio(right, total))
        support.append(total)
    return acc, support


def first_error_level(true_path: Sequence[str], pred_path: Sequence[str]) -> int | None:
    """1-based level of the first wrong (or missing, for a stopped walk) node; ``None`` if the path is right."""
    for level, node in enumerate(true_path, start=1):
        if len(pred_path) < level or pred_path[level - 1] != node:
            return level
    return None


def error_attribution(hier: Hierarchy, true_leaves: Sequence[str], pred_paths: Sequence[Sequence[str]]
                      ) -> tuple[list[float], list[int]]:
    """Share of the leaf-level mistakes first made at each level, top level first.

    A walk that stopped above the leaf is attributed to the level it did not reach.

    Returns
    -------
    (list of float, list of int)
        Shares (summing to 1, or all 0 when there is no mistake) and counts, both of length
        ``max depth of true_leaves``.
    """
    true_paths = [hier.path(t) for t in true_leaves]
    n_levels = max((len(p) for p in true_paths), default=0)
    counts = [0] * n_levels
    for tp, pp in zip(true_paths, pred_paths):
        level = first_error_level(tp, pp)
        if level is not None:
            counts[level - 1] += 1
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts], counts


def _node_counts(hier: Hierarchy, nid: str, true_leaves: Sequence[str], pred_paths: Sequence[Sequence[str]],
                 chosen: Sequence[str | None] | None) -> tuple[int, int, int, int]:
    """(right, images) over the images truly below ``nid``, then over those the chain routed to it."""
    right_true = n_true = right_routed = n_routed = 0
    for i, (t, pp) in enumerate(zip(true_leaves, pred_paths)):
        want = hier.child_towards(nid, t)
        if want is None:
            continue
        n_true += 1
        ok = chosen is not None and chosen[i] == want
        right_true += int(ok)
        if nid == ROOT_ID or nid in pp:
            n_routed += 1
            right_routed += int(ok)
    return right_true, n_true, right_routed, n_routed


def node_accuracies(hier: Hierarchy, true_leaves: Sequence[str], pred_paths: Sequence[Sequence[str]],
                    local_children: dict[str, Sequence[str | None]]) -> dict[str, dict]:
    """Local and routed accuracy of every classifier node.

    Parameters
    ----------
    true_leaves : sequence of str, shape (N,)
    pred_paths : sequence of sequences of str, shape (N, variable)
    local_children : dict
        Classifier node id → sequence of ``N`` child ids its classifier chose (``None`` for images
        not truly below it). Nodes missing here get ``None`` accuracies.

    Returns
    -------
    dict
        Node dataset name → ``{node, local_accuracy, routed_accuracy, n_true, n_routed}``.
        ``local_accuracy``: the node's classifier on every image truly below it. ``routed_accuracy``:
        the same classifier on the subset the chain routed to it (all earlier decisions right) - for
        routed images its choice is the chain's decision there; a walk that the confidence threshold
        stopped at the node is scored by the classifier's most likely child.
    """
    out = {}
    for nid in hier.classifier_nodes():
        chosen = local_children.get(nid)
        right_true, n_true, right_routed, n_routed = _node_counts(hier, nid, true_leaves, pred_paths, chosen)
        have = chosen is not None
        out[hier.nodes[nid].dataset] = {
            "node": node_label(nid),
            "local_accuracy": ratio(right_true, n_true) if have else None,
            "routed_accuracy": ratio(right_routed, n_routed) if have else None,
            "n_true": n_true,
            "n_routed": n_routed,
        }
    return out


def node_label(nid: str) -> str:
    """How messages and results name a node: its id, ``root`` for the root (whose id is ``""``)."""
    return "root" if nid == ROOT_ID else nid


def node_vs_flat(hier: Hierarchy, true_leaves: Sequence[str], local_children: dict[str, Sequence[str | None]],
                 flat_leaves: Sequence[str]) -> dict[str, dict]:
    """Does the hierarchy pay, node by node? Each classifier node's decision, LCPN vs flat.

    On the images truly below a node, the LCPN side is the node's own classifier (its choice in
    ``local_children``); the flat side is the flat model's leaf mapped to the child of that node it
    lies under (wrong when the flat leaf is outside the node's subtree). Both are paired on the same
    images, so the exact McNemar test of :func:`paired_comparison` applies.

    Parameters
    ----------
    true_leaves : sequence of str, shape (N,)
    local_children : dict
        Classifier node id → ``N`` child ids its classifier chose (``None`` where not below it).
    flat_leaves : sequence of str, shape (N,)
        The flat baseline's leaf per image.

    Returns
    -------
    dict
        Node dataset name → ``{node, n, lcpn_accuracy, flat_accuracy, difference, lcpn_only, flat_only,
        p_value, winner}``; ``winner`` is ``lcpn``, ``flat`` or ``tie`` (equal accuracy), ``None`` values
        where the node has no image or no local predictions.
    """
    out = {}
    for nid in hier.classifier_nodes():
        chosen = local_children.get(nid)
        rows = [i for i, t in enumerate(true_leaves) if hier.child_towards(nid, t) is not None]
        entry = {"node": node_label(nid), "n": len(rows), "lcpn_accuracy": None, "flat_accuracy": None,
                 "difference": None, "lcpn_only": 0, "flat_only": 0, "p_value": None, "winner": None}
        if rows and chosen is not None:
            want = [hier.child_towards(nid, true_leaves[i]) for i in rows]
            lcpn = np.array([chosen[i] == w for i, w in zip(rows, want)], dtype=bool)
            flat = np.array([hier.child_towards(nid, flat_leaves[i]) == w for i, w in zip(rows, want)], dtype=bool)
            comp = paired_comparison(lcpn, flat, n_boot=1)  # the test only; no interval per node
            d = comp["difference"]
            entry.update(lcpn_accuracy=float(lcpn.mean()), flat_accuracy=float(flat.mean()), difference=d,
                         lcpn_only=comp["a_only"], flat_only=comp["b_only"], p_value=comp["p_value"],
                         winner="lcpn" if d > 0 else "flat" if d < 0 else "tie")
        out[hier.nodes[nid].dataset] = entry
    return json_ready(out)


def leaf_scores(hier: Hierarchy, true_leaves: Sequence[str], pred_leaf: Sequence[str | None]) -> dict:
    """:func:`classification_summary` over the leaves in :func:`display_order`, plus a :data:`STOPPED`
    column for ``None`` (a walk that stopped above a leaf); ``per_class`` leaves that column out."""
    leaves = display_order(hier)
    index = {leaf: k for k, leaf in enumerate(leaves)}
    y_true = [index[t] for t in true_leaves]
    y_pred = [index.get(p, len(leaves)) if p else len(leaves) for p in pred_leaf]
    summary = classification_summary(y_true, y_pred, leaves + [STOPPED])
    summary["per_class"].pop(STOPPED, None)
    return summary


def leaf_confusion(hier: Hierarchy, summary: dict, n_stopped: int) -> dict:
    """``{rows, columns, counts}``: true leaves × predicted leaves (+ :data:`STOPPED` if any stopped)."""
    rows = display_order(hier)
    n = summary["n_images"]
    cm = (np.array(summary["confusion"], dtype=int) if n else np.zeros((len(rows) + 1,) * 2, int))[: len(rows)]
    columns = rows + [STOPPED]
    if not n_stopped:
        cm, columns = cm[:, : len(rows)], rows
    return {"rows": rows, "columns": columns, "counts": cm.tolist()}


def leaf_correct(true_leaves: Sequence[str], pred_paths: Sequence[Sequence[str]]) -> np.ndarray:
    """Bool array, shape (N,): the predicted path ends at the true leaf."""
    return np.array([bool(p) and p[-1] == t for p, t in zip(pred_paths, true_leaves)], dtype=bool)


_PRF_KEYS = ("hierarchical_precision", "hierarchical_recall", "hierarchical_f1")


def score(hier: Hierarchy, true_leaves: Sequence[str], pred_paths: Sequence[Sequence[str]],
          confidences: Sequence[float] | None = None,
          local_children: dict[str, Sequence[str | None]] | None = None) -> dict:
    """Every number of one model's evaluation, for the chained predictor and the flat baseline alike.

    Parameters
    ----------
    hier : Hierarchy
        The trained hierarchy.
    true_leaves : sequence of str, shape (N,)
        True leaf id per image (each a leaf of ``hier``).
    pred_paths : sequence of sequences of str, shape (N, variable)
        Predicted node ids per image, top level first (``Prediction.node_ids``; for a flat model
        ``hier.path(leaf)``); shorter than the true path for a partial prediction.
    confidences : sequence of float, shape (N,), optional
        The model's confidence per image; adds ``mean_confidence`` and ``confidence_ece`` (expected
        calibration error against leaf correctness), else both are ``None``.
    local_children : dict, optional
        Classifier node id → ``N`` child ids chosen by that node's own classifier (``None`` where the
        image is not truly below it); see :func:`node_accuracies`.

    Returns
    -------
    dict
        JSON-ready (``None`` for undefined values): ``n_images``, ``leaf_accuracy``, ``leaf_error``,
        ``level_accuracy``/``level_support`` (top level first), ``error_attribution``/``error_counts``,
        ``n_mistakes``, ``n_stopped``, ``hierarchical_precision``/``_recall``/``_f1``,
        ``mistake_severity``, ``mean_confidence``, ``confidence_ece``, ``macro_f1``, ``per_leaf``,
        ``confusion`` (``rows``, ``columns``, ``counts``), ``nodes``.
    """
    true_leaves, pred_paths = [str(t) for t in true_leaves], [list(p) for p in pred_paths]
    if len(true_leaves) != len(pred_paths):
        raise ValueError(f"{len(true_leaves)} true leaves but {len(pred_paths)} predictions")
    n = len(true_leaves)
    pred_node = [p[-1] if p else ROOT_ID for p in pred_paths]  # deepest predicted node ("" = none)
    correct = leaf_correct(true_leaves, pred_paths)
    level_acc, level_support = level_accuracy(hier, true_leaves, pred_paths)
    shares, counts = error_attribution(hier, true_leaves, pred_paths)
    leaf_set = set(hier.leaves())
    pred_leaf = [p if p in leaf_set else None for p in pred_node]
    summary = leaf_scores(hier, true_leaves, pred_leaf)
    n_stopped = sum(1 for p in pred_leaf if p is None)
    leaf_accuracy = float(correct.mean()) if n else None
    with_conf = confidences is not None and n > 0
    prf = hierarchical_prf(hier, true_leaves, pred_node) if n else dict.fromkeys(_PRF_KEYS)
    return json_ready({
        "n_images": n,
        "leaf_accuracy": leaf_accuracy,
        "leaf_error": 1.0 - leaf_accuracy if n else None,
        "level_accuracy": level_acc,
        "level_support": level_support,
        "error_attribution": shares,
        "error_counts": counts,
        "n_mistakes": int((~correct).sum()),
        "n_stopped": n_stopped,
        **prf,
        "mistake_severity": mistake_severity(hier, true_leaves, pred_node),
        "mean_confidence": float(np.mean(confidences)) if with_conf else None,
        "confidence_ece": expected_calibration_error(confidences, correct) if with_conf else None,
        "macro_f1": summary["macro_f1"],
        "per_leaf": summary["per_class"],
        "confusion": leaf_confusion(hier, summary, n_stopped),
        "nodes": node_accuracies(hier, true_leaves, pred_paths, local_children or {}),
    })
