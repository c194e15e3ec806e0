"""End-to-end evaluation of the chained (LCPN) predictor and the flat baseline on a test set.

Three layers, so the arithmetic can be tested without torch or images:

* collecting a test set: :func:`load_prepared_test_set` (the test split recorded by
  prepare_dataset.py) or :func:`scan_test_tree` (any ``ROOT/<class>/.../<leaf>/images`` folder),
  checked against the trained hierarchy by :func:`check_known_leaves`;
* running the models: :func:`predict_test_set` walks every image down the tree once and, in the
  same backbone pass, runs each classifier node on the images that truly belong under it (its
  *local* accuracy does not depend on where its parent routed them) and the flat head;
* :func:`assemble_results`: a pure function of (hierarchy, true leaves, predicted paths, local
  predictions, flat predictions) that returns the ``results.json`` document, and
  :func:`render_markdown` / :func:`write_figures` / :func:`summary_lines` that present it.

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
  only drawn when at least one prediction stopped. Rows are normalised over all of a true leaf's
  images, so a row's shares (stopped column included) sum to one.
* Images that cannot be decoded (or that a ``--data`` scan leaves out) are excluded from every
  metric and listed under ``unreadable``; ``n_images`` counts the images that were evaluated.
* Values that are undefined (no images to average over) are ``None`` (``null`` in JSON), never NaN.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .hierarchy import FLAT_DATASET, ROOT_ID, Hierarchy, HierarchyError, require_hierarchy_json, scan_tree
from .metrics import (classification_summary, expected_calibration_error, hierarchical_prf, mistake_severity,
                      paired_comparison)
from .safeio import UserError

log = logging.getLogger(__name__)

#: Column of the leaf confusion matrix for predictions that stopped above a leaf.
STOPPED = "(stopped)"
#: Significance level of the verdict.
ALPHA = 0.05
#: The files :func:`write_outputs` writes into the output folder.
OUTPUT_FILES = ("results.json", "results.md", "graph.png", "matrix.png")


# ------------------------------------------------------------------------------------- test sets
@dataclass
class TestSet:
    """Images with their true leaf.

    Attributes
    ----------
    paths : list of str
        Image files, shape ``(N,)``.
    leaves : list of str
        True leaf id per image, shape ``(N,)``.
    source : str
        What the images are (shown in the report).
    skipped : list of (str, str)
        (path, reason) of images left out before prediction.
    """

    paths: list[str]
    leaves: list[str]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    __test__ = False  # not a pytest test class


def load_prepared_test_set(data_dir: str | Path) -> tuple[TestSet, Hierarchy, dict]:
    """The test split recorded in ``data_dir/hierarchy.json`` (written by prepare_dataset.py).

    Images are read from ``data_dir/flat/test/<flat class folder>/<file>``, where the flat class
    folders (``doc["flat"]["classes"]``) are aligned with the leaf ids (``doc["flat"]["class_nodes"]``).

    Returns
    -------
    (TestSet, Hierarchy, dict)
        The test images, the prepared tree and the whole hierarchy.json document.

    Raises
    ------
    UserError
        No or unreadable hierarchy.json, or no image in the test split.
    """
    data_dir = Path(data_dir)
    path = data_dir / "hierarchy.json"
    hier, doc = require_hierarchy_json(path, f"no prepared datasets in {data_dir} (or evaluate a folder tree with --data DIR)",
                                       f"python3 prepare_dataset.py -p YOUR_DATASET -o {data_dir}")
    try:
        folder = dict(zip(doc["flat"]["class_nodes"], doc["flat"]["classes"], strict=True))
        test = [im for im in doc["images"] if im["split"] == "test"]
        paths = [str(data_dir / FLAT_DATASET / "test" / folder[im["leaf"]] / im["file"]) for im in test]
        leaves = [str(im["leaf"]) for im in test]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} is malformed ({type(exc).__name__}: {exc}); rerun prepare_dataset.py") from None
    if not test:
        raise UserError(f"{path} lists no image in the test split; rerun prepare_dataset.py with a test share > 0 "
                        "(--ratio) or evaluate a folder tree with --data DIR")
    return TestSet(paths, leaves, f"test split of {data_dir}"), hier, doc


def scan_test_tree(root: str | Path) -> tuple[TestSet, Hierarchy]:
    """Every decodable image of a ``ROOT/<class>/.../<leaf>/images`` tree (e.g. a separately kept test set).

    Images that fail :func:`hiernet.images.check_image` (or lie outside a leaf folder) go to
    ``TestSet.skipped``.

    Raises
    ------
    UserError
        The folder is missing or holds no usable class folder.
    """
    from .images import check_image

    root = Path(root)
    try:
        scan = scan_tree(root, check=check_image)
    except HierarchyError as exc:
        raise UserError(f"--data: {exc}") from None
    for w in scan.warnings:
        # a test tree may hold only some classes: "one child, no model is trained" concerns training only
        (log.debug if " has one child (" in w else log.warning)("warning: %s", w)
    paths, leaves = [], []
    for leaf in sorted(scan.files):
        for rel in scan.files[leaf]:
            paths.append(str(root / rel))
            leaves.append(leaf)
    skipped = [(str(root / p), why) for p, why in scan.skipped]
    return TestSet(paths, leaves, f"folder tree {root}", skipped), scan.hierarchy


def check_known_leaves(hier: Hierarchy, leaves: Sequence[str], where: str) -> None:
    """Refuse test classes that are not leaves of the trained hierarchy.

    Raises
    ------
    UserError
        One line naming the unknown classes (and a few known ones).
    """
    known = set(hier.leaves())
    unknown = sorted(set(leaves) - known)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
        valid = ", ".join(sorted(known)[:10]) + (", ..." if len(known) > 10 else "")
        raise UserError(f"{where} has classes the models were not trained on: {shown}; "
                        f"the trained classes are: {valid}")


# ------------------------------------------------------------------------------------- prediction
def predict_test_set(predictor, test: TestSet, batch_size: int = 32, workers: int = 2,
                     progress: bool = False) -> tuple[list, dict[str, list]]:
    """Predict every test image and each classifier node's own choice on the images below it.

    One backbone pass per batch serves the chain, the flat head (if loaded) and the local scores
    (:meth:`hiernet.predictor.HierarchicalPredictor.predict_and_score`).

    Parameters
    ----------
    predictor : HierarchicalPredictor
    test : TestSet
        ``N`` images; their leaves must be leaves of ``predictor.hier``.

    Returns
    -------
    (list of Prediction, dict)
        ``N`` predictions in ``test.paths`` order (``error`` set for unreadable images), and
        classifier node id → list of ``N`` predicted child ids of that node's classifier, ``None``
        for images not truly below the node (or unreadable).
    """
    from .predictor import Prediction

    hier = predictor.hier
    n = len(test.paths)
    classifiers = hier.classifier_nodes()
    below = {nid: set(hier.subtree_leaves(nid)) for nid in classifiers}
    local: dict[str, list] = {nid: [None] * n for nid in classifiers}
    preds: list = [None] * n
    # the predictor's own decoding/resizing, so evaluation sees exactly what predict.py sees
    for prepared in predictor.prepared_batches(test.paths, max(1, batch_size), workers, progress, desc="evaluate"):
        good = [(i, x) for i, x, _ in prepared if x is not None]
        for i, _, err in prepared:
            if err is not None:
                preds[i] = Prediction(test.paths[i], complete=False, error=err)
        if good:
            score = {nid: [k for k, (i, _) in enumerate(good) if test.leaves[i] in below[nid]] for nid in classifiers}
            batch_preds, scores = predictor.predict_and_score([x for _, x in good], [test.paths[i] for i, _ in good],
                                                              score)
            for (i, _), pr in zip(good, batch_preds):
                preds[i] = pr
            for nid, probs in scores.items():
                child_ids = predictor.nodes[nid].class_nodes
                for k, row in zip(score[nid], probs):
                    local[nid][good[k][0]] = child_ids[int(np.argmax(row))]
    return preds, local


# ------------------------------------------------------------------------------------- metrics (pure)
def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _json_safe(obj):
    """NaN/inf → ``None``, numpy scalars → Python numbers, tuples → lists (recursively)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
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


