"""Train one node (or the flat baseline) end to end and write its folder in ``trained_models/``.

The public steps, composed by :func:`train_node`:

1. :func:`load_node_data` — the node's prepared splits, labels and (optional) leaf-level targets;
2. inputs: :func:`frozen_inputs` (``mode="frozen"``, the default, fast on a CPU: a shared ImageNet
   backbone, frozen; each image's features and those of a few augmented views come from the feature
   cache, :func:`node_features`; only a small head is trained) or :func:`finetune_inputs`
   (``mode="finetune"``, the original GPU recipe: the whole network is trained on images);
3. :func:`fit_head` — train (early stopping, resumable), then :func:`calibrate_head` (frozen mode);
4. :func:`evaluate_node` — the node's own test split;
5. :func:`write_node_folder` — ``model.pth`` (with the :class:`~hiernet.config.TrainConfig`), plots, metrics.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from . import distributed as dist_utils
from .artifacts import publish, save_checkpoint, staging_dir
from .backbones import create_backbone
from .config import FitConfig, HeadConfig, TrainConfig
from .data import read_split
from .features import (INT8_PIN, TREE_STATS, cached_features, config_hash, int8_feature_backbone, pin_int8_backbone,
                       pin_tree_stats, tree_feature_stats, tree_training_images)
from .engine import FitResult, fit, logit_adjustment, predict_logits_sharded, write_csv
from .hierarchy import FLAT_DATASET, Hierarchy, display_names, require_hierarchy_json
from .images import ImageDecodeError, load_rgb, resize_for_model, to_array
from .metrics import classification_summary, expected_calibration_error, text_report
from .models import FeatureExtractor, Head, NodeNet
from .routing import average_views, softmax
from .safeio import UserError, exclusive_lock, pickle_atomic, write_json_atomic, write_text_atomic
from .incremental import node_fingerprint
from .splits import split_identity

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images with labels for fine-tuning: augmented views when ``train``, the evaluation input otherwise.

    Yields ``(float tensor (3, S, S) in [0, 1], label)``. An image that fails to decode is replaced by
    the next one (with a warning) so a file damaged after prepare_dataset.py cannot stop a run.
    """

    #: :func:`hiernet.engine.fit` passes ``(index, epoch)`` pairs (the epoch reaches worker processes).
    indices_carry_epoch = True

    def __init__(self, items: list[tuple[Path, int]], size: int, policy: str, train: bool, seed: int = 0):
        self.items, self.size, self.policy, self.train, self.seed, self.epoch = items, size, policy, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item):
        """``item``: an index, or ``(index, epoch)`` from :class:`hiernet.engine.EpochSampler` (worker
        processes do not see :meth:`set_epoch`)."""
        i, epoch = item if isinstance(item, tuple) else (item, self.epoch)
        for k in range(len(self.items)):
            path, label = self.items[(i + k) % len(self.items)]
            try:
                img = load_rgb(path, min_size=self.size)
                break
            except ImageDecodeError as exc:
                log.warning("skipped %s: %s", path, exc)
        else:  # pragma: no cover - every image broken
            raise UserError("no image of this dataset can be decoded")
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, i])
            from .data import augment

            img = augment(img, self.size, rng)
        else:
            img = resize_for_model(img, self.size, self.policy)
        return torch.from_numpy(to_array(img)), label


# ----------------------------------------------------------------------------------- 1. the node's data
@dataclass
class NodeData:
    """One prepared node dataset.

    Attributes
    ----------
    splits : dict
        ``{"train"|"val"|"test": [(path, class index), ...]}``.
    fine_leaves, group : list or None
        For a node trained on the leaves below it: the ``K`` leaves and the ``(K, C)`` 0/1 matrix
        (:meth:`hiernet.hierarchy.Hierarchy.fine_label_matrix`); else ``None``.
    targets : dict
        ``{split: (N,) int64}`` training targets: leaf indices with ``group``, else class indices. With
        ``group``, a partial-label image (labelled down to an inner node) has the set target ``-1 - s``:
        row ``s`` of ``target_sets``.
    target_sets : list or None
        ``(S, K)`` 0/1 rows, the leaves below each partial label's node
        (:class:`hiernet.engine.SetTargetLoss`); ``None`` when there are none.
    """

    dataset: str
    node_id: str | None
    classes: list
    class_nodes: list
    splits: dict
    fine_leaves: list | None
    group: list | None
    targets: dict
    hier: Hierarchy
    doc: dict
    data_dir: Path | None = None
    target_sets: list | None = None

    def labels(self, split: str) -> np.ndarray:
        """``(N,)`` class (child) indices of a split."""
        return np.array([y for _, y in self.splits[split]], dtype=np.int64)

    def paths(self, split: str) -> list:
        return [p for p, _ in self.splits[split]]

    @property
    def n_outputs(self) -> int:
        """Outputs the head is trained on: leaves with ``group``, else classes."""
        return len(self.classes) if self.fine_leaves is None else len(self.fine_leaves)


