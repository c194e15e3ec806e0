"""Load every node once and route batches of images down the tree (LCPN inference).

When node heads share one frozen backbone, the backbone runs once per image and the features are
routed level by level; each parent's head sees only the images sent to it, in one batch. Nodes with
their own fine-tuned network run it on the images routed to them only. A parent with one child
needs no model: it passes images on with probability 1.

Two runtimes: ``torch`` (reads ``model.pth`` with ``weights_only=True``) and ``onnx`` (reads the
ONNX files src/export.py writes; needs neither torch nor its start-up time). This module imports
torch only when the torch runtime is used.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .hierarchy import FLAT_DATASET, ROOT_ID, Hierarchy, require_hierarchy_json
from .images import ImageDecodeError, load_rgb, resize_for_model, to_array
from .safeio import UserError, sha256_file

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
MANIFEST = "manifest.json"


@dataclass
class Prediction:
    """One image's result.

    ``labels``/``node_ids``/``probs`` run from the top level down to the deepest predicted node;
    ``confidence`` is the product of ``probs``; ``topk`` holds, per level, the K most likely classes
    of the node the image was routed to; ``complete`` is False when ``min_confidence`` stopped the
    walk above a leaf; ``error`` is set (and the rest empty) when the image could not be read.
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

    @property
    def node(self) -> str:
        """Deepest predicted node id (``""`` if none)."""
        return self.node_ids[-1] if self.node_ids else ROOT_ID

    def to_dict(self) -> dict:
        d = {"path": self.path, "labels": self.labels, "probs": [round(p, 6) for p in self.probs],
             "confidence": round(self.confidence, 6), "node": self.node, "complete": self.complete}
        if self.topk:
            d["topk"] = [[{"label": n, "prob": round(p, 6)} for n, p in level] for level in self.topk]
        if self.error:
            d = {"path": self.path, "labels": [], "probs": [], "confidence": 0.0, "node": "", "complete": False,
                 "error": self.error}
        return d


@dataclass
class NodeModel:
    """Runtime view of one classifier node.

    ``head`` maps ``(B, D)`` features to ``(B, C)`` logits (shared-backbone node); ``full`` maps
    ``(B, 3, S, S)`` images to logits (node with its own network). ``backbone`` names the shared
    backbone group for ``head`` nodes.
    """

    dataset: str
    node_id: str | None
    classes: list
    class_nodes: list
    image_size: int
    resize: str
    tta: bool
    backbone: str | None = None
    head: Callable | None = None
    full: Callable | None = None


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def read_models_hierarchy(models_dir: Path) -> tuple[Hierarchy, dict]:
    """``trained_models/hierarchy.json`` → (tree, document), or one clear line saying what to run."""
    return require_hierarchy_json(models_dir / "hierarchy.json", f"no trained models in {models_dir}", "cd src && ./train_lcpn.sh")


