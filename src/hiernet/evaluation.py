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
import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .hierarchy import FLAT_DATASET, Hierarchy, HierarchyError, load_hierarchy_json
from .metrics import json_ready, leaf_correct, node_vs_flat, paired_comparison, partial_label_score, score
from .report import verdict
from .routing import path_leaf_probs
from .safeio import UserError, sha256_file
from .testsets import TestSet, check_known_leaves, load_prepared_test_set, partial_test_set, scan_test_tree

log = logging.getLogger(__name__)

#: The fields of the flat baseline's :func:`~hiernet.metrics.score` that ``results.json`` reports
#: under ``flat`` (in this order); the chain's score is reported whole, at the top level.
FLAT_FIELDS = ("leaf_accuracy", "macro_f1", "hierarchical_f1", "level_accuracy", "hierarchical_precision",
               "hierarchical_recall", "mistake_severity")


# ------------------------------------------------------------------------------------- prediction
def combined_leaves(hier: Hierarchy, node_probs: dict[str, np.ndarray], flat_probs: np.ndarray,
                    flat_leaves: Sequence[str]) -> list[str]:
    """The combined decision: per image, the leaf maximising flat probability × LCPN path probability.

    Parameters
    ----------
    node_probs : dict
        As for :func:`hiernet.routing.path_leaf_probs`, on all ``N`` images.
    flat_probs : ndarray, shape (N, L)
        The flat head's probabilities; columns follow ``flat_leaves``.

    Returns
    -------
    list of str, shape (N,)
    """
    flat_probs = np.asarray(flat_probs, dtype=float)
    joint = path_leaf_probs(hier, node_probs, flat_leaves, n=len(flat_probs)) * flat_probs
    return [str(flat_leaves[j]) for j in joint.argmax(axis=1)]


def _can_combine(predictor) -> bool:
    """Whether the combined decision is computed: it needs every node's and the flat head's probabilities on
    every image, cheap when all nodes are heads on shared backbones (one extra small matrix product each),
    so only then."""
    return predictor.flat is not None and all(nm.head is not None for nm in predictor.nodes.values())


def predict_test_set(predictor, test: TestSet, batch_size: int = 32, workers: int = 2,
                     progress: bool = False) -> tuple[list, dict[str, list], list | None]:
    """Predict every test image and each classifier node's own choice on the images below it.

    One backbone pass per batch serves the chain, the flat head (if loaded), the local scores
    (:meth:`hiernet.predictor.HierarchicalPredictor.predict_and_score`) and, when the flat head is
    loaded and every node is a head on a shared backbone, the combined decision (:func:`combined_leaves`).

    Parameters
    ----------
    predictor : HierarchicalPredictor
    test : TestSet
        ``N`` images; their leaves must be leaves of ``predictor.hier``.

    Returns
    -------
    (list of Prediction, dict, list or None)
        ``N`` predictions in ``test.paths`` order (``error`` set for unreadable images);
        classifier node id → list of ``N`` predicted child ids of that node's classifier, ``None``
        for images not truly below the node (or unreadable); the combined decision's ``N`` leaves
        (``None`` for unreadable images), or ``None`` when it is not computed.
    """
    from .predictor import COMBINED_SCORES, Prediction

    hier = predictor.hier
    n = len(test.paths)
    classifiers = hier.classifier_nodes()
    below = {nid: set(hier.subtree_leaves(nid)) for nid in classifiers}
    local: dict[str, list] = {nid: [None] * n for nid in classifiers}
    preds: list = [None] * n
    combine = _can_combine(predictor)
    combined: list | None = [None] * n if combine else None
    # the predictor's own decoding/resizing, so evaluation sees exactly what predict.py sees
    for prepared in predictor.prepared_batches(test.paths, max(1, batch_size), workers, progress, desc="evaluate"):
        good = [(i, x) for i, x, _ in prepared if x is not None]
        for i, _, err in prepared:
            if err is not None:
                preds[i] = Prediction(test.paths[i], complete=False, error=err)
        if not good:
            continue
        rows = {nid: [k for k, (i, _) in enumerate(good) if test.leaves[i] in below[nid]] for nid in classifiers}
        batch_preds, scores = predictor.predict_and_score([x for _, x in good], [test.paths[i] for i, _ in good], rows,
                                                          combined=combine)
        for (i, _), pr in zip(good, batch_preds):
            preds[i] = pr
        for nid in classifiers:
            child_ids = predictor.nodes[nid].class_nodes
            for k, row in zip(rows[nid], scores[nid]):
                local[nid][good[k][0]] = child_ids[int(np.argmax(row))]
        if combine:  # what predict.py --decision combined computes
            leaves = np.asarray(predictor.flat.class_nodes, dtype=object)[scores[COMBINED_SCORES].argmax(1)]
            for (i, _), leaf in zip(good, leaves):
                combined[i] = leaf
    return preds, local, combined


