"""Route images down a class tree from per-node class probabilities (pure numpy: no torch, no I/O).

The predictor, evaluation and the ablation bench share this step: each image starts at the root and
moves, level by level, to the most likely child of the node it is at, until it reaches a leaf (or the
path probability would fall below ``min_confidence``). A parent with one child needs no model: images
pass on with probability 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

import numpy as np

from .hierarchy import ROOT_ID, Hierarchy

#: Per-node probabilities: node id → ``(N, C)`` array over all ``N`` images, or a function
#: ``(node id, int indices (K,)) → (K, C)`` computing them only for the images routed to the node.
#: Columns follow ``hier.nodes[node].children``.
NodeProbs = Union[Mapping[str, np.ndarray], Callable[[str, np.ndarray], np.ndarray]]


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits ``(B, C)`` → probabilities ``(B, C)`` (numerically stable)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def average_views(probs: np.ndarray, mirror_probs: np.ndarray) -> np.ndarray:
    """Mirror averaging: the mean of an image's and its mirror image's probabilities, both ``(B, C)``."""
    return (probs + mirror_probs) / 2


@dataclass
class Route:
    """One image's walk down the tree.

    ``node_ids``/``probs`` run from the top level down to the deepest chosen node; ``confidence`` is
    the product of ``probs`` (1.0 for an empty walk); ``topk`` holds, per level, ``(child id, prob)``
    of the K most likely children of the node the image was at, most likely first; ``complete`` is
    False when ``min_confidence`` stopped the walk above a leaf; ``candidates`` then lists
    ``(child id, prob)`` of the most likely children (at least 2) of the node where it stopped: the
    level it could not decide.
    """

    node_ids: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    confidence: float = 1.0
    topk: list = field(default_factory=list)
    complete: bool = True
    candidates: list = field(default_factory=list)

    @property
    def node(self) -> str:
        """Deepest chosen node id (the root id ``""`` for an empty walk)."""
        return self.node_ids[-1] if self.node_ids else ROOT_ID


def _probs_at(hier: Hierarchy, probs: NodeProbs, nid: str, idx: np.ndarray) -> np.ndarray:
    """Probabilities ``(len(idx), C)`` of node ``nid``'s children for the images ``idx``."""
    children = hier.nodes[nid].children
    if len(children) == 1:
        return np.ones((len(idx), 1))
    p = probs(nid, idx) if callable(probs) else np.asarray(probs[nid])[idx]
    if p.shape != (len(idx), len(children)):
        raise ValueError(f"node {nid!r}: probabilities of shape {p.shape}, expected {(len(idx), len(children))}")
    return p


def route(hier: Hierarchy, probs: NodeProbs, n: int, topk: int = 1, min_confidence: float = 0.0) -> list[Route]:
    """Walk ``n`` images down ``hier``, each to the most likely child at every level.

    Parameters
    ----------
    hier : Hierarchy
        The tree; a node's probability columns follow ``hier.nodes[id].children``.
    probs : NodeProbs
        Per classifier node (more than one child), the children's probabilities: a mapping
        node id → ``(n, C)`` array, or a function ``(node id, indices (K,)) → (K, C)`` that is called
        once per node and level with exactly the images routed there. One-child parents need none.
    n : int
        Number of images.
    topk : int
        How many children to list per level in :attr:`Route.topk` (at most the node's ``C``).
    min_confidence : float
        Stop an image at the deepest node whose path probability stays ``>= min_confidence``
        (0: always go to a leaf); a stopped route keeps its path's confidence and lists the
        candidates of the level it could not decide (:attr:`Route.candidates`).

    Returns
    -------
    list of Route
        ``n`` routes, in image order.
    """
    routes = [Route() for _ in range(n)]
    current = np.array([ROOT_ID] * n, dtype=object)
    active = np.ones(n, dtype=bool)
    while active.any():
        for nid in sorted(set(current[active])):
            idx = np.where(active & (current == nid))[0]
            children = hier.nodes[nid].children
            if not children:
                active[idx] = False
                continue
            p = _probs_at(hier, probs, nid, idx)
            k = min(max(1, int(topk)), p.shape[1])
            order = np.argsort(-p, axis=1)
            for row, i in enumerate(idx):
                best = order[row, 0]
                r, pb = routes[i], float(p[row, best])
                if min_confidence and r.confidence * pb < min_confidence:
                    r.complete, active[i] = False, False
                    r.candidates = [(children[j], float(p[row, j])) for j in order[row, :max(k, 2)]]
                    continue
                r.node_ids.append(children[best])
                r.probs.append(pb)
                r.confidence *= pb
                r.topk.append([(children[j], float(p[row, j])) for j in order[row, :k]])
                current[i] = children[best]
    return routes


