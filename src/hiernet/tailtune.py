"""Tune the last blocks of an EfficientNet backbone on a CPU, then train the usual frozen-mode heads on it.

Fine-tuning a whole backbone is a GPU job; tuning its last block(s) is not. The backbone is cut before
its last ``blocks`` MBConv blocks: the **trunk** (stem and the blocks before the cut) runs once per
image and view in onnxruntime and its feature maps are cached (:class:`hiernet.data.FeatureCache`, keyed
like the pooled features plus the cut); the **tail** (the last blocks, the 1 × 1 head convolution and
its batch norm, then global average pooling) is trained with a linear classifier over the tree's leaves
on those maps (:func:`tune_tail`). The tuned tail is written back into the backbone's ``state_dict``
(:func:`tuned_state_dict`), a plain weights file that ``train.py --weights`` loads like any other: the
feature cache, the int8 export and prediction then see the tuned backbone, unchanged.

A ``+`` composite (the default recipe's two networks) is tuned member by member (:func:`tune_member`:
each member's own trunk maps, tail and classifier); its weights file is the composite's ``net.state_dict()``
(member ``i`` under ``"i."``), which ``create_backbone(weights=...)`` splits again.

Each member's tuned linear classifier is kept too: averaged over the members (their logits, one linear
layer over the concatenated features) it is the **tuned classifier** (:func:`averaged_classifier`), saved
beside the weights (:func:`save_classifier`) for ``train.py -d flat --flat-classifier`` to use as the flat
head (by cross-validation it beats the heads trained on the tuned features afterwards).

Only the tree's training split is read; the validation split scores the tuned linear classifier(s).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .safeio import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneConfig:
    """How the tail is tuned.

    Attributes
    ----------
    blocks : int
        How many of the backbone's last MBConv blocks are tuned (with the head convolution).
    epochs : int
        Passes over the training images (one random cached view of each per epoch, mirrored at random).
    lr : float
        Peak learning rate of the tail (AdamW, one-cycle); the classifier's is ten times as high.
    views : int
        Augmented views cached per training image, besides the evaluation view and its mirror.
    batch_size : int
    label_smoothing : float
    seed : int
        Seeds the augmented views, the order of the images and the initialisation.
    """

    blocks: int = 1
    epochs: int = 12
    lr: float = 3e-4
    views: int = 2
    batch_size: int = 64
    label_smoothing: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- the cut network
def split_backbone(backbone, blocks: int):
    """Cut a single EfficientNet backbone before its last ``blocks`` blocks: ``(trunk, tail)``.

    Parameters
    ----------
    backbone : hiernet.models.FeatureExtractor
        A single (not composite) EfficientNet(-Lite) backbone.
    blocks : int
        Blocks in the tail, ``1 <= blocks <=`` the backbone's number of blocks.

    Returns
    -------
    (torch.nn.Module, torch.nn.Module)
        ``trunk``: images ``(N, 3, S, S)`` in ``[0, 1]`` → maps ``(N, C, h, w)`` (it shares the backbone's
        parameters); ``tail``: maps → pooled features ``(N, D)``, a copy of the last blocks. Composed,
        they compute exactly ``backbone(x)``. Both in eval mode.
    """
    import torch
    from torch import nn

    trunks = backbone.trunks()
    if len(trunks) != 1:
        raise UserError(f"tune one backbone at a time: {backbone.spec.name!r} joins {len(trunks)}; "
                        f"pick one of them with --backbone")
    net = trunks[0]
    n = len(net._blocks)
    if not 1 <= blocks <= n:
        raise UserError(f"--tune-blocks must be 1-{n} for {backbone.spec.name} ({n} blocks), got {blocks}")
    cut = n - blocks

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net  # registered: the trunk's parameters are the backbone's

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - backbone.mean0) / backbone.std0
            x = net._swish(net._bn0(net._conv_stem(x)))
            for block in net._blocks[:cut]:
                x = block(x)
            return x

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(copy.deepcopy(list(net._blocks[cut:])))
            self.conv_head, self.bn1, self.act = copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1), net._swish

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))

    tail = Tail().eval()
    tail.cut = cut
    return Trunk().eval(), tail


def tuned_state_dict(backbone, tail) -> dict:
    """The backbone's ``state_dict`` with the tuned ``tail`` (from :func:`split_backbone`) in place of its
    last blocks and head convolution: a plain ``{name: tensor}`` dict that ``create_backbone(weights=...)``
    loads. The backbone itself is not changed."""
    net = backbone.trunks()[0]
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    parts = [(f"_blocks.{tail.cut + i}.", block) for i, block in enumerate(tail.blocks)]
    parts += [("_conv_head.", tail.conv_head), ("_bn1.", tail.bn1)]
    for prefix, module in parts:
        for k, v in module.state_dict().items():
            if prefix + k not in sd:
                raise RuntimeError(f"tuned tensor {prefix + k} has no place in the backbone")
            sd[prefix + k] = v.detach().clone()
    return sd


# ----------------------------------------------------------------------------------- cached maps
def trunk_maps(paths: list, backbone, blocks: int, resize: str, n_aug: int, seed: int,
               cache_dir: Path | None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The feature maps of every image before ``backbone``'s last ``blocks`` blocks (the trunk of
    :func:`split_backbone`): the evaluation view, its mirror and ``n_aug`` augmented views, from the
    feature cache (computed by onnxruntime where it lacks them). A cached map is ``C·h·w`` floats per view
    (Lite0 @ 224 px before its last block: 7 × 7 × 192, 37 kB).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        float32 maps ``(N, 2 + n_aug, C, h, w)`` (zeros where decoding failed) and a bool mask ``(N,)``
        of the images that decoded.
    """
    import tempfile

    import torch

    from .config import AugmentConfig
    from .data import FeatureCache, aug_views, eval_views, extract_features
    from .features import feature_cache_key

    size = backbone.image_size
    with torch.inference_mode():
        shape = tuple(split_backbone(backbone, blocks)[0](torch.zeros(1, 3, size, size)).shape[1:])
    key = {**feature_cache_key(backbone, resize, "maps", "cpu"), "tail_blocks": blocks, "views": n_aug, "seed": seed,
           "augment": AugmentConfig().key()}
    n_views = 2 + n_aug

    def make(img, s):
        v = eval_views(img, size, resize)
        return v if not n_aug else np.concatenate([v, aug_views(img, size, n_aug, s ^ seed)])

    with tempfile.TemporaryDirectory() as tmp:
        runner = None

        def run(batch: np.ndarray) -> np.ndarray:  # the trunk is exported only when the cache lacks a map
            nonlocal runner
            runner = runner or _trunk_runner(backbone, blocks, Path(cache_dir) / "onnx" if cache_dir else Path(tmp))
            return runner(batch).reshape(len(batch), -1)

        cache = FeatureCache(cache_dir, key, n_views, int(np.prod(shape)))
        feats, ok = extract_features(paths, run, cache, make, size, batch_size=16 * n_views, progress=progress,
                                     desc="trunk maps")
    return feats.reshape((len(paths), n_views) + shape), ok


