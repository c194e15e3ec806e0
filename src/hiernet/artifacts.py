"""Save and load a node folder ``trained_models/<node>/`` safely.

``model.pth`` is a plain dict (config + state_dicts) read only with ``torch.load(weights_only=True)``.
The ``bin/*.pickle`` files keep the original project's layout; the suite reads ``encoder.pickle``
only through an allow-list unpickler and never reads the transform pickles.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from .safeio import UserError, remove_stale, replace_dir, restricted_load

log = logging.getLogger(__name__)

FORMAT = "fashion-hiernet-node"
FORMAT_VERSION = 1


class ArtifactError(UserError):
    """A node folder is missing, damaged, inconsistent or untrusted."""


@dataclass
class NodeArtifact:
    """A loaded node model.

    Attributes
    ----------
    folder : Path
    checkpoint : dict
        The ``model.pth`` dict (``config`` + ``state_dict``).
    """

    folder: Path
    checkpoint: dict

    @property
    def config(self) -> dict:
        return self.checkpoint["config"]

    @property
    def classes(self) -> list[str]:
        return list(self.config["node"]["classes"])

    @property
    def class_nodes(self) -> list[str]:
        return list(self.config["node"]["class_nodes"])

    def train_config(self):
        """The :class:`~hiernet.config.TrainConfig` the node was trained with.

        Older files hold a flat ``train`` dict; it is read too (missing values take the defaults).
        """
        from .config import TrainConfig

        return TrainConfig.from_dict(self.config.get("train") or {})


def staging_dir(models_dir: Path, name: str) -> Path:
    """A fresh temporary folder ``models_dir/.<name>.tmp-<pid>`` for a node's new outputs."""
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(models_dir, name)
    d = models_dir / f".{name}.tmp-{os.getpid()}"
    if d.exists():
        shutil.rmtree(d)
    (d / "bin").mkdir(parents=True)
    return d


def publish(staging: Path, models_dir: Path, name: str) -> Path:
    """Swap a finished staging folder in as ``models_dir/<name>`` (the old one is kept until then)."""
    target = models_dir / name
    replace_dir(staging, target)
    return target


def save_checkpoint(path: Path, config: dict, state_dict: dict) -> None:
    """Write ``model.pth``: ``{"format", "version", "config", "state_dict"}`` (tensors and plain data only)."""
    import torch

    from .safeio import atomic_path

    ck = {"format": FORMAT, "version": FORMAT_VERSION, "config": config, "state_dict": state_dict}
    with atomic_path(path) as tmp:
        torch.save(ck, tmp)


