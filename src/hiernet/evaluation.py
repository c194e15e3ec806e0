"""End-to-end evaluation of the chained (LCPN) predictor and the flat baseline on a test set.

The parts, so each can be tested without the others (and the arithmetic without torch or images):

* :mod:`hiernet.testsets` collects a test set (the recorded test split or any folder tree);
* :func:`predict_test_set` walks every image down the tree once and, in the same backbone pass,
  runs each classifier node on the images that truly belong under it (its *local* accuracy does not
  depend on where its parent routed them) and the flat head;
* :func:`assemble_results` scores the chain and the flat baseline with the same
  :func:`hiernet.metrics.score` and adds their paired comparison: the ``results.json`` document;
* :mod:`hiernet.report` presents it (summary, ``results.md``, figures);
* :func:`evaluate` drives the three steps.

Images that cannot be decoded (or that a folder-tree scan leaves out) are excluded from every metric
and listed under ``unreadable``; ``n_images`` counts the images that were evaluated. The conventions
of the metrics (partial predictions, the stopped column, ``None`` for undefined values) are those of
:mod:`hiernet.metrics`.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .hierarchy import FLAT_DATASET, Hierarchy
from .metrics import json_ready, leaf_correct, paired_comparison, score
from .report import verdict
from .safeio import UserError
from .testsets import TestSet, check_known_leaves, load_prepared_test_set, scan_test_tree

log = logging.getLogger(__name__)

#: The fields of the flat baseline's :func:`~hiernet.metrics.score` that ``results.json`` reports
#: under ``flat`` (in this order); the chain's score is reported whole, at the top level.
FLAT_FIELDS = ("leaf_accuracy", "macro_f1", "hierarchical_f1", "level_accuracy", "hierarchical_precision",
               "hierarchical_recall", "mistake_severity")


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


# ------------------------------------------------------------------------------------- results
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
        The chain's predicted node ids per image, top level first (``Prediction.node_ids``).
    local_children : dict, optional
        Classifier node id → ``N`` child ids chosen by that node's own classifier; see
        :func:`hiernet.metrics.node_accuracies`.
    flat_leaves : sequence of str, shape (N,), optional
        The flat baseline's leaf per image; adds ``flat``, ``comparison`` and ``verdict``.
    n_boot, seed
        Bootstrap draws and seed of the paired comparison.
    confidences : sequence of float, shape (N,), optional
        The chain's confidence per image (``Prediction.confidence``).

    Returns
    -------
    dict
        JSON-ready: the chain's :func:`hiernet.metrics.score`, and with ``flat_leaves``: ``flat``
        (the flat baseline's score, :data:`FLAT_FIELDS`), ``comparison`` (paired, LCPN vs flat, with
        ``lcpn_accuracy`` and ``flat_accuracy``) and ``verdict``.
    """
    res = score(hier, true_leaves, pred_paths, confidences=confidences, local_children=local_children)
    if flat_leaves is not None:
        if len(flat_leaves) != len(true_leaves):
            raise ValueError(f"{len(true_leaves)} true leaves but {len(flat_leaves)} flat predictions")
        flat_paths = [hier.path(str(f)) for f in flat_leaves]
        flat = score(hier, true_leaves, flat_paths)
        res["flat"] = {k: flat[k] for k in FLAT_FIELDS}
        comp = json_ready(paired_comparison(leaf_correct(true_leaves, pred_paths),
                                            leaf_correct(true_leaves, flat_paths), n_boot=n_boot, seed=seed))
        comp["lcpn_accuracy"], comp["flat_accuracy"] = res["leaf_accuracy"], flat["leaf_accuracy"]
        res["comparison"] = comp
        res["verdict"] = verdict(comp)
    return res


# ------------------------------------------------------------------------------------- driver
def _check_prepared_matches(doc: dict, models_doc: dict, hier: Hierarchy, data_dir: Path, models_dir: Path) -> None:
    if doc.get("fingerprint") != hier.fingerprint():
        log.warning("warning: %s and %s describe different hierarchies; evaluating the test classes the models "
                    "know, but the test split may overlap the models' training images", data_dir, models_dir)
    elif models_doc.get("split_seed") is not None and doc.get("seed") != models_doc.get("split_seed"):
        log.warning("warning: %s was split with seed %s but the models were trained on a split with seed %s; "
                    "the test images may include training images", data_dir, doc.get("seed"), models_doc.get("split_seed"))