def load_prepared(data_dir: Path) -> tuple[Hierarchy, dict]:
    """The tree and ``hierarchy.json`` document of a prepared datasets folder (one line if missing)."""
    return require_hierarchy_json(data_dir / "hierarchy.json", f"no prepared datasets in {data_dir}",
                                  f"python3 prepare_dataset.py -p YOUR_DATASET -o {data_dir}")


def load_node_data(data_dir: Path, ds: str, fine_labels: bool = True) -> NodeData:
    """Read node dataset ``ds`` (or ``"flat"``) of ``data_dir``; refuse nodes that cannot be trained."""
    hier, doc = load_prepared(data_dir)
    if ds == FLAT_DATASET:
        info, node_id = doc["flat"], None
    elif ds in doc["datasets"]:
        info, node_id = doc["datasets"][ds], doc["datasets"][ds]["node"]
    else:
        known = ", ".join(list(doc["datasets"]) + [FLAT_DATASET])
        raise UserError(f"no dataset {ds!r} in {data_dir}; choose one of: {known}")
    classes, class_nodes = list(info["classes"]), list(info["class_nodes"])
    splits = {s: read_split(data_dir / ds / s, classes) for s in ("train", "val", "test")}
    if not splits["train"]:
        raise UserError(f"{data_dir / ds / 'train'} has no images; rerun prepare_dataset.py")
    present = sorted({classes[y] for _, y in splits["train"]})
    if len(present) < 2:
        raise UserError(f"node {ds!r} has training images for only {present}; a classifier needs two classes")
    fine = fine_label_targets(hier, doc, node_id, class_nodes) if fine_labels else None
    if fine is None:
        targets = {s: np.array([y for _, y in items], dtype=np.int64) for s, items in splits.items()}
        return NodeData(ds, node_id, classes, class_nodes, splits, None, None, targets, hier, doc, data_dir)
    targets, sets = leaf_targets(hier, doc, fine[0], splits)
    return NodeData(ds, node_id, classes, class_nodes, splits, fine[0], fine[1], targets, hier, doc, data_dir,
                    sets or None)


def fine_label_targets(hier: Hierarchy, doc: dict, node_id: str | None, class_nodes: list[str]):
    """The leaves and ``(K leaves, C children)`` matrix a fine-label node trains on, or ``None`` to train
    on its children: for the flat dataset and nodes whose children are all leaves. Partial-label images
    below the node train it with set targets (:func:`leaf_targets`)."""
    if node_id is None:
        return None
    return hier.fine_label_matrix(node_id, class_nodes)


def leaf_targets(hier: Hierarchy, doc: dict, leaves: list[str], splits: dict) -> tuple[dict, list]:
    """Fine-label targets of a node's ``splits`` over its ``leaves`` (``K``).

    An image with a leaf label gets that leaf's index; a partial-label image (``doc["partial_images"]``,
    labelled down to inner node B) gets the set target ``-1 - s``, row ``s`` of the returned ``(S, K)``
    0/1 sets holding the leaves below B (one row per such node).

    Returns
    -------
    (dict, list)
        ``{split: (N,) int64}`` and the sets (``[]`` without partial labels).
    """
    leaf_of_file = {im["file"]: im["leaf"] for im in doc["images"]}
    node_of_file = {im["file"]: im["node"] for im in doc.get("partial_images", [])}
    index = {leaf: k for k, leaf in enumerate(leaves)}
    sets, set_index = [], {}

    def target(name: str) -> int:
        if name in leaf_of_file:
            return index[leaf_of_file[name]]
        node = node_of_file[name]
        if node not in set_index:
            below = set(hier.subtree_leaves(node))
            row = [1.0 if leaf in below else 0.0 for leaf in leaves]
            if not any(row):
                raise UserError(f"partial label {node!r} has no leaf among {leaves}; rerun prepare_dataset.py")
            set_index[node] = len(sets)
            sets.append(row)
        return -1 - set_index[node]

    targets = {s: np.array([target(p.name) for p, _ in items], dtype=np.int64) for s, items in splits.items()}
    return targets, sets