def read_checkpoint(path: Path) -> dict:
    """Load and check a ``model.pth``; anything but our plain format is refused with one line.

    Raises
    ------
    ArtifactError
        Missing, truncated, carrying code (refused by ``weights_only=True``), or not our format.
    """
    import torch

    if not path.is_file():
        raise ArtifactError(f"{path} is missing; train this node with: python3 src/train.py -d {path.parent.name}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: one line, not three
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it names {found.group(1)}, i.e. it carries code" if found else "damaged, or it may carry code"
        raise ArtifactError(
            f"{path} was refused: it is not a plain weights file ({what}); retrain the node or get a clean copy"
        ) from None
    except Exception as exc:
        raise ArtifactError(f"{path} is damaged or truncated ({type(exc).__name__}); retrain this node") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a Fashion-Hiernet node model; retrain this node")
    if ck.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {ck.get('version')}, this suite reads {FORMAT_VERSION}; retrain")
    cfg = ck.get("config")
    try:
        node, bb, head = cfg["node"], cfg["backbone"], cfg["head"]
        ok = (
            _str_list(node["classes"]) and _str_list(node["class_nodes"])
            and len(node["classes"]) == len(node["class_nodes"]) >= 1
            and isinstance(bb["name"], str)
            and _int(head["n_classes"], 1) and _int(head.get("in_dim", 1), 1) and _int(head.get("hidden", 0), 0)
            and isinstance(ck["state_dict"], dict) and isinstance(ck["state_dict"]["head"], dict)
            # what the predictor reads later: checked here so a tampered file fails with this line
            and isinstance(cfg.get("hierarchy_fingerprint", ""), str)
            and _int(bb.get("image_size", 64), 8, 4096)
            and bb.get("resize", "crop") in ("crop", "squash", "pad")
            and isinstance(bb.get("weights_fingerprint", ""), (str, type(None)))
        )
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ArtifactError(f"{path} lacks required entries or has malformed ones; retrain this node")
    from .backbones import get_spec

    try:
        get_spec(bb["name"])
    except UserError:
        raise ArtifactError(f"{path} uses backbone {bb['name']!r}, unknown to this version of the suite; retrain this node") from None
    return ck


def _str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _int(x, lo: int, hi: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo and (hi is None or x <= hi)


def load_node(folder: Path) -> NodeArtifact:
    """Load ``folder/model.pth`` and check ``folder/bin/encoder.pickle`` agrees with it.

    Raises
    ------
    ArtifactError
        On any problem, naming the file and what to do.
    """
    ck = read_checkpoint(folder / "model.pth")
    enc_path = folder / "bin" / "encoder.pickle"
    if enc_path.exists() or enc_path.is_symlink():
        try:
            enc = restricted_load(enc_path)
        except pickle.UnpicklingError as exc:
            raise ArtifactError(f"{enc_path} was refused ({exc}); it may carry code. Retrain the node") from None
        except OSError as exc:
            raise ArtifactError(f"{enc_path} cannot be read ({exc.strerror or exc}); retrain the node") from None
        classes = ck["config"]["node"]["classes"]
        try:
            agrees = isinstance(enc, dict) and {int(k): v for k, v in enc.items()} == dict(enumerate(classes))
        except (TypeError, ValueError, OverflowError):
            agrees = False
        if not agrees:
            raise ArtifactError(
                f"{enc_path} disagrees with {folder / 'model.pth'} (classes {classes}); retrain the node"
            )
    head = ck["config"]["head"]
    if head["n_classes"] != len(ck["config"]["node"]["classes"]):
        raise ArtifactError(f"{folder / 'model.pth'}: head size does not match its class list; retrain the node")
    return NodeArtifact(folder, ck)


def build_torch_model(art: NodeArtifact, shared_backbones: dict | None = None):
    """Rebuild the torch modules of a node.

    Returns
    -------
    (backbone, head, owns_backbone)
        ``backbone`` maps ``(N,3,S,S)`` → ``(N,D)``; ``owns_backbone`` is True when the node has its own
        fine-tuned weights (else the shared frozen one, built once per key in ``shared_backbones``).
    """
    from .backbones import create_backbone
    from .models import build_head

    cfg = art.config
    bb = cfg["backbone"]
    sd = art.checkpoint["state_dict"]
    try:
        head = build_head(cfg["head"])
        head_sd = dict(sd["head"])
        head_sd.setdefault("temperature", head.temperature)  # trained before calibration existed: T = 1
        head.load_state_dict(head_sd)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        why = " ".join(str(exc).split())[:160]  # torch messages span lines: keep one
        raise ArtifactError(f"{art.folder / 'model.pth'}: head weights do not fit its config ({why}); retrain") from None
    if "backbone" in sd:
        backbone = create_backbone(bb["name"], pretrained=False, image_size=bb["image_size"])
        try:
            backbone.net.load_state_dict(sd["backbone"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            why = " ".join(str(exc).split())[:160]  # torch messages span lines: keep one
            raise ArtifactError(
                f"{art.folder / 'model.pth'}: backbone weights do not fit {bb['name']} ({why}); retrain"
            ) from None
        return backbone.eval(), head.eval(), True
    key = backbone_key(cfg)
    if shared_backbones is not None and key in shared_backbones:
        return shared_backbones[key], head.eval(), False
    backbone = create_backbone(bb["name"], pretrained=True, weights=weights_file(art), image_size=bb["image_size"])
    if backbone.weights_fingerprint != bb["weights_fingerprint"]:
        raise ArtifactError(
            f"{art.folder}: the {bb['name']} weights here differ from those it was trained on; "
            "reinstall the same weights package or retrain"
        )
    if shared_backbones is not None:
        shared_backbones[key] = backbone
    return backbone, head.eval(), False


def weights_file(art: NodeArtifact) -> Path | None:
    """The backbone weights file a frozen node was trained with (``None``: the packaged ImageNet weights).

    Where training found it, else a file of the same name in the models folder (the node folder's
    parent: ``train_lcpn.sh --tune-backbone`` writes its tuned backbone there, so a models folder moved or
    copied elsewhere still loads; the fingerprint check that follows catches another file).

    Raises
    ------
    ArtifactError
        Neither exists (one line, with what to do).
    """
    recorded = art.config["backbone"].get("weights_file")
    if not recorded:
        return None
    for candidate in (Path(recorded), art.folder.parent / Path(recorded).name):
        if candidate.is_file():
            return candidate
    raise ArtifactError(f"{art.folder}: the backbone weights it was trained with, {recorded}, are missing; put the "
                        f"file back (or beside the node folders) or predict with the ONNX export (--runtime onnx)")


def backbone_key(cfg: dict) -> tuple:
    """What identifies a frozen shared backbone: name, input size, resize policy, weights."""
    bb = cfg["backbone"]
    return (bb["name"], int(bb["image_size"]), bb["resize"], bb["weights_fingerprint"])
