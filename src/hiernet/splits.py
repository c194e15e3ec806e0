"""One train/val/test assignment per image, shared by every node's dataset (no torch).

The split is made ONCE per image, from its content hash and the seed (stable as images are added;
see :func:`assign_splits`); the parent dataset, every child dataset and the flat dataset are all cut
from that one assignment, so no test image can appear in
any node's training data. Output folders are built in a staging folder inside the output folder and
swapped in; only entries this module wrote earlier are ever replaced or deleted.
"""

from __future__ import annotations

import hashlib
import json
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


def unit_hash(seed: int, content_hash: str) -> float:
    """An image's place in [0, 1): a uniform number fixed by the seed and the image's content hash."""
    digest = hashlib.sha256(f"{seed}:{content_hash}".encode("utf-8")).digest()
    return int.from_bytes(digest, "big") / 2.0**256


def assign_splits(
    files: dict[str, list[str]],
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 1337,
    hashes: dict[str, str] | None = None,
    previous: dict[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Assign each image to a split, stratified by class, stable as images are added.

    Each image gets ``u = unit_hash(seed, content hash)`` and goes to train if ``u < r_train``, to val
    if ``u < r_train + r_val``, else to test, so its split depends on nothing but its own bytes and
    the seed. Then, per class: a class with fewer than ``MIN_SPLITTABLE`` images is wholly train; a
    bigger class that lacks a train, val or test image (with a share > 0) takes one from another split
    holding two or more, the image whose ``u`` lies nearest to the missing split's interval. Images
    in ``previous`` keep their split and are never taken, so re-preparing a grown set moves no image.

    Parameters
    ----------
    files : dict
        class (a leaf, or an inner node for partial labels) → list of image keys.
    ratios : (float, float, float)
        train/val/test shares, summing to 1.
    seed : int
    hashes : dict, optional
        image key → SHA-256 of its bytes (hex); without it the key itself is hashed.
    previous : dict, optional
        content hash → split from an earlier run with the same seed and ratios.

    Returns
    -------
    (dict, list)
        image key → ``"train" | "val" | "test"``, and warnings for classes too small to split.
    """
    check_ratios(ratios)
    hashes = hashes or {}
    previous = previous or {}
    out: dict[str, str] = {}
    warnings = []
    for group in sorted(files):
        keys = sorted(files[group])
        content = {k: hashes.get(k) or hashlib.sha256(k.encode("utf-8", "surrogatepass")).hexdigest() for k in keys}
        u = {k: unit_hash(seed, content[k]) for k in keys}
        kept = {k: previous[content[k]] for k in keys if content[k] in previous}
        if len(keys) < MIN_SPLITTABLE:
            out.update({k: kept.get(k, "train") for k in keys})
            warnings.append(
                f"class '{group}' has only {len(keys)} image(s): all go to train, none to val/test "
                f"(add at least {MIN_SPLITTABLE} to evaluate it)"
            )
            continue
        split = {k: kept.get(k) or _natural_split(u[k], ratios) for k in keys}
        _guarantee_each_split(split, u, [k for k in keys if k not in kept], ratios)
        missing = [s for s, r in zip(SPLITS, ratios) if r > 0 and s not in split.values()]
        if missing:
            warnings.append(f"class '{group}' has no {'/'.join(missing)} image; it is kept so to leave earlier "
                            "images where they were (prepare into a new -o to rebalance)")
        out.update(split)
    return out, warnings


def split_identity(doc: dict, previous: dict | None = None) -> str:
    """The identity of a hierarchy.json document's train/val/test assignment (16 hex digits).

    A hash of the seed, the ratios and every image's (content hash, split), made when an assignment
    first appears. A re-prepare that moves no earlier image (the stable split: images were only added
    or removed) keeps the identity of ``previous`` (the earlier document of the same folder), so models
    trained before and after it can share a bundle; any move, another seed or other ratios give a new one.
    A document without a recorded ``split_id`` (an older prepare) gets the hash of its own assignment.

    Parameters
    ----------
    doc : dict
        ``seed``, ``ratios``, ``images`` and ``partial_images`` entries with ``sha256`` (or ``path``) and ``split``.
    previous : dict, optional
        The document the folder held before (its ``split_id`` is kept when no image moved).
    """
    def assignment(d: dict) -> dict:
        entries = list(d.get("images", [])) + list(d.get("partial_images", []))
        return {str(e.get("sha256") or e.get("path")): e.get("split") for e in entries}

    if not isinstance(previous, dict) or not previous.get("split_id"):
        return doc.get("split_id") or _assignment_hash(doc, assignment(doc))
    same = previous.get("seed") == doc.get("seed") and list(previous.get("ratios", [])) == list(doc.get("ratios", []))
    now = assignment(doc)
    if same and all(now.get(h, s) == s for h, s in assignment(previous).items()):
        return str(previous["split_id"])
    return _assignment_hash(doc, now)


def _assignment_hash(doc: dict, assignment: dict) -> str:
    text = json.dumps([doc.get("seed"), doc.get("ratios"), sorted(assignment.items())])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def check_ratios(ratios: tuple[float, ...]) -> None:
    """Refuse ratios that are not three non-negative shares summing to 1 with train > 0."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6 or ratios[0] <= 0:
        raise UserError(f"--ratio must be three non-negative numbers summing to 1 with train > 0, got {list(ratios)}")


def _natural_split(u: float, ratios: tuple[float, float, float]) -> str:
    if u < ratios[0]:
        return "train"
    return "val" if u < ratios[0] + ratios[1] else "test"


def _guarantee_each_split(split: dict[str, str], u: dict[str, float], movable: list[str],
                          ratios: tuple[float, float, float]) -> None:
    """Give a class at least one image per split with a share > 0, moving only ``movable`` images."""
    lo = {"train": 0.0, "val": ratios[0], "test": ratios[0] + ratios[1]}
    hi = {"train": ratios[0], "val": ratios[0] + ratios[1], "test": 1.0}
    for target, r in zip(("train", "test", "val"), (ratios[0], ratios[2], ratios[1])):
        if r <= 0 or target in split.values():
            continue
        count = {s: sum(1 for v in split.values() if v == s) for s in SPLITS}
        donors = [k for k in movable if count[split[k]] > 1]
        if donors:
            best = min(donors, key=lambda k: (max(lo[target] - u[k], u[k] - hi[target], 0.0), k))
            split[best] = target


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
    """(dataset, class folder) of every dataset an image labelled ``leaf`` belongs to: flat (leaves
    only), then the datasets of the nodes above it, top down (a partial label stops above its node)."""
    targets = [(FLAT_DATASET, leaf_folder[leaf])] if hier.nodes[leaf].is_leaf else []
    for nid in [ROOT_ID] + hier.path(leaf)[:-1]:
        node = hier.nodes[nid]
        if len(node.children) >= 2:
            targets.append((node.dataset, hier.nodes[hier.child_towards(nid, leaf)].name))
    return targets


def _fill(staging: Path, hier: Hierarchy, files: dict[str, list[str]], assignment: dict[str, str],
          src: Path | None, datasets: dict[str, dict], leaf_folder: dict[str, str],
          extra: dict[str, dict]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Link (or copy) every assigned image into its datasets under ``staging``; counts go into ``datasets``.

    Returns
    -------
    (list of dict, list of dict, dict)
        ``images`` entries of hierarchy.json (``path``, ``leaf``, ``split``, ``file`` + ``extra``), the
        ``partial_images`` entries (``node`` instead of ``leaf``), and how many files were hard-linked /
        copied.
    """
    leaf_of = {p: leaf for leaf, ps in files.items() for p in ps}
    modes = {"link": 0, "copy": 0}
    images, partial_images, used_names = [], [], set()
    for rel in sorted(assignment):
        split, leaf = assignment[rel], leaf_of[rel]
        name = stored_name(rel)
        if name in used_names:  # an 8-hex-digit prefix clash: never let one image replace another
            name = f"{hashlib.sha1(rel.encode('utf-8')).hexdigest()}_{name.split('_', 1)[1]}"
        used_names.add(name)
        is_leaf = hier.nodes[leaf].is_leaf
        entry = {"path": rel, "leaf" if is_leaf else "node": leaf, "split": split, "file": name}
        (images if is_leaf else partial_images).append({**entry, **extra.get(rel, {})})
        for ds, cls in _placements(hier, leaf, leaf_folder):
            d = staging / ds / split / cls
            d.mkdir(parents=True, exist_ok=True)
            modes[_link_or_copy(src / rel if src is not None else Path(rel), d / name)] += 1
            datasets[ds]["counts"][split][cls] += 1
    for ds in datasets:  # empty class folders keep the class list stable for loaders
        for s in SPLITS:
            for cls in datasets[ds]["classes"]:
                (staging / ds / s / cls).mkdir(parents=True, exist_ok=True)
    return images, partial_images, modes


def _partial_counts(partial_images: list[dict]) -> dict[str, dict[str, int]]:
    """Inner node → images per split among the partial labels (hierarchy.json ``partial``)."""
    counts: dict[str, dict[str, int]] = {}
    for e in partial_images:
        counts.setdefault(e["node"], dict.fromkeys(SPLITS, 0))[e["split"]] += 1
    return {n: counts[n] for n in sorted(counts)}


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
    src: Path | None,
    out: Path,
    meta: dict,
    extra: dict[str, dict] | None = None,
) -> dict:
    """Write every node's dataset, the flat dataset and ``hierarchy.json`` under ``out``.

    Layout: ``out/<node dataset>/<split>/<child name>/<file>`` for every internal node with two or
    more children (the root's dataset is ``parent``), ``out/flat/<split>/<leaf dataset name>/<file>``,
    and ``out/hierarchy.json``. Files are hard links where possible, copies otherwise. Everything
    is built in ``out/.staging-<pid>``; each dataset folder is then swapped in by
    :func:`hiernet.safeio.replace_dir` (an old folder stays in place until its new one is complete),
    and ``hierarchy.json`` last.

    ``files`` may also hold inner nodes (partial labels): such an image goes to the datasets of the
    nodes above its node only (not to its node's, nor to flat) and is listed in ``partial_images``.
    ``src`` is the input folder the keys are relative to, or ``None`` when they are absolute paths;
    ``extra`` (key → dict) adds fields to each image's entry.

    Returns
    -------
    dict
        The hierarchy.json document.
    """
    if src is not None:
        check_paths(src, out)
    old = owned_entries(out)
    # distinct even when two leaf ids map to one safe name ("a b" and "a_b", "é" and "è")
    leaf_folder = unique_names(hier.leaves())
    datasets = _dataset_plan(hier, leaf_folder)
    _refuse_clashes(out, sorted(datasets), old)
    staging = _fresh_staging(out)
    try:
        images, partial_images, modes = _fill(staging, hier, files, assignment, src, datasets, leaf_folder,
                                              extra or {})
        doc = {**meta, "tree": hier.to_dict(), "fingerprint": hier.fingerprint(),
               "datasets": {k: v for k, v in datasets.items() if k != FLAT_DATASET},
               "flat": datasets[FLAT_DATASET], "images": images, "partial_images": partial_images,
               "partial": _partial_counts(partial_images), "file_modes": modes}
        write_json_atomic(staging / "hierarchy.json", doc)
        _publish(staging, out, old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return doc