def top_parent(hier: Hierarchy, leaf: str) -> str:
    """The top-level node id above (or at) ``leaf``."""
    return hier.path(leaf)[0]


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
        acc.append(_ratio(right, total))
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
        have = chosen is not None
        out[hier.nodes[nid].dataset] = {
            "node": nid,
            "local_accuracy": _ratio(right_true, n_true) if have else None,
            "routed_accuracy": _ratio(right_routed, n_routed) if have else None,
            "n_true": n_true,
            "n_routed": n_routed,
        }
    return out


def verdict(comparison: dict, alpha: float = ALPHA) -> str:
    """One sentence on the paired comparison (``metrics.paired_comparison`` of LCPN vs flat)."""
    d, p, (lo, hi) = comparison["difference"], comparison["p_value"], comparison["ci95"]
    if d is None or not comparison.get("n"):
        return "No images to compare the hierarchy with the flat baseline."
    p_text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    detail = (f"leaf accuracy {d * 100:+.1f} points (95% CI {lo * 100:+.1f} to {hi * 100:+.1f}), "
              f"McNemar p = {p_text}")
    if p < alpha and d > 0:
        return f"The hierarchy is better than the flat baseline at p<{alpha:g}: {detail}."
    if p < alpha and d < 0:
        return f"The hierarchy is worse than the flat baseline at p<{alpha:g}: {detail}."
    return f"No significant difference between the hierarchy and the flat baseline at p<{alpha:g}: {detail}."


