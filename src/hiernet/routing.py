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
