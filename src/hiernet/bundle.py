"""Every node model of a ``trained_models/`` folder, loaded once: the torch or the ONNX bundle.

:func:`load_bundle` reads ``model.pth`` files (torch runtime, ``weights_only=True``) or the ONNX
export (onnx runtime) into a :class:`ModelBundle`: the tree, one :class:`NodeModel` per classifier
node, and the shared backbones. The ONNX export's ``manifest.json`` has one schema,
:class:`OnnxManifest`: src/export.py writes it, :func:`onnx_problem` checks it before it is used.
This module imports torch only when the torch runtime is used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from .hierarchy import FLAT_DATASET, Hierarchy, display_names, is_safe_folder_name, require_hierarchy_json
from .images import RESIZE_POLICIES
from .safeio import UserError, sha256_file

#: How a leaf is chosen (``hiernet.predictor.PredictOptions.decision``), in the order preferred when
#: two are equally accurate: the level-by-level walk first (it runs only the nodes on the path).
DECISIONS = ("lcpn", "combined", "flat")

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
RUNTIMES = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "int8")


@dataclass
class NodeModel:
    """Runtime view of one classifier node.

    ``head`` maps ``(B, D)`` features to ``(B, C)`` logits (shared-backbone node); ``full`` maps
    ``(B, 3, S, S)`` images to logits (node with its own network). ``backbone`` names the shared
    backbone group for ``head`` nodes. Columns follow ``class_nodes`` (child ids), labelled ``classes``.
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


class Backbone(NamedTuple):
    """A shared backbone: ``run`` maps ``(B, 3, S, S)`` images to ``(B, D)`` features; S = ``image_size``."""

    run: Callable
    image_size: int
    resize: str


@dataclass
class ModelBundle:
    """All node models of one models folder.

    Attributes
    ----------
    hier : Hierarchy
    nodes : dict
        Classifier node id → :class:`NodeModel`.
    backbones : dict
        Backbone group name → :class:`Backbone`.
    runtime : str
        ``torch`` or ``onnx`` (or anything else for hand-built bundles).
    flat : NodeModel or None
        The flat baseline (all leaves at once), when loaded.
    device : str
        Where the torch runtime runs (``cpu`` for onnx).
    precision : str
        ``fp32`` or ``int8``: the shared backbones that run.
    display : dict
        Node id → the name shown to people (``hierarchy.json`` → ``display``; empty for trees prepared
        from folders, whose node names are shown).
    """

    hier: Hierarchy
    nodes: dict
    backbones: dict
    runtime: str
    flat: NodeModel | None = None
    device: str = "cpu"
    precision: str = "fp32"
    display: dict = field(default_factory=dict)

    def all_nodes(self) -> list[NodeModel]:
        """The classifier nodes, then the flat baseline if loaded."""
        return list(self.nodes.values()) + ([self.flat] if self.flat else [])

    def input_specs(self) -> list[tuple[int, str]]:
        """Distinct (image size, resize policy) pairs the models need."""
        specs = {(b[1], b[2]) for b in self.backbones.values()}
        specs |= {(n.image_size, n.resize) for n in self.all_nodes() if n.full}
        return sorted(specs)


def read_models_hierarchy(models_dir: Path) -> tuple[Hierarchy, dict]:
    """``trained_models/hierarchy.json`` → (tree, document), or one clear line saying what to run."""
    return require_hierarchy_json(models_dir / "hierarchy.json", f"no trained models in {models_dir}", "cd src && ./train_lcpn.sh")


def models_display(models_dir: Path) -> dict:
    """The display names of ``models_dir``'s ``hierarchy.json`` (:func:`hiernet.hierarchy.display_names`),
    ``{}`` when it is missing or unreadable (loading the models then says why)."""
    from .safeio import UserError

    try:
        hier, doc = read_models_hierarchy(Path(models_dir))
    except UserError:
        return {}
    return display_names(doc, hier)


def node_list(hier: Hierarchy, with_flat: bool) -> list[tuple[str, str | None]]:
    """(dataset folder, node id) of every classifier node, then ``("flat", None)`` if asked."""
    out = [(hier.nodes[n].dataset, n) for n in hier.classifier_nodes()]
    if with_flat:
        out.append((FLAT_DATASET, None))
    return out