def _leaf_scores(hier: Hierarchy, true_leaves: Sequence[str], pred_leaf: Sequence[str | None]) -> dict:
    """classification_summary over the trained leaves (display order) plus a (stopped) column."""
    leaves = display_order(hier)
    index = {leaf: k for k, leaf in enumerate(leaves)}
    y_true = [index[t] for t in true_leaves]
    y_pred = [index.get(p, len(leaves)) if p else len(leaves) for p in pred_leaf]
    summary = classification_summary(y_true, y_pred, leaves + [STOPPED])
    summary["per_class"].pop(STOPPED, None)
    return summary


def assemble_results(hier: Hierarchy, true_leaves: Sequence[str], pred_paths: Sequence[Sequence[str]],
                     local_children: dict[str, Sequence[str | None]] | None = None,
                     flat_leaves: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0,
                     confidences: Sequence[float] | None = None) -> dict:
    """Every number of ``results.json`` from predictions (pure: no models, no files).

    Parameters
    ----------
    hier : Hierarchy
        The trained hierarchy.
    true_leaves : sequence of str, shape (N,)
        True leaf id per evaluated image (each a leaf of ``hier``).
    pred_paths : sequence of sequences of str, shape (N, variable)
        Predicted node ids per image, top level first (``Prediction.node_ids``); shorter than the
        true path for a partial prediction.
    local_children : dict, optional
        Classifier node id → ``N`` child ids chosen by that node's own classifier (``None`` where the
        image is not truly below the node); see :func:`node_accuracies`.
    flat_leaves : sequence of str, shape (N,), optional
        The flat baseline's leaf per image; adds ``flat``, ``comparison`` and ``verdict``.
    n_boot, seed
        Bootstrap draws and seed of the paired comparison.
    confidences : sequence of float, shape (N,), optional
        The chain's confidence per image (``Prediction.confidence``, the product of the levels'
        probabilities); adds ``mean_confidence`` and ``confidence_ece`` (expected calibration error of
        that confidence against leaf correctness).

    Returns
    -------
    dict
        JSON-ready (``None`` for undefined values): ``n_images``, ``leaf_accuracy``, ``leaf_error``,
        ``level_accuracy``/``level_support`` (top level first), ``error_attribution``/``error_counts``,
        ``n_mistakes``, ``n_stopped``, ``hierarchical_precision``/``_recall``/``_f1``,
        ``mistake_severity``, ``macro_f1``, ``per_leaf``, ``confusion`` (``rows``, ``columns``,
        ``counts``), ``nodes``, and with ``flat_leaves``: ``flat``, ``comparison``, ``verdict``.
    """
    true_leaves = [str(t) for t in true_leaves]
    pred_paths = [list(p) for p in pred_paths]
    if len(true_leaves) != len(pred_paths):
        raise ValueError(f"{len(true_leaves)} true leaves but {len(pred_paths)} predictions")
    n = len(true_leaves)
    pred_node = [p[-1] if p else ROOT_ID for p in pred_paths]
    correct = np.array([p == t for p, t in zip(pred_node, true_leaves)], dtype=bool)
    level_acc, level_support = level_accuracy(hier, true_leaves, pred_paths)
    shares, counts = error_attribution(hier, true_leaves, pred_paths)
    leaf_set = set(hier.leaves())
    pred_leaf = [p if p in leaf_set else None for p in pred_node]
    summary = _leaf_scores(hier, true_leaves, pred_leaf)
    rows = display_order(hier)
    n_stopped = sum(1 for p in pred_leaf if p is None)
    cm = (np.array(summary["confusion"], dtype=int) if n else np.zeros((len(rows) + 1,) * 2, int))[: len(rows)]
    columns = rows + [STOPPED]
    if not n_stopped:
        cm, columns = cm[:, : len(rows)], rows
    leaf_accuracy = float(correct.mean()) if n else None
    res: dict = {
        "n_images": n,
        "leaf_accuracy": leaf_accuracy,
        "leaf_error": 1.0 - leaf_accuracy if n else None,
        "level_accuracy": level_acc,
        "level_support": level_support,
        "error_attribution": shares,
        "error_counts": counts,
        "n_mistakes": int((~correct).sum()),
        "n_stopped": n_stopped,
        **hierarchical_prf(hier, true_leaves, pred_node),
        "mistake_severity": mistake_severity(hier, true_leaves, pred_node),
        "mean_confidence": float(np.mean(confidences)) if confidences is not None and n else None,
        "confidence_ece": expected_calibration_error(confidences, correct) if confidences is not None and n else None,
        "macro_f1": summary["macro_f1"],
        "per_leaf": summary["per_class"],
        "confusion": {"rows": rows, "columns": columns, "counts": cm.tolist()},
        "nodes": node_accuracies(hier, true_leaves, pred_paths, local_children or {}),
    }
    if not n:
        res.update({k: None for k in ("hierarchical_precision", "hierarchical_recall", "hierarchical_f1")})
    if flat_leaves is not None:
        flat_leaves = [str(f) for f in flat_leaves]
        if len(flat_leaves) != n:
            raise ValueError(f"{n} true leaves but {len(flat_leaves)} flat predictions")
        flat_paths = [hier.path(f) for f in flat_leaves]
        flat_correct = np.array([f == t for f, t in zip(flat_leaves, true_leaves)], dtype=bool)
        flat_summary = _leaf_scores(hier, true_leaves, flat_leaves)
        flat_prf = hierarchical_prf(hier, true_leaves, flat_leaves)
        res["flat"] = {
            "leaf_accuracy": float(flat_correct.mean()) if n else None,
            "macro_f1": flat_summary["macro_f1"],
            "hierarchical_f1": flat_prf["hierarchical_f1"] if n else None,
            "level_accuracy": level_accuracy(hier, true_leaves, flat_paths)[0],
            "hierarchical_precision": flat_prf["hierarchical_precision"] if n else None,
            "hierarchical_recall": flat_prf["hierarchical_recall"] if n else None,
            "mistake_severity": mistake_severity(hier, true_leaves, flat_leaves),
        }
        comp = _json_safe(paired_comparison(correct, flat_correct, n_boot=n_boot, seed=seed))
        comp["lcpn_accuracy"], comp["flat_accuracy"] = res["leaf_accuracy"], res["flat"]["leaf_accuracy"]
        res["comparison"] = comp
        res["verdict"] = verdict(comp)
    return _json_safe(res)