class HierarchicalPredictor:
    """All node models of a ``trained_models/`` folder, loaded once.

    Use :meth:`load`, then :meth:`predict_paths`.
    """

    #: Mirror-image averaging (for nodes trained with it) is applied to an image at a node only when the
    #: node's top probability without it is below this; 1 = every image, 0 = never. A confident decision
    #: is practically never changed by the mirror, and skipping it saves most of the second backbone pass.
    DEFAULT_TTA_BELOW = 0.6

    def __init__(self, hier: Hierarchy, nodes: dict, backbones: dict, runtime: str, flat: NodeModel | None,
                 min_confidence: float = 0.0, topk: int = 1):
        self.tta_below = self.DEFAULT_TTA_BELOW
        self.hier = hier
        self.nodes = nodes  # node id -> NodeModel
        self.backbones = backbones  # group -> (callable images->feats, image_size, resize)
        self.runtime = runtime
        self.flat = flat
        self.min_confidence = float(min_confidence)
        self.topk = max(1, int(topk))
        #: Batches decoded ahead while the network runs. 0 on CPU: the decoding threads would compete
        #: with onnxruntime's for the same cores (measured slower), so each batch is decoded by all the
        #: workers at once and then run. An accelerator runs the network off the CPU: decode ahead.
        self.prefetch_batches = 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, models_dir: str | Path, runtime: str = "auto", device: str = "cpu", min_confidence: float = 0.0,
             topk: int = 1, with_flat: bool = False, tta_below: float | None = None) -> "HierarchicalPredictor":
        """Load ``models_dir`` with ``runtime`` ``auto`` (ONNX when exported and current, else torch),
        ``torch`` or ``onnx``.

        Raises
        ------
        UserError
            Missing or inconsistent models, with the command that fixes it.
        """
        models_dir = Path(models_dir)
        hier, doc = read_models_hierarchy(models_dir)
        if runtime not in ("auto", "torch", "onnx"):
            raise UserError(f"unknown runtime {runtime!r}; use auto, torch or onnx")
        if runtime in ("auto", "onnx"):
            problem = onnx_problem(models_dir, hier, with_flat)
            if problem is None:
                pred = cls._load_onnx(models_dir, hier, min_confidence, topk, with_flat)
            elif runtime == "onnx":
                raise UserError(f"{problem}; run: python3 src/export.py --models-dir {models_dir}")
            else:
                log.info("using the torch runtime (%s)", problem)
        if runtime == "torch" or (runtime == "auto" and problem is not None):
            pred = cls._load_torch(models_dir, hier, doc, device, min_confidence, topk, with_flat)
        if pred.runtime == "torch" and str(device) != "cpu":
            pred.prefetch_batches = 2
        if tta_below is not None:
            if not 0.0 <= tta_below <= 1.0:
                raise UserError(f"--tta-below must be between 0 and 1, got {tta_below}")
            pred.tta_below = float(tta_below)
        return pred

    @classmethod
    def _node_list(cls, hier: Hierarchy, with_flat: bool) -> list[tuple[str, str | None]]:
        out = [(hier.nodes[n].dataset, n) for n in hier.classifier_nodes()]
        if with_flat:
            out.append((FLAT_DATASET, None))
        return out

    @classmethod
    def _check_node(cls, hier: Hierarchy, ds: str, nid: str | None, cfg_node: dict, fingerprint: str, folder: Path) -> None:
        expected = hier.nodes[nid].children if nid is not None else hier.leaves()
        if fingerprint != hier.fingerprint() or list(cfg_node["class_nodes"]) != list(expected):
            raise UserError(
                f"{folder} was trained for another hierarchy than {folder.parent / 'hierarchy.json'}; "
                f"retrain it: python3 src/train.py -d {ds}"
            )

    @classmethod
    def _load_torch(cls, models_dir, hier, doc, device, min_confidence, topk, with_flat):
        import torch

        from .artifacts import ArtifactError, backbone_key, build_torch_model, load_node
        from .runtime import TorchRunner

        shared_modules: dict = {}
        groups: dict = {}
        nodes: dict = {}
        flat = None
        for ds, nid in cls._node_list(hier, with_flat):
            folder = models_dir / ds
            if not (folder / "model.pth").exists():
                what = "the flat baseline" if nid is None else f"node '{nid}'"
                raise UserError(f"{folder / 'model.pth'} is missing ({what}); run: python3 src/train.py -d {ds}")
            try:
                art = load_node(folder)
            except ArtifactError as exc:
                raise UserError(str(exc)) from None
            cfg = art.config
            cls._check_node(hier, ds, nid, cfg["node"], cfg["hierarchy_fingerprint"], folder)
            backbone, head, own = build_torch_model(art, shared_modules)
            bb = cfg["backbone"]
            nm = NodeModel(ds, nid, art.classes, art.class_nodes, int(bb["image_size"]), bb["resize"], bool(cfg.get("tta")))
            if own:
                net = torch.nn.Sequential(backbone, head)
                nm.full = TorchRunner(net, device)
            else:
                key = backbone_key(cfg)
                group = groups.setdefault(key, f"bb{len(groups)}")
                nm.backbone = group
                nm.head = TorchRunner(head, device)
            if nid is None:
                flat = nm
            else:
                nodes[nid] = nm
        backbones = {g: (TorchRunner(shared_modules[k], device), k[1], k[2]) for k, g in groups.items()}
        return cls(hier, nodes, backbones, "torch", flat, min_confidence, topk)

    @classmethod
    def _load_onnx(cls, models_dir, hier, min_confidence, topk, with_flat):
        from .runtime import OrtRunner

        onnx_dir = models_dir / ONNX_DIR
        man = json.loads((onnx_dir / MANIFEST).read_text(encoding="utf-8"))

        def session(file: str, threads: int | None = None):
            try:
                return OrtRunner(onnx_dir / file, threads=threads)
            except Exception as exc:  # onnxruntime raises its own types for damaged files
                raise UserError(
                    f"{onnx_dir / file} is damaged ({type(exc).__name__}); run: python3 src/export.py --models-dir {models_dir}"
                ) from None

        backbones = {g: (session(b["file"]), int(b["image_size"]), b["resize"]) for g, b in man["backbones"].items()}
        nodes, flat = {}, None
        for ds, nid in cls._node_list(hier, with_flat):
            e = man["nodes"][ds]
            nm = NodeModel(ds, nid, e["classes"], e["class_nodes"], int(e["image_size"]), e["resize"], bool(e["tta"]))
            runner = session(e["file"], threads=1 if e["backbone"] else None)
            if e["backbone"]:
                nm.backbone, nm.head = e["backbone"], runner
            else:
                nm.full = runner
            if nid is None:
                flat = nm
            else:
                nodes[nid] = nm
        return cls(hier, nodes, backbones, "onnx", flat, min_confidence, topk)

    # ------------------------------------------------------------------ inference
    def input_specs(self) -> list[tuple[int, str]]:
        """Distinct (image size, resize policy) pairs the loaded models need."""
        specs = {(s, r) for _, s, r in self.backbones.values()}
        specs |= {(n.image_size, n.resize) for n in list(self.nodes.values()) + ([self.flat] if self.flat else []) if n.full}
        return sorted(specs)

    def _prepare(self, path: str) -> tuple[dict | None, str | None]:
        specs = self.input_specs()
        try:
            img = load_rgb(path, min_size=max(s for s, _ in specs) if specs else None)
        except ImageDecodeError as exc:
            return None, str(exc)
        return {spec: to_array(resize_for_model(img, spec[0], spec[1])) for spec in specs}, None

    def prepared_batches(self, paths: Sequence[str], batch_size: int = 32, workers: int = 2, progress: bool = False,
                         desc: str | None = None):
        """Decode and resize ``paths`` in a thread pool, batch by batch (``prefetch_batches`` ahead).

        Yields
        ------
        list of (int, dict or None, str or None)
            Per image of one batch: its index in ``paths``, its model inputs (see :meth:`predict_arrays`)
            or ``None``, and the decoding error or ``None``.
        """
        from tqdm import tqdm

        from .data import _bounded_map

        paths = [str(p) for p in paths]
        chunks = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
        bar = tqdm(total=len(paths), unit="img", disable=not progress, leave=False, desc=desc)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            if self.prefetch_batches:
                batches = _bounded_map(pool, lambda ch: [(i, *self._prepare(paths[i])) for i in ch], chunks,
                                       ahead=self.prefetch_batches)
            else:
                batches = ([(i, *r) for i, r in zip(ch, pool.map(lambda i: self._prepare(paths[i]), ch))] for ch in chunks)
            for prepared in batches:
                yield prepared
                bar.update(len(prepared))
        bar.close()

    def predict_paths(self, paths: Sequence[str], batch_size: int = 32, workers: int = 2,
                      progress: bool = False) -> list[Prediction]:
        """Predict every path (decoding in a thread pool, batches of ``batch_size``); never raises for a bad image.

        Selective mirror averaging is batched across batches: each batch is routed without the mirror
        first; the few images some node was unsure about are set aside with their features, and once a
        full batch of them has gathered (or at the end) their mirrors run in one pass and they are routed
        again with averaging. The results equal routing each batch with the mirror inline, at a fraction
        of the cost of many tiny mirror passes.
        """
        paths = [str(p) for p in paths]
        out: dict[int, Prediction] = {}
        waiting: list[tuple[int, dict, dict]] = []  # (index, inputs, {group: features (D,)})

        def flush():
            if waiting:
                feats = {g: np.stack([f[g] for _, _, f in waiting]) for g in waiting[0][2]}
                # every waiting image needs its mirror at the first node it was unsure about: one pass for all
                preds, _, _, _ = self._route([x for _, x, _ in waiting], [paths[i] for i, _, _ in waiting], None,
                                             mirror="all", feats=feats)
                out.update(zip([i for i, _, _ in waiting], preds))
                waiting.clear()

        for prepared in self.prepared_batches(paths, batch_size, workers, progress):
            for i, x, err in prepared:
                if x is None:
                    out[i] = Prediction(paths[i], complete=False, error=err)
            good = [(i, x) for i, x, _ in prepared if x is not None]
            preds, _, unsure, feats = self._route([x for _, x in good], [paths[i] for i, _ in good], None, mirror="defer")
            for row, ((i, x), pr) in enumerate(zip(good, preds)):
                if unsure[row]:
                    waiting.append((i, x, {g: f[row] for g, f in feats.items()}))
                else:
                    out[i] = pr
            if len(waiting) >= batch_size:
                flush()
        flush()
        return [out[i] for i in range(len(paths))]

    def predict_arrays(self, inputs: list[dict], names: list[str]) -> list[Prediction]:
        """Route a batch down the tree.

        Parameters
        ----------
        inputs : list of dict
            Per image, ``{(size, resize): float32 array (3, size, size)}`` for every :meth:`input_specs` entry.
        names : list of str
            What to put in ``Prediction.path``.
        """
        return self.predict_and_score(inputs, names)[0]

    def predict_and_score(self, inputs: list[dict], names: list[str],
                          score: dict | None = None) -> tuple[list[Prediction], dict]:
        """:meth:`predict_arrays`, plus chosen nodes' own class probabilities on chosen images.

        The extra scores reuse the batch's backbone pass; they do not depend on where the chain
        routed an image (evaluation uses them for each node's local accuracy).

        Parameters
        ----------
        inputs, names
            As for :meth:`predict_arrays`.
        score : dict, optional
            Classifier node id → int indices into ``inputs`` (shape ``(K,)``) to run that node on.

        Returns
        -------
        (list of Prediction, dict)
            The predictions of :meth:`predict_arrays`, and node id → float array ``(K, C)`` of the
            node's class probabilities, columns in ``self.nodes[id].class_nodes`` order.
        """
        preds, scores, _, _ = self._route(inputs, names, score, mirror="inline")
        return preds, scores

    def _route(self, inputs: list[dict], names: list[str], score: dict | None, mirror: str = "inline",
               feats: dict | None = None) -> tuple[list[Prediction], dict, np.ndarray, dict]:
        """Route a batch down the tree, with selective mirror averaging according to ``mirror``.

        ``"inline"``: run the mirror of the images a node is unsure about, when it is. ``"defer"``: never
        run a mirror pass, only flag the images that wanted one. ``"all"``: the caller knows every image
        will want its mirror, so the first mirror pass of a backbone covers the whole batch.

        Returns
        -------
        (list of Prediction, dict, numpy.ndarray, dict)
            Predictions, scores (as :meth:`predict_and_score`), a bool mask ``(n,)`` of the images some
            node (or the flat model) wanted the mirror for, and the backbone features computed,
            group → ``(n, D)``. ``feats`` (group → ``(n, D)``) passes features already computed.
        """
        n = len(inputs)
        if n == 0:
            return [], {}, np.zeros(0, dtype=bool), {}
        batch = {spec: np.stack([x[spec] for x in inputs]) for spec in self.input_specs()}
        feats = dict(feats or {})
        mirrored: dict = {}  # group -> (features (n, D), bool mask of rows computed)
        unsure = np.zeros(n, dtype=bool)

        def features(group: str) -> np.ndarray:
            if group not in feats:
                run, size, resize = self.backbones[group]
                feats[group] = np.asarray(run(batch[(size, resize)]), dtype=np.float32)
            return feats[group]

        def mirror_features(group: str, idx: np.ndarray) -> np.ndarray:
            """Features of the mirrored images ``idx``; each image's mirror is computed at most once."""
            run, size, resize = self.backbones[group]
            if group not in mirrored:
                mirrored[group] = (np.zeros_like(features(group)), np.zeros(n, dtype=bool))
            f, done = mirrored[group]
            todo = np.where(~done)[0] if mirror == "all" else idx[~done[idx]]
            if len(todo):
                f[todo] = run(np.ascontiguousarray(batch[(size, resize)][todo, :, :, ::-1]))
                done[todo] = True
            return f[idx]

        def node_probs(nm: NodeModel, idx: np.ndarray) -> np.ndarray:
            if nm.head is not None:
                p = _softmax(nm.head(features(nm.backbone)[idx]))
                if nm.tta and self.tta_below > 0:
                    # mirror averaging where it can matter: images this node is not already sure about
                    sel = np.arange(len(idx)) if self.tta_below >= 1 else np.where(p.max(axis=1) < self.tta_below)[0]
                    if len(sel) and mirror == "defer":
                        unsure[idx[sel]] = True
                    elif len(sel):
                        p[sel] = (p[sel] + _softmax(nm.head(mirror_features(nm.backbone, idx[sel])))) / 2
                return p
            return _softmax(nm.full(batch[(nm.image_size, nm.resize)][idx]))

        preds = [Prediction(names[i], confidence=1.0) for i in range(n)]
        current = np.array([ROOT_ID] * n, dtype=object)
        active = np.ones(n, dtype=bool)
        while active.any():
            for nid in sorted(set(current[active])):
                idx = np.where(active & (current == nid))[0]
                node = self.hier.nodes[nid]
                if not node.children:
                    active[idx] = False
                    continue
                if len(node.children) == 1:
                    probs = np.ones((len(idx), 1))
                    names_ = [self.hier.nodes[node.children[0]].name]
                    child_ids = node.children
                else:
                    nm = self.nodes[nid]
                    probs = node_probs(nm, idx)
                    names_, child_ids = nm.classes, nm.class_nodes
                k = min(self.topk, probs.shape[1])
                order = np.argsort(-probs, axis=1)
                for row, i in enumerate(idx):
                    best = order[row, 0]
                    pr = preds[i]
                    p = float(probs[row, best])
                    if self.min_confidence and pr.confidence * p < self.min_confidence:
                        pr.complete = False
                        active[i] = False
                        continue
                    pr.labels.append(names_[best])
                    pr.node_ids.append(child_ids[best])
                    pr.probs.append(p)
                    pr.confidence *= p
                    pr.topk.append([(names_[j], float(probs[row, j])) for j in order[row, :k]])
                    current[i] = child_ids[best]
        for pr in preds:
            if not pr.node_ids:
                pr.confidence = 1.0 if pr.complete else pr.confidence
        if self.flat is not None:
            fp = node_probs(self.flat, np.arange(n))
            for i, pr in enumerate(preds):
                j = int(fp[i].argmax())
                pr.flat_leaf, pr.flat_prob = self.flat.class_nodes[j], float(fp[i, j])
        scores = {}
        for nid, idx in (score or {}).items():
            idx = np.asarray(idx, dtype=np.int64)
            nm = self.nodes[nid]
            scores[nid] = node_probs(nm, idx) if len(idx) else np.zeros((0, len(nm.class_nodes)), np.float32)
        return preds, scores, unsure, feats

    def encoders(self) -> dict:
        """node id → {index: class name} (what the original printed as the encoder)."""
        return {nid: dict(enumerate(nm.classes)) for nid, nm in self.nodes.items()}


