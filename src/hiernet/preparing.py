"""prepare_dataset.py's work for both inputs (a folder tree or a catalogue CSV), no torch.

Both end the same way: labelled images (leaves and partial labels) → one stable split → every node's
dataset, the flat dataset and ``hierarchy.json`` (see :func:`hiernet.splits.materialize`).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .catalogue import LabelledImages
from .hierarchy import Hierarchy, HierarchyError, partition_labels, scan_tree
from .images import check_image
from .safeio import UserError, sha256_file
from .splits import assign_splits, materialize, split_identity

log = logging.getLogger(__name__)


def labelled_tree(src: Path, progress: bool = True) -> tuple[LabelledImages, list[str]]:
    """Scan a ``ROOT/<parent>/<child>/images`` tree and hash its images.

    Returns
    -------
    (LabelledImages, list of str)
        Keys are paths relative to ``src``; the scan's warnings.
    """
    from tqdm import tqdm

    try:
        scan = scan_tree(src, check=check_image)
    except HierarchyError as exc:
        raise UserError(str(exc)) from None
    groups = {**scan.files, **scan.partial}
    keys = sorted(k for ks in groups.values() for k in ks)
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(tqdm(pool.map(lambda k: sha256_file(src / k), keys), total=len(keys), desc="hashing",
                            unit="img", disable=not progress))
    skipped = [{"path": p, "reason": r} for p, r in scan.skipped]
    return LabelledImages(groups=groups, hashes=dict(zip(keys, digests)), skipped=skipped), scan.warnings


def single_child_warnings(hier: Hierarchy) -> list[str]:
    """One warning per inner node with a single child (no model is trained for it)."""
    out = []
    for nid in hier.internal_nodes():
        if len(hier.nodes[nid].children) == 1:
            only = hier.nodes[hier.nodes[nid].children[0]].name
            out.append(f"'{nid or 'root'}' has one child ('{only}'): no model is trained for it and "
                       f"prediction passes through to '{only}' with probability 1")
    return out


def previous_document(out: Path) -> dict | None:
    """The hierarchy.json document an earlier run wrote to ``out``, or ``None`` (none, or unreadable)."""
    try:
        doc = json.loads((out / "hierarchy.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def previous_splits(out: Path, seed: int, ratios: tuple[float, float, float]) -> dict[str, str]:
    """content hash → split of the images an earlier run wrote to ``out`` with the same seed and ratios."""
    try:
        doc = json.loads((out / "hierarchy.json").read_text(encoding="utf-8"))
        if doc.get("seed") != seed or [float(r) for r in doc.get("ratios", [])] != [float(r) for r in ratios]:
            return {}
        entries = list(doc.get("images", [])) + list(doc.get("partial_images", []))
        return {e["sha256"]: e["split"] for e in entries if isinstance(e.get("sha256"), str) and e.get("split")}
    except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError):
        return {}


def prepare(labelled: LabelledImages, src: Path | None, out: Path, ratios: tuple[float, float, float], seed: int,
            meta: dict, warnings: list[str] | None = None) -> dict:
    """Split ``labelled`` and write the datasets under ``out``; returns the hierarchy.json document.

    ``src`` is the folder the image keys are relative to (``None``: keys are absolute paths).
    Images already in ``out`` (same seed and ratios) keep their split.
    """
    leaves, partial = partition_labels({n: ks for n, ks in labelled.groups.items() if ks})
    if not leaves:
        raise UserError("no usable images (every row or file was skipped; see the reasons above)")
    try:
        hier = Hierarchy.from_leaf_paths(leaves)
    except HierarchyError as exc:
        raise UserError(str(exc)) from None
    warnings = list(warnings if warnings is not None else single_child_warnings(hier))
    if labelled.splits is not None:
        assignment = dict(labelled.splits)
    else:
        assignment, split_warnings = assign_splits(labelled.groups, ratios, seed, labelled.hashes,
                                                   previous_splits(out, seed, ratios))
        warnings += split_warnings
    for s in labelled.skipped:
        log.warning("skipped %s: %s", f"line {s['line']}" if "line" in s else s["path"], s["reason"])
    for w in warnings:
        log.warning("warning: %s", w)
    extra = {k: {"sha256": h, **labelled.extra.get(k, {})} for k, h in labelled.hashes.items()}
    meta = {**meta, "seed": seed, "ratios": list(ratios), "skipped": labelled.skipped, "warnings": warnings,
            "display": labelled.display}
    now = {"seed": seed, "ratios": list(ratios), "images": [
        {"sha256": labelled.hashes.get(k), "path": k, "split": s} for k, s in assignment.items()]}
    meta["split_id"] = split_identity(now, previous_document(out))
    return materialize(hier, {**leaves, **partial}, assignment, src, out, meta, extra)


def summary(doc: dict) -> list[str]:
    """The lines prepare_dataset.py prints after a run."""
    hier = Hierarchy.from_dict(doc["tree"])
    n = {s: sum(1 for im in doc["images"] if im["split"] == s) for s in ("train", "val", "test")}
    n_partial = len(doc.get("partial_images", []))
    lines = [
        f"{len(doc['images'])} images, {len(hier.leaves())} classes, depth {hier.max_depth()}: "
        f"train {n['train']} / val {n['val']} / test {n['test']}; {n_partial} partial; {len(doc['skipped'])} skipped"
    ]
    for node, counts in doc.get("partial", {}).items():
        lines.append(f"  partial labels at '{node}': {counts}")
    for ds, info in doc["datasets"].items():
        counts = {c: sum(info["counts"][s][c] for s in info["counts"]) for c in info["classes"]}
        lines.append(f"  {ds}: {counts}")
    return lines