def expected_class_nodes(hier: Hierarchy, node_id: str | None) -> list[str]:
    """The columns a node's model must have: its children (the leaves for the flat baseline)."""
    return list(hier.nodes[node_id].children) if node_id is not None else hier.leaves()


# ---------------------------------------------------------------------- the ONNX manifest
@dataclass
class OnnxNode:
    """One node's entry in the ONNX manifest (``backbone`` None: ``file`` is the whole network)."""

    file: str
    backbone: str | None
    classes: list
    class_nodes: list
    image_size: int
    resize: str
    tta: bool
    model_sha256: str

    def valid(self, backbones: dict) -> bool:
        """True when the entry is well-formed (and its backbone group exists in ``backbones``)."""
        return (is_safe_folder_name(self.file) and isinstance(self.classes, list) and isinstance(self.class_nodes, list)
                and len(self.classes) == len(self.class_nodes) and self.resize in RESIZE_POLICIES
                and int(self.image_size) >= 8 and (self.backbone is None or self.backbone in backbones))


@dataclass
class OnnxBackbone:
    """One shared backbone's entry in the ONNX manifest; ``int8_file``: its int8 version (the one its
    heads were trained on), when they were trained with int8 features."""

    file: str
    image_size: int
    resize: str
    int8_file: str | None = None

    def valid(self) -> bool:
        return (is_safe_folder_name(self.file) and self.resize in RESIZE_POLICIES and int(self.image_size) >= 8
                and (self.int8_file is None or is_safe_folder_name(self.int8_file)))

    def files(self) -> list[str]:
        return [self.file] + ([self.int8_file] if self.int8_file else [])


@dataclass
class OnnxManifest:
    """``trained_models/onnx/manifest.json``: what src/export.py wrote and :func:`load_bundle` reads.

    ``nodes`` maps a node's dataset folder to its :class:`OnnxNode`, ``backbones`` a group name to its
    :class:`OnnxBackbone`; ``max_abs_diff`` is the largest torch/onnxruntime probability difference
    measured at export time. ``precision`` (``fp32`` or ``int8``) is the backbone prediction uses by
    default: int8 when the heads were trained on int8 features and the export's guard (``guard``: the
    validation split's leaf accuracy with each backbone) kept it. ``decision`` is what ``--decision auto``
    uses (:func:`chosen_decision`): ``{"chosen", "leaf_accuracy": {decision: accuracy}, "n_images",
    "precision"}``, the decision with the best leaf accuracy on the validation split.
    """

    hierarchy_fingerprint: str
    backbones: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)
    max_abs_diff: float | None = None
    torch_version: str | None = None
    version: int = MANIFEST_VERSION
    precision: str = "fp32"
    guard: dict | None = None
    decision: dict | None = None

    def to_dict(self) -> dict:
        d = {"version": self.version, "hierarchy_fingerprint": self.hierarchy_fingerprint, "precision": self.precision,
             "backbones": {g: vars(b) for g, b in self.backbones.items()},
             "nodes": {ds: vars(e) for ds, e in self.nodes.items()}}
        for name in ("max_abs_diff", "torch_version", "guard", "decision"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OnnxManifest":
        """Parse a manifest document; raises KeyError/TypeError/ValueError when it is malformed."""
        precision = d.get("precision", "fp32")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"unknown precision {precision!r}")
        return cls(d["hierarchy_fingerprint"], {g: OnnxBackbone(**b) for g, b in d["backbones"].items()},
                   {ds: OnnxNode(**e) for ds, e in d["nodes"].items()}, d.get("max_abs_diff"), d.get("torch_version"),
                   d.get("version", MANIFEST_VERSION), precision, d.get("guard"), d.get("decision"))

    @classmethod
    def read(cls, models_dir: Path) -> "OnnxManifest":
        return cls.from_dict(json.loads((models_dir / ONNX_DIR / MANIFEST).read_text(encoding="utf-8")))

    def problem(self, models_dir: Path, hier: Hierarchy, with_flat: bool) -> str | None:
        """Why this export cannot serve ``hier`` from ``models_dir`` (``None`` if it can)."""
        if self.hierarchy_fingerprint != hier.fingerprint():
            return "the ONNX export is for another hierarchy"
        for ds, nid in node_list(hier, with_flat):
            e = self.nodes.get(ds)
            if e is None:
                return f"node '{ds}' is missing from the ONNX export"
            if not e.valid(self.backbones) or list(e.class_nodes) != expected_class_nodes(hier, nid):
                return f"the ONNX manifest entry of node '{ds}' is malformed"
            model = models_dir / ds / "model.pth"
            if not model.exists() or model_sha256(model) != e.model_sha256:
                return f"the ONNX export of node '{ds}' is older than its model.pth"
            if not (models_dir / ONNX_DIR / e.file).exists():
                return f"{e.file} is missing from the ONNX export"
        for b in self.backbones.values():
            if not b.valid():
                return "the ONNX manifest is malformed"
            for f in b.files():
                if not (models_dir / ONNX_DIR / f).exists():
                    return f"{f} is missing from the ONNX export"
        return None