def _trunk_runner(backbone, blocks: int, folder: Path):
    """``(B, 3, S, S) → (B, C, h, w)``: the trunk in onnxruntime, exported once into ``folder`` (named by
    the backbone, input size, weights and cut); PyTorch without onnxruntime."""
    from .features import config_hash
    from .runtime import OrtRunner, TorchRunner, export_onnx, onnx_available

    if not onnx_available():  # pragma: no cover - onnxruntime is a dependency
        return TorchRunner(split_backbone(backbone, blocks)[0], "cpu")
    which = [backbone.spec.name, backbone.image_size, backbone.weights_fingerprint, blocks]
    onnx = folder / f"trunk-{config_hash({'trunk': which})}.onnx"
    if not onnx.exists():
        traceable = copy.deepcopy(backbone)
        traceable.set_export_mode()
        size = backbone.image_size
        export_onnx(split_backbone(traceable, blocks)[0], np.zeros((1, 3, size, size), np.float32), onnx)
    return OrtRunner(onnx)


# ----------------------------------------------------------------------------------- tuning
def pooled(tail, maps, views: list, batch: int = 256) -> np.ndarray:
    """``tail`` (in eval mode) over ``maps`` ``(N, V, C, h, w)``'s ``views``: ``(N, len(views), D)`` float32."""
    import torch

    tail.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(maps), batch):
            x = torch.from_numpy(np.asarray(maps[s:s + batch][:, views], dtype=np.float32))
            out.append(tail(x.flatten(0, 1)).view(len(x), len(views), -1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(views), tail.conv_head.out_channels), np.float32)


