"""One train/val/test assignment per image, shared by every node's dataset (no torch).

The split is made ONCE per image, stratified by leaf and seeded; the parent dataset, every child
dataset and the flat dataset are all cut from that one assignment, so no test image can appear in
any node's training data. Output folders are built in a staging folder inside the output folder and
swapped in; only entries this module wrote earlier are ever replaced or deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from .hierarchy import FLAT_DATASET, ROOT_ID, Hierarchy, safe_name, unique_names
from .safeio import UserError, remove_stale, replace_dir, write_json_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Files in an output folder that are not ours but may be replaced around (shipped with the repo).
KEEP_NAMES = frozenset({"README.md", ".gitkeep", ".gitignore"})
#: Leaves with fewer images than this are put wholly into train (and warned about).
MIN_SPLITTABLE = 3


def _leaf_seed(seed: int, leaf: str) -> int:
    digest = hashlib.sha256(f"{seed}:{leaf}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train/val/test counts for ``n`` images (val and test get at least one each when ``n >= 3``)."""
    if n < MIN_SPLITTABLE:
        return n, 0, 0
    n_val = max(1, round(n * ratios[1])) if ratios[1] > 0 else 0
    n_test = max(1, round(n * ratios[2])) if ratios[2] > 0 else 0
    while n - n_val - n_test < 1:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def assign_splits(
    files: dict[str, list[str]], ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 1337
) -> tuple[dict[str, str], list[str]]:
    """Assign each image to a split, stratified by leaf.

    Parameters
    ----------
    files : dict
        leaf id → list of relative image paths.
    ratios : (float, float, float)
        train/val/test shares, summing to 1.
    seed : int
        The seed; the result depends only on it and on each leaf's own file list.

    Returns
    -------
    (dict, list)
        relative path → ``"train" | "val" | "test"``, and warnings for leaves too small to split.
    """
    import random

    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6 or ratios[0] <= 0:
        raise UserError(f"--ratio must be three non-negative numbers summing to 1 with train > 0, got {list(ratios)}")
    out: dict[str, str] = {}
    warnings = []
    for leaf in sorted(files):
        paths = sorted(files[leaf])
        random.Random(_leaf_seed(seed, leaf)).shuffle(paths)
        n_train, n_val, _ = split_counts(len(paths), ratios)
        if len(paths) < MIN_SPLITTABLE:
            warnings.append(
                f"class '{leaf}' has only {len(paths)} image(s): all go to train, none to val/test "
                f"(add at least {MIN_SPLITTABLE} to evaluate it)"
            )
        for i, p in enumerate(paths):
            out[p] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out, warnings


def stored_name(rel_path: str) -> str:
    """Collision-free file name for an image inside a dataset folder: ``<hash8>_<safe base name>``."""
    digest = hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:8]
    base = os.path.basename(rel_path)
    stem, ext = os.path.splitext(base)
    return f"{digest}_{safe_name(stem)[:80]}{ext.lower()}"


def _link_or_copy(src: Path, dst: Path) -> str:
    # Resolve symlinks first: os.link() links a symlink itself on Linux (whatever follow_symlinks
    # says), and a relative symlink copied into the output would point at the wrong file or nowhere.
    real = os.path.realpath(src, strict=True)
    try:
        os.link(real, dst)
        return "link"
    except OSError:
        shutil.copyfile(real, dst)
        return "copy"


def check_paths(src: Path, out: Path) -> None:
    """Refuse an output folder inside the input tree, or the input inside the output."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise UserError(f"output folder {out} is inside the input folder {src}; choose another -o")
    if o in s.parents:
        raise UserError(f"input folder {src} is inside the output folder {out}; choose another -o")


def owned_entries(out: Path) -> list[str]:
    """Entries of ``out`` a previous run wrote (from its hierarchy.json); refuse a foreign folder."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder; choose another -o")
    marker = out / "hierarchy.json"
    entries = [e for e in os.listdir(out) if e not in KEEP_NAMES and not e.startswith(".")]
    foreign = UserError(
        f"output folder {out} is not empty and was not written by prepare_dataset.py; "
        "choose an empty or new folder with -o"
    )
    if not marker.exists():
        if entries:
            raise foreign
        return []
    import json

    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise UserError(f"{marker} is unreadable; delete the output folder {out} by hand, then rerun") from None
    # Only a document prepare_dataset.py wrote makes the folder ours (trained_models/ has a
    # hierarchy.json too, without "datasets"/"images": replacing it would break the models).
    if not (isinstance(doc, dict) and isinstance(doc.get("datasets"), dict) and isinstance(doc.get("images"), list)):
        raise foreign
    owned = set(doc["datasets"]) | {FLAT_DATASET}
    return sorted(e for e in entries if e in owned) + ["hierarchy.json"]


def _dataset_plan(hier: Hierarchy, leaf_folder: dict[str, str]) -> dict[str, dict]:
    """Dataset name → ``{node, classes, class_nodes, counts}`` (counts zero) for every classifier node
    and the flat dataset (whose class folders are ``leaf_folder``'s names)."""
    datasets: dict[str, dict] = {}
    for nid in hier.classifier_nodes():
        node = hier.nodes[nid]
        datasets[node.dataset] = {
            "node": nid,
            "classes": [hier.nodes[c].name for c in node.children],
            "class_nodes": list(node.children),
            "counts": {s: {hier.nodes[c].name: 0 for c in node.children} for s in SPLITS},
        }
    datasets[FLAT_DATASET] = {
        "node": None,
        "classes": [leaf_folder[leaf] for leaf in hier.leaves()],
        "class_nodes": hier.leaves(),
        "counts": {s: {leaf_folder[leaf]: 0 for leaf in hier.leaves()} for s in SPLITS},
    }
    return datasets