#: SHA-256 of the model.pth files this process has hashed (:func:`model_sha256`).
_MODEL_DIGESTS: dict[tuple, str] = {}


def model_sha256(path: Path) -> str:
    """:func:`hiernet.safeio.sha256_file` of a ``model.pth``, computed once per version of the file in this
    process: export records it, loading checks the export's currency more than once (``--decision auto``,
    then the bundle), evaluation fingerprints the models, and a serving process checks on every reload. The key is what any rewrite or replacement of the file changes
    (device, inode, size, modification and change times)."""
    st = Path(path).stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _MODEL_DIGESTS:
        if len(_MODEL_DIGESTS) >= 4096:  # a long-lived service sees every retrained version: stay bounded
            _MODEL_DIGESTS.clear()
        _MODEL_DIGESTS[key] = sha256_file(path)
    return _MODEL_DIGESTS[key]


def onnx_problem(models_dir: Path, hier: Hierarchy, with_flat: bool = False) -> str | None:
    """Why the ONNX export in ``models_dir/onnx`` cannot be used (``None`` if it can).

    The export is current only if every node's ``model.pth`` has the SHA-256 recorded at export time.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    if not (models_dir / ONNX_DIR / MANIFEST).exists():
        return f"no ONNX export in {models_dir / ONNX_DIR}"
    try:
        return OnnxManifest.read(models_dir).problem(models_dir, hier, with_flat)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"the ONNX manifest is unreadable ({type(exc).__name__})"


def chosen_decision(models_dir: Path) -> tuple[str, dict | None]:
    """What ``--decision auto`` means for ``models_dir``: the decision the ONNX export chose on the
    validation split (``OnnxManifest.decision``), while that export (flat baseline included) is current;
    else ``lcpn``.

    Returns
    -------
    (str, dict or None)
        The decision (``lcpn``, ``flat`` or ``combined``) and the manifest's record behind it (``None``
        when there is none to follow).
    """
    models_dir = Path(models_dir)
    try:
        hier, _ = read_models_hierarchy(models_dir)
        if onnx_problem(models_dir, hier, with_flat=True) is not None:
            return "lcpn", None
        record = OnnxManifest.read(models_dir).decision
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return "lcpn", None
    if not isinstance(record, dict) or record.get("chosen") not in DECISIONS:
        return "lcpn", None
    return str(record["chosen"]), record


def decision_accuracies(record: dict) -> str:
    """A decision record's validation leaf accuracies as one phrase: ``"lcpn 90.98 %, flat 90.25 %"``."""
    return ", ".join(f"{k} {100 * v:.2f} %" for k, v in record.get("leaf_accuracy", {}).items())


# ---------------------------------------------------------------------- loading
def choose_runtime(runtime: str, device: str) -> str:
    """The runtime ``auto`` means on ``device``: ``"torch"`` on a GPU (``cuda``, ``cuda:N``, ``mps``; the
    ONNX export runs on the CPU), else ``"auto"`` (ONNX when exported and current, else torch). Other
    runtimes are returned unchanged."""
    if runtime == "auto" and str(device) != "cpu":
        return "torch"
    return runtime