# ------------------------------------------------------------------------------------- presentation
def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def summary_lines(res: dict) -> list[str]:
    """The short text summary evaluate.py prints."""
    lines = [
        f"evaluated {res['n_images']} images ({res.get('n_unreadable', 0)} unreadable) "
        f"with the {res.get('runtime', '?')} runtime: {res.get('source', '')}",
        f"leaf accuracy (end-to-end): {_f(res['leaf_accuracy'])}   top-1 error {_f(res['leaf_error'])}, "
        + (f"mean mistake severity {_f(res['mistake_severity'], 2)} edges" if res["mistake_severity"] is not None
           else "mistake severity n/a (no prediction left the true path)"),
        "level accuracy: " + ", ".join(f"level {k} {_f(v)}" for k, v in enumerate(res["level_accuracy"], 1)),
        "mistakes first made at: " + ", ".join(f"level {k} {_pct(v)}" for k, v in enumerate(res["error_attribution"], 1))
        + f" (of {res['n_mistakes']})",
        f"hierarchical F1: {_f(res['hierarchical_f1'])} (precision {_f(res['hierarchical_precision'])}, "
        f"recall {_f(res['hierarchical_recall'])}); macro F1 over leaves {_f(res['macro_f1'])}",
    ]
    if res.get("n_stopped"):
        lines.append(f"{res['n_stopped']} predictions stopped above a leaf (--min-confidence)")
    if "flat" in res:
        fl, c = res["flat"], res["comparison"]
        lines.append(f"flat baseline: leaf accuracy {_f(fl['leaf_accuracy'])}, macro F1 {_f(fl['macro_f1'])}, "
                     f"hierarchical F1 {_f(fl['hierarchical_f1'])}")
        lines.append(f"LCPN - flat: {_f(c['difference'])} (95% CI {_f(c['ci95'][0])} to {_f(c['ci95'][1])}), "
                     f"McNemar p = {_f(c['p_value'])} ({c['a_only']} only LCPN right, {c['b_only']} only flat right)")
        lines.append(res["verdict"])
    return lines