# ------------------------------------------------------------------------------------- results
def assemble_results(hier: Hierarchy, true_leaves: Sequence[str], pred_paths: Sequence[Sequence[str]],
                     local_children: dict[str, Sequence[str | None]] | None = None,
                     flat_leaves: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0,
                     confidences: Sequence[float] | None = None,
                     combined_leaves: Sequence[str] | None = None) -> dict:
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
    combined_leaves : sequence of str, shape (N,), optional
        The combined decision's leaf per image (:func:`combined_leaves`); adds ``combined`` (its score,
        :data:`FLAT_FIELDS`, and its paired comparison with the chain: ``vs_lcpn``). Reported only.

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
        res["nodes_vs_flat"] = node_vs_flat(hier, true_leaves, local_children or {}, [str(f) for f in flat_leaves])
    if combined_leaves is not None:
        comb_paths = [hier.path(str(c)) for c in combined_leaves]
        comb = score(hier, true_leaves, comb_paths)
        res["combined"] = {k: comb[k] for k in FLAT_FIELDS}
        res["combined"]["vs_lcpn"] = json_ready(paired_comparison(
            leaf_correct(true_leaves, comb_paths), leaf_correct(true_leaves, pred_paths), n_boot=n_boot, seed=seed))
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


def score_partial(predictor, data_dir: Path, batch_size: int, workers: int) -> dict | None:
    """``results.json`` ``partial``: the test images of ``data_dir`` labelled only down to an inner node,
    scored at their own depth (:func:`hiernet.metrics.partial_label_score`); ``None`` when there are none."""
    from .hierarchy import load_hierarchy_json

    _, doc = load_hierarchy_json(Path(data_dir) / "hierarchy.json")
    test = partial_test_set(data_dir, doc)
    keep = [i for i, b in enumerate(test.leaves) if b in predictor.hier.nodes]
    if not keep:
        return None
    test = TestSet([test.paths[i] for i in keep], [test.leaves[i] for i in keep], test.source)
    preds, _, _ = predict_test_set(predictor, test, batch_size=batch_size, workers=workers)
    ok = [i for i, pr in enumerate(preds) if not pr.error]
    res = partial_label_score([test.leaves[i] for i in ok], [preds[i].node_ids for i in ok])
    log.info("partial-label test images: %d, accuracy at their own depth %s", res["n_images"], res["accuracy"])
    return {**res, "n_unreadable": len(preds) - len(ok)}


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


def models_fingerprint(models_dir: str | Path, hier: Hierarchy) -> str:
    """16 hex digits naming one model bundle: the tree and the content of every ``model.pth`` in it.

    Two evaluations with the same fingerprint scored the same models (the ONNX export is checked
    against these files by hash before it is used, so it is covered too).
    """
    from .bundle import model_sha256, node_list

    h = hashlib.sha256(hier.fingerprint().encode())
    for ds, _ in node_list(hier, with_flat=True):
        f = Path(models_dir) / ds / "model.pth"
        if f.is_file():
            h.update(f"{ds}:{model_sha256(f)};".encode())
    return h.hexdigest()[:16]


def seen_in_training(paths: Sequence[str], data_dir: str | Path | None) -> dict[str, int]:
    """How many of ``paths`` have the content of an image of the train or val split of ``data_dir``.

    Matched by SHA-256 of the file bytes (``hierarchy.json`` records each image's split; the files
    are ``data_dir/flat/<split>/<leaf folder>/<file>``), so renamed or moved copies are found too.

    Returns
    -------
    dict
        ``{"train": count, "val": count}``; empty when ``data_dir`` holds no readable prepared split.
    """
    if data_dir is None:
        return {}
    try:
        _, doc = load_hierarchy_json(Path(data_dir) / "hierarchy.json")
        folder = dict(zip(doc["flat"]["class_nodes"], doc["flat"]["classes"], strict=True))
        known = {}
        for im in doc["images"]:
            if im["split"] in ("train", "val"):
                f = Path(data_dir) / FLAT_DATASET / im["split"] / folder[im["leaf"]] / im["file"]
                if f.is_file():
                    known[sha256_file(f)] = im["split"]
    except (OSError, HierarchyError, KeyError, TypeError, ValueError) as exc:
        log.info("cannot check the test images against the training split of %s: %s", data_dir, exc)
        return {}
    counts = {"train": 0, "val": 0}
    for p in paths:
        try:
            split = known.get(sha256_file(p))
        except OSError:
            continue
        if split:
            counts[split] += 1
    return counts