def load_bundle(models_dir: str | Path, runtime: str = "auto", device: str = "cpu", with_flat: bool = False,
                precision: str = "auto") -> ModelBundle:
    """Load every node of ``models_dir`` with ``runtime`` ``auto`` (on a GPU ``device``: torch there; else
    ONNX when exported and current, else torch), ``torch`` or ``onnx``; ``with_flat`` also loads the flat baseline.

    ``precision`` picks the shared backbones: ``auto`` = the export's (int8 when the heads were trained
    on int8 features and the export's guard kept it) on a CPU, fp32 on another device or in torch;
    ``int8`` needs the ONNX export of int8-trained models; ``fp32`` always works.

    Raises
    ------
    UserError
        Missing or inconsistent models, with the command that fixes it.
    """
    models_dir = Path(models_dir)
    hier, doc = read_models_hierarchy(models_dir)
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; use auto, torch or onnx")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use auto, fp32 or int8")
    runtime = choose_runtime(runtime, device)
    if precision == "int8" and runtime == "torch":
        raise UserError("--precision int8 runs in onnxruntime on the CPU only; use --runtime onnx (or auto) "
                        "with --device cpu, or --precision fp32")
    if precision == "auto" and str(device) != "cpu":
        precision = "fp32"
    problem = onnx_problem(models_dir, hier, with_flat) if runtime in ("auto", "onnx") else "torch asked for"
    if problem is None:
        bundle = load_onnx_bundle(models_dir, hier, with_flat, precision)
    elif runtime in ("auto", "onnx"):
        if runtime == "onnx" or precision == "int8":
            raise UserError(f"{problem}; run: python3 src/export.py --models-dir {models_dir}")
        bundle = load_torch_bundle(models_dir, hier, device, with_flat)  # said only once it loaded
        log.warning("note: predicting with PyTorch, several times slower than onnxruntime (%s); "
                    "run: python3 src/export.py --models-dir %s", problem, models_dir.resolve())
    else:
        bundle = load_torch_bundle(models_dir, hier, device, with_flat)
    display = display_names(doc, hier)
    if display:  # a catalogue's original names (the bundle's default: none)
        bundle.display = display
    return bundle


def _load_artifact(folder: Path, hier: Hierarchy, ds: str, nid: str | None):
    """``folder``'s checked node artifact; one line naming the command when missing or for another tree."""
    from .artifacts import ArtifactError, load_node

    if not (folder / "model.pth").exists():
        what = "the flat baseline" if nid is None else f"node '{nid}'"
        raise UserError(f"{folder / 'model.pth'} is missing ({what}); run: python3 src/train.py -d {ds}")
    try:
        art = load_node(folder)
    except ArtifactError as exc:
        raise UserError(str(exc)) from None
    cfg = art.config
    # A model that records its node fingerprint (incremental training) is valid wherever its classes are
    # the node's children: parts of the tree outside its subtree may have changed since. Older ones must
    # come from this very tree.
    other_tree = "fingerprint" not in cfg and cfg["hierarchy_fingerprint"] != hier.fingerprint()
    if other_tree or list(cfg["node"]["class_nodes"]) != expected_class_nodes(hier, nid):
        raise UserError(
            f"{folder} was trained for another hierarchy than {folder.parent / 'hierarchy.json'}; "
            f"retrain it: python3 src/train.py -d {ds}"
        )
    return art


def load_torch_bundle(models_dir: Path, hier: Hierarchy, device: str = "cpu", with_flat: bool = False) -> ModelBundle:
    """The torch bundle: each ``model.pth`` (``weights_only=True``); frozen backbones built once and shared.

    Torch runners expose their module as ``.module`` (what src/export.py exports).
    """
    import torch

    from .artifacts import backbone_key, build_torch_model
    from .runtime import TorchRunner

    shared_modules: dict = {}
    groups: dict = {}
    bundle = ModelBundle(hier, {}, {}, "torch", None, str(device))
    split_ids: dict = {}
    for ds, nid in node_list(hier, with_flat):
        art = _load_artifact(models_dir / ds, hier, ds, nid)
        cfg = art.config
        split_ids[ds] = (cfg.get("split") or {}).get("id") if isinstance(cfg.get("split"), dict) else None
        backbone, head, own = build_torch_model(art, shared_modules)
        bb = cfg["backbone"]
        nm = NodeModel(ds, nid, art.classes, art.class_nodes, int(bb["image_size"]), bb["resize"], bool(cfg.get("tta")))
        if own:
            nm.full = TorchRunner(torch.nn.Sequential(backbone, head), device)
        else:
            key = backbone_key(cfg)
            nm.backbone = groups.setdefault(key, f"bb{len(groups)}")
            nm.head = TorchRunner(head, device)
        _add_node(bundle, nm)
    bundle.backbones = {g: Backbone(TorchRunner(shared_modules[k], device), k[1], k[2]) for k, g in groups.items()}
    check_one_split(models_dir, split_ids)
    return bundle