def _placements(hier: Hierarchy, leaf: str, leaf_folder: dict[str, str]) -> list[tuple[str, str]]:
    """(dataset, class folder) of every dataset an image of ``leaf`` belongs to: flat, then top down."""
    targets = [(FLAT_DATASET, leaf_folder[leaf])]
    for nid in [ROOT_ID] + hier.path(leaf)[:-1]:
        node = hier.nodes[nid]
        if len(node.children) >= 2:
            targets.append((node.dataset, hier.nodes[hier.child_towards(nid, leaf)].name))
    return targets


def _fill(staging: Path, hier: Hierarchy, files: dict[str, list[str]], assignment: dict[str, str], src: Path,
          datasets: dict[str, dict], leaf_folder: dict[str, str]) -> tuple[list[dict], dict[str, int]]:
    """Link (or copy) every assigned image into its datasets under ``staging``; counts go into ``datasets``.

    Returns
    -------
    (list of dict, dict)
        ``images`` entries of hierarchy.json (``path``, ``leaf``, ``split``, ``file``), and how many
        files were hard-linked / copied.
    """
    leaf_of = {p: leaf for leaf, ps in files.items() for p in ps}
    modes = {"link": 0, "copy": 0}
    images, used_names = [], set()
    for rel in sorted(assignment):
        split, leaf = assignment[rel], leaf_of[rel]
        name = stored_name(rel)
        if name in used_names:  # an 8-hex-digit prefix clash: never let one image replace another
            name = f"{hashlib.sha1(rel.encode('utf-8')).hexdigest()}_{name.split('_', 1)[1]}"
        used_names.add(name)
        images.append({"path": rel, "leaf": leaf, "split": split, "file": name})
        for ds, cls in _placements(hier, leaf, leaf_folder):
            d = staging / ds / split / cls
            d.mkdir(parents=True, exist_ok=True)
            modes[_link_or_copy(src / rel, d / name)] += 1
            datasets[ds]["counts"][split][cls] += 1
    for ds in datasets:  # empty class folders keep the class list stable for loaders
        for s in SPLITS:
            for cls in datasets[ds]["classes"]:
                (staging / ds / s / cls).mkdir(parents=True, exist_ok=True)
    return images, modes


def _refuse_clashes(out: Path, new: list[str], old: list[str]) -> None:
    """Refuse to replace an entry of ``out`` named like a new dataset that no earlier run wrote."""
    clash = sorted(e for e in new if os.path.lexists(out / e) and e not in old)
    if clash:
        raise UserError(f"output folder {out} holds {', '.join(clash)} not written by prepare_dataset.py; "
                        "move it away or choose another -o")


def _publish(staging: Path, out: Path, old: list[str]) -> None:
    """Swap every dataset folder of ``staging`` into ``out``, delete old ones no longer made, then the
    new hierarchy.json (the marker: last, so it only ever lists complete folders)."""
    new = sorted(e for e in os.listdir(staging) if e != "hierarchy.json")
    for e in new:
        replace_dir(staging / e, out / e)
    for e in old:
        if e not in new and e != "hierarchy.json":
            remove_stale(out, e)
            shutil.rmtree(out / e, ignore_errors=True)
    os.replace(staging / "hierarchy.json", out / "hierarchy.json")


def _fresh_staging(out: Path) -> Path:
    """An empty ``out/.staging-<pid>``, after deleting what crashed earlier runs left in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for p in [*out.glob(".staging-*"), *out.glob(".trash-*")]:  # .trash-*: left by older versions
        shutil.rmtree(p, ignore_errors=True)
    staging = out / f".staging-{os.getpid()}"
    staging.mkdir()
    return staging


def materialize(
    hier: Hierarchy,
    files: dict[str, list[str]],
    assignment: dict[str, str],
    src: Path,
    out: Path,
    meta: dict,
) -> dict:
    """Write every node's dataset, the flat dataset and ``hierarchy.json`` under ``out``.

    Layout: ``out/<node dataset>/<split>/<child name>/<file>`` for every internal node with two or
    more children (the root's dataset is ``parent``), ``out/flat/<split>/<leaf dataset name>/<file>``,
    and ``out/hierarchy.json``. Files are hard links where possible, copies otherwise. Everything
    is built in ``out/.staging-<pid>``; each dataset folder is then swapped in by
    :func:`hiernet.safeio.replace_dir` (an old folder stays in place until its new one is complete),
    and ``hierarchy.json`` last.

    Returns
    -------
    dict
        The hierarchy.json document.
    """
    check_paths(src, out)
    old = owned_entries(out)
    # distinct even when two leaf ids map to one safe name ("a b" and "a_b", "é" and "è")
    leaf_folder = unique_names(hier.leaves())
    datasets = _dataset_plan(hier, leaf_folder)
    _refuse_clashes(out, sorted(datasets), old)
    staging = _fresh_staging(out)
    try:
        images, modes = _fill(staging, hier, files, assignment, src, datasets, leaf_folder)
        doc = {**meta, "tree": hier.to_dict(), "fingerprint": hier.fingerprint(),
               "datasets": {k: v for k, v in datasets.items() if k != FLAT_DATASET},
               "flat": datasets[FLAT_DATASET], "images": images, "file_modes": modes}
        write_json_atomic(staging / "hierarchy.json", doc)
        _publish(staging, out, old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return doc
