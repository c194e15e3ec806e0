"""The class hierarchy as explicit, validated data (no torch).

A :class:`Hierarchy` is a rooted tree. Node ids are paths relative to the dataset root
(``"tops"``, ``"tops/t-shirt"``, ``"apparel/upper/t-shirt"``); the root's id is ``""``. Every internal
node with two or more children gets one local classifier (LCPN); its dataset/model folder name is
recorded in ``Node.dataset`` (``"parent"`` for the root, a file-system-safe form of the id otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .images import is_image_name

log = logging.getLogger(__name__)

ROOT_ID = ""
ROOT_DATASET = "parent"
FLAT_DATASET = "flat"
#: Names a node's dataset/model folder must not take: they sit beside those folders in
#: split_datasets/ and trained_models/ (a class folder called "hierarchy.json" must not clash).
RESERVED_DATASETS = frozenset({ROOT_DATASET, FLAT_DATASET, "bin", "onnx", "hierarchy.json", "README.md"})
#: Longest folder name made from a node id (leaves room for ``.<name>.tmp-<pid>`` under NAME_MAX).
MAX_FOLDER_NAME = 100
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_FOLDER_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")


class HierarchyError(ValueError):
    """The tree is not a valid hierarchy; the message says what and where."""


@dataclass
class Node:
    """One node of the tree.

    Attributes
    ----------
    id : str
        Path-unique id (``"a/b"``); ``""`` for the root.
    name : str
        The folder name (the class label shown to users).
    parent : str or None
        Parent id; ``None`` for the root.
    children : list of str
        Child ids in sorted order (the class index order of this node's classifier).
    dataset : str or None
        Dataset/model folder name for internal nodes, ``None`` for leaves.
    """

    id: str
    name: str
    parent: str | None
    children: list[str] = field(default_factory=list)
    dataset: str | None = None

    @property
    def is_leaf(self) -> bool:
        return not self.children


def safe_name(node_id: str) -> str:
    """A folder name for ``node_id``: ``/`` becomes ``__``, other unsafe characters ``_``."""
    parts = [_SAFE_RE.sub("_", p).strip("._") or "_" for p in node_id.split("/")]
    return "__".join(parts)


def is_safe_folder_name(name: str) -> bool:
    """True for a plain, visible folder name: ``[A-Za-z0-9._-]`` only, not starting with ``.``."""
    return isinstance(name, str) and _SAFE_FOLDER_RE.fullmatch(name) is not None


def short_safe_name(node_id: str, limit: int = MAX_FOLDER_NAME) -> str:
    """:func:`safe_name`, cut to ``limit`` characters with a hash of ``node_id`` when longer.

    Deep trees of long folder names would otherwise give names the file system refuses.
    The result satisfies :func:`is_safe_folder_name`.
    """
    name = safe_name(node_id)
    if len(name) <= limit:
        return name
    import hashlib

    digest = hashlib.sha1(node_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    head = name[: limit - 9].rstrip("._-")
    return f"{head}-{digest}" if head else digest


def unique_names(keys: Iterable[str], used: Iterable[str] = ()) -> dict[str, str]:
    """key → distinct safe short folder name, in sorted key order (``-2``, ``-3`` … on clashes)."""
    taken = set(used)
    out = {}
    for key in sorted(keys):
        base = short_safe_name(key)
        name, k = base, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name)
        out[key] = name
    return out


class Hierarchy:
    """A validated tree of :class:`Node` keyed by id."""

    def __init__(self, nodes: dict[str, Node]):
        self.nodes = nodes
        self.validate()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_leaf_paths(cls, leaf_ids: Iterable[str]) -> "Hierarchy":
        """Build the tree implied by leaf ids such as ``["tops/shirt", "bags/tote"]``."""
        nodes: dict[str, Node] = {ROOT_ID: Node(ROOT_ID, "", None)}
        for leaf in sorted(set(leaf_ids)):
            if not leaf or leaf.startswith("/") or leaf.endswith("/") or "//" in leaf:
                raise HierarchyError(f"invalid leaf id {leaf!r}")
            parts = leaf.split("/")
            for depth in range(1, len(parts) + 1):
                nid = "/".join(parts[:depth])
                if nid not in nodes:
                    pid = "/".join(parts[: depth - 1])
                    nodes[nid] = Node(nid, parts[depth - 1], pid)
                    nodes[pid].children.append(nid)
        for n in nodes.values():
            n.children.sort()
        leaves = set(leaf_ids)
        for nid, n in nodes.items():
            if nid in leaves and n.children:
                raise HierarchyError(f"{nid!r} is both a class (leaf) and a parent of other classes")
        cls._assign_datasets(nodes)
        return cls(nodes)

    @staticmethod
    def _assign_datasets(nodes: dict[str, Node]) -> None:
        names = unique_names([nid for nid, n in nodes.items() if nid != ROOT_ID and not n.is_leaf], RESERVED_DATASETS)
        for nid, n in nodes.items():
            if n.is_leaf:
                n.dataset = None
            elif nid == ROOT_ID:
                n.dataset = ROOT_DATASET
            else:
                n.dataset = names[nid]

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check the tree: one root, consistent parent/child links, path-unique ids, no cycles.

        Raises
        ------
        HierarchyError
            Naming the first problem found.
        """
        nodes = self.nodes
        if ROOT_ID not in nodes:
            raise HierarchyError("the hierarchy has no root node")
        if nodes[ROOT_ID].parent is not None:
            raise HierarchyError("the root node must not have a parent")
        if not nodes[ROOT_ID].children:
            raise HierarchyError("the hierarchy has no classes")
        datasets: set[str] = set()
        for nid, n in nodes.items():
            if n.id != nid:
                raise HierarchyError(f"node key {nid!r} does not match its id {n.id!r}")
            if nid != ROOT_ID:
                if n.parent not in nodes:
                    raise HierarchyError(f"node {nid!r} has unknown parent {n.parent!r}")
                expected = f"{n.parent}/{n.name}" if n.parent else n.name
                if nid != expected:
                    raise HierarchyError(f"node id {nid!r} is not its parent's path plus its name")
                if nid not in nodes[n.parent].children:
                    raise HierarchyError(f"node {nid!r} is missing from its parent's children")
            if len(set(n.children)) != len(n.children):
                raise HierarchyError(f"node {nid!r} lists a child twice")
            for c in n.children:
                if c not in nodes or nodes[c].parent != nid:
                    raise HierarchyError(f"child {c!r} of {nid!r} does not point back to it")
            if n.children and not n.dataset:
                raise HierarchyError(f"internal node {nid!r} has no dataset name")
            if n.dataset:
                reserved = (n.dataset != ROOT_DATASET) if nid == ROOT_ID else (n.dataset in RESERVED_DATASETS)
                if n.dataset in datasets or not is_safe_folder_name(n.dataset) or reserved:
                    raise HierarchyError(f"dataset name {n.dataset!r} is repeated, reserved or unsafe")
                datasets.add(n.dataset)
        seen = set(self.iter_ids())
        if seen != set(nodes):
            raise HierarchyError("some nodes are not reachable from the root")

    # ---------------------------------------------------------------- queries
    @property
    def root(self) -> Node:
        return self.nodes[ROOT_ID]

    def iter_ids(self) -> list[str]:
        """All ids in breadth-first order, root first."""
        out, queue = [], deque([ROOT_ID])
        while queue:
            nid = queue.popleft()
            if nid in out:
                raise HierarchyError("the hierarchy has a cycle")
            out.append(nid)
            queue.extend(self.nodes[nid].children)
        return out

    def leaves(self) -> list[str]:
        """Leaf ids, sorted."""
        return sorted(nid for nid, n in self.nodes.items() if n.is_leaf and nid != ROOT_ID)

    def internal_nodes(self) -> list[str]:
        """Internal node ids in breadth-first order, root first."""
        return [nid for nid in self.iter_ids() if self.nodes[nid].children]

    def classifier_nodes(self) -> list[str]:
        """Internal nodes with two or more children: the ones that need a model, root first."""
        return [nid for nid in self.internal_nodes() if len(self.nodes[nid].children) >= 2]

    def path(self, nid: str) -> list[str]:
        """Ids from the top level down to ``nid`` (root excluded)."""
        out = []
        while nid != ROOT_ID:
            out.append(nid)
            nid = self.nodes[nid].parent
        return out[::-1]

    def ancestors(self, nid: str) -> set[str]:
        """``nid`` and its ancestors, root excluded (the set used by hierarchical P/R/F1)."""
        return set(self.path(nid))

    def depth(self, nid: str) -> int:
        """Number of edges from the root (top-level classes have depth 1)."""
        return len(self.path(nid))

    def max_depth(self) -> int:
        return max(self.depth(leaf) for leaf in self.leaves())

    def tree_distance(self, a: str, b: str) -> int:
        """Edges between ``a`` and ``b`` through their lowest common ancestor."""
        pa, pb = [ROOT_ID] + self.path(a), [ROOT_ID] + self.path(b)
        common = 0
        while common < min(len(pa), len(pb)) and pa[common] == pb[common]:
            common += 1
        return (len(pa) - common) + (len(pb) - common)

    def subtree_leaves(self, nid: str) -> list[str]:
        """Leaves at or below ``nid``, sorted."""
        if self.nodes[nid].is_leaf and nid != ROOT_ID:
            return [nid]
        return sorted(leaf for c in self.nodes[nid].children for leaf in self.subtree_leaves(c))

    def child_towards(self, nid: str, leaf: str) -> str | None:
        """The child of ``nid`` on the path to ``leaf``, or ``None`` if ``leaf`` is not below ``nid``."""
        p = self.path(leaf)
        d = self.depth(nid) if nid != ROOT_ID else 0
        if d < len(p) and (nid == ROOT_ID or p[d - 1] == nid):
            return p[d]
        return None

    def fine_label_matrix(self, nid: str, children: list[str] | None = None) -> tuple[list[str], list[list[float]]] | None:
        """Which child of ``nid`` each leaf below it falls under (for heads trained on leaf labels).

        Parameters
        ----------
        nid : str
            An internal node.
        children : list of str, optional
            The column order (default: ``nid``'s children as stored).

        Returns
        -------
        None, or (list of str, list of list of float)
            ``None`` when every child is a leaf (nothing finer to learn). Else the ``K`` leaves below
            ``nid`` (sorted) and a ``(K, C)`` 0/1 matrix whose row ``j`` has a 1 in the column of the
            child on the way to leaf ``j``.
        """
        children = list(self.nodes[nid].children if children is None else children)
        if all(self.nodes[c].is_leaf for c in children):
            return None
        leaves = self.subtree_leaves(nid)
        matrix = [[0.0] * len(children) for _ in leaves]
        for j, leaf in enumerate(leaves):
            matrix[j][children.index(self.child_towards(nid, leaf))] = 1.0
        return leaves, matrix

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        """A JSON-ready dict: ``{"nodes": [{id, name, parent, children, dataset}, ...]}``, BFS order."""
        return {
            "nodes": [
                {"id": n.id, "name": n.name, "parent": n.parent, "children": list(n.children), "dataset": n.dataset}
                for n in (self.nodes[i] for i in self.iter_ids())
            ]
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Hierarchy":
        """Inverse of :meth:`to_dict`, with full validation."""
        try:
            if not isinstance(data["nodes"], list):
                raise TypeError("'nodes' is not a list")
            nodes = {}
            for d in data["nodes"]:
                if not isinstance(d, dict):
                    raise TypeError("a node entry is not an object")
                parent, dataset, children = d["parent"], d.get("dataset"), d["children"]
                if not (parent is None or isinstance(parent, str)) or not (dataset is None or isinstance(dataset, str)):
                    raise TypeError(f"node {d['id']!r}: parent and dataset must be strings or null")
                if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
                    raise TypeError(f"node {d['id']!r}: children must be a list of strings")
                if not isinstance(d["id"], str) or not isinstance(d["name"], str):
                    raise TypeError("node id and name must be strings")
                n = Node(d["id"], d["name"], parent, list(children), dataset)
                if n.id in nodes:
                    raise HierarchyError(f"node id {n.id!r} appears twice")
                nodes[n.id] = n
        except (KeyError, TypeError) as exc:
            raise HierarchyError(f"malformed hierarchy data ({type(exc).__name__}: {exc})") from None
        return cls(nodes)

    def fingerprint(self) -> str:
        """A short stable hash of the tree, used to check models belong to the same hierarchy."""
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# -------------------------------------------------------------------- scanning a folder tree
@dataclass
class ScanResult:
    """What :func:`scan_tree` found.

    Attributes
    ----------
    hierarchy : Hierarchy
    files : dict
        leaf id → sorted list of image paths relative to the root (posix).
    skipped : list of (str, str)
        (relative path, reason) for every image-like file left out.
    warnings : list of str
    partial : dict
        inner node id → sorted image paths lying directly in that folder (a partial label).
    """

    hierarchy: Hierarchy
    files: dict[str, list[str]]
    skipped: list[tuple[str, str]]
    warnings: list[str]
    partial: dict[str, list[str]] = field(default_factory=dict)


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _shown(p: Path, root: Path) -> str:
    """``p`` relative to ``root``, printable and JSON-safe even for names that are not UTF-8."""
    return _rel(p, root).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _list_folder(folder: Path, root: Path, skipped: list, warnings: list) -> tuple[list[Path], list[Path]] | None:
    """Sub-folders and image files of ``folder`` (sorted; hidden entries ignored), or ``None`` if unlistable.

    Symlinked folders, unstat-able entries and names that are not UTF-8 go to ``skipped``.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        warnings.append(f"cannot list folder {_shown(folder, root) or '.'}: {exc.strerror or exc}")
        return None
    subdirs, images = [], []
    for e in entries:
        if e.name.startswith("."):
            continue
        p = Path(e.path)
        try:
            if e.is_symlink() and e.is_dir():
                skipped.append((_shown(p, root), "symlinked folder, not followed"))
                continue
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError as exc:
            skipped.append((_shown(p, root), f"cannot stat: {exc.strerror or exc}"))
            continue
        if (is_dir or is_image_name(e.name)) and not _utf8_ok(e.name):
            skipped.append((_shown(p, root), "name is not valid UTF-8; rename it"))
            continue
        if is_dir:
            subdirs.append(p)
        elif is_image_name(e.name):
            images.append(p)
    return subdirs, images


def _usable_images(images: list[Path], root: Path, check: Callable[[Path], str | None] | None,
                   skipped: list) -> list[str]:
    """Relative paths of the regular, ``check``-passing files among ``images``; the rest go to ``skipped``."""
    good = []
    for p in images:
        reason = None
        try:
            if p.is_symlink() and not p.exists():
                reason = "broken symlink"
            elif not p.is_file():
                reason = "not a regular file"
        except OSError as exc:  # symlink loops raise ELOOP
            reason = f"cannot stat: {exc.strerror or exc}"
        if reason is None and check is not None:
            reason = check(p)
        if reason is None:
            good.append(_rel(p, root))
        else:
            skipped.append((_rel(p, root), reason))
    return good


def _tree_warnings(hier: Hierarchy, internal: set[str]) -> list[str]:
    """Warnings on the scanned tree: folders left without classes, parents with one child."""
    warnings = []
    for nid in sorted(internal):
        if nid and nid not in hier.nodes:
            warnings.append(f"folder '{nid}' has no usable classes below it; it is left out")
    for nid in hier.internal_nodes():
        if len(hier.nodes[nid].children) == 1:
            only = hier.nodes[hier.nodes[nid].children[0]].name
            warnings.append(
                f"'{nid or 'root'}' has one child ('{only}'): no model is trained for it and "
                f"prediction passes through to '{only}' with probability 1"
            )
    return warnings


def scan_tree(root: str | os.PathLike, check: Callable[[Path], str | None] | None = None) -> ScanResult:
    """Scan ``ROOT/<class>/.../<leaf>/<images>`` into a hierarchy and per-leaf file lists.

    A folder with sub-folders is an internal node; a folder without is a leaf. Hidden files/folders
    and non-image extensions are ignored. Images lying directly in an internal folder are partial
    labels of that folder's node (``partial``; in the root folder they are skipped). Images that
    ``check`` rejects, broken symlinks and symlinked folders are left out and listed in ``skipped``.
    Empty leaves (and parents left with no children) are dropped with a warning.

    Raises
    ------
    HierarchyError
        If ``root`` is missing, not a folder, or holds no usable class folder.
    """
    root = Path(root)
    if not root.exists():
        raise HierarchyError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise HierarchyError(f"{root} is a file, not a dataset folder (expected ROOT/<class>/<subclass>/images)")
    files: dict[str, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []
    internal: set[str] = set()
    partial: dict[str, list[str]] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        listed = _list_folder(folder, root, skipped, warnings)
        if listed is None:
            continue
        subdirs, images = listed
        nid = _rel(folder, root) if folder != root else ROOT_ID
        if subdirs:
            internal.add(nid)
            if nid == ROOT_ID:
                for p in images:
                    skipped.append((_rel(p, root), "image directly in the dataset root; move it into a class folder"))
            else:
                good = _usable_images(images, root, check, skipped)
                if good:
                    partial[nid] = sorted(good)
            stack.extend(reversed(subdirs))
            continue
        if folder == root:
            raise HierarchyError(f"{root} has no class folders; expected ROOT/<class>/<subclass>/images")
        good = _usable_images(images, root, check, skipped)
        if good:
            files[nid] = sorted(good)
        else:
            warnings.append(f"class folder '{nid}' has no usable images; it is left out")
    files, partial = partition_labels({**files, **partial})
    if not files:
        raise HierarchyError(f"no usable images found under {root}")
    hier = Hierarchy.from_leaf_paths(files)
    warnings += _tree_warnings(hier, internal)
    skipped.sort()
    return ScanResult(hier, files, skipped, warnings, partial)


def partition_labels(groups: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split node id → images into leaves and partial labels.

    A node with another labelled node below it (``"a"`` beside ``"a/b"``) is inner: its images are
    partial labels. Every other node is a leaf.

    Returns
    -------
    (dict, dict)
        leaf id → images, and inner node id → images.
    """
    prefixes = {"/".join(n.split("/")[:k]) for n in groups for k in range(1, n.count("/") + 1)}
    leaves = {n: ps for n, ps in groups.items() if n not in prefixes}
    inner = {n: ps for n, ps in groups.items() if n in prefixes}
    return leaves, inner


def _utf8_ok(name: str) -> bool:
    """False for a file name holding bytes that are not UTF-8 (undecodable, kept as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_hierarchy_json(path: str | os.PathLike) -> tuple[Hierarchy, dict]:
    """Read a ``hierarchy.json`` written by prepare_dataset.py or train.py.

    Returns
    -------
    (Hierarchy, dict)
        The validated tree and the whole JSON document.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HierarchyError(f"{path} not found") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise HierarchyError(f"{path} is not readable JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(doc, dict) or "tree" not in doc:
        raise HierarchyError(f"{path} has no 'tree' entry")
    return Hierarchy.from_dict(doc["tree"]), doc


def display_names(doc: dict, hier: "Hierarchy | None" = None) -> dict[str, str]:
    """``hierarchy.json`` → ``display``: node id → the name shown to people (a catalogue's original
    category name, for the nodes whose safe id differs from it; see :mod:`hiernet.catalogue`).

    Returns ``{}`` when the document has none (trees prepared from folders) or it is not a mapping;
    keys and values as strings, only node ids of ``hier`` when given.
    """
    raw = doc.get("display") if isinstance(doc, dict) else None
    if not isinstance(raw, dict):
        return {}
    out = {str(k): str(v) for k, v in raw.items()}
    return {k: v for k, v in out.items() if k in hier.nodes} if hier is not None else out


def display_path(node_id: str, display: dict[str, str], sep: str = " / ") -> str:
    """A node id (a path of safe names, ``a/b/c``) in display names: each prefix's ``display`` name, else
    its own last part, joined by ``sep``."""
    parts = node_id.split("/") if node_id else []
    return sep.join(display.get("/".join(parts[:k + 1]), part) for k, part in enumerate(parts))


def require_hierarchy_json(path: str | os.PathLike, missing: str, fix: str) -> tuple[Hierarchy, dict]:
    """:func:`load_hierarchy_json`, turning every failure into one :class:`~hiernet.safeio.UserError` line.

    Parameters
    ----------
    missing : str
        What to say when the file does not exist (e.g. "no trained models in DIR").
    fix : str
        The command that makes a valid file (appended as "run: FIX").
    """
    from .safeio import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"{missing} ({path.name} missing); run: {fix}")
    try:
        return load_hierarchy_json(path)
    except HierarchyError as exc:
        where = "" if str(path) in str(exc) else f"{path}: "  # name the file whatever part of it is wrong
        raise UserError(f"{where}{exc}; run: {fix}") from None