def render_markdown(res: dict) -> str:
    """The ``results.md`` report: headline numbers, per level, per node, flat comparison, figures."""
    has_flat = "flat" in res
    fl = res.get("flat", {})
    L = [
        "# Evaluation of the hierarchical classifier",
        "",
        f"{res['n_images']} images evaluated ({res.get('n_unreadable', 0)} unreadable, left out) from "
        f"{res.get('source', 'the test set')}; models: `{res.get('models_dir', '')}`; runtime: {res.get('runtime', '?')}"
        + (f"; `--min-confidence {res['min_confidence']}`" if res.get("min_confidence") else "") + ".",
        "",
        "## Headline numbers",
        "",
        "| metric | LCPN (chained) |" + (" flat baseline |" if has_flat else ""),
        "|---|---|" + ("---|" if has_flat else ""),
    ]

    def row(name, a, b=None, fmt=_f):
        L.append(f"| {name} | {fmt(a)} |" + (f" {fmt(b)} |" if has_flat else ""))

    row("leaf accuracy", res["leaf_accuracy"], fl.get("leaf_accuracy"))
    row("top-1 error", res["leaf_error"], None if not has_flat or fl.get("leaf_accuracy") is None else 1 - fl["leaf_accuracy"])
    row("macro F1 (leaves)", res["macro_f1"], fl.get("macro_f1"))
    row("hierarchical precision", res["hierarchical_precision"], fl.get("hierarchical_precision"))
    row("hierarchical recall", res["hierarchical_recall"], fl.get("hierarchical_recall"))
    row("hierarchical F1", res["hierarchical_f1"], fl.get("hierarchical_f1"))
    row("mistake severity (edges to common ancestor)", res["mistake_severity"], fl.get("mistake_severity"),
        fmt=lambda v: _f(v, 2))
    if res.get("confidence_ece") is not None:
        L.append(f"| mean confidence / its calibration error (ECE) | {_f(res['mean_confidence'])} / "
                 f"{_f(res['confidence_ece'])} |" + (" |" if has_flat else ""))
    L += [
        "",
        "Leaf accuracy counts an image only when every level is right and the walk reaches the true leaf. "
        "Mistake severity is the mean number of edges from the true leaf up to its lowest common ancestor "
        "with the prediction, over mistakes (1 = a sibling).",
    ]
    if res.get("n_stopped"):
        L += ["", f"{res['n_stopped']} predictions stopped above a leaf; they count as wrong for leaf accuracy "
                  "and get partial credit in the hierarchical scores."]
    L += ["", "## Per level", "", "| level | images | LCPN accuracy |" + (" flat accuracy |" if has_flat else "")
          + " share of mistakes first made here |",
          "|---|---|---|" + ("---|" if has_flat else "") + "---|"]
    for k, (acc, sup) in enumerate(zip(res["level_accuracy"], res["level_support"])):
        share = res["error_attribution"][k] if k < len(res["error_attribution"]) else None
        flat_acc = fl.get("level_accuracy", [None] * (k + 1))[k] if has_flat else None
        L.append(f"| {k + 1} | {sup} | {_f(acc)} |" + (f" {_f(flat_acc)} |" if has_flat else "")
                 + f" {_pct(share)} ({res['error_counts'][k]}) |")
    L += ["", "## Per node", "",
          "Local: the node's classifier on every test image of its classes. "
          "Routed: on those the chain actually sent it (all earlier levels right).", "",
          "| node | classifies | local accuracy | images | routed accuracy | images routed |",
          "|---|---|---|---|---|---|"]
    for ds, nd in res["nodes"].items():
        where = "top level" if nd["node"] == ROOT_ID else f"below `{nd['node']}`"
        L.append(f"| {_md(ds)} | {_md(where)} | {_f(nd['local_accuracy'])} | {nd['n_true']} | {_f(nd['routed_accuracy'])} | "
                 f"{nd['n_routed']} |")
    if has_flat:
        c = res["comparison"]
        L += ["", "## Hierarchy vs flat baseline", "",
              f"Paired on the same {c['n']} images: difference in leaf accuracy (LCPN - flat) **{_f(c['difference'])}**, "
              f"95% paired-bootstrap interval [{_f(c['ci95'][0])}, {_f(c['ci95'][1])}]; "
              f"{c['a_only']} images only the hierarchy got right, {c['b_only']} only the flat model; "
              f"exact McNemar p = {_f(c['p_value'])}.", "", f"**Verdict:** {res['verdict']}"]
    L += ["", "## Per leaf", "", "| leaf | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for leaf, s in res["per_leaf"].items():
        L.append(f"| {_md(leaf)} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} | {s['support']} |")
    L += ["", "## Figures", "", "![graph](graph.png)", "", "![matrix](matrix.png)", ""]
    return "\n".join(L)


def write_figures(hier: Hierarchy, res: dict, out_dir: str | Path) -> None:
    """``graph.png`` (node-local vs end-to-end accuracies) and ``matrix.png`` (leaf confusion by parent)."""
    from . import plots

    out_dir = Path(out_dir)
    labels, values = [], []
    for ds, nd in res["nodes"].items():
        if nd["local_accuracy"] is None:
            continue
        what = f"{ds}: top level" if nd["node"] == ROOT_ID else ds
        labels.append(f"{what}  (local, n={nd['n_true']})")
        values.append(nd["local_accuracy"])
    highlight = []
    end_to_end = [(f"level {k} (end-to-end)", v) for k, v in enumerate(res["level_accuracy"], 1)]
    end_to_end.append(("leaf accuracy (end-to-end)", res["leaf_accuracy"]))
    if "flat" in res:
        end_to_end.append(("flat baseline: leaf accuracy", res["flat"]["leaf_accuracy"]))
    for name, v in end_to_end:
        if v is not None:
            highlight.append(len(labels))
            labels.append(name)
            values.append(v)
    plots.accuracy_bars(labels, values, out_dir / "graph.png",
                        f"Node-local vs end-to-end accuracy ({res['n_images']} test images)", highlight=highlight,
                        legend=("node-local classifier", "end-to-end"))
    conf = res["confusion"]
    rows = conf["rows"]
    groups = [hier.nodes[top_parent(hier, leaf)].name for leaf in rows]
    plots.confusion(np.array(conf["counts"], dtype=float).reshape(len(rows), len(conf["columns"])), rows,
                    out_dir / "matrix.png",
                    f"Leaf confusion, end-to-end (n={res['n_images']}, leaf accuracy {_f(res['leaf_accuracy'], 3)})",
                    groups=groups, columns=conf["columns"])


def write_outputs(hier: Hierarchy, res: dict, out_dir: str | Path) -> list[Path]:
    """Write :data:`OUTPUT_FILES` into ``out_dir``, each atomically; returns their paths."""
    from .safeio import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_figures(hier, res, out_dir)
    write_text_atomic(out_dir / "results.md", render_markdown(res))
    write_json_atomic(out_dir / "results.json", res)  # last: its presence means the set is complete
    return [out_dir / f for f in OUTPUT_FILES]


# ------------------------------------------------------------------------------------- orchestration
def _check_prepared_matches(doc: dict, models_doc: dict, hier: Hierarchy, data_dir: Path, models_dir: Path) -> None:
    if doc.get("fingerprint") != hier.fingerprint():
        log.warning("warning: %s and %s describe different hierarchies; evaluating the test classes the models "
                    "know, but the test split may overlap the models' training images", data_dir, models_dir)
    elif models_doc.get("split_seed") is not None and doc.get("seed") != models_doc.get("split_seed"):
        log.warning("warning: %s was split with seed %s but the models were trained on a split with seed %s; "
                    "the test images may include training images", data_dir, doc.get("seed"), models_doc.get("split_seed"))


def evaluate(models_dir: str | Path, data_dir: str | Path | None = None, data_tree: str | Path | None = None,
             runtime: str = "auto", device: str = "cpu", min_confidence: float = 0.0, batch_size: int = 32,
             with_flat: bool | None = None, workers: int | None = None, progress: bool = False,
             tta_below: float | None = None) -> tuple[dict, Hierarchy]:
    """Load the models once, predict the test set and assemble the results.

    Parameters
    ----------
    models_dir : path
        ``trained_models/``.
    data_dir : path, optional
        Prepared ``split_datasets/``: its recorded test split is evaluated (unless ``data_tree``).
    data_tree : path, optional
        Any folder tree of the same hierarchy, evaluated instead.
    with_flat : bool or None
        Evaluate the flat baseline; ``None`` = when ``models_dir/flat/model.pth`` exists.

    Returns
    -------
    (dict, Hierarchy)
        The results document (see :func:`assemble_results`, plus ``n_unreadable``, ``unreadable``,
        ``runtime``, ``source``, ``models_dir``, ``min_confidence``, ``created``) and the trained tree.

    Raises
    ------
    UserError
        Missing data or models, unknown test classes, or no readable test image.
    """
    from .predictor import HierarchicalPredictor, default_workers, read_models_hierarchy

    models_dir = Path(models_dir)
    hier, models_doc = read_models_hierarchy(models_dir)
    if data_tree is not None:
        test, _ = scan_test_tree(data_tree)
        check_known_leaves(hier, test.leaves, f"--data {data_tree}")
    else:
        if data_dir is None:
            raise ValueError("give data_dir or data_tree")
        test, _, doc = load_prepared_test_set(data_dir)
        check_known_leaves(hier, test.leaves, f"the test split of {data_dir}")
        _check_prepared_matches(doc, models_doc, hier, Path(data_dir), models_dir)
    for p, why in test.skipped:
        log.warning("skipped %s: %s", p, why)
    if with_flat is None:
        with_flat = (models_dir / FLAT_DATASET / "model.pth").exists()
        if not with_flat:
            log.info("no flat baseline in %s; evaluating the hierarchy only", models_dir)
    predictor = HierarchicalPredictor.load(models_dir, runtime=runtime, device=device, min_confidence=min_confidence,
                                           with_flat=with_flat, tta_below=tta_below)
    log.info("runtime: %s; %d test images", predictor.runtime, len(test.paths))
    preds, local = predict_test_set(predictor, test, batch_size=batch_size,
                                    workers=workers or default_workers(), progress=progress)
    unreadable = list(test.skipped) + [(pr.path, pr.error) for pr in preds if pr.error]
    ok = [i for i, pr in enumerate(preds) if not pr.error]
    for pr in preds:
        if pr.error:
            log.warning("unreadable %s: %s", pr.path, pr.error)
    if not ok:
        first = f" (first: {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
        raise UserError(f"none of the {len(test.paths)} test images could be read{first}")
    res = assemble_results(
        hier,
        [test.leaves[i] for i in ok],
        [preds[i].node_ids for i in ok],
        {nid: [ch[i] for i in ok] for nid, ch in local.items()},
        [preds[i].flat_leaf for i in ok] if with_flat else None,
        confidences=[preds[i].confidence for i in ok],
    )
    head = {"n_images": res.pop("n_images"), "n_unreadable": len(unreadable), "runtime": predictor.runtime}
    tail = {
        "source": test.source,
        "models_dir": str(models_dir),
        "min_confidence": float(min_confidence),
        "unreadable": [{"path": p, "reason": r} for p, r in unreadable],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return {**head, **res, **tail}, hier