def make_head(cfg: HeadConfig, in_dim: int, n_classes: int, group=None) -> Head:
    """A :class:`~hiernet.models.Head` ``(N, in_dim) → (N, n_classes)``; with ``group`` ``(K, C)`` it
    is trained on ``K`` leaf outputs (see :meth:`hiernet.hierarchy.Hierarchy.fine_label_matrix`)."""
    g = None if group is None else torch.tensor(group, dtype=torch.float32)
    return Head(in_dim, n_classes, cfg.hidden, cfg.dropout, g)


# ----------------------------------------------------------------------------------- 2. inputs
@dataclass
class NodeInputs:
    """What training and evaluating a node needs, whichever strategy built it.

    ``test_mirror`` ``(M, D)``: features of the mirrored test images (mirror averaging), or ``None``;
    ``val_x``/``val_children``: validation features ``(V, D)`` and class indices for calibration, or ``None``;
    ``val_mirror`` ``(V, D)``: the mirrored validation images' features when prediction mirror-averages.
    """

    model: torch.nn.Module
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    train_labels: np.ndarray
    test_paths: list
    trains_backbone: bool
    test_mirror: np.ndarray | None = None
    val_x: np.ndarray | None = None
    val_children: np.ndarray | None = None
    int8_model: Path | None = None
    tree_stats: dict | None = None
    val_mirror: np.ndarray | None = None


def node_features(cfg: TrainConfig, backbone: FeatureExtractor, data: NodeData, device: str,
                  cache_dir: Path | None, progress: bool, int8_pin: Path | None = None) -> dict:
    """Cached features of a node's splits.

    Returns
    -------
    dict
        ``{split: (features (N', 2, D), ok mask (N,))}`` for train/val/test (view 1 is the mirror), and
        ``"aug"``: ``(N', views, D)`` augmented training views and their mask when ``cfg.views > 0``.
        With ``cfg.precision == "int8"`` the features come from the int8 backbone (built first if it is
        not cached yet, or the one ``int8_pin`` names), whose file is ``out["int8_model"]``.
    """
    out = {}
    int8 = None
    if cfg.precision == "int8":
        int8 = int8_feature_backbone(backbone, cfg.resize, cache_dir, tree_training_images(data.data_dir, data.doc),
                                     cfg.fit.seed, int8_pin)
        out["int8_model"] = int8
    for s in ("train", "val", "test"):
        f, ok = cached_features(data.paths(s), backbone, cfg.resize, device, cache_dir, "eval", 0, cfg.fit.seed,
                                progress, cfg.onnx, cfg.augment, cfg.precision, int8)
        out[s] = (f[ok], ok)
    if cfg.views > 0:
        f, ok = cached_features(data.paths("train"), backbone, cfg.resize, device, cache_dir, "aug", cfg.views,
                                cfg.fit.seed, progress, cfg.onnx, cfg.augment, cfg.precision, int8)
        out["aug"] = (f[ok], ok)
    return out


def feature_sets(head: Head, train_views: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 stats: tuple | None = None):
    """Training and validation sets of features; fits ``head``'s standardiser on the training ones (or
    sets it to ``stats``, the tree's ``(mean (D,), std (D,))``, :func:`tree_feature_stats`).

    Parameters
    ----------
    train_views : numpy.ndarray, shape (N, V, D)
        Every view of a training image is one sample with that image's target ``train_y`` ``(N,)``.
    val_x, val_y : numpy.ndarray, shapes (M, D) and (M,)

    Returns
    -------
    (TensorDataset, TensorDataset, numpy.ndarray)
        Train set ``(N*V, D)``, validation set, and the ``(N*V,)`` training targets.
    """
    n_v, dim = train_views.shape[1], train_views.shape[2]
    train_x = torch.from_numpy(train_views.reshape(-1, dim))
    ys = torch.from_numpy(np.repeat(train_y, n_v))
    head.fit_standardizer(train_x, stats)
    return TensorDataset(train_x, ys), TensorDataset(torch.from_numpy(val_x), torch.from_numpy(val_y)), ys.numpy()