def _warn_seen(test: TestSet, data_dir: Path | None, data_tree: Path) -> dict[str, int]:
    """Warn (one line) when images of the folder tree were training or validation images."""
    seen = seen_in_training(test.paths, data_dir)
    if sum(seen.values()):
        log.warning("warning: %d of the %d images of %s were in the training data of %s (%d train, %d val; same "
                    "file content): their scores are optimistic", sum(seen.values()), len(test.paths), data_tree,
                    data_dir, seen["train"], seen["val"])
    return seen


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
        Any folder tree of the same hierarchy, evaluated instead; its images are then checked by content
        against the train and val images of ``data_dir`` (a warning and ``seen_in_training``).
    with_flat : bool or None
        Evaluate the flat baseline; ``None`` = when ``models_dir/flat/model.pth`` exists.
    precision : {"auto", "fp32", "int8"}
        The shared backbones' precision (see :func:`hiernet.bundle.load_bundle`).

    Returns
    -------
    (dict, Hierarchy)
        The results document (see :func:`assemble_results`, plus ``n_unreadable``, ``unreadable``,
        ``runtime``, ``auto_decision`` (:func:`_auto_decision_record`), ``source``, ``models_dir``, ``models_fingerprint`` (:func:`models_fingerprint`),
        ``min_confidence``, ``seen_in_training`` (:func:`seen_in_training`, with ``data_tree``),
        ``images`` (one record per evaluated image), ``created``, and ``display`` when the tree has display
        names: node id → the name results.md and report.html show) and the trained tree.

    Raises
    ------
    UserError
        Missing data or models, unknown test classes, or no readable test image (``arg`` names the
        parameter at fault where there is one).
    """
    from .predictor import HierarchicalPredictor, default_workers, read_models_hierarchy

    # messages and results name absolute paths
    models_dir, data_dir, data_tree = (None if p is None else Path(p).resolve() for p in (models_dir, data_dir, data_tree))
    hier, models_doc = read_models_hierarchy(models_dir)
    test = _load_test_set(hier, models_doc, models_dir, data_dir, data_tree)
    seen = _warn_seen(test, data_dir, data_tree) if data_tree is not None else {}
    with_flat = _want_flat(models_dir, with_flat)
    predictor = HierarchicalPredictor.load(models_dir, runtime=runtime, device=device, min_confidence=min_confidence,
                                           with_flat=with_flat, tta_below=tta_below, precision=precision)
    log.info("runtime: %s; %d test images", predictor.runtime, len(test.paths))
    preds, local, combined = predict_test_set(predictor, test, batch_size=batch_size,
                                              workers=workers or default_workers(), progress=progress)
    ok, unreadable = _readable(test, preds)
    res = assemble_results(
        hier, [test.leaves[i] for i in ok], [preds[i].node_ids for i in ok],
        {nid: [ch[i] for i in ok] for nid, ch in local.items()},
        [preds[i].flat_leaf for i in ok] if with_flat else None,
        confidences=[preds[i].confidence for i in ok],
        combined_leaves=[combined[i] for i in ok] if combined is not None else None,
    )
    if data_tree is None:
        res["partial"] = score_partial(predictor, Path(data_dir), batch_size, workers or default_workers())
    head = {"n_images": res.pop("n_images"), "n_unreadable": len(unreadable), "runtime": predictor.runtime,
            "precision": predictor.bundle.precision, "auto_decision": _auto_decision_record(models_dir)}
    tail = {"source": test.source, "models_dir": str(models_dir), "models_fingerprint": models_fingerprint(models_dir, hier),
            "min_confidence": float(min_confidence), "seen_in_training": seen, "images": _image_records(test, preds, ok),
            "unreadable": [{"path": p, "reason": r} for p, r in unreadable],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **({"display": dict(predictor.display)} if predictor.display else {})}
    return {**head, **res, **tail}, hier


def _auto_decision_record(models_dir: Path) -> dict:
    """What ``predict.py --decision auto`` uses with these models: ``{"chosen", ...}`` (the export's
    record, :func:`hiernet.bundle.chosen_decision`; ``{"chosen": "lcpn"}`` without one)."""
    from .bundle import chosen_decision

    decision, record = chosen_decision(models_dir)
    return {**(record or {}), "chosen": decision}


def _want_flat(models_dir: Path, with_flat: bool | None) -> bool:
    """``with_flat``, or (``None``) whether ``models_dir`` holds a flat baseline (said when it does not)."""
    if with_flat is None:
        with_flat = (models_dir / FLAT_DATASET / "model.pth").exists()
        if not with_flat:
            log.info("no flat baseline in %s; evaluating the hierarchy only", models_dir)
    return with_flat


def _image_records(test: TestSet, preds: list, ok: Sequence[int]) -> list[dict]:
    """``results.json`` → ``images``: per evaluated image its path, true leaf, predicted path (node ids),
    the chain's confidence and the flat leaf (``None`` without the flat baseline)."""
    return [{"path": preds[i].path, "true": test.leaves[i], "pred": list(preds[i].node_ids),
             "confidence": float(preds[i].confidence), "flat": preds[i].flat_leaf} for i in ok]
