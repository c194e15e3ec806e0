"""Incremental training: which nodes must be retrained (torch-free).

A node's *fingerprint* (:func:`node_fingerprint`) hashes everything its training depends on: its
classes, the content hash, split and label of every image below it, the split's identity and the
recipe. ``train.py`` records it with the node (``metrics.json`` and ``model.pth``) and, at its next run,
keeps a node whose fingerprint has not changed (:func:`node_is_current`) unless ``--force``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import TrainConfig
from .data import TRANSFORM_VERSION
from .hierarchy import FLAT_DATASET, Hierarchy, require_hierarchy_json
from .safeio import UserError, sha256_file
from .splits import split_identity


#: Bumped when the way a node is trained changes in a way the recipe does not show (retrains every node).
FINGERPRINT_VERSION = 2  # 2: heads floor the standardiser std (Head.STD_FLOOR)


def node_fingerprint(doc: dict, ds: str, cfg: TrainConfig) -> str:
    """What node dataset ``ds`` (or ``"flat"``) of a hierarchy.json document would be trained on, as a hash.

    The class list (with the leaves below the node when ``cfg`` trains it on fine labels), every image
    strictly below the node (partial labels included) as sorted ``(sha256, split, label)`` — the label
    is the child towards the image's node, or its leaf/node id with fine labels — the split identity
    (:func:`hiernet.splits.split_identity`) and the recipe (``cfg`` without its preset name, and without
    its precision when fp32 or auto, so models trained before ``--precision`` existed stay current; the
    backbone weights file's hash, the feature transform version) and, for a fine-label node with partial
    labels below it, a mark that they are set targets (such nodes trained on their children before, so
    they are retrained; the others keep their fingerprint). Two equal fingerprints mean that
    retraining would repeat the same run.

    Raises
    ------
    UserError
        ``ds`` is not a node dataset of ``doc``.
    """
    hier = Hierarchy.from_dict(doc["tree"])
    entries = list(doc.get("images", [])) + list(doc.get("partial_images", []))
    if ds == FLAT_DATASET:
        info, nid, fine = doc["flat"], None, None
        items = [(im.get("sha256") or im["path"], im["split"], im["leaf"]) for im in doc.get("images", [])]
    elif ds in doc.get("datasets", {}):
        info = doc["datasets"][ds]
        nid = info["node"]
        fine = hier.fine_label_matrix(nid, list(info["class_nodes"])) if cfg.head.fine_labels else None
        items, partial_nodes = [], {im["node"] for im in doc.get("partial_images", [])}
        for im in entries:
            label = im.get("leaf") or im.get("node")
            child = hier.child_towards(nid, label) if label in hier.nodes else None
            if child is not None:
                items.append((im.get("sha256") or im["path"], im["split"], label if fine else child))
    else:
        raise UserError(f"no dataset {ds!r} in the prepared hierarchy; see: python3 src/train.py --list-nodes")
    recipe = {k: v for k, v in cfg.to_dict().items() if k != "preset"}
    if recipe.get("precision") in ("auto", "fp32"):  # fp32 (the default) hashes as before precision existed
        del recipe["precision"]
    if recipe.get("flat_classifier") is None:  # as before the option existed
        recipe.pop("flat_classifier", None)
    else:
        recipe["flat_classifier_sha256"] = _file_sha(cfg.flat_classifier)
    src = {"version": FINGERPRINT_VERSION, "transform": TRANSFORM_VERSION, "recipe": recipe,
           "weights_sha256": _file_sha(cfg.weights),
           "node": nid, "classes": list(info["classes"]), "class_nodes": list(info["class_nodes"]),
           "fine": fine[0] if fine else None, "split": split_identity(doc), "images": sorted(items)}
    if fine and any(label in partial_nodes for _, _, label in items):
        src["set_targets"] = True  # partial labels train its leaf outputs (before: its children instead)
    return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _file_sha(path: str | None) -> str | None:
    """The SHA-256 of the file ``path`` names (``None``: no path, or no such file)."""
    return sha256_file(Path(path)) if path and Path(path).is_file() else None


def trained_fingerprint(models_dir: Path, ds: str) -> str | None:
    """The fingerprint node ``ds`` of ``models_dir`` was trained with (``None``: missing, unreadable or older).

    Read from the node's ``metrics.json`` (written in the same folder swap as ``model.pth``, whose
    ``config["fingerprint"]`` holds the same value), so deciding needs no torch.
    """
    folder = Path(models_dir) / ds
    if not (folder / "model.pth").is_file():
        return None
    try:
        value = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def node_is_current(cfg: TrainConfig, ds: str, data_dir: Path, models_dir: Path) -> bool:
    """Whether ``models_dir/<ds>`` was trained on exactly what ``data_dir`` and ``cfg`` would train it on now.

    A missing node, one trained by an older version (no fingerprint) or damaged: ``False`` (train it).
    """
    stored = trained_fingerprint(models_dir, ds)
    if stored is None:
        return False
    _, doc = require_hierarchy_json(Path(data_dir) / "hierarchy.json", f"no prepared datasets in {data_dir}",
                                    f"python3 prepare_dataset.py -p YOUR_DATASET -o {data_dir}")
    # "auto" is decided by the device (int8 on a CPU, fp32 on a GPU), which is not known before torch is
    # imported: a node trained with either is what "auto" would have trained
    variants = ("fp32", "int8") if cfg.precision == "auto" else (cfg.precision,)
    return any(stored == node_fingerprint(doc, ds, cfg.override({"precision": p})) for p in variants)