def frozen_inputs(cfg: TrainConfig, backbone: FeatureExtractor, head: Head, data: NodeData, device: str,
                  cache_dir: Path | None, progress: bool, int8_pin: Path | None = None) -> NodeInputs:
    """The head alone, trained on cached features of the frozen backbone (``int8_pin``: see :func:`node_features`;
    the tree's standardisation statistics are pinned beside it, :func:`tree_feature_stats`)."""
    backbone.requires_grad_(False)
    feats = node_features(cfg, backbone, data, device, cache_dir, progress, int8_pin)
    (xs, ok_tr), (xv, ok_v), (xt, ok_t) = feats["train"], feats["val"], feats["test"]
    if "aug" in feats:
        xs = np.concatenate([xs, feats["aug"][0]], axis=1)
    stats = None
    if cfg.head.standardize == "tree":
        stats = tree_feature_stats(cfg, backbone, data, device, cache_dir, progress, feats.get("int8_model"),
                                   None if int8_pin is None else int8_pin.parent / TREE_STATS)
    train_set, val_set, train_labels = feature_sets(head, xs, data.targets["train"][ok_tr], xv[:, 0],
                                                    data.targets["val"][ok_v],
                                                    None if stats is None else (stats["mean"], stats["std"]))
    test_set = TensorDataset(torch.from_numpy(xt[:, 0]), torch.from_numpy(data.labels("test")[ok_t]))
    return NodeInputs(head, train_set, val_set, test_set, train_labels,
                      [p for p, k in zip(data.paths("test"), ok_t) if k], False,
                      test_mirror=xt[:, 1] if cfg.tta else None, val_x=xv[:, 0], val_children=data.labels("val")[ok_v],
                      int8_model=feats.get("int8_model"), tree_stats=stats, val_mirror=xv[:, 1] if cfg.tta else None)


def finetune_inputs(cfg: TrainConfig, backbone: FeatureExtractor, head: Head, data: NodeData, device: str,
                    cache_dir: Path | None, progress: bool, int8_pin: Path | None = None) -> NodeInputs:
    """Backbone and head trained together on (augmented) images."""
    size, seed = backbone.image_size, cfg.fit.seed
    relabel = {s: [(p, int(y)) for (p, _), y in zip(data.splits[s], data.targets[s])] for s in ("train", "val")}
    return NodeInputs(NodeNet(backbone, head), ImageDataset(relabel["train"], size, cfg.resize, True, seed),
                      ImageDataset(relabel["val"], size, cfg.resize, False),
                      ImageDataset(data.splits["test"], size, cfg.resize, False), data.targets["train"],
                      data.paths("test"), True)


#: How each ``TrainConfig.mode`` builds a node's inputs.
STRATEGIES = {"frozen": frozen_inputs, "finetune": finetune_inputs}


# ----------------------------------------------------------------------------------- 3. fit, 4. evaluate
def fit_head(model: torch.nn.Module, head: Head, train_set: Dataset, val_set: Dataset, train_labels: np.ndarray,
             cfg: FitConfig, device: str, work_dir: Path, config_hash: str, progress: bool = True,
             target_sets: list | None = None) -> FitResult:
    """Train ``model`` (the head, or backbone + head) on the head's fine outputs; the head then aggregates.

    ``train_labels`` ``(N,)``: the targets of ``train_set`` (for class weights, and the output bias's start at
    their log prior with ``cfg.prior_bias``); ``target_sets``: the sets of its set targets
    (:attr:`NodeData.target_sets`). See :func:`hiernet.engine.fit`.
    """
    head.aggregate = False  # train on the fine (leaf) targets when there are any
    if cfg.prior_bias:
        head.init_prior_bias(train_labels, cfg.logit_adjust)
    result = fit(model, train_set, val_set, train_labels, head.net[-1].out_features, cfg, device, work_dir,
                 config_hash, progress=progress, target_sets=target_sets)
    head.aggregate = True
    return result


def flat_classifier(cfg: TrainConfig, ds: str, classes: list, backbone: FeatureExtractor) -> dict:
    """The tuned classifier ``cfg.flat_classifier`` (:func:`hiernet.tailtune.load_classifier`), checked against
    what it will be the head of: the flat baseline (``ds``), frozen mode, a linear head, the same leaves
    ``classes`` in the same order, and features of the backbone it was tuned with.

    Raises
    ------
    UserError
        One line saying which of these does not hold and what to run.
    """
    from .tailtune import load_classifier

    path = cfg.flat_classifier
    if ds != FLAT_DATASET:
        raise UserError(f"--flat-classifier is the flat baseline's head; use it with -d {FLAT_DATASET}, not -d {ds}")
    if not cfg.frozen or cfg.head.hidden:
        raise UserError("--flat-classifier is a linear head on frozen features; drop --mode finetune and --hidden")
    clf = load_classifier(path)
    again = "tune again on this tree: python3 src/tune_backbone.py (or train_lcpn.sh --tune-backbone NAME)"
    if clf["classes"] != list(classes):
        raise UserError(f"{path} classifies other leaves ({len(clf['classes'])}) than this tree's flat dataset "
                        f"({len(classes)}); {again}")
    if clf["weight"].shape[1] != backbone.spec.feature_dim or clf["weights_fingerprint"] != backbone.weights_fingerprint:
        raise UserError(f"{path} was tuned with other backbone weights than {cfg.backbone} with --weights "
                        f"{cfg.weights or '(ImageNet)'}; pass the classifier file written beside those weights, or {again}")
    return clf