def check_one_split(models_dir: Path, split_ids: dict) -> None:
    """Refuse models trained on different train/val/test splits (one's test images may be another's training ones).

    Parameters
    ----------
    split_ids : dict
        Node dataset → the split identity its ``model.pth`` records (``config["split"]["id"]``), or
        ``None`` for models of older versions (allowed, with one warning: they cannot be checked).
    """
    known = {ds: sid for ds, sid in split_ids.items() if sid is not None}
    unknown = sorted(ds for ds, sid in split_ids.items() if sid is None)
    if len(set(known.values())) > 1:
        by_split: dict = {}
        for ds, sid in known.items():
            by_split.setdefault(sid, []).append(ds)
        shown = "; ".join(f"split {sid}: {', '.join(nodes)}" for sid, nodes in sorted(by_split.items()))
        raise UserError(f"the models in {models_dir.resolve()} were trained on different splits of the data ({shown}); "
                        "retrain them on one prepared dataset: ./train_lcpn.sh")
    if unknown and known:
        log.warning("warning: node(s) %s of %s record no split (trained by an older version); "
                    "cannot check they share the other nodes' split", ", ".join(unknown), models_dir)


def load_onnx_bundle(models_dir: Path, hier: Hierarchy, with_flat: bool = False, precision: str = "auto") -> ModelBundle:
    """The onnxruntime bundle from ``models_dir/onnx`` (check it first with :func:`onnx_problem`)."""
    return onnx_bundle(Path(models_dir) / ONNX_DIR, OnnxManifest.read(models_dir), hier, with_flat, precision)


def onnx_bundle(onnx_dir: Path, man: OnnxManifest, hier: Hierarchy, with_flat: bool = False,
                precision: str = "auto") -> ModelBundle:
    """The onnxruntime bundle of the export in ``onnx_dir`` described by ``man``, with the ``precision``
    backbones (``auto``: ``man.precision``)."""
    from .runtime import OrtRunner

    models_dir = onnx_dir.parent
    precision = man.precision if precision == "auto" else precision
    if precision == "int8" and not all(b.int8_file for b in man.backbones.values()):
        raise UserError(f"the models in {models_dir} were not trained with int8 features (no int8 backbone); "
                        "use --precision fp32 or auto, or retrain with --precision int8")

    def session(file: str, threads: int | None = None):
        try:
            return OrtRunner(onnx_dir / file, threads=threads)
        except Exception as exc:  # onnxruntime raises its own types for damaged files
            raise UserError(
                f"{onnx_dir / file} is damaged ({type(exc).__name__}); run: python3 src/export.py --models-dir {models_dir}"
            ) from None

    bundle = ModelBundle(hier, {}, {}, "onnx", None, "cpu", precision)
    bundle.backbones = {g: Backbone(session(b.int8_file if precision == "int8" else b.file), int(b.image_size), b.resize)
                        for g, b in man.backbones.items()}
    for ds, nid in node_list(hier, with_flat):
        e = man.nodes[ds]
        nm = NodeModel(ds, nid, e.classes, e.class_nodes, int(e.image_size), e.resize, bool(e.tta))
        runner = session(e.file, threads=1 if e.backbone else None)
        if e.backbone:
            nm.backbone, nm.head = e.backbone, runner
        else:
            nm.full = runner
        _add_node(bundle, nm)
    return bundle


def _add_node(bundle: ModelBundle, nm: NodeModel) -> None:
    if nm.node_id is None:
        bundle.flat = nm
    else:
        bundle.nodes[nm.node_id] = nm
