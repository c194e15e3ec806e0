"""The training recipe as one typed value: :class:`TrainConfig` (torch-free).

A recipe is a :class:`TrainConfig` with three nested parts (:class:`HeadConfig`, :class:`FitConfig`,
:class:`AugmentConfig`). The named presets are values of it (:data:`PRESETS`); ``train.py`` starts from
one and replaces the fields whose flags were given (:meth:`TrainConfig.override`, keyed by the flag
names in :data:`FLAG_FIELDS`). ``model.pth`` stores :meth:`TrainConfig.to_dict` and
:meth:`TrainConfig.from_dict` rebuilds it (unknown keys are ignored, missing ones take the defaults).

The defaults of every class are the default (``cpu``) recipe: there is one set of defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .safeio import UserError


@dataclass(frozen=True)
class AugmentConfig:
    """Random-resized-crop, flip and colour jitter of the cached augmented views.

    Part of the feature-cache key (:meth:`key`): changing a value computes new features.
    """

    scale: tuple = (0.55, 1.0)
    ratio: tuple = (0.75, 1.333)
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def key(self) -> str:
        """The JSON text that identifies these settings in the feature-cache key."""
        return json.dumps(self.__dict__, sort_keys=True, default=list)


@dataclass(frozen=True)
class HeadConfig:
    """The node classifier on top of the features.

    Attributes
    ----------
    hidden : int
        Hidden units of the MLP (0 = a linear head).
    dropout : float
    fine_labels : bool
        A node whose children are parents learns the leaves below it and predicts their sums per child.
    standardize : {"tree", "node"}
        Frozen mode: the statistics a head standardises its features with. ``tree``: the mean and std of
        the whole tree's training images (every node and the flat head alike; pinned in the models
        folder, :data:`hiernet.features.TREE_STATS`); ``node``: those of the node's own training views.
        A small node's own statistics are noisy and blow up features that barely vary below it
        (3-fold CV on the catalogue export: +2.0 points of leaf accuracy, +3.0 of macro F1, bench/tail.py).
    """

    hidden: int = 1024
    dropout: float = 0.3
    fine_labels: bool = True
    standardize: str = "tree"


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of one optimisation run (:func:`hiernet.engine.fit`).

    ``class_weight_power``: loss weight ``(n / (C * count)) ** power`` (1 balanced, 0 unweighted).
    ``logit_adjust``: ``tau`` of the logit-adjusted loss, CE on ``logits + tau * log(prior)`` (Menon et al.;
    1 = balanced softmax, 0 = plain CE); the head's raw logits then score classes as if balanced.
    ``sample_power``: class-aware sampling, a training sample of class c drawn with weight
    ``count_c ** -power`` (1 = every class equally often, 0 = uniform shuffling).
    ``prior_bias``: the output bias starts at the (logit-adjusted) log prior of the training targets instead of
    a random value (a small node makes few optimiser steps and otherwise keeps a nearly random bias).
    """

    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-3
    label_smoothing: float = 0.1
    patience: int = 10
    warmup_epochs: float = 1.0
    class_weight_power: float = 0.0  # weighting cost leaf accuracy in cross-validation (bench/ablation.py)
    logit_adjust: float = 0.0
    sample_power: float = 0.0
    prior_bias: bool = False
    amp: bool = True
    workers: int = 0
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how a node is trained (not where: folders and device are arguments).

    Attributes
    ----------
    preset : str
        The preset this recipe started from (recorded, never read back as a recipe).
    backbone : str
        A registered backbone or several joined by ``+`` (see :func:`hiernet.backbones.list_backbones`).
    image_size : int or None
        Input side in pixels; ``None`` = the backbone's own.
    mode : {"frozen", "finetune"}
        Frozen backbone + heads on cached features, or the whole network trained on images.
    resize : {"crop", "squash", "pad"}
    views : int
        Augmented views per training image cached as features (frozen mode).
    tta, calibrate : bool
        Mirror averaging at test time and temperature scaling (frozen mode only).
    onnx : bool
        Compute cached features with onnxruntime on CPU (else PyTorch).
    weights : str or None
        A backbone state_dict file instead of the packaged/downloaded ImageNet weights.
    precision : {"auto", "fp32", "int8"}
        The backbone that computes the cached features: ``int8`` = onnxruntime's statically quantised
        backbone (CPU), ``auto`` = int8 where it runs (frozen features on a CPU), else fp32. A trained node records the resolved value (``fp32`` or
        ``int8``); prediction uses the same by default.
    flat_classifier : str or None
        Frozen mode, the flat baseline only: a tuned classifier file (``tune_backbone.py`` writes one beside
        the tuned weights, :func:`hiernet.tailtune.save_classifier`) that is the flat head as it is (a
        linear head, ``head.hidden`` 0) instead of a head trained here; the validation split chooses its
        post-hoc logit adjustment (:func:`hiernet.training.adjust_for_prior`) and fits its temperature.
    """

    preset: str = "cpu"
    backbone: str = "efficientnet-lite1+efficientnet-lite0"
    image_size: int | None = 280
    mode: str = "frozen"
    resize: str = "crop"
    views: int = 4
    tta: bool = True
    calibrate: bool = True
    onnx: bool = True
    weights: str | None = None
    precision: str = "auto"
    flat_classifier: str | None = None
    head: HeadConfig = field(default_factory=HeadConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def frozen(self) -> bool:
        return self.mode == "frozen"

    def to_dict(self) -> dict:
        """Plain JSON-able data (nested dicts; tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` output, or from the flat ``train`` dict of older ``model.pth`` files.

        Unknown keys are ignored and missing ones take the defaults.

        Raises
        ------
        UserError
            ``data`` is not a dict or holds values of the wrong kind (one line).
        """
        if not isinstance(data, dict):
            raise UserError(f"a training config must be a dict, got {type(data).__name__}; retrain the node")
        if not any(isinstance(data.get(k), dict) for k in ("head", "fit", "augment")):
            return cls().override({k: v for k, v in data.items() if k in FLAG_FIELDS or k == "preset"})
        try:
            aug = {k: tuple(v) if isinstance(v, list) else v for k, v in _known(AugmentConfig, data.get("augment") or {}).items()}
            parts = {"head": HeadConfig(**_known(HeadConfig, data.get("head") or {})),
                     "fit": FitConfig(**_known(FitConfig, data.get("fit") or {})), "augment": AugmentConfig(**aug)}
            return cls(**_known(cls, data, skip=("head", "fit", "augment")), **parts)
        except (TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"the saved training config cannot be read ({exc}); retrain the node") from None

    def override(self, changes: dict) -> "TrainConfig":
        """A copy with fields replaced; keys are :data:`FLAG_FIELDS` names or dotted paths (``"fit.lr"``)."""
        top, nested = {}, {}
        for key, value in changes.items():
            path = FLAG_FIELDS.get(key, key)
            part, _, name = path.rpartition(".")
            if part:
                nested.setdefault(part, {})[name] = value
            else:
                top[name] = value
        try:
            parts = {part: dataclasses.replace(getattr(self, part), **values) for part, values in nested.items()}
            return dataclasses.replace(self, **top, **parts)
        except (TypeError, ValueError) as exc:
            raise UserError(f"bad training setting ({exc})") from None


def _known(cls, data: dict, skip: tuple = ()) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: v for k, v in data.items() if k in names}


#: train.py flag (argparse ``dest``) → the field it sets. Also the keys of the flat ``train`` dict
#: that older ``model.pth`` files hold.
FLAG_FIELDS: dict[str, str] = {
    "backbone": "backbone", "image_size": "image_size", "mode": "mode", "resize": "resize", "views": "views",
    "tta": "tta", "calibrate": "calibrate", "onnx": "onnx", "weights": "weights", "precision": "precision",
    "flat_classifier": "flat_classifier",
    "hidden": "head.hidden", "dropout": "head.dropout", "fine_labels": "head.fine_labels",
    "standardize": "head.standardize",
    "epochs": "fit.epochs", "batch_size": "fit.batch_size", "lr": "fit.lr", "weight_decay": "fit.weight_decay",
    "label_smoothing": "fit.label_smoothing", "patience": "fit.patience", "class_weights": "fit.class_weight_power",
    "logit_adjust": "fit.logit_adjust", "sample_power": "fit.sample_power", "prior_bias": "fit.prior_bias",
    "amp": "fit.amp", "workers": "fit.workers", "seed": "fit.seed",
}

#: Named recipes; explicit flags override their values.
PRESETS: dict[str, TrainConfig] = {
    # the default, offline, CPU: frozen Lite1 + Lite0 features of one 280 px input (+ cached augmented views),
    # a calibrated MLP head per node
    "cpu": TrainConfig(),
    # speed first, CPU: the cpu recipe on one frozen EfficientNet-Lite0 at its own 224 px (about a third of
    # the cpu preset's multiply-adds per image; README "Speed" measures what it trades)
    "fast": TrainConfig(preset="fast", backbone="efficientnet-lite0", image_size=None),
    # the original research recipe: EfficientNet-B4 fully fine-tuned per node (GPU)
    "original": TrainConfig(
        preset="original", backbone="efficientnet-b4", image_size=None, mode="finetune", views=0, tta=False,
        calibrate=False, head=HeadConfig(hidden=0),
        fit=FitConfig(epochs=25, batch_size=32, lr=3e-4, weight_decay=1e-4, patience=5, class_weight_power=0.5),
    ),
}
DEFAULT_PRESET = "cpu"


def preset_with_flags(preset: str, flags: dict) -> TrainConfig:
    """The preset ``preset`` with the given flags (``None`` = not given: keep the preset's value).

    Another backbone without an explicit ``image_size`` takes its own input size, not the preset's.
    """
    base = PRESETS[preset]
    given = {k: v for k, v in flags.items() if v is not None}
    if "image_size" not in given and given.get("backbone", base.backbone) != base.backbone:
        given["image_size"] = None
    if given.get("flat_classifier"):  # a tuned classifier is a linear head
        if given.get("hidden"):
            raise UserError(f"--flat-classifier is a linear head; drop --hidden {given['hidden']}")
        given["hidden"] = 0
    return base.override(given)


def default_workers(mode: str, device: str, cpus: int, procs_per_host: int = 1) -> int:
    """``--workers`` when not given: fine-tuning on CUDA decodes images in ``min(8, cpus / procs_per_host)``
    DataLoader worker processes (decoding B4's inputs in the training process starves a GPU); else 0
    (frozen mode reads cached features; on a CPU the cores are busy training)."""
    if mode != "finetune" or not str(device).startswith("cuda"):
        return 0
    return max(1, min(8, cpus // max(1, procs_per_host)))