#: Post-hoc logit adjustment strengths the tuned classifier's validation split chooses from (0: none).
PRIOR_TAUS = tuple(round(0.1 * i, 1) for i in range(11))  # 0, 0.1, ..., 1: chosen by cross-validation (README)


def adjust_for_prior(head: Head, train_labels: np.ndarray, val_x: np.ndarray | None, val_y: np.ndarray | None,
                     val_mirror: np.ndarray | None = None) -> float:
    """Post-hoc logit adjustment of a linear head (Menon et al. 2021): its bias minus ``tau * log(prior)`` of
    the training classes, ``tau`` from :data:`PRIOR_TAUS` with the best validation leaf accuracy (the
    smallest among equals; 0 without a validation split), the images' decisions made as prediction makes
    them (mirror-averaged probabilities when ``val_mirror`` is given). Rare classes get a fair share of the
    decisions without costing the frequent ones more than the validation split allows.

    Parameters
    ----------
    train_labels : numpy.ndarray, shape (N,)
        Class indices of the training samples (their frequencies are the prior).
    val_x, val_y : numpy.ndarray, shapes (V, D) and (V,)
    val_mirror : numpy.ndarray, shape (V, D), optional
        Features of the mirrored validation images.

    Returns
    -------
    float
        The chosen ``tau`` (the head's bias is left adjusted by it).
    """
    if val_x is None or not len(val_y):
        return 0.0
    last = head.net[-1]
    log_prior = logit_adjustment(train_labels, last.out_features, 1.0).to(last.bias)
    base = last.bias.detach().clone()
    x, y = torch.from_numpy(val_x), torch.as_tensor(val_y)
    x_mirror = None if val_mirror is None else torch.from_numpy(val_mirror)

    def accuracy(tau: float) -> float:
        last.bias.copy_(base - tau * log_prior)
        probs = torch.softmax(head.eval()(x), 1)
        if x_mirror is not None:  # as evaluate_node and prediction: the mean of the two views' probabilities
            probs = average_views(probs, torch.softmax(head(x_mirror), 1))
        return float((probs.argmax(1) == y).float().mean())

    with torch.no_grad():
        tau = choose_prior_tau(accuracy)
        last.bias.copy_(base - tau * log_prior)
    return tau


def choose_prior_tau(accuracy) -> float:
    """The ``tau`` of :data:`PRIOR_TAUS` with the highest ``accuracy(tau)`` (a validation leaf accuracy), the
    smallest among equals: an adjustment that does not help is not made."""
    best_tau, best_acc = 0.0, -1.0
    for tau in PRIOR_TAUS:
        acc = accuracy(tau)
        if acc > best_acc + 1e-9:
            best_tau, best_acc = tau, acc
    return best_tau


def classifier_head(head: Head, clf: dict, inputs: NodeInputs) -> tuple[FitResult, float]:
    """Make ``head`` (its standardiser fitted) the tuned classifier ``clf`` (:func:`flat_classifier`), its
    bias adjusted for the class prior as the validation split chooses (:func:`adjust_for_prior`): nothing is
    trained. Returns a result without epochs (its validation loss: the classifier's on the validation split)
    and the chosen ``tau``."""
    head.load_linear(clf["weight"], clf["bias"])
    head.aggregate = True
    tau = adjust_for_prior(head, inputs.train_labels, inputs.val_x, inputs.val_children, inputs.val_mirror)
    log.info("flat head: logit adjustment tau %.2f (of %s, best validation leaf accuracy)", tau, PRIOR_TAUS)
    loss = math.inf
    if inputs.val_x is not None and len(inputs.val_children):
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(head.eval()(torch.from_numpy(inputs.val_x)),
                                                           torch.from_numpy(inputs.val_children).long()))
    log.info("flat head: the tuned classifier, not trained here (validation loss %.4f)", loss)
    return FitResult(history=[], best_epoch=0, best_val_loss=loss), tau