def level_groups(hier, leaf_ids: list) -> list:
    """Each leaf's ancestor at every level of ``hier`` that has more than one node: the groups of
    :func:`tune_tail`'s level loss.

    Returns
    -------
    list of numpy.ndarray
        One ``(len(leaf_ids),)`` int array per level (top level first): the index, among that level's
        nodes, of each leaf's ancestor there (a leaf above that level is its own group).
    """
    paths = [hier.path(leaf) for leaf in leaf_ids]
    out = []
    for depth in range(max(map(len, paths)) - 1):  # the leaves' own level is the leaf loss itself
        ids = [path[min(depth, len(path) - 1)] for path in paths]
        nodes = sorted(set(ids))
        if len(nodes) > 1:
            out.append(np.array([nodes.index(i) for i in ids]))
    return out


def level_nll(log_probs, groups: list, y):
    """Mean negative log-likelihood of the true leaves' ancestors, summed over ``groups``' levels.

    ``log_probs`` ``(B, C)``: log-softmax over the leaves; ``groups``: :func:`level_groups`; ``y`` ``(B,)``
    leaf indices. A node's probability is the sum of its leaves' probabilities.
    """
    import torch
    import torch.nn.functional as F

    total = log_probs.new_zeros(())
    for g in groups:
        g = torch.as_tensor(g, dtype=torch.long)
        onehot = F.one_hot(g, int(g.max()) + 1).to(log_probs.dtype)  # (C, K)
        node_logp = torch.logsumexp(log_probs.unsqueeze(2) + torch.log(onehot).unsqueeze(0), 1)  # (B, K)
        total = total + F.nll_loss(node_logp, g[y])
    return total


def shared_classifier(dim: int, n_classes: int, levels: list):
    """A linear classifier over the leaves that borrows strength from the tree: each leaf's weight and bias
    are its own plus those of its ancestor at every level of ``levels`` (:func:`level_groups`).

    The ancestors' parts start at zero and are trained on the gradients of all their leaves, so a rare
    leaf starts from, and moves with, what its siblings share. :meth:`collapsed` folds it into one
    ``nn.Linear(dim, n_classes)`` with the same logits. ``forward``: ``(B, dim)`` -> ``(B, n_classes)``.
    """
    import torch
    from torch import nn

    class SharedLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.leaf = nn.Linear(dim, n_classes)
            self.shared = nn.ModuleList(nn.Linear(dim, int(np.max(g)) + 1) for g in levels)
            for m in self.shared:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
            for i, g in enumerate(levels):
                self.register_buffer(f"group{i}", torch.as_tensor(np.asarray(g), dtype=torch.long), persistent=False)

        def _groups(self):
            return [getattr(self, f"group{i}") for i in range(len(self.shared))]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.leaf(x)
            for g, m in zip(self._groups(), self.shared):
                z = z + m(x)[:, g]
            return z

        def collapsed(self) -> nn.Linear:
            out = nn.Linear(dim, n_classes)
            with torch.no_grad():
                out.weight.copy_(self.leaf.weight + sum(m.weight[g] for g, m in zip(self._groups(), self.shared)))
                out.bias.copy_(self.leaf.bias + sum(m.bias[g] for g, m in zip(self._groups(), self.shared)))
            return out

    return SharedLinear()