def path_leaf_probs(hier: Hierarchy, node_probs: Mapping[str, np.ndarray], leaves, n: int | None = None) -> np.ndarray:
    """The LCPN probability of every leaf: the product of the node probabilities along its path.

    Parameters
    ----------
    node_probs : mapping
        Classifier node id → ``(N, C)`` probabilities of its children (``hier.nodes[id].children`` order)
        on all ``N`` images; one-child parents need none (probability 1).
    leaves : sequence of str, shape (L,)
        The leaf order of the result's columns.
    n : int, optional
        Number of images (needed only when no node has a classifier).

    Returns
    -------
    ndarray, shape (N, L)
    """
    if n is None:
        n = len(next(iter(node_probs.values()))) if node_probs else 0
    out = np.ones((n, len(leaves)))
    for j, leaf in enumerate(leaves):
        parent = ROOT_ID
        for child in hier.path(leaf):
            children = hier.nodes[parent].children
            if len(children) > 1:
                out[:, j] *= node_probs[parent][:, children.index(child)]
            parent = child
    return out


def route_leaves(hier: Hierarchy, leaf_probs: np.ndarray, leaves, topk: int = 1,
                 min_confidence: float = 0.0) -> list[Route]:
    """Routes from a distribution over the leaves (the flat head's, or the combined decision's): each image
    goes to its most likely leaf, reported level by level like :func:`route`'s walks.

    A node's probability is the mass of the leaves below it, so each level's ``probs`` entry is the
    chosen child's share of its parent's mass and the path's ``confidence`` is the leaf's probability.

    Parameters
    ----------
    leaf_probs : ndarray, shape (N, L)
        Non-negative scores per image and leaf (rows are normalised here); columns follow ``leaves``.
    leaves : sequence of str, shape (L,)
        Every leaf of ``hier``, once.
    topk, min_confidence
        As for :func:`route`: children listed per level (by mass); a walk stops above the node whose
        mass would fall below ``min_confidence`` and lists the candidates of the level it could not decide.

    Returns
    -------
    list of Route
        ``N`` routes, in image order.
    """
    leaves = list(leaves)
    if sorted(leaves) != sorted(hier.leaves()):
        raise ValueError("the leaf distribution's columns must be the tree's leaves, each once")
    q = np.asarray(leaf_probs, dtype=float)
    q = q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
    col = {leaf: j for j, leaf in enumerate(leaves)}
    mass = {nid: q[:, [col[leaf] for leaf in hier.subtree_leaves(nid)]].sum(axis=1) for nid in hier.nodes}
    routes = []
    for i, best in enumerate(q.argmax(axis=1)):
        r, parent = Route(), ROOT_ID
        for child in hier.path(leaves[best]):
            children = hier.nodes[parent].children
            share = np.array([mass[c][i] for c in children]) / max(mass[parent][i], 1e-300)
            order = np.argsort(-share, kind="stable")
            pb = float(share[children.index(child)])
            if min_confidence and r.confidence * pb < min_confidence:
                r.complete = False
                r.candidates = [(children[j], float(share[j])) for j in order[:max(topk, 2)]]
                break
            r.node_ids.append(child)
            r.probs.append(pb)
            r.confidence *= pb
            r.topk.append([(children[j], float(share[j])) for j in order[:max(1, min(topk, len(children)))]])
            parent = child
        routes.append(r)
    return routes