def calibrate_head(head: Head, val_x: np.ndarray, val_children: np.ndarray, device: str, name: str = "") -> dict | None:
    """Fit the head's temperature on validation features ``(V, D)``; ``None`` with fewer than 2 images."""
    if val_x is None or len(val_children) < 2:
        return None
    head.cpu()
    cal = head.fit_temperature(torch.from_numpy(val_x), torch.from_numpy(val_children))
    head.to(device)
    log.info("node %s: temperature %.3f (validation NLL %.4f -> %.4f, ECE %.4f -> %.4f)", name, cal["temperature"],
             cal["nll_before"], cal["nll_after"], cal["ece_before"], cal["ece_after"])
    return cal


def evaluate_node(model: torch.nn.Module, head: Head, inputs: NodeInputs, n_classes: int, cfg: FitConfig,
                  device: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(N, C)`` on the node's test split (mirror-averaged when ``inputs.test_mirror``) and labels ``(N,)``.

    Under torchrun each rank predicts its share of the test images; every rank gets all of them.
    """
    logits, y_test = predict_logits_sharded(model, inputs.test_set, cfg.batch_size * 2, cfg.workers, device, cfg.amp)
    if not len(y_test):
        return np.zeros((0, n_classes)), y_test
    probs = softmax(logits)
    if inputs.test_mirror is not None:
        with torch.no_grad():
            flip_logits = head.eval()(torch.from_numpy(inputs.test_mirror).to(device)).float().cpu().numpy()
        probs = average_views(probs, softmax(flip_logits))
    return probs, y_test


def node_summary(probs: np.ndarray, y_test: np.ndarray, classes: list, extra: dict) -> dict:
    """Test metrics of a node (:func:`hiernet.metrics.classification_summary`, ``extra``, test ECE)."""
    y_pred = probs.argmax(1) if len(y_test) else np.zeros((0,), int)
    summary = {**classification_summary(y_test, y_pred, classes), **extra}
    if len(y_test):
        summary["test_ece"] = expected_calibration_error(probs.max(1), probs.argmax(1) == y_test)
    return summary


# ----------------------------------------------------------------------------------- the composition
def train_node(cfg: TrainConfig, ds: str, data_dir: Path, models_dir: Path, device: str = "cpu",
               cache_dir: Path | None = None, progress: bool = True, recalibrate: bool = False) -> dict:
    """Train node dataset ``ds`` of ``data_dir`` with recipe ``cfg`` and write ``models_dir/<ds>/``.

    With int8 features the node uses the int8 backbone the models folder's other nodes were trained
    with (its :data:`INT8_PIN`), unless ``recalibrate`` (``--force``) or there is none yet.

    Returns
    -------
    dict
        The node's test metrics (also written as ``metrics.json``).
    """
    from .quantize import resolve_train_precision

    data_dir, models_dir = Path(data_dir), Path(models_dir)
    cfg = cfg.override({"precision": resolve_train_precision(cfg.precision, device, cfg.mode, cfg.onnx,
                                                             cache_dir is not None)})
    data = load_node_data(data_dir, ds, cfg.head.fine_labels)
    with dist_utils.rank0_first():  # rank 0 downloads missing ImageNet weights; the others then read them
        backbone = create_backbone(cfg.backbone, weights=cfg.weights, image_size=cfg.image_size)
    torch.manual_seed(cfg.fit.seed)
    np.random.seed(cfg.fit.seed)
    clf = flat_classifier(cfg, ds, data.classes, backbone) if cfg.flat_classifier else None
    head = make_head(cfg.head, backbone.spec.feature_dim, len(data.classes), data.group)
    pin = models_dir / INT8_PIN
    inputs = STRATEGIES[cfg.mode](cfg, backbone, head, data, device, cache_dir, progress, None if recalibrate else pin)
    work = models_dir / f".{ds}.work"
    work.mkdir(parents=True, exist_ok=True)
    hash_src = {"config": cfg.to_dict(), "classes": data.classes, "n_train": len(inputs.train_set),
                "size": backbone.image_size, "n_outputs": data.n_outputs,
                **({"target_sets": data.target_sets} if data.target_sets else {})}
    prior_tau = None
    if clf is not None:
        result, prior_tau = classifier_head(head, clf, inputs)
    else:
        result = fit_head(inputs.model, head, inputs.train_set, inputs.val_set, inputs.train_labels, cfg.fit, device,
                          work, config_hash(hash_src), progress, data.target_sets)
    calibration = calibrate_head(head, inputs.val_x, inputs.val_children, device, ds) if cfg.calibrate else None
    probs, y_test = evaluate_node(inputs.model, head, inputs, len(data.classes), cfg.fit, device)
    summary = node_summary(probs, y_test, data.classes, {
        "node": ds, "node_id": data.node_id, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "best_val_loss": result.best_val_loss, "tta": inputs.test_mirror is not None, "calibration": calibration,
        **({} if prior_tau is None else {"prior_tau": prior_tau}),
        "fingerprint": node_fingerprint(data.doc, ds, cfg), "split_id": split_identity(data.doc)})
    if dist_utils.is_main():
        write_node_folder(models_dir, NodeRun(cfg, data, backbone, head, inputs, result, summary, y_test,
                                              probs.argmax(1) if len(y_test) else np.zeros((0,), int)))
        write_models_hierarchy(models_dir, data.doc)
        if inputs.int8_model is not None:
            pin_int8_backbone(pin, backbone, cfg.resize, inputs.int8_model)
        if inputs.tree_stats is not None:
            pin_tree_stats(models_dir / TREE_STATS, inputs.tree_stats)
        shutil.rmtree(work, ignore_errors=True)
    dist_utils.barrier()
    return summary


# ----------------------------------------------------------------------------------- 5. the node folder
@dataclass
class NodeRun:
    """A trained node and its test results: what :func:`write_node_folder` writes."""

    cfg: TrainConfig
    data: NodeData
    backbone: FeatureExtractor
    head: Head
    inputs: NodeInputs
    result: FitResult
    summary: dict
    y_test: np.ndarray
    y_pred: np.ndarray


def checkpoint_config(run: NodeRun) -> dict:
    """The ``config`` of ``model.pth``: what prediction reads (node, backbone, head, tta), the recipe, the
    node's :func:`node_fingerprint` and the split's identity (``split``: ``id``, ``seed``, ``ratios``)."""
    data, cfg, backbone = run.data, run.cfg, run.backbone
    fine = {"n_fine": len(data.fine_leaves), "fine_classes": data.fine_leaves} if data.fine_leaves else {}
    return {
        "node": {"id": data.node_id, "dataset": data.dataset, "classes": data.classes, "class_nodes": data.class_nodes,
                 "kind": "flat" if data.dataset == FLAT_DATASET else "node"},
        "hierarchy_fingerprint": data.hier.fingerprint(),
        "backbone": {"name": backbone.spec.name, "image_size": backbone.image_size, "resize": cfg.resize,
                     "weights_fingerprint": backbone.weights_fingerprint, "weights_file": cfg.weights,
                     "trainable": run.inputs.trains_backbone, "precision": cfg.precision, **_int8_record(run.inputs)},
        "head": {"in_dim": backbone.spec.feature_dim, "n_classes": len(data.classes), "hidden": cfg.head.hidden,
                 "dropout": cfg.head.dropout, **fine},
        "tta": run.summary["tta"],
        "train": {**cfg.to_dict(), "split_seed": data.doc.get("seed")},
        "fingerprint": run.summary["fingerprint"],
        "split": {"id": run.summary["split_id"], "seed": data.doc.get("seed"), "ratios": data.doc.get("ratios")},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _int8_record(inputs: NodeInputs) -> dict:
    """The int8 backbone the node's features came from (its cache file name and SHA-256), if any."""
    if inputs.int8_model is None:
        return {}
    from .safeio import sha256_file

    return {"int8_model": Path(inputs.int8_model).name, "int8_sha256": sha256_file(inputs.int8_model)}


def write_models_hierarchy(models_dir: Path, doc: dict) -> None:
    """``trained_models/hierarchy.json``: the tree the models were trained for (predict needs no split_datasets),
    with the prepared tree's display names when it has any."""
    out = {"version": 1, "tree": doc["tree"], "fingerprint": doc["fingerprint"], "flat": {
        "classes": doc["flat"]["classes"], "class_nodes": doc["flat"]["class_nodes"]},
        "source": doc.get("source"), "split_seed": doc.get("seed"), "split_id": split_identity(doc)}
    if display_names(doc):  # a catalogue's original category names (predict and evaluate show them)
        out["display"] = display_names(doc)
    write_json_atomic(models_dir / "hierarchy.json", out)


def write_node_folder(models_dir: Path, run: NodeRun) -> Path:
    """Write ``models_dir/<node>/`` (``model.pth``, ``bin/``, plots, ``performance.txt``, ``metrics.json``,
    ``log.csv``) through a staging folder swapped in at the end; returns the folder."""
    ds, classes, backbone = run.data.dataset, run.data.classes, run.backbone
    stage = staging_dir(models_dir, ds)
    state = {"head": {k: v.detach().cpu() for k, v in run.head.state_dict().items()}}
    if run.inputs.trains_backbone:
        state["backbone"] = {k: v.detach().cpu() for k, v in backbone.net.state_dict().items()}
    config = checkpoint_config(run)
    save_checkpoint(stage / "model.pth", config, state)
    _write_legacy_pickles(stage, classes, backbone)
    _write_plots(stage, run)
    write_text_atomic(stage / "performance.txt", _performance_text(run, config))
    write_json_atomic(stage / "metrics.json", run.summary)
    if run.result.history:
        write_csv(stage / "log.csv", run.result.history)
    return publish(stage, models_dir, ds)


def _write_legacy_pickles(stage: Path, classes: list, backbone: FeatureExtractor) -> None:
    """``bin/*.pickle`` of the original project's layout (the suite itself reads only the encoder)."""
    from torchvision import transforms as T

    spec, size = backbone.spec, backbone.image_size
    pickle_atomic(stage / "bin" / "encoder.pickle", dict(enumerate(classes)))
    pickle_atomic(stage / "bin" / "test_transforms.pickle",
                  T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(spec.mean, spec.std)]))
    pickle_atomic(stage / "bin" / "inv_normalize.pickle",
                  T.Normalize([-m / s for m, s in zip(spec.mean, spec.std)], [1 / s for s in spec.std]))


