"""Predict class paths for images: decode and batch → backbones → node probabilities → routing → records.

The models come from a :class:`hiernet.bundle.ModelBundle` (torch or ONNX, loaded once); the walk
down the tree is :func:`hiernet.routing.route`. When node heads share one frozen backbone, the backbone
runs once per image; each parent's head sees only the images routed to it, in one batch. Nodes with
their own fine-tuned network run it on the images routed to them only. How the predictor behaves is
fixed at construction by :class:`PredictOptions` (with its :class:`MirrorPolicy`).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .bundle import (DECISIONS, MANIFEST, ONNX_DIR, ModelBundle, NodeModel, chosen_decision,  # noqa: F401
                     decision_accuracies, load_bundle, onnx_problem, read_models_hierarchy)
from .hierarchy import ROOT_ID, Hierarchy
from .images import ImageDecodeError, load_rgb, resize_for_model, to_array
from .routing import average_views, path_leaf_probs, route, route_leaves, softmax
from .safeio import UserError

log = logging.getLogger(__name__)

#: Kept for callers written before :func:`hiernet.routing.softmax` was public.

#: How the root node is named in records and messages (its id is ``""``).
ROOT_NAME = "root"
#: The key of the combined decision's leaf scores in :meth:`HierarchicalPredictor.predict_and_score`'s scores.
COMBINED_SCORES = "\0combined"


@dataclass(frozen=True)
class MirrorPolicy:
    """Selective mirror-image averaging, for nodes trained with it.

    A node averages an image's probabilities with its mirror image's only when its top probability
    without the mirror is below ``below``: 1 = every image, 0 = never. A confident decision is
    practically never changed by the mirror, and skipping it saves most of the second backbone pass.
    """

    below: float = 0.6

    def __post_init__(self):
        if not 0.0 <= self.below <= 1.0:
            raise UserError(f"the mirror-averaging threshold must be between 0 and 1, got {self.below}")

    @property
    def enabled(self) -> bool:
        return self.below > 0

    def unsure(self, probs: np.ndarray) -> np.ndarray:
        """Rows of ``probs`` ``(B, C)`` that want their mirror: int indices ``(K,)``."""
        if self.below >= 1:
            return np.arange(len(probs))
        return np.where(probs.max(axis=1) < self.below)[0]


@dataclass(frozen=True)
class PredictOptions:
    """Everything that shapes predictions, fixed when the predictor is built.

    Attributes
    ----------
    min_confidence : float
        Stop at the deepest node whose path probability stays ``>=`` this (0: always a leaf).
    topk : int
        Classes listed per level in ``Prediction.topk``.
    mirror : MirrorPolicy
    prefetch_batches : int or None
        Batches decoded ahead while the network runs. ``None``: 2 for torch on an accelerator, else 0
        (on CPU decoding threads would compete with onnxruntime's for the same cores, measured slower).
    decision : {"lcpn", "flat", "combined", "auto"}
        How the leaf is chosen: ``lcpn`` walks the tree level by level with the node classifiers;
        ``flat`` takes the flat head's most likely leaf; ``combined`` the leaf maximising flat probability
        × LCPN path probability (every node runs on every image). The last two need the flat model and
        report each level's share of the chosen distribution (:func:`hiernet.routing.route_leaves`).
        ``auto``: the one the export found most accurate on the validation split, resolved by
        :meth:`HierarchicalPredictor.load` (a predictor built on a bundle alone takes ``lcpn``).
    """

    min_confidence: float = 0.0
    topk: int = 1
    mirror: MirrorPolicy = field(default_factory=MirrorPolicy)
    prefetch_batches: int | None = None
    decision: str = "lcpn"

    def __post_init__(self):
        if self.decision not in DECISIONS + ("auto",):
            raise UserError(f"unknown decision {self.decision!r}; use one of auto, {', '.join(DECISIONS)}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise UserError(f"the minimum confidence must be between 0 and 1, got {self.min_confidence}")
        if self.topk < 1:
            raise UserError(f"top-k must be at least 1, got {self.topk}")


@dataclass
class Prediction:
    """One image's result.

    ``labels``/``node_ids``/``probs`` run from the top level down to the deepest predicted node;
    ``confidence`` is the product of ``probs``; ``topk`` holds, per level, ``(label, prob)`` of the K
    most likely classes of the node the image was routed to; ``complete`` is False when
    ``min_confidence`` stopped the walk above a leaf, and ``candidates`` then holds ``(label, prob)``
    of the most likely children of the node where it stopped (the level it could not decide);
    ``error`` is set (and the rest empty) when the image could not be read. ``display``: the path in
    the names shown to people (a catalogue's original category names), ``None`` when the models' tree
    has none (then the record has no ``display`` field).
    """

    path: str
    labels: list = field(default_factory=list)
    node_ids: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    confidence: float = 0.0
    topk: list = field(default_factory=list)
    complete: bool = True
    error: str | None = None
    flat_leaf: str | None = None
    flat_prob: float | None = None
    candidates: list = field(default_factory=list)
    display: list | None = None

    @property
    def node(self) -> str:
        """Deepest predicted node id (``""`` if none)."""
        return self.node_ids[-1] if self.node_ids else ROOT_ID

    def record(self) -> dict:
        """The one output record every writer of :mod:`hiernet.outputs` prints (floats unrounded).

        ``node`` is the deepest predicted node id, ``root`` when the walk stopped before the top
        level (``""`` for an unreadable image). A stopped walk's ``topk`` ends with one more level:
        the candidates of the node where it stopped. ``display`` (after ``labels``, only when the
        models' tree has display names) is ``labels`` in the names shown to people.
        """
        shown = {} if self.display is None else {"display": list(self.display)}
        if self.error:
            return {"path": self.path, "labels": [], **shown, "probs": [], "confidence": 0.0, "node": "",
                    "complete": False, "error": self.error}
        d = {"path": self.path, "labels": list(self.labels), **shown, "probs": list(self.probs),
             "confidence": self.confidence, "node": self.node or ROOT_NAME, "complete": self.complete}
        levels = list(self.topk) + ([self.candidates] if self.candidates and not self.complete else [])
        if levels:
            d["topk"] = [[{"label": n, "prob": p} for n, p in level] for level in levels]
        return d


class MirrorMode(enum.Enum):
    """When a batch runs the mirror passes its nodes ask for."""

    INLINE = "inline"  # at once, for the images a node is unsure about
    DEFER = "defer"  # never: only flag those images (``Batch.unsure``)
    ALL = "all"  # every image will want it: the first mirror pass of a backbone covers the whole batch


class Batch:
    """One batch's images, backbone features (computed once) and node probabilities.

    ``images``: ``{(size, resize): (n, 3, size, size)}``; ``feats``: group → ``(n, D)``; ``unsure``:
    bool ``(n,)``, the images some node wanted the mirror for (in :attr:`MirrorMode.DEFER`); ``wanted``:
    ``id(node model)`` → bool ``(n,)``, the images that node wanted the mirror for (any mode);
    ``flat_probs``: the flat model's probabilities ``(n, L)`` once :meth:`HierarchicalPredictor._run` has them.
    """

    def __init__(self, bundle: ModelBundle, inputs: list[dict], mirror: MirrorPolicy, mode: MirrorMode,
                 feats: dict | None = None):
        self.bundle, self.mirror, self.mode = bundle, mirror, mode
        self.n = len(inputs)
        self.images = {spec: np.stack([x[spec] for x in inputs]) for spec in bundle.input_specs()}
        self.feats = dict(feats or {})
        self.mirrored: dict = {}  # group -> (features (n, D), bool mask of rows computed)
        self.unsure = np.zeros(self.n, dtype=bool)
        self.wanted: dict = {}  # id(node model) -> bool (n,): the images it wanted the mirror for
        self.flat_probs: np.ndarray | None = None

    def features(self, group: str) -> np.ndarray:
        if group not in self.feats:
            run, size, resize = self.bundle.backbones[group]
            self.feats[group] = np.asarray(run(self.images[(size, resize)]), dtype=np.float32)
        return self.feats[group]

    def mirror_features(self, group: str, idx: np.ndarray) -> np.ndarray:
        """Features of the mirrored images ``idx``; each image's mirror is computed at most once."""
        run, size, resize = self.bundle.backbones[group]
        if group not in self.mirrored:
            self.mirrored[group] = (np.zeros_like(self.features(group)), np.zeros(self.n, dtype=bool))
        f, done = self.mirrored[group]
        todo = np.where(~done)[0] if self.mode is MirrorMode.ALL else idx[~done[idx]]
        if len(todo):
            f[todo] = run(np.ascontiguousarray(self.images[(size, resize)][todo, :, :, ::-1]))
            done[todo] = True
        return f[idx]

    def node_probs(self, nm: NodeModel, idx: np.ndarray, follow: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities ``(len(idx), C)`` of node ``nm`` on the batch's images ``idx``.

        A node trained with mirrors averages the images it is unsure about with their mirrors
        (:class:`MirrorPolicy`); with ``follow`` (bool ``(n,)``) it averages those images instead and asks
        for no others: the combined decision runs every node on every image, and a node is unsure about
        most images that do not belong below it, so there the flat model's doubt decides
        (:meth:`HierarchicalPredictor._combined_scores`).
        """
        if nm.head is None:
            return softmax(nm.full(self.images[(nm.image_size, nm.resize)][idx]))
        p = softmax(nm.head(self.features(nm.backbone)[idx]))
        if nm.tta and self.mirror.enabled:
            if follow is not None:
                sel = np.where(follow[idx])[0]
            else:
                sel = self.mirror.unsure(p)
                self.wanted.setdefault(id(nm), np.zeros(self.n, dtype=bool))[idx[sel]] = True
            if len(sel) and self.mode is MirrorMode.DEFER:
                self.unsure[idx[sel]] = True
            elif len(sel):
                p[sel] = average_views(p[sel], softmax(nm.head(self.mirror_features(nm.backbone, idx[sel]))))
        return p


class HierarchicalPredictor:
    """A :class:`ModelBundle` and the :class:`PredictOptions` to predict with.

    Use :meth:`load` (or ``HierarchicalPredictor(load_bundle(...), PredictOptions(...))``), then
    :meth:`predict_paths`. ``HierarchicalPredictor(hier, nodes, backbones, runtime, flat=None,
    min_confidence=0.0, topk=1)`` (the older form) still works.
    """

    DEFAULT_TTA_BELOW = MirrorPolicy.below

    def __init__(self, bundle: ModelBundle | Hierarchy, options: PredictOptions | dict | None = None, *parts):
        if isinstance(bundle, Hierarchy):  # the older form: (hier, nodes, backbones, runtime, flat, min_conf, topk)
            hier, nodes, (backbones, runtime, *rest) = bundle, options, parts
            flat, min_confidence, topk = (rest + [None, 0.0, 1][len(rest):])[:3]
            bundle, options = ModelBundle(hier, nodes, backbones, runtime, flat), PredictOptions(min_confidence, topk)
        self.bundle = bundle
        self.options = options or PredictOptions()
        if self.options.decision == "auto":  # only load() knows the models folder whose export chose one
            self.options = dataclasses.replace(self.options, decision="lcpn")
        if self.options.decision != "lcpn" and bundle.flat is None:
            raise UserError(f"the {self.options.decision} decision needs the flat model: load it (with_flat=True), "
                            "or train it (train_lcpn.sh trains it unless NO_FLAT=1)")
        prefetch = self.options.prefetch_batches
        if prefetch is None:
            prefetch = 2 if bundle.runtime == "torch" and str(bundle.device) != "cpu" else 0
        self.prefetch_batches = int(prefetch)
        # node id -> the label printed for it: its name, or the class name its parent's model was trained with
        self._labels = {nid: node.name for nid, node in bundle.hier.nodes.items()}
        for nm in bundle.nodes.values():
            self._labels.update(zip(nm.class_nodes, nm.classes))

    @classmethod
    def load(cls, models_dir: str | Path, runtime: str = "auto", device: str = "cpu", min_confidence: float = 0.0,
             topk: int = 1, with_flat: bool = False, tta_below: float | None = None,
             options: PredictOptions | None = None, precision: str = "auto",
             decision: str = "lcpn") -> "HierarchicalPredictor":
        """:func:`hiernet.bundle.load_bundle`, predicting with ``options`` (or the ones the other
        arguments give: ``tta_below`` None keeps :class:`MirrorPolicy`'s default). A ``decision`` other
        than ``lcpn`` loads the flat model too; ``auto`` is the one the export chose on the validation
        split (:func:`hiernet.bundle.chosen_decision`; ``lcpn`` without one).

        Raises
        ------
        UserError
            Bad options, or missing or inconsistent models, with the command that fixes it.
        """
        if options is None:
            mirror = MirrorPolicy() if tta_below is None else MirrorPolicy(float(tta_below))
            options = PredictOptions(float(min_confidence), int(topk), mirror, decision=decision)
        if options.decision == "auto":
            options = dataclasses.replace(options, decision=_auto_decision(models_dir))
        with_flat = with_flat or options.decision != "lcpn"
        return cls(load_bundle(models_dir, runtime, device, with_flat, precision), options)

    def with_options(self, **changes) -> "HierarchicalPredictor":
        """A predictor on the same loaded models with some :class:`PredictOptions` fields changed."""
        return type(self)(self.bundle, dataclasses.replace(self.options, **changes))

    # views of the bundle and the options
    hier = property(lambda self: self.bundle.hier)
    nodes = property(lambda self: self.bundle.nodes)
    backbones = property(lambda self: self.bundle.backbones)
    runtime = property(lambda self: self.bundle.runtime)
    flat = property(lambda self: self.bundle.flat)
    display = property(lambda self: self.bundle.display)
    min_confidence = property(lambda self: self.options.min_confidence)
    topk = property(lambda self: self.options.topk)
    tta_below = property(lambda self: self.options.mirror.below)

    def input_specs(self) -> list[tuple[int, str]]:
        """Distinct (image size, resize policy) pairs the loaded models need."""
        return self.bundle.input_specs()

    def encoders(self) -> dict:
        """node id → {index: class name} (what the original printed as the encoder)."""
        return {nid: dict(enumerate(nm.classes)) for nid, nm in self.nodes.items()}

    # ------------------------------------------------------------------ decoding
    def _prepare(self, path: str, specs: list) -> tuple[dict | None, str | None]:
        try:
            img = load_rgb(path, min_size=max(s for s, _ in specs) if specs else None)
        except ImageDecodeError as exc:
            return None, str(exc)
        return {spec: to_array(resize_for_model(img, spec[0], spec[1])) for spec in specs}, None

    def prepared_batches(self, paths: Iterable[str], batch_size: int = 32, workers: int = 2, progress: bool = False,
                         desc: str | None = None, total: int | None = None):
        """Decode and resize ``paths`` in a thread pool, batch by batch (``prefetch_batches`` ahead).

        ``paths`` may be any iterable (a generator over a huge folder): it is read one batch at a
        time, so at most ``prefetch_batches + 1`` batches of decoded images exist at once.
        ``total`` (default ``len(paths)`` when it has one) sizes the progress bar.

        Yields
        ------
        list of (int, dict or None, str or None)
            Per image of one batch: its index in ``paths``, its model inputs (see :meth:`predict_arrays`)
            or ``None``, and the decoding error or ``None``.
        """
        from tqdm import tqdm

        from .data import bounded_map

        specs = self.input_specs()
        if total is None and hasattr(paths, "__len__"):
            total = len(paths)
        numbered = enumerate(str(p) for p in paths)
        chunks = iter(lambda: list(itertools.islice(numbered, batch_size)), [])
        prepare = lambda ch: [(i, *self._prepare(p, specs)) for i, p in ch]  # noqa: E731
        bar = tqdm(total=total, unit="img", disable=not progress, leave=False, desc=desc, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            if self.prefetch_batches:
                batches = bounded_map(pool, prepare, chunks, ahead=self.prefetch_batches)
            else:
                batches = ([(i, *r) for (i, _), r in zip(ch, pool.map(lambda ip: self._prepare(ip[1], specs), ch))]
                           for ch in chunks)
            for prepared in batches:
                yield prepared
                bar.update(len(prepared))
        bar.close()

    # ------------------------------------------------------------------ prediction
    def predict_paths(self, paths: Sequence[str], batch_size: int = 32, workers: int = 2,
                      progress: bool = False) -> list[Prediction]:
        """Predict every path (decoding in a thread pool, batches of ``batch_size``); never raises for a bad image.

        The list of :meth:`predict_iter`'s predictions (use that for many images).
        """
        return list(self.predict_iter(paths, batch_size, workers, progress))

    def predict_iter(self, paths: Iterable[str], batch_size: int = 32, workers: int = 2, progress: bool = False,
                     total: int | None = None, max_lag: int = 4) -> Iterator[Prediction]:
        """Predict ``paths`` (any iterable, read lazily), yielding one :class:`Prediction` per path, in order.

        Selective mirror averaging is batched across batches: each batch is routed without the mirror
        first; the few images some node was unsure about are set aside with their features, and once a
        full batch of them has gathered, or the oldest has waited ``max_lag`` batches (or at the end),
        their mirrors run in one pass and they are routed again with averaging. The results equal
        routing each batch with the mirror inline, at a fraction of the cost of many tiny mirror
        passes. Predictions are yielded as soon as every earlier one is done, so at most about
        ``max_lag + 1`` batches of predictions (and one batch of set-aside images) are held at once.
        """
        done: dict[int, Prediction] = {}
        names: dict[int, str] = {}  # index -> path, for the images not yielded yet
        waiting: list[tuple[int, dict, dict]] = []  # (index, inputs, {group: features (D,)})
        nxt, n_batch, oldest = 0, 0, None  # next index to yield; batches seen; batch of the oldest waiting
        for prepared, batch_paths in self._numbered_batches(paths, batch_size, workers, progress, total):
            names.update(batch_paths)
            for i, x, err in prepared:
                if x is None:
                    done[i] = Prediction(names[i], complete=False, error=err, display=[] if self.display else None)
            good = [(i, x) for i, x, _ in prepared if x is not None]
            preds, _, batch = self._run([x for _, x in good], [names[i] for i, _ in good], MirrorMode.DEFER)
            for row, ((i, x), pr) in enumerate(zip(good, preds)):
                if batch is not None and batch.unsure[row]:
                    waiting.append((i, x, {g: f[row] for g, f in batch.feats.items()}))
                    oldest = n_batch if oldest is None else oldest
                else:
                    done[i] = pr
            n_batch += 1
            if waiting and (len(waiting) >= batch_size or n_batch - oldest >= max_lag):
                self._flush_mirrors(waiting, names, done)
                oldest = None
            while nxt in done:
                names.pop(nxt, None)
                yield done.pop(nxt)
                nxt += 1
        self._flush_mirrors(waiting, names, done)
        while nxt in done:
            yield done.pop(nxt)
            nxt += 1

    def _numbered_batches(self, paths, batch_size, workers, progress, total):
        """:meth:`prepared_batches`, each batch with its ``{index: path}``."""
        kept: dict[int, str] = {}

        def remember(it):
            for i, p in enumerate(it):
                kept[i] = str(p)
                yield p

        if total is None and hasattr(paths, "__len__"):
            total = len(paths)
        for prepared in self.prepared_batches(remember(paths), batch_size, workers, progress, total=total):
            yield prepared, {i: kept.pop(i) for i, _, _ in prepared}

    def _flush_mirrors(self, waiting: list, names: dict, out: dict) -> None:
        """Route the set-aside images again, their mirrors all computed in one pass; empties ``waiting``."""
        if waiting:
            feats = {g: np.stack([f[g] for _, _, f in waiting]) for g in waiting[0][2]}
            preds, _, _ = self._run([x for _, x, _ in waiting], [names[i] for i, _, _ in waiting], MirrorMode.ALL,
                                    feats=feats)
            out.update(zip([i for i, _, _ in waiting], preds))
            waiting.clear()

    def predict_arrays(self, inputs: list[dict], names: list[str]) -> list[Prediction]:
        """Route a batch down the tree.

        Parameters
        ----------
        inputs : list of dict
            Per image, ``{(size, resize): float32 array (3, size, size)}`` for every :meth:`input_specs` entry.
        names : list of str
            What to put in ``Prediction.path``.
        """
        return self._run(inputs, names, MirrorMode.INLINE)[0]

    def predict_and_score(self, inputs: list[dict], names: list[str], score: dict | None = None,
                          combined: bool = False) -> tuple[list[Prediction], dict]:
        """:meth:`predict_arrays`, plus chosen nodes' own class probabilities on chosen images.

        The extra scores reuse the batch's backbone pass; they do not depend on where the chain
        routed an image (evaluation uses them for each node's local accuracy).

        Parameters
        ----------
        inputs, names
            As for :meth:`predict_arrays`.
        score : dict, optional
            Classifier node id → int indices into ``inputs`` (shape ``(K,)``) to run that node on.
        combined : bool
            Also the combined decision's leaf scores on every image (the flat model loaded), exactly as
            ``decision="combined"`` computes them, under :data:`COMBINED_SCORES`.

        Returns
        -------
        (list of Prediction, dict)
            The predictions of :meth:`predict_arrays`, and node id → float array ``(K, C)`` of the
            node's class probabilities, columns in ``self.nodes[id].class_nodes`` order (and
            :data:`COMBINED_SCORES` → ``(n, L)``, columns in ``self.flat.class_nodes`` order).
        """
        preds, scores, batch = self._run(inputs, names, MirrorMode.INLINE, score)
        if combined and batch is not None:
            scores[COMBINED_SCORES] = self._combined_scores(batch)
        return preds, scores

    def _run(self, inputs: list[dict], names: list[str], mode: MirrorMode, score: dict | None = None,
             feats: dict | None = None) -> tuple[list[Prediction], dict, Batch | None]:
        """Route a batch (backbone features ``feats``, group → ``(n, D)``, when already computed).

        Returns the predictions, the scores of :meth:`predict_and_score`, and the :class:`Batch`
        (its ``unsure`` mask and ``feats``; ``None`` for an empty batch).
        """
        if not inputs:
            return [], {}, None
        batch = Batch(self.bundle, inputs, self.options.mirror, mode, feats)
        fp = None if self.flat is None else batch.node_probs(self.flat, np.arange(batch.n))
        batch.flat_probs = fp
        if self.options.decision == "lcpn":
            routes = route(self.hier, lambda nid, idx: batch.node_probs(self.nodes[nid], idx), batch.n,
                           self.options.topk, self.options.min_confidence)
        else:
            scores = fp if self.options.decision == "flat" else self._combined_scores(batch)
            routes = route_leaves(self.hier, scores, self.flat.class_nodes, self.options.topk, self.options.min_confidence)
        preds = [self._prediction(name, r) for name, r in zip(names, routes)]
        if fp is not None:
            for i, pr in enumerate(preds):
                j = int(fp[i].argmax())
                pr.flat_leaf, pr.flat_prob = self.flat.class_nodes[j], float(fp[i, j])
        scores = {}
        for nid, idx in (score or {}).items():
            idx = np.asarray(idx, dtype=np.int64)
            nm = self.nodes[nid]
            scores[nid] = batch.node_probs(nm, idx) if len(idx) else np.zeros((0, len(nm.class_nodes)), np.float32)
        return preds, scores, batch

    def _combined_scores(self, batch: Batch) -> np.ndarray:
        """The combined decision's ``(n, L)`` scores over the flat model's leaves: its probabilities
        (``batch.flat_probs``) times each leaf's LCPN path probability. Every node runs on every image
        and averages with the mirror the images the flat model wanted it for (``Batch.node_probs``'s
        ``follow``), not those it is unsure about itself: most images are not below most nodes."""
        every = np.arange(batch.n)
        follow = batch.wanted.get(id(self.flat), np.zeros(batch.n, dtype=bool))
        node_p = {nid: batch.node_probs(self.nodes[nid], every, follow) for nid in self.hier.classifier_nodes()}
        return batch.flat_probs * path_leaf_probs(self.hier, node_p, self.flat.class_nodes, batch.n)

    def _prediction(self, name: str, r) -> Prediction:
        lab = self._labels
        shown = [self.display.get(c, lab[c]) for c in r.node_ids] if self.display else None
        return Prediction(name, [lab[c] for c in r.node_ids], list(r.node_ids), list(r.probs), r.confidence,
                          [[(lab[c], p) for c, p in level] for level in r.topk], r.complete,
                          candidates=[(lab[c], p) for c, p in getattr(r, "candidates", [])], display=shown)


def _auto_decision(models_dir: str | Path) -> str:
    """``--decision auto`` for ``models_dir`` (:func:`hiernet.bundle.chosen_decision`), said in the log."""
    decision, record = chosen_decision(Path(models_dir))
    if record is None:
        log.info("decision: lcpn (no choice recorded by a current export)")
    else:
        log.info("decision: %s (the export's choice on %s validation images: leaf accuracy %s)", decision,
                 record.get("n_images", "?"), decision_accuracies(record))
    return decision


def iter_image_paths(inputs: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files and folders (recursively) into image paths; returns (paths, [(input, problem)])."""
    from .images import is_image_name, list_images

    paths, problems = [], []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = [str(x) for x in list_images(p)]
            if not found:
                problems.append((raw, "folder holds no images"))
            paths.extend(found)
        elif p.exists() or p.is_symlink():
            paths.append(raw)
        else:
            problems.append((raw, "file not found"))
        if p.is_file() and not is_image_name(p.name):
            log.info("%s has no image extension; trying to decode it anyway", raw)
    return paths, problems


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
