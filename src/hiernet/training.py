"""Train one node (or the flat baseline) end to end and write its folder in ``trained_models/``.

Two modes:

* ``frozen`` (default, fast on a CPU): a shared ImageNet backbone, frozen; each image's features (and
  those of a few augmented views) are computed once into the feature cache; only a small head is trained.
  All nodes share the backbone, so prediction runs it once per image.
* ``finetune`` (the original GPU recipe): the whole network is trained on images for this node.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from . import distributed as dist_utils
from .artifacts import publish, save_checkpoint, staging_dir
from .backbones import create_backbone
from .data import TRANSFORM_VERSION, AugmentConfig, FeatureCache, aug_views, eval_views, extract_features, read_split
from .engine import FitConfig, fit, predict_logits
from .hierarchy import FLAT_DATASET, Hierarchy, require_hierarchy_json
from .images import ImageDecodeError, load_rgb, resize_for_model, to_array
from .metrics import classification_summary, expected_calibration_error, text_report
from .predictor import _softmax
from .models import Head, NodeNet
from .runtime import OrtRunner, TorchRunner, export_onnx, onnx_available
from .safeio import UserError, exclusive_lock, pickle_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

#: Named recipes; explicit flags override their values.
PRESETS: dict[str, dict] = {
    # fast, offline, CPU: frozen Lite1 + Lite0 features of one 280 px input (+ cached augmented views), an MLP head per node
    "cpu": dict(backbone="efficientnet-lite1+efficientnet-lite0", image_size=280, mode="frozen", resize="crop", views=4, hidden=1024, dropout=0.3,
                epochs=60, batch_size=256, lr=1e-3, weight_decay=1e-3, patience=10, label_smoothing=0.1, tta=True,
                class_weights=0.0, fine_labels=True, calibrate=True),  # weighting cost leaf accuracy in cross-validation (bench/ablation.py)
    # the original research recipe: EfficientNet-B4 fully fine-tuned per node (GPU)
    "original": dict(backbone="efficientnet-b4", image_size=None, mode="finetune", resize="crop", views=0, hidden=0, dropout=0.3,
                     epochs=25, batch_size=32, lr=3e-4, weight_decay=1e-4, patience=5, label_smoothing=0.1, tta=False,
                     class_weights=0.5, fine_labels=True, calibrate=False),
}
DEFAULT_PRESET = "cpu"


def resolve_settings(args) -> dict:
    """Merge a preset with the flags the user gave (flags left as ``None`` take the preset's value)."""
    preset = PRESETS[args.preset]
    out = {}
    for k, v in preset.items():
        given = getattr(args, k, None)
        out[k] = v if given is None else given
    if args.image_size is None and out["backbone"] != preset["backbone"]:
        out["image_size"] = None  # another backbone: its own input size, not the preset's
    return out


class ImageDataset(Dataset):
    """Images with labels for fine-tuning: augmented views when ``train``, the evaluation input otherwise.

    Yields ``(float tensor (3, S, S) in [0, 1], label)``. An image that fails to decode is replaced by
    the next one (with a warning) so a file damaged after prepare_dataset.py cannot stop a run.
    """

    def __init__(self, items: list[tuple[Path, int]], size: int, policy: str, train: bool, seed: int = 0):
        self.items, self.size, self.policy, self.train, self.seed, self.epoch = items, size, policy, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
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
            rng = np.random.default_rng([self.seed, self.epoch, i])
            from .data import augment

            img = augment(img, self.size, rng)
        else:
            img = resize_for_model(img, self.size, self.policy)
        return torch.from_numpy(to_array(img)), label


def _feature_runner(backbone, device: str, cache_dir: Path, cache_key: str, use_onnx: bool):
    """The fastest way to run the frozen backbone here: onnxruntime on CPU, else PyTorch."""
    if device == "cpu" and use_onnx and onnx_available():
        onnx_path = cache_dir / "onnx" / f"backbone-{cache_key}.onnx"
        if not onnx_path.exists():
            import copy

            export_copy = copy.deepcopy(backbone)
            export_copy.set_export_mode()
            export_onnx(export_copy, np.zeros((1, 3, backbone.image_size, backbone.image_size), np.float32), onnx_path)
        return OrtRunner(onnx_path)
    return TorchRunner(backbone, device)


def _cached_features(paths, backbone, settings, device, cache_dir, kind: str, n_aug: int, seed: int, progress: bool):
    """``(N, V, D)`` features of ``paths`` (``kind`` "eval": 2 views; "aug": ``n_aug`` views) and a decode mask."""
    size, policy = backbone.image_size, settings["resize"]
    key = {
        "backbone": backbone.spec.name, "image_size": size, "weights": backbone.weights_fingerprint,
        "resize": policy, "transform_version": TRANSFORM_VERSION, "kind": kind,
    }
    if kind == "aug":
        key.update({"augment": AugmentConfig().key(), "seed": seed, "n": n_aug})
        n_views = n_aug

        def make(img, s):
            return aug_views(img, size, n_aug, s ^ seed)
    else:
        n_views = 2

        def make(img, s):
            return eval_views(img, size, policy)

    cache = FeatureCache(cache_dir, key, n_views, backbone.spec.feature_dim)
    runner_key = hashlib.sha256(json.dumps(["onnx-v2", key["backbone"], size, key["weights"]]).encode()).hexdigest()[:16]
    runner = None

    def run(batch):
        nonlocal runner
        if runner is None:
            runner = _feature_runner(backbone, device, cache_dir, runner_key, settings.get("onnx", True))
        return runner(batch)

    if dist_utils.is_distributed():  # each rank fills its share of the cache, then all read it
        r, w = dist_utils.rank(), dist_utils.world_size()
        extract_features(paths[r::w], run, cache, make, size, progress=False)
        dist_utils.barrier()
    return extract_features(paths, run, cache, make, size, progress=progress and dist_utils.is_main(), desc=f"{kind} features")


def _config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_node(args) -> dict:
    """Train the node ``args.dataset`` and write ``args.output_dir/<dataset>/``; returns its test metrics."""
    settings = resolve_settings(args)
    settings["onnx"] = not getattr(args, "no_onnx", False)
    data_dir, models_dir = Path(args.data_dir), Path(args.output_dir)
    hier, doc = _load_prepared(data_dir)
    ds = args.dataset
    if ds == FLAT_DATASET:
        info, node_id = doc["flat"], None
    else:
        if ds not in doc["datasets"]:
            known = ", ".join(list(doc["datasets"]) + [FLAT_DATASET])
            raise UserError(f"no dataset {ds!r} in {data_dir}; choose one of: {known}")
        info, node_id = doc["datasets"][ds], doc["datasets"][ds]["node"]
    classes = list(info["classes"])
    splits = {s: read_split(data_dir / ds / s, classes) for s in ("train", "val", "test")}
    if not splits["train"]:
        raise UserError(f"{data_dir / ds / 'train'} has no images; rerun prepare_dataset.py")
    present = sorted({classes[y] for _, y in splits["train"]})
    if len(present) < 2:
        raise UserError(f"node {ds!r} has training images for only {present}; a classifier needs two classes")

    device = args.device
    main = dist_utils.is_main()
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    backbone = create_backbone(settings["backbone"], weights=args.weights, image_size=settings["image_size"])
    size = backbone.image_size
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    work = models_dir / f".{ds}.work"
    work.mkdir(parents=True, exist_ok=True)
    fit_cfg = FitConfig(
        epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
        weight_decay=settings["weight_decay"], label_smoothing=settings["label_smoothing"],
        patience=settings["patience"], class_weight_power=settings["class_weights"], amp=not args.no_amp,
        workers=args.workers, seed=args.seed,
    )
    n_classes, dim = len(classes), backbone.spec.feature_dim
    fine = _fine_targets(hier, doc, node_id, list(info["class_nodes"])) if settings["fine_labels"] else None
    if fine is None:
        head = Head(dim, n_classes, settings["hidden"], settings["dropout"])
        fine_labels = None
    else:  # train on the leaves below this node, predict their sums per child
        fine_leaves, group, leaf_of_file = fine
        head = Head(dim, n_classes, settings["hidden"], settings["dropout"], group)
        fine_labels = {s: np.array([fine_leaves.index(leaf_of_file[p.name]) for p, _ in items], dtype=np.int64)
                       for s, items in splits.items()}
    tta = bool(settings["tta"]) and settings["mode"] == "frozen"
    labels = {s: np.array([y for _, y in items], dtype=np.int64) for s, items in splits.items()}
    train_targets = fine_labels or labels
    paths = {s: [p for p, _ in items] for s, items in splits.items()}
    test_paths = paths["test"]

    if settings["mode"] == "frozen":
        backbone.requires_grad_(False)
        feats = {}
        for s in ("train", "val", "test"):
            f, ok = _cached_features(paths[s], backbone, settings, device, cache_dir, "eval", 0, args.seed, not args.quiet)
            feats[s] = (f[ok], (labels if s == "test" else train_targets)[s][ok])
            if s == "val":
                val_children = labels["val"][ok]
            if s == "test":
                test_paths = [p for p, k in zip(paths[s], ok) if k]
        xs, ys = feats["train"]
        if settings["views"] > 0:
            fa, ok = _cached_features(paths["train"], backbone, settings, device, cache_dir, "aug", settings["views"], args.seed, not args.quiet)
            xs = np.concatenate([xs, fa[ok]], axis=1)
        n_v = xs.shape[1]
        train_x = torch.from_numpy(xs.reshape(-1, dim))
        train_y = torch.from_numpy(np.repeat(ys, n_v))
        head.fit_standardizer(train_x)
        model = head
        train_set = TensorDataset(train_x, train_y)
        val_set = TensorDataset(torch.from_numpy(feats["val"][0][:, 0]), torch.from_numpy(feats["val"][1]))
        test_set = TensorDataset(torch.from_numpy(feats["test"][0][:, 0]), torch.from_numpy(feats["test"][1]))
        train_labels = train_y.numpy()
    else:
        model = NodeNet(backbone, head)
        relabel = {s: [(p, int(y)) for (p, _), y in zip(splits[s], train_targets[s])] for s in ("train", "val")}
        train_set = ImageDataset(relabel["train"], size, settings["resize"], True, args.seed)
        val_set = ImageDataset(relabel["val"], size, settings["resize"], False)
        test_set = ImageDataset(splits["test"], size, settings["resize"], False)
        train_labels = train_targets["train"]

    n_outputs = n_classes if fine is None else len(fine[0])
    hash_src = {"settings": settings, "fit": asdict(fit_cfg), "classes": classes, "n_train": len(train_set), "size": size,
                "n_outputs": n_outputs}
    head.aggregate = False  # train on the fine (leaf) targets when there are any
    result = fit(model, train_set, val_set, train_labels, n_outputs, fit_cfg, device, work, _config_hash(hash_src),
                 progress=not args.quiet)
    head.aggregate = True
    calibration = None
    if settings["mode"] == "frozen" and settings.get("calibrate", True) and len(val_children) >= 2:
        head.cpu()
        calibration = head.fit_temperature(torch.from_numpy(feats["val"][0][:, 0]), torch.from_numpy(val_children))
        head.to(device)
        log.info("node %s: temperature %.3f (validation NLL %.4f -> %.4f, ECE %.4f -> %.4f)", ds, calibration["temperature"],
                 calibration["nll_before"], calibration["nll_after"], calibration["ece_before"], calibration["ece_after"])

    # ------------------------------------------------------------------ test split of this node
    from torch.utils.data import DataLoader

    loader = DataLoader(test_set, batch_size=fit_cfg.batch_size * 2, shuffle=False, num_workers=args.workers)
    logits, y_test = predict_logits(model, loader, device, fit_cfg.amp)
    if tta and len(y_test):
        flip_logits = head.eval()(torch.from_numpy(feats["test"][0][:, 1]).to(device)).detach().float().cpu().numpy()
        probs = (_softmax(logits) + _softmax(flip_logits)) / 2
    else:
        probs = _softmax(logits) if len(y_test) else np.zeros((0, n_classes))
    y_pred = probs.argmax(1) if len(y_test) else np.zeros((0,), int)
    summary = classification_summary(y_test, y_pred, classes)
    summary.update({"node": ds, "node_id": node_id, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                    "best_val_loss": result.best_val_loss, "tta": tta, "calibration": calibration})
    if len(y_test):
        summary["test_ece"] = expected_calibration_error(probs.max(1), probs.argmax(1) == y_test)

    if main:
        config = {
            "node": {"id": node_id, "dataset": ds, "classes": classes, "class_nodes": list(info["class_nodes"]),
                     "kind": "flat" if ds == FLAT_DATASET else "node"},
            "hierarchy_fingerprint": hier.fingerprint(),
            "backbone": {"name": backbone.spec.name, "image_size": size, "resize": settings["resize"],
                         "weights_fingerprint": backbone.weights_fingerprint,
                         "weights_file": str(Path(args.weights).resolve()) if args.weights else None,
                         "trainable": settings["mode"] == "finetune"},
            "head": {"in_dim": dim, "n_classes": n_classes, "hidden": settings["hidden"], "dropout": settings["dropout"],
                     **({"n_fine": len(fine[0]), "fine_classes": fine[0]} if fine else {})},
            "tta": tta,
            "train": {**settings, "preset": args.preset, "seed": args.seed, "split_seed": doc.get("seed")},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        state = {"head": {k: v.detach().cpu() for k, v in head.state_dict().items()}}
        if settings["mode"] == "finetune":
            state["backbone"] = {k: v.detach().cpu() for k, v in backbone.net.state_dict().items()}
        _write_node_folder(models_dir, ds, config, state, summary, result, splits, test_paths, y_test, y_pred,
                           classes, backbone)
        _write_models_hierarchy(models_dir, doc)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    dist_utils.barrier()
    return summary


def _fine_targets(hier: Hierarchy, doc: dict, node_id: str | None, children: list[str]):
    """Leaf-level targets for a node whose children are themselves parents.

    Returns
    -------
    None, or (list of leaf ids, group tensor (K leaves, C children), {stored file name: leaf id})
        ``None`` for the flat dataset and for nodes whose children are all leaves (nothing finer exists).
    """
    if node_id is None or all(hier.nodes[c].is_leaf for c in children):
        return None
    if any(node_id == "" or im["node"].startswith(f"{node_id}/") for im in doc.get("partial_images", [])):
        return None  # partial labels below this node have no leaf to train on: use the children as targets
    leaves = hier.subtree_leaves(node_id)
    group = torch.zeros(len(leaves), len(children))
    for j, leaf in enumerate(leaves):
        group[j, children.index(hier.child_towards(node_id, leaf))] = 1.0
    leaf_of_file = {im["file"]: im["leaf"] for im in doc["images"]}
    return leaves, group, leaf_of_file


def _load_prepared(data_dir: Path) -> tuple[Hierarchy, dict]:
    return require_hierarchy_json(data_dir / "hierarchy.json", f"no prepared datasets in {data_dir}",
                                  f"python3 prepare_dataset.py -p YOUR_DATASET -o {data_dir}")


def _write_models_hierarchy(models_dir: Path, doc: dict) -> None:
    """``trained_models/hierarchy.json``: the tree the models were trained for (predict needs no split_datasets)."""
    out = {"version": 1, "tree": doc["tree"], "fingerprint": doc["fingerprint"], "flat": {
        "classes": doc["flat"]["classes"], "class_nodes": doc["flat"]["class_nodes"]},
        "source": doc.get("source"), "split_seed": doc.get("seed")}
    write_json_atomic(models_dir / "hierarchy.json", out)


def _write_node_folder(models_dir, ds, config, state, summary, result, splits, test_paths, y_test, y_pred, classes, backbone):
    from torchvision import transforms as T

    from . import plots

    stage = staging_dir(models_dir, ds)
    save_checkpoint(stage / "model.pth", config, state)
    spec = backbone.spec
    size = backbone.image_size
    pickle_atomic(stage / "bin" / "encoder.pickle", dict(enumerate(classes)))
    pickle_atomic(stage / "bin" / "test_transforms.pickle",
                  T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(spec.mean, spec.std)]))
    pickle_atomic(stage / "bin" / "inv_normalize.pickle",
                  T.Normalize([-m / s for m, s in zip(spec.mean, spec.std)], [1 / s for s in spec.std]))
    title = f"node '{ds}'"
    per_class = {c: [p for p, y in splits["train"] if y == i][:4] for i, c in enumerate(classes)}
    plots.image_grid([(p, c) for c, ps in per_class.items() for p in ps][:36], stage / "class_plot.png",
                     f"{title}: training images", cols=min(8, max(4, len(classes))))
    plots.loss_curves(result.history, stage / "error_plot.png", f"{title}: loss per epoch")
    cm = np.array(summary["confusion"]) if summary["confusion"] else np.zeros((len(classes), len(classes)))
    plots.confusion(cm, classes, stage / "confusion_matrix.png", f"{title}: test split (n={len(y_test)})")
    wrong = [(p, f"A: {classes[t]}\nP: {classes[q]}") for p, t, q in zip(test_paths, y_test, y_pred) if t != q]
    plots.image_grid(wrong[:24], stage / "wrong_plot.png", f"{title}: misclassified test images ({len(wrong)})",
                     color="darkred")
    lines = [
        f"node: {ds}  ({'flat baseline over all leaves' if ds == FLAT_DATASET else 'local classifier'})",
        f"classes: {classes}",
        f"backbone: {config['backbone']['name']} @ {size}px, {'fine-tuned' if config['backbone']['trainable'] else 'frozen'}",
        f"test images: {summary['n_images']}",
        f"accuracy: {summary['accuracy']:.4f}",
        f"macro precision: {summary['macro_precision']:.4f}",
        f"macro recall: {summary['macro_recall']:.4f}",
        f"macro F1: {summary['macro_f1']:.4f}",
        f"best epoch: {result.best_epoch} of {len(result.history)} (val loss {result.best_val_loss:.4f})",
        _calibration_line(summary),
        "",
        "This is the accuracy of this local classifier on test images of its own classes.",
        "End-to-end (chained) accuracy: python3 src/evaluate.py",
        "",
        text_report(y_test, y_pred, classes) if len(y_test) else "(no test images)",
    ]
    write_text_atomic(stage / "performance.txt", "\n".join(lines) + "\n")
    write_json_atomic(stage / "metrics.json", summary)
    from .engine import _write_csv

    if result.history:
        _write_csv(stage / "log.csv", result.history)
    publish(stage, models_dir, ds)


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