def _write_plots(stage: Path, run: NodeRun) -> None:
    from . import plots

    ds, classes, splits = run.data.dataset, run.data.classes, run.data.splits
    title = f"node '{ds}'"
    per_class = {c: [p for p, y in splits["train"] if y == i][:4] for i, c in enumerate(classes)}
    plots.image_grid([(p, c) for c, ps in per_class.items() for p in ps][:36], stage / "class_plot.png",
                     f"{title}: training images", cols=min(8, max(4, len(classes))))
    plots.loss_curves(run.result.history, stage / "error_plot.png", f"{title}: loss per epoch")
    summary = run.summary
    cm = np.array(summary["confusion"]) if summary["confusion"] else np.zeros((len(classes), len(classes)))
    plots.confusion(cm, classes, stage / "confusion_matrix.png", f"{title}: test split (n={len(run.y_test)})")
    wrong = [(p, f"A: {classes[t]}\nP: {classes[q]}")
             for p, t, q in zip(run.inputs.test_paths, run.y_test, run.y_pred) if t != q]
    plots.image_grid(wrong[:24], stage / "wrong_plot.png", f"{title}: misclassified test images ({len(wrong)})",
                     color="darkred")


def _performance_text(run: NodeRun, config: dict) -> str:
    ds, classes, summary, result = run.data.dataset, run.data.classes, run.summary, run.result
    lines = [
        f"node: {ds}  ({'flat baseline over all leaves' if ds == FLAT_DATASET else 'local classifier'})",
        f"classes: {classes}",
        f"backbone: {config['backbone']['name']} @ {config['backbone']['image_size']}px, "
        f"{'fine-tuned' if config['backbone']['trainable'] else 'frozen'}",
        f"test images: {summary['n_images']}",
        f"accuracy: {summary['accuracy']:.4f}",
        f"macro precision: {summary['macro_precision']:.4f}",
        f"macro recall: {summary['macro_recall']:.4f}",
        f"macro F1: {summary['macro_f1']:.4f}",
        (f"head: the tuned classifier {run.cfg.flat_classifier}, not trained here, logit adjustment tau "
         f"{summary.get('prior_tau', 0.0):.2f} chosen on the validation split (val loss {result.best_val_loss:.4f})"
         if run.cfg.flat_classifier else
         f"best epoch: {result.best_epoch} of {len(result.history)} (val loss {result.best_val_loss:.4f})"),
        _calibration_line(summary),
        "",
        "This is the accuracy of this local classifier on test images of its own classes.",
        "End-to-end (chained) accuracy: python3 src/evaluate.py",
        "",
        text_report(run.y_test, run.y_pred, classes) if len(run.y_test) else "(no test images)",
    ]
    return "\n".join(lines) + "\n"


def _calibration_line(summary: dict) -> str:
    c = summary.get("calibration")
    if not c:
        return "calibration: none (temperature 1)"
    test = f"; test ECE {summary['test_ece']:.4f}" if summary.get("test_ece") is not None else ""
    return (f"calibration: temperature {c['temperature']:.3f} fitted on the validation split "
            f"(ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}){test}")


def node_lock(models_dir: Path, ds: str):
    """The lock that keeps two trainings of one node apart."""
    return exclusive_lock(models_dir / f".{ds}.lock", f"training of node '{ds}'")
