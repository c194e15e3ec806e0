"""Test sets for evaluation: the recorded test split of prepared datasets, or any folder tree.

:func:`load_prepared_test_set` reads the test split prepare_dataset.py recorded in
``hierarchy.json``; :func:`scan_test_tree` takes every decodable image of a
``ROOT/<class>/.../<leaf>/images`` tree; :func:`check_known_leaves` refuses test classes the models
were not trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .hierarchy import FLAT_DATASET, ROOT_ID, Hierarchy, HierarchyError, require_hierarchy_json, scan_tree
from .safeio import UserError

log = logging.getLogger(__name__)


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
    try:
        hier, doc = require_hierarchy_json(path, f"no prepared datasets in {data_dir}",
                                           f"python3 prepare_dataset.py -p YOUR_DATASET -o {data_dir}")
    except UserError as exc:
        raise UserError(str(exc), arg="data_dir") from None
    try:
        folder = dict(zip(doc["flat"]["class_nodes"], doc["flat"]["classes"], strict=True))
        test = [im for im in doc["images"] if im["split"] == "test"]
        paths = [str(data_dir / FLAT_DATASET / "test" / folder[im["leaf"]] / im["file"]) for im in test]
        leaves = [str(im["leaf"]) for im in test]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} is malformed ({type(exc).__name__}: {exc}); rerun prepare_dataset.py",
                        arg="data_dir") from None
    if not test:
        raise UserError(f"{path} lists no image in the test split; rerun prepare_dataset.py with a test share > 0 "
                        "(its --ratio)", arg="data_dir")
    return TestSet(paths, leaves, f"test split of {data_dir}"), hier, doc


def partial_test_set(data_dir: str | Path, doc: dict) -> TestSet:
    """The test-split images of prepared ``doc`` labelled only down to an inner node (partial labels).

    ``TestSet.leaves`` holds each image's labelled (inner) node. An image is read from the dataset of
    the deepest classifier node above its node (``data_dir/<dataset>/test/<child towards it>/<file>``),
    where prepare_dataset.py put it.
    """
    data_dir = Path(data_dir)
    hier = Hierarchy.from_dict(doc["tree"])
    paths, nodes = [], []
    for im in doc.get("partial_images", []):
        node = im.get("node")
        if im.get("split") != "test" or node not in hier.nodes:
            continue
        above = [a for a in [ROOT_ID] + hier.path(node)[:-1] if len(hier.nodes[a].children) >= 2]
        if not above:
            continue
        child = hier.nodes[hier.child_towards(above[-1], node)].name
        paths.append(str(data_dir / hier.nodes[above[-1]].dataset / "test" / child / im["file"]))
        nodes.append(node)
    return TestSet(paths, nodes, f"partial labels in the test split of {data_dir}")


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
        raise UserError(str(exc), arg="data_tree") from None
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


def check_known_leaves(hier: Hierarchy, leaves: Sequence[str], where: str, arg: str | None = None) -> None:
    """Refuse test classes that are not leaves of the trained hierarchy.

    Parameters
    ----------
    leaves : sequence of str, shape (N,)
        The test images' true leaves.
    where : str
        The test set, as the message names it ("the test split of DIR").
    arg : str, optional
        :attr:`UserError.arg` of the error (the parameter that chose the test set).

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
                        f"the trained classes are: {valid}", arg=arg)