# ---------------------------------------------------------------------- ONNX export bookkeeping
def onnx_problem(models_dir: Path, hier: Hierarchy, with_flat: bool = False) -> str | None:
    """Why the ONNX export in ``models_dir/onnx`` cannot be used (``None`` if it can).

    The export is current only if every node's ``model.pth`` has the SHA-256 recorded at export time
    and the encoder pickles (read with the allow-list unpickler) agree with it.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    man_path = models_dir / ONNX_DIR / MANIFEST
    if not man_path.exists():
        return f"no ONNX export in {models_dir / ONNX_DIR}"
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
        if man.get("hierarchy_fingerprint") != hier.fingerprint():
            return "the ONNX export is for another hierarchy"
        wanted = [hier.nodes[n].dataset for n in hier.classifier_nodes()] + ([FLAT_DATASET] if with_flat else [])
        from .hierarchy import is_safe_folder_name
        from .images import RESIZE_POLICIES

        for ds in wanted:
            e = man["nodes"].get(ds)
            if e is None:
                return f"node '{ds}' is missing from the ONNX export"
            if not (is_safe_folder_name(e["file"]) and isinstance(e["classes"], list) and isinstance(e["class_nodes"], list)
                    and len(e["classes"]) == len(e["class_nodes"]) and e["resize"] in RESIZE_POLICIES
                    and int(e["image_size"]) >= 8 and (e["backbone"] is None or e["backbone"] in man["backbones"])):
                return f"the ONNX manifest entry of node '{ds}' is malformed"
            model = models_dir / ds / "model.pth"
            if not model.exists() or sha256_file(model) != e["model_sha256"]:
                return f"the ONNX export of node '{ds}' is older than its model.pth"
            if not (models_dir / ONNX_DIR / e["file"]).exists():
                return f"{e['file']} is missing from the ONNX export"
        for b in man["backbones"].values():
            if not is_safe_folder_name(b["file"]) or b["resize"] not in RESIZE_POLICIES or int(b["image_size"]) < 8:
                return "the ONNX manifest is malformed"
            if not (models_dir / ONNX_DIR / b["file"]).exists():
                return f"{b['file']} is missing from the ONNX export"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"the ONNX manifest is unreadable ({type(exc).__name__})"
    return None


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