def tune_tail(tail, maps, y: np.ndarray, n_classes: int, epochs: int, seed: int, lr: float = 3e-4, batch: int = 64,
              label_smoothing: float = 0.1, progress: bool = False, levels: list | None = None,
              level_weight: float = 0.0, repeat_threshold: float = 0.0, share_levels: bool = False,
              share_decay: float | None = None, extra: tuple | None = None):
    """Train ``tail`` and a linear classifier on ``maps`` ``(N, V, C, h, w)`` with labels ``y`` ``(N,)``.

    Each epoch sees one random view of every image, mirrored at random; AdamW with a one-cycle schedule
    (the classifier at 10 × ``lr``), label smoothing. With ``levels`` (:func:`level_groups`) and a
    ``level_weight`` > 0 the loss adds ``level_weight`` × the negative log-likelihood of the true path's
    nodes at those levels (:func:`level_nll`; a hierarchy-aware loss). With ``repeat_threshold`` > 0 an
    epoch sees the images of rare classes more than once, each time another random view
    (:func:`repeat_factors`). With ``levels`` and ``share_levels`` the classifier borrows strength from
    the tree while it trains (:func:`shared_classifier`), then is folded into one linear layer;
    ``share_decay`` (default: the rest's 1e-4) is then the weight decay of each leaf's own part alone, so
    that a large one pulls every leaf toward what its ancestors share. ``extra``: more views for some
    images, ``(extra_maps (M, K, C, h, w), rows (N,))`` with ``rows[i]`` image ``i``'s row of ``extra_maps``
    or -1: an image with a row draws its view among its ``V + K`` views (e.g. more augmented views of the
    rare classes' images). Returns ``(tail, classifier)`` in eval mode; the classifier maps pooled features
    ``(N, D)`` to logits ``(N, n_classes)``.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    shared = bool(levels) and share_levels
    cls, opt = _classifier_and_optimizer(tail, n_classes, lr, levels if shared else None, share_decay)
    n, n_views = len(y), maps.shape[1]
    n_extra = _extra_counts(extra, n)
    counts = epoch_counts(y, n_classes, epochs, repeat_threshold, seed)  # drawn up front: the schedule's length
    steps = sum(((n if c is None else int(c.sum())) + batch - 1) // batch for c in counts)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in opt.param_groups], total_steps=steps,
                                                pct_start=0.15)
    yt = torch.as_tensor(y, dtype=torch.long)
    tail.train()
    cls.train()
    for epoch in tqdm(range(epochs), desc="tuning", unit="epoch", disable=not progress, leave=False):
        ids, views = _epoch_draws(n, n_views, counts[epoch], gen, n_extra)
        total = 0.0
        for s in range(0, len(ids), batch):
            o = np.argsort(ids[s:s + batch], kind="stable")  # in file order: the maps are memory-mapped
            b, v = ids[s:s + batch][o], views[s:s + batch][o]
            x = torch.from_numpy(_read_views(maps, b, v, extra))
            flip = torch.rand(len(b), generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
            z = cls(tail(x))
            loss = F.cross_entropy(z, yt[b], label_smoothing=label_smoothing)
            if levels and level_weight:
                loss = loss + level_weight * level_nll(F.log_softmax(z, 1), levels, yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        log.info("tuning epoch %d: loss %.3f", epoch, total / len(ids))
    if shared:
        cls[1] = cls[1].collapsed()
    return tail.eval(), cls.eval()


def _classifier_and_optimizer(tail, n_classes: int, lr: float, shared_levels: list | None, share_decay: float | None):
    """:func:`tune_tail`'s classifier (dropout, then a linear layer over the leaves, or
    :func:`shared_classifier` of ``shared_levels``) and its AdamW (weight decay 1e-4; the classifier at
    10 × ``lr``; with a shared classifier and ``share_decay``, that decay on each leaf's own part)."""
    import torch
    from torch import nn

    dim = tail.conv_head.out_channels
    head = shared_classifier(dim, n_classes, shared_levels) if shared_levels else nn.Linear(dim, n_classes)
    cls = nn.Sequential(nn.Dropout(0.2), head)
    groups = [{"params": tail.parameters(), "lr": lr}, {"params": cls.parameters(), "lr": 10 * lr}]
    if shared_levels and share_decay is not None:
        groups[1:] = [{"params": head.leaf.parameters(), "lr": 10 * lr, "weight_decay": share_decay},
                      {"params": head.shared.parameters(), "lr": 10 * lr}]
    return cls, torch.optim.AdamW(groups, weight_decay=1e-4)


def epoch_counts(y: np.ndarray, n_classes: int, epochs: int, repeat_threshold: float, seed: int) -> list:
    """How often each image comes in each epoch: ``None`` (every image once) per epoch without repeat-factor
    sampling, else one ``(N,)`` int array per epoch, :func:`repeat_factors` rounded at random."""
    if repeat_threshold <= 0:
        return [None] * epochs
    factors, rng = repeat_factors(y, n_classes, repeat_threshold), np.random.default_rng(seed)
    return [np.floor(factors).astype(int) + (rng.random(len(y)) < factors % 1) for _ in range(epochs)]


def _epoch_draws(n: int, n_views: int, count: np.ndarray | None, gen,
                 n_extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's shuffled image indices and a random view of each, both ``(E,)``: every image once
    (``count`` None) or image ``i`` ``count[i]`` times; with ``n_extra`` ``(N,)`` image ``i``'s view is one
    of its ``n_views + n_extra[i]`` (views from ``n_views`` on are its extra ones)."""
    import torch

    if count is None:
        ids = torch.randperm(n, generator=gen).numpy()
        if n_extra is None:
            return ids, torch.randint(0, n_views, (n,), generator=gen).numpy()[ids]
    else:
        entries = np.repeat(np.arange(n), count)
        ids = entries[torch.randperm(len(entries), generator=gen).numpy()]
        if n_extra is None:
            return ids, torch.randint(0, n_views, (len(entries),), generator=gen).numpy()
    u = torch.rand(len(ids), generator=gen, dtype=torch.float64).numpy()
    return ids, np.minimum((u * (n_views + n_extra[ids])).astype(np.int64), n_views + n_extra[ids] - 1)


def _extra_counts(extra: tuple | None, n: int) -> np.ndarray | None:
    """How many extra views each of ``n`` images has in :func:`tune_tail`'s ``extra`` (``(N,)``; None without)."""
    if extra is None:
        return None
    extra_maps, rows = extra
    rows = np.asarray(rows)
    if rows.shape != (n,) or rows.max(initial=-1) >= extra_maps.shape[0]:
        raise ValueError(f"extra rows must be ({n},) indices below {extra_maps.shape[0]} or -1, got shape {rows.shape}")
    return np.where(rows >= 0, extra_maps.shape[1], 0)


def _read_views(maps, b: np.ndarray, v: np.ndarray, extra: tuple | None) -> np.ndarray:
    """Images ``b``'s views ``v`` (both ``(B,)``) as float32 maps ``(B, C, h, w)``: from ``maps`` below its
    ``V`` views, from ``extra``'s maps (:func:`tune_tail`) above."""
    if extra is None:
        return np.asarray(maps[b, v], dtype=np.float32)
    extra_maps, rows = extra
    own = v < maps.shape[1]
    x = np.empty((len(b),) + tuple(maps.shape[2:]), np.float32)
    if own.any():
        x[own] = maps[b[own], v[own]]
    if not own.all():
        x[~own] = extra_maps[np.asarray(rows)[b[~own]], v[~own] - maps.shape[1]]
    return x


def repeat_factors(y: np.ndarray, n_classes: int, threshold: float) -> np.ndarray:
    """Repeat-factor sampling (Gupta et al. 2019, LVIS): an image of class ``c`` comes
    ``max(1, sqrt(threshold / f_c))`` times per epoch on average, ``f_c`` the fraction of images of class
    ``c``: classes rarer than ``threshold`` come more often, the others once. Returns ``(N,)`` factors."""
    frac = np.bincount(y, minlength=n_classes) / max(len(y), 1)
    return np.maximum(1.0, np.sqrt(threshold / np.maximum(frac, 1e-12)))[y]


def tuned_probs(tail, cls, maps) -> np.ndarray:
    """Class probabilities ``(N, C)`` of maps ``(N, V >= 2, C, h, w)``: the eval view and its mirror averaged."""
    return mirror_probs(tuned_logits(tail, cls, maps))


def tuned_logits(tail, cls, maps) -> np.ndarray:
    """The classifier's logits ``(N, 2, C)`` of maps ``(N, V >= 2, C, h, w)``: the eval view and its mirror."""
    import torch

    feats = torch.from_numpy(pooled(tail, maps, [0, 1]))
    with torch.inference_mode():
        return torch.stack([cls(feats[:, 0]), cls(feats[:, 1])], 1).numpy()


def mirror_probs(logits: np.ndarray) -> np.ndarray:
    """``(N, 2, C)`` logits of a view and its mirror → their softmax probabilities averaged ``(N, C)``
    (what prediction does: :func:`hiernet.routing.softmax`, :func:`hiernet.routing.average_views`)."""
    from .routing import average_views, softmax

    return average_views(softmax(logits[:, 0]), softmax(logits[:, 1]))


# ----------------------------------------------------------------------------------- the tuned classifier
#: What :func:`save_classifier` writes and :func:`load_classifier` accepts (``format`` of the file).
CLASSIFIER_FORMAT = "hiernet-linear-classifier"


def averaged_classifier(members: list) -> tuple:
    """One linear layer over the concatenated features that averages the members' logits.

    Parameters
    ----------
    members : list of (torch.Tensor, torch.Tensor)
        Member ``i``'s classifier: weight ``(C, D_i)`` and bias ``(C,)``, in the composite's member order.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Weight ``(C, sum D_i)`` and bias ``(C,)``: ``W [f_1, ..., f_n] + b = mean_i (W_i f_i + b_i)``.
    """
    import torch

    n = len(members)
    weight = torch.cat([w.detach().float() for w, _ in members], 1) / n
    bias = torch.stack([b.detach().float() for _, b in members]).mean(0)
    return weight, bias


def save_classifier(path: Path, weight, bias, classes: list, backbone: str, image_size: int,
                    weights_fingerprint: str) -> None:
    """Write the tuned classifier (plain tensors, strings and ints: it loads with ``weights_only=True``),
    via a temporary file. ``weights_fingerprint`` is the tuned backbone's (``create_backbone(...)
    .weights_fingerprint``): the classifier is only right on that backbone's features."""
    import torch

    from .safeio import atomic_path

    with atomic_path(Path(path)) as tmp:
        torch.save({"format": CLASSIFIER_FORMAT, "version": 1, "classes": list(classes),
                    "weight": weight.detach().cpu().contiguous(), "bias": bias.detach().cpu().contiguous(),
                    "backbone": backbone, "image_size": int(image_size),
                    "weights_fingerprint": str(weights_fingerprint)}, tmp)


def load_classifier(path: str | Path) -> dict:
    """Read a :func:`save_classifier` file (``torch.load(weights_only=True)``) and check its shape.

    Raises
    ------
    UserError
        Missing, not such a file, or inconsistent: one line saying what to run.
    """
    import torch

    path = Path(path)
    fix = "write it with: python3 src/tune_backbone.py (or train_lcpn.sh --tune-backbone NAME)"
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"classifier file {path} not found; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch's own errors alike
        raise UserError(f"{path} is not a classifier file tune_backbone.py wrote ({type(exc).__name__}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{path} is not a classifier file tune_backbone.py wrote; {fix}")
    w, b, classes = doc.get("weight"), doc.get("bias"), doc.get("classes")
    if (not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor) or w.dim() != 2 or b.shape != (w.shape[0],)
            or not isinstance(classes, list) or len(classes) != w.shape[0]):
        raise UserError(f"{path}: the classifier's weight, bias and classes do not fit together; {fix}")
    return doc


# ----------------------------------------------------------------------------------- the whole step
def tuning_key(doc: dict, backbone, resize: str, cfg: TuneConfig) -> str:
    """What a tuning depends on (16 hex digits): the backbone, its input size, starting weights and resize
    policy, ``cfg``, and the tree's training images (content hash and leaf) — a rerun with the same key
    would tune the same weights again."""
    from .features import config_hash

    train = sorted((str(e.get("sha256") or e.get("path")), str(e.get("leaf"))) for e in doc.get("images", [])
                   if e.get("split") == "train")
    return config_hash({"backbone": backbone.spec.name, "image_size": backbone.image_size, "resize": resize,
                        "weights": backbone.weights_fingerprint, "tune": cfg.to_dict(), "classes": doc["flat"]["classes"],
                        "train": train})


def classifier_path(out: Path) -> Path:
    """Where the tuned classifier of the weights file ``out`` goes: ``<out stem>.classifier.pth`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.classifier.pth")


def current_tuning(out: Path, key: str) -> dict | None:
    """The summary beside the weights file ``out`` (``out.json``) when it was tuned with ``key`` and the
    file still holds those weights, with its tuned classifier (:func:`classifier_path`); else ``None``."""
    import json

    from .backbones import load_state_dict_file, state_fingerprint

    try:
        summary = json.loads(Path(out).with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("key") != key or not Path(out).is_file():
        return None
    try:
        same = state_fingerprint(load_state_dict_file(out)) == summary.get("weights_fingerprint")
        same = same and load_classifier(classifier_path(out))["weights_fingerprint"] == summary.get("backbone_fingerprint")
    except UserError:
        return None
    return summary if same else None


def tune_backbone(data_dir: Path, backbone_name: str, image_size: int | None, cfg: TuneConfig, cache_dir: Path | None,
                  resize: str = "crop", weights: str | None = None, progress: bool = True,
                  keep: Path | None = None) -> tuple[dict | None, dict | None, dict]:
    """Tune ``cfg.blocks`` last blocks of ``backbone_name`` on the prepared tree's training images (flat
    leaves as classes). A ``+`` composite has the last blocks of every member tuned, each on its own maps
    with its own linear classifier (:func:`tune_member`).

    Parameters
    ----------
    keep : Path, optional
        An earlier result: when it was tuned from the same inputs (:func:`tuning_key`,
        :func:`current_tuning`), nothing is tuned and its summary is returned with ``None`` weights.

    Returns
    -------
    (dict or None, dict or None, dict)
        The tuned backbone's ``state_dict`` (a composite's: its ``net.state_dict()``, member ``i`` under
        ``"i."``, what ``create_backbone(weights=...)`` loads); the tuned classifier ``{"weight" (C, D),
        "bias" (C,), "classes", "weights_fingerprint"}`` (:func:`averaged_classifier`; the fingerprint
        is the tuned backbone's ``weights_fingerprint``); and a summary: its :func:`tuning_key` (``key``),
        backbone, image size, config, images, classes, validation leaf accuracy (eval view + mirror;
        ``None`` without a validation split) of the members' probabilities averaged (``val_accuracy``) and
        of the tuned classifier (``val_accuracy_classifier``), the weights' fingerprints and seconds.
    """
    import torch

    from .backbones import create_backbone, joint_fingerprint, state_fingerprint

    t0 = time.time()
    doc, classes, train, val = _flat_splits(Path(data_dir))
    backbone = create_backbone(backbone_name, weights=weights, image_size=image_size)
    key = tuning_key(doc, backbone, resize, cfg)
    if keep is not None and (earlier := current_tuning(keep, key)) is not None:
        return None, None, earlier
    spec = backbone.spec
    members = [backbone] if not spec.parts else [  # each member from the composite's loaded weights
        create_backbone(part.name, weights=trunk.state_dict(), image_size=backbone.image_size)
        for part, trunk in zip(spec.members(), backbone.trunks())]
    tuned = []
    for member in members:
        torch.manual_seed(cfg.seed)
        tuned.append(tune_member(member, train, val, len(classes), cfg, resize, cache_dir, progress))
    sds = [t["state_dict"] for t in tuned]
    sd = sds[0] if not spec.parts else {f"{i}.{k}": v for i, member_sd in enumerate(sds) for k, v in member_sd.items()}
    weight, bias = averaged_classifier([(t["weight"], t["bias"]) for t in tuned])
    fingerprint = joint_fingerprint([state_fingerprint(s) for s in sds])
    classifier = {"weight": weight, "bias": bias, "classes": list(classes), "weights_fingerprint": fingerprint}
    val_acc = val_acc_clf = None
    val_ok = np.logical_and.reduce([t["val_ok"] for t in tuned])
    if val and val_ok.any():
        vy = np.array([c for _, c in val])[val_ok]
        logits = [t["val_logits"][val_ok] for t in tuned]  # (V, 2, C) each
        val_acc = float(np.mean(np.mean([mirror_probs(z) for z in logits], 0).argmax(1) == vy))
        val_acc_clf = float(np.mean(mirror_probs(np.mean(logits, 0)).argmax(1) == vy))
    summary = {"key": key, "backbone": backbone_name, "image_size": backbone.image_size, "resize": resize,
               "tune": cfg.to_dict(), "base_weights": backbone.weights_fingerprint, "train_images": tuned[0]["n_train"],
               "classes": len(classes), "val_images": len(val), "val_accuracy": val_acc,
               "val_accuracy_classifier": val_acc_clf, "weights_fingerprint": state_fingerprint(sd),
               "backbone_fingerprint": fingerprint, "seconds": round(time.time() - t0, 1)}
    return sd, classifier, summary


def tune_member(backbone, train: list, val: list, n_classes: int, cfg: TuneConfig, resize: str,
                cache_dir: Path | None, progress: bool = True) -> dict:
    """Tune the last ``cfg.blocks`` blocks of one (single) backbone on ``train`` ``[(path, class), ...]``.

    Returns
    -------
    dict
        ``state_dict``: the tuned backbone's (:func:`tuned_state_dict`); ``weight`` ``(C, D)`` and ``bias``
        ``(C,)``: its tuned linear classifier; ``val_logits``: the classifier's logits ``(len(val), 2, C)``
        on the validation images' eval view and mirror (``None`` without ``val``); ``val_ok``: a bool mask
        ``(len(val),)`` of the validation images that decoded; ``n_train``: how many training images did.
    """
    _, tail = split_backbone(backbone, cfg.blocks)
    log.info("tuning the last %d block(s) of %s @ %d px on %d training images, %d leaves", cfg.blocks,
             backbone.spec.name, backbone.image_size, len(train), n_classes)
    maps, ok = trunk_maps([p for p, _ in train], backbone, cfg.blocks, resize, cfg.views, cfg.seed, cache_dir,
                          progress)
    y = np.array([c for _, c in train])
    tail, cls = tune_tail(tail, maps[ok], y[ok], n_classes, cfg.epochs, cfg.seed, cfg.lr, cfg.batch_size,
                          cfg.label_smoothing, progress)
    del maps
    logits, vok = None, np.zeros(len(val), bool)
    if val:
        vmaps, vok = trunk_maps([p for p, _ in val], backbone, cfg.blocks, resize, 0, cfg.seed, cache_dir, progress)
        logits = tuned_logits(tail, cls, vmaps)
    linear = cls[-1]
    return {"state_dict": tuned_state_dict(backbone, tail), "weight": linear.weight.detach().clone(),
            "bias": linear.bias.detach().clone(), "val_logits": logits, "val_ok": vok, "n_train": int(ok.sum())}


def _flat_splits(data_dir: Path) -> tuple[dict, list, list, list]:
    """The prepared tree's document, its leaves (the flat dataset's class folders) and the flat train and
    val splits as ``[(path, class index), ...]`` (val empty when absent)."""
    from .data import read_split
    from .hierarchy import require_hierarchy_json

    _, doc = require_hierarchy_json(data_dir / "hierarchy.json", "the prepared dataset", "run prepare_dataset.py first")
    classes = doc["flat"]["classes"]
    train = read_split(data_dir / "flat" / "train", classes)
    val = read_split(data_dir / "flat" / "val", classes) if (data_dir / "flat" / "val").is_dir() else []
    if len({c for _, c in train}) < 2:
        raise UserError(f"{data_dir}: tuning needs training images of at least two leaves; prepare a larger tree")
    return doc, classes, train, val