def _load_test_set(hier: Hierarchy, models_doc: dict, models_dir: Path, data_dir, data_tree) -> TestSet:
    """The test set ``data_tree`` (a folder tree) or else the recorded test split of ``data_dir``."""
    if data_tree is not None:
        test, _ = scan_test_tree(data_tree)
        check_known_leaves(hier, test.leaves, f"the folder tree {data_tree}", arg="data_tree")
    else:
        if data_dir is None:
            raise ValueError("give data_dir or data_tree")
        test, _, doc = load_prepared_test_set(data_dir)
        check_known_leaves(hier, test.leaves, f"the test split of {data_dir}", arg="data_dir")
        _check_prepared_matches(doc, models_doc, hier, Path(data_dir), models_dir)
    for p, why in test.skipped:
        log.warning("skipped %s: %s", p, why)
    return test


def _readable(test: TestSet, preds: list) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of the images that were predicted, and (path, reason) of every image left out."""
    unreadable = list(test.skipped) + [(pr.path, pr.error) for pr in preds if pr.error]
    for pr in preds:
        if pr.error:
            log.warning("unreadable %s: %s", pr.path, pr.error)
    ok = [i for i, pr in enumerate(preds) if not pr.error]
    if not ok:
        first = f" (first: {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
        raise UserError(f"none of the {len(test.paths)} test images could be read{first}")
    return ok, unreadable


def evaluate(models_dir: str | Path, data_dir: str | Path | None = None, data_tree: str | Path | None = None,
             runtime: str = "auto", device: str = "cpu", min_confidence: float = 0.0, batch_size: int = 32,
             with_flat: bool | None = None, workers: int | None = None, progress: bool = False,
             tta_below: float | None = None, precision: str = "auto") -> tuple[dict, Hierarchy]:
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
    precision : {"auto", "fp32", "int8"}
        The shared backbones' precision (see :func:`hiernet.bundle.load_bundle`).

    Returns
    -------
    (dict, Hierarchy)
        The results document (see :func:`assemble_results`, plus ``n_unreadable``, ``unreadable``,
        ``runtime``, ``source``, ``models_dir``, ``min_confidence``, ``created``) and the trained tree.

    Raises
    ------
    UserError
        Missing data or models, unknown test classes, or no readable test image (``arg`` names the
        parameter at fault where there is one).
    """
    from .predictor import HierarchicalPredictor, default_workers, read_models_hierarchy

    models_dir = Path(models_dir)
    hier, models_doc = read_models_hierarchy(models_dir)
    test = _load_test_set(hier, models_doc, models_dir, data_dir, data_tree)
    if with_flat is None:
        with_flat = (models_dir / FLAT_DATASET / "model.pth").exists()
        if not with_flat:
            log.info("no flat baseline in %s; evaluating the hierarchy only", models_dir)
    predictor = HierarchicalPredictor.load(models_dir, runtime=runtime, device=device, min_confidence=min_confidence,
                                           with_flat=with_flat, tta_below=tta_below, precision=precision)
    log.info("runtime: %s; %d test images", predictor.runtime, len(test.paths))
    preds, local = predict_test_set(predictor, test, batch_size=batch_size,
                                    workers=workers or default_workers(), progress=progress)
    ok, unreadable = _readable(test, preds)
    res = assemble_results(
        hier, [test.leaves[i] for i in ok], [preds[i].node_ids for i in ok],
        {nid: [ch[i] for i in ok] for nid, ch in local.items()},
        [preds[i].flat_leaf for i in ok] if with_flat else None,
        confidences=[preds[i].confidence for i in ok],
    )
    head = {"n_images": res.pop("n_images"), "n_unreadable": len(unreadable), "runtime": predictor.runtime,
            "precision": predictor.bundle.precision}
    tail = {"source": test.source, "models_dir": str(models_dir), "min_confidence": float(min_confidence),
            "unreadable": [{"path": p, "reason": r} for p, r in unreadable],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return {**head, **res, **tail}, hier
