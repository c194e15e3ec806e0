"""Train and evaluate one node classifier (a head on features, or a whole network on images).

One loop serves both: ``model.train()`` for training batches and ``model.eval()`` for validation,
one AdamW optimiser and one warm-up + cosine schedule per run, class-weighted cross-entropy with
label smoothing (optionally on logit-adjusted logits, and with class-aware sampling; targets may be sets of classes,
partial labels: :class:`SetTargetLoss`), early stopping on validation loss that restores the best weights, AMP on CUDA,
a per-epoch CSV log, a resumable checkpoint after every epoch, and DistributedDataParallel when
launched by torchrun.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, Subset, WeightedRandomSampler

from . import distributed as dist_utils
from .config import FitConfig

__all__ = ["FitConfig", "FitResult", "class_weights", "logit_adjustment", "LogitAdjustedLoss", "SetTargetLoss",
           "target_rows", "target_distribution", "label_counts", "sample_weights", "predict_logits", "fit",
           "train_one_epoch", "evaluate",
           "EarlyStopping", "save_resume_checkpoint", "restore_resume_checkpoint", "write_csv", "train_batching",
           "EpochSampler", "shard", "predict_logits_sharded", "scaled_lr"]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """History rows (one dict per epoch) and the epoch whose weights were kept."""

    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf


def target_rows(labels, n_classes: int):
    """Row of each target in a ``(C + S, C)`` target matrix (:func:`target_distribution`,
    :class:`SetTargetLoss`): class ``y >= 0`` is row ``y``, set target ``-1 - s`` is row ``C + s``.
    ``labels`` may be a numpy array or a torch tensor."""
    if isinstance(labels, torch.Tensor):
        return torch.where(labels >= 0, labels, n_classes - 1 - labels)
    labels = np.asarray(labels)
    return np.where(labels >= 0, labels, n_classes - 1 - labels)


def target_distribution(labels: np.ndarray, sets, n_classes: int) -> np.ndarray:
    """``(C + S, C)``: for each target row (:func:`target_rows`), how it counts towards the ``C`` classes.

    A class target counts as one sample of its class; a set target (row ``s`` of the 0/1 ``sets``
    ``(S, C)``) as one sample spread over its classes in proportion to their class-target counts in
    ``labels`` (evenly when none of them has any): what class weights, logit adjustment and class-aware
    sampling count for a partial label.
    """
    labels = np.asarray(labels)
    sets = np.asarray(sets, dtype=np.float64).reshape(-1, n_classes)
    hard = np.bincount(labels[labels >= 0], minlength=n_classes).astype(np.float64)
    spread = sets * hard
    empty = spread.sum(1) == 0
    spread[empty] = sets[empty]
    spread /= np.maximum(spread.sum(1, keepdims=True), 1e-12)
    return np.concatenate([np.eye(n_classes), spread])


def label_counts(labels: np.ndarray, n_classes: int, sets=None) -> np.ndarray:
    """Samples per class ``(C,)`` float; set targets (``labels < 0``, rows of ``sets``) count fractionally
    (:func:`target_distribution`)."""
    labels = np.asarray(labels)
    if sets is None or not len(sets):
        return np.bincount(labels, minlength=n_classes).astype(np.float64)
    return target_distribution(labels, sets, n_classes)[target_rows(labels, n_classes)].sum(0)


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0, sets=None) -> torch.Tensor:
    """Inverse-frequency loss weights ``(n / (C * count_c)) ** power``; classes with no samples get 0.

    ``power`` 1 fully balances the classes, 0 leaves the loss unweighted (the ``cpu`` recipe: weighting
    cost leaf accuracy in cross-validation); the ``original`` recipe uses 0.5. Set targets count as in
    :func:`label_counts`.
    """
    counts = label_counts(labels, n_classes, sets)
    w = np.where(counts > 0, (counts.sum() / (n_classes * np.where(counts > 0, counts, 1.0))) ** power, 0.0)
    return torch.tensor(w, dtype=torch.float32)


def logit_adjustment(labels: np.ndarray, n_classes: int, tau: float, sets=None) -> torch.Tensor:
    """``tau * log(prior)`` ``(C,)`` of the training labels ``(N,)`` (Menon et al., 2021, logit adjustment).

    A class without samples counts as one (a finite shift); set targets count as in :func:`label_counts`.
    Added to the logits in the training loss, it makes the raw logits estimate class-balanced scores;
    ``tau`` 1 is the balanced softmax (Ren et al., 2020).
    """
    counts = label_counts(labels, n_classes, sets)
    counts = np.where(counts > 0, counts, 1.0)
    return torch.tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)


def sample_weights(labels: np.ndarray, power: float, sets=None) -> np.ndarray:
    """Class-aware sampling weights ``(N,)``: ``count_c ** -power`` for a sample of class ``c``; a set
    target gets that weight averaged over its classes as it counts towards them (:func:`target_distribution`)."""
    labels = np.asarray(labels)
    if sets is None or not len(sets):
        return np.bincount(labels).astype(np.float64)[labels] ** -power
    n_classes = np.asarray(sets).shape[1]
    counts = label_counts(labels, n_classes, sets)
    inv = np.where(counts > 0, np.where(counts > 0, counts, 1.0) ** -power, 0.0)
    return (target_distribution(labels, sets, n_classes) @ inv)[target_rows(labels, n_classes)]


class LogitAdjustedLoss(nn.Module):
    """``loss(logits + shift, y)``: a loss on logits ``(B, C)`` shifted by a fixed ``(C,)`` vector."""

    def __init__(self, loss: nn.Module, shift: torch.Tensor):
        super().__init__()
        self.loss = loss
        self.weight = getattr(loss, "weight", None)
        self.register_buffer("shift", shift)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(logits + self.shift, y)


class SetTargetLoss(nn.Module):
    """Cross-entropy whose target is a class or a set of classes (a partial label: the leaves below its node).

    A target ``y >= 0`` is class ``y``; ``y = -1 - s`` is the set of classes in row ``s`` of ``sets``
    ``(S, C)`` (0/1), whose loss is ``-log Σ_{k in set} softmax(z)_k = logsumexp(z) - logsumexp(z[set])``.
    Logits are shifted by ``shift`` ``(C,)`` first (logit adjustment) when given. Each sample's loss is
    weighted by ``row_weight[row]`` ``(C + S,)`` (:func:`target_rows`; class weights, and for a set their
    mean as the set counts towards its classes) and the sum divided by the sum of the weights. Label
    smoothing ``eps`` mixes in ``eps/C Σ_k weight_k · (-log p_k)`` as ``nn.CrossEntropyLoss`` does: for class
    targets the loss equals ``nn.CrossEntropyLoss(weight, label_smoothing=eps)(z + shift, y)``.
    """

    def __init__(self, sets, weight: torch.Tensor | None = None, row_weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0, shift: torch.Tensor | None = None):
        super().__init__()
        sets = torch.as_tensor(np.asarray(sets, dtype=np.float32)) > 0
        if sets.dim() != 2 or not bool(sets.any(1).all()):
            raise ValueError("set targets must be a (S, C) 0/1 matrix with at least one class per set")
        self.n_classes, self.label_smoothing = int(sets.shape[1]), float(label_smoothing)
        self.register_buffer("member", torch.cat([torch.eye(self.n_classes, dtype=torch.bool), sets]))
        self.register_buffer("weight", weight)
        self.register_buffer("row_weight", row_weight)
        self.register_buffer("shift", shift)

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits if self.shift is None else logits + self.shift, dim=1)

    def nll(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(B,)`` unweighted, unsmoothed ``-log P(target)`` (the probability of the set for set targets)."""
        member = self.member[target_rows(y, self.n_classes)]
        return -self._log_probs(logits).masked_fill(~member, float("-inf")).logsumexp(1)

    def sample_weight(self, y: torch.Tensor) -> torch.Tensor:
        """``(B,)`` loss weight of each target (ones without class weights)."""
        if self.row_weight is None:
            return torch.ones(len(y), dtype=torch.float32, device=y.device)
        return self.row_weight[target_rows(y, self.n_classes)]

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: the most likely class is the target class, or one of the target set."""
        return self.member[target_rows(y, self.n_classes), logits.argmax(1)]

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = self._log_probs(logits)
        nll = -logp.masked_fill(~self.member[target_rows(y, self.n_classes)], float("-inf")).logsumexp(1)
        w = self.sample_weight(y)
        loss = (1 - self.label_smoothing) * w * nll
        if self.label_smoothing:
            smooth = -(logp * self.weight).sum(1) if self.weight is not None else -logp.sum(1)
            loss = loss + self.label_smoothing / self.n_classes * smooth
        return loss.sum() / w.sum()


def _criteria(train_labels: np.ndarray, n_classes: int, cfg: FitConfig, device: str, sets=None):
    """Training loss (label smoothing) and validation loss: class-weighted CE, on adjusted logits if asked;
    a :class:`SetTargetLoss` pair when there are set targets (``sets`` ``(S, C)``)."""
    if sets is not None and len(sets):
        return _set_criteria(train_labels, n_classes, cfg, device, sets)
    weight = class_weights(train_labels, n_classes, cfg.class_weight_power).to(device) if cfg.class_weight_power else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    val_criterion = nn.CrossEntropyLoss(weight=weight)
    if cfg.logit_adjust:
        shift = logit_adjustment(train_labels, n_classes, cfg.logit_adjust)
        criterion, val_criterion = LogitAdjustedLoss(criterion, shift).to(device), LogitAdjustedLoss(val_criterion, shift).to(device)
    return criterion, val_criterion


def _set_criteria(train_labels: np.ndarray, n_classes: int, cfg: FitConfig, device: str, sets):
    """:func:`_criteria` with set targets: class weights, logit adjustment and label smoothing as for class
    targets, a set target counting towards its classes as in :func:`target_distribution`."""
    weight = row_weight = shift = None
    if cfg.class_weight_power:
        weight = class_weights(train_labels, n_classes, cfg.class_weight_power, sets)
        dist = target_distribution(train_labels, sets, n_classes)
        row_weight = torch.tensor(dist @ weight.numpy().astype(np.float64), dtype=torch.float32)
    if cfg.logit_adjust:
        shift = logit_adjustment(train_labels, n_classes, cfg.logit_adjust, sets)
    return (SetTargetLoss(sets, weight, row_weight, cfg.label_smoothing, shift).to(device),
            SetTargetLoss(sets, weight, row_weight, 0.0, shift).to(device))


def _autocast(device: str, enabled: bool):
    return torch.autocast("cuda", dtype=torch.float16, enabled=enabled and device.startswith("cuda"))


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, device: str, amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, C)`` and labels ``(N,)`` of a loader in eval mode."""
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        with _autocast(device, amp):
            out = model(_to_device(x, device))
        outs.append(out.float().cpu())
        ys.append(y)
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(outs).numpy(), torch.cat(ys).numpy()


def _to_device(x: torch.Tensor, device: str) -> torch.Tensor:
    """``x`` on ``device``; image batches ``(B, 3, H, W)`` in channels-last layout on CUDA (faster convolutions)."""
    if device.startswith("cuda") and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def shard(dataset: Dataset) -> Dataset:
    """This rank's disjoint share of ``dataset`` (items ``rank, rank + W, ...``; no padding), or ``dataset``."""
    if not dist_utils.is_distributed():
        return dataset
    return Subset(dataset, range(dist_utils.rank(), len(dataset), dist_utils.world_size()))


def predict_logits_sharded(model: nn.Module, dataset: Dataset, batch_size: int, workers: int, device: str,
                           amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_logits` of ``dataset`` with each rank predicting its :func:`shard`; every rank gets
    all ``(N, C)`` logits and ``(N,)`` labels, in dataset order."""
    loader = DataLoader(shard(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.startswith("cuda"))
    logits, labels = predict_logits(model, loader, device, amp)
    if not dist_utils.is_distributed():
        return logits, labels
    parts = dist_utils.all_gather_object((logits, labels))
    w, n = dist_utils.world_size(), len(dataset)
    dim = max((p[0].shape[1] for p in parts if len(p[1])), default=0)
    out_l, out_y = np.zeros((n, dim), np.float32), np.zeros((n,), np.int64)
    for r, (lg, y) in enumerate(parts):
        if len(y):
            out_l[r::w], out_y[r::w] = lg, y
    return out_l, out_y


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class EarlyStopping:
    """Keeps the weights of the epoch with the lowest validation loss; stops after ``patience`` worse ones.

    ``best_state`` starts as the model's weights before training (kept when no epoch improves).
    """

    patience: int
    best_state: dict
    best_epoch: int = -1
    best_val_loss: float = math.inf
    bad_epochs: int = 0

    @property
    def stopped(self) -> bool:
        return self.bad_epochs >= self.patience

    def step(self, val_loss: float, epoch: int, model: nn.Module) -> bool:
        """Record epoch ``epoch`` (1-based); True when it is the best so far (its weights are copied)."""
        if val_loss < self.best_val_loss - 1e-6:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
            return True
        self.bad_epochs += 1
        return False


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion, optimizer, scheduler, scaler, device: str,
                    amp: bool, desc: str = "", progress: bool = False) -> tuple[float, float]:
    """One pass over ``loader`` in train mode, stepping the scheduler per batch.

    Sums stay on the device (no host sync per step) and are reduced once at the end.

    Returns
    -------
    (float, float)
        Mean training loss and accuracy over all ranks.
    """
    from tqdm import tqdm

    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = _to_device(x, device), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            out = model(x)
            loss = criterion(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        sums += torch.stack([loss.detach().double() * len(y), _hits(criterion, out, y).sum().double(),
                             torch.full((), float(len(y)), dtype=torch.float64, device=device)])
    tot = dist_utils.all_reduce_tensor(sums).tolist()
    return tot[0] / max(1, tot[2]), tot[1] / max(1, tot[2])


def _hits(criterion, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: right predictions (a set target is hit by any class of its set)."""
    return criterion.hits(out, y) if isinstance(criterion, SetTargetLoss) else out.argmax(1) == y


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, criterion, device: str, amp: bool) -> tuple[float, float]:
    """Loss (``criterion``, no label smoothing) and accuracy of ``model`` on ``loader`` in eval mode (a set
    target, see :class:`SetTargetLoss`, is right when the prediction is in its set).

    Under torchrun each rank passes its shard of the data (:func:`shard`); the sums
    Σ w·loss, Σ w, correct and n are reduced over the ranks, so every rank gets the same numbers
    (and takes the same early-stopping decision).
    """
    model.eval()
    weight, shift = getattr(criterion, "weight", None), getattr(criterion, "shift", None)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # Σ w·loss, Σ w, correct, n
    for x, y in loader:
        x, y = _to_device(x, device), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        if isinstance(criterion, SetTargetLoss):
            w, losses = criterion.sample_weight(y), criterion.nll(out, y)
        else:
            w = weight[y] if weight is not None else torch.ones_like(y, dtype=torch.float32)
            losses = nn.functional.cross_entropy(out if shift is None else out + shift, y, reduction="none")
        sums += torch.stack([(w * losses).sum().double(), w.sum().double(), _hits(criterion, out, y).sum().double(),
                             torch.full((), float(len(y)), dtype=torch.float64, device=device)])
    tot = dist_utils.all_reduce_tensor(sums).tolist()
    return tot[0] / tot[1] if tot[1] > 0 else math.inf, tot[2] / max(1.0, tot[3])


def save_resume_checkpoint(path: Path, config_hash: str, epoch: int, model, optimizer, scheduler, scaler,
                           stopper: EarlyStopping, history: list) -> None:
    """Write everything :func:`restore_resume_checkpoint` needs to continue after epoch ``epoch`` (0-based)."""
    from .safeio import atomic_path

    ck = {
        "config_hash": config_hash, "epoch": epoch, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "best_state": stopper.best_state, "history": history, "best_epoch": stopper.best_epoch,
        "best_val_loss": stopper.best_val_loss, "bad_epochs": stopper.bad_epochs,
    }
    with atomic_path(path) as tmp:
        torch.save(ck, tmp)


_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "scaler", "best_state", "history", "best_epoch",
                    "best_val_loss", "bad_epochs")


def _read_checkpoint(path: Path, config_hash: str, log_it: bool) -> dict | None:
    """The checkpoint at ``path`` if it exists, is complete and was written with ``config_hash``."""
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start over
        if log_it:
            log.warning("cannot resume from %s (%s); starting over", path, type(exc).__name__)
        return None
    if not isinstance(ck, dict) or ck.get("config_hash") != config_hash:
        if log_it:
            log.info("ignoring checkpoint %s written with other settings", path)
        return None
    missing = [k for k in _CHECKPOINT_KEYS if k not in ck]
    if missing:
        if log_it:
            log.warning("cannot resume from %s (it lacks %s); starting over", path, ", ".join(missing))
        return None
    return ck


def _apply_checkpoint(ck: dict, model, optimizer, scheduler, scaler, stopper: EarlyStopping) -> str:
    """Load ``ck`` into the objects (raises on the first part that does not fit); returns a note or ``""``."""
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    note = ""
    if scaler.is_enabled() and not ck["scaler"]:
        note = " with a fresh AMP loss scale (the checkpoint was written without AMP)"
    elif scaler.is_enabled():
        scaler.load_state_dict(ck["scaler"])
    stopper.best_state, stopper.best_epoch, stopper.best_val_loss = ck["best_state"], ck["best_epoch"], ck["best_val_loss"]
    stopper.bad_epochs = ck["bad_epochs"]
    return note


def restore_resume_checkpoint(path: Path, config_hash: str, model, optimizer, scheduler, scaler,
                              stopper: EarlyStopping, log_it: bool = True) -> tuple[list, int]:
    """Load ``path`` into the objects if it was written with ``config_hash``; all of it or nothing.

    Under torchrun rank 0 alone reads ``path`` (other hosts may not see it) and broadcasts it. A part
    that does not fit (another model or optimiser) rolls every object back to its state before the
    call. A checkpoint written without AMP resumes with a fresh loss scale.

    Returns
    -------
    (list, int)
        The history so far and the (0-based) epoch to start at; ``([], 0)`` when nothing was resumed.
    """
    ck = dist_utils.broadcast_object(_read_checkpoint(path, config_hash, log_it) if dist_utils.is_main() else None)
    if ck is None:
        return [], 0
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
              copy.deepcopy(scheduler.state_dict()), copy.deepcopy(scaler.state_dict()),
              (stopper.best_state, stopper.best_epoch, stopper.best_val_loss, stopper.bad_epochs))
    try:
        note = _apply_checkpoint(ck, model, optimizer, scheduler, scaler, stopper)
    except Exception as exc:  # noqa: BLE001 - roll back whatever was applied, then start over
        model.load_state_dict(before[0])
        optimizer.load_state_dict(before[1])
        scheduler.load_state_dict(before[2])
        if before[3]:
            scaler.load_state_dict(before[3])
        stopper.best_state, stopper.best_epoch, stopper.best_val_loss, stopper.bad_epochs = before[4]
        if log_it:
            log.warning("cannot resume from %s (%s: %s); starting over from epoch 1", path, type(exc).__name__,
                        str(exc).splitlines()[0][:120] if str(exc) else "")
        return [], 0
    if log_it:
        log.info("resuming from epoch %d (checkpoint %s)%s", ck["epoch"] + 1, path, note)
    return ck["history"], ck["epoch"] + 1


def train_batching(n: int, world: int, batch_size: int) -> tuple[int, bool]:
    """Batch size and ``drop_last`` for ``n`` training samples split over ``world`` ranks.

    Each rank sees ``ceil(n / world)`` samples (DistributedSampler pads). A rank with fewer samples than
    ``batch_size`` gets one smaller batch (the batch shrinks to its share); otherwise the incomplete last
    batch is dropped when there are more than two full batches, or when it would hold a single sample
    (BatchNorm cannot train on one). Every rank thus makes at least one step per epoch.
    """
    per_rank = -(-n // max(1, world))
    if per_rank < 1:
        raise ValueError("no training samples")
    if per_rank <= batch_size:
        return per_rank, False
    return batch_size, per_rank > 2 * batch_size or per_rank % batch_size == 1


class EpochSampler(Sampler):
    """Wraps a sampler so each index carries the epoch: yields ``(index, epoch)``.

    DataLoader worker processes (persistent ones above all) hold their own copy of the dataset, so a
    ``dataset.set_epoch`` in the main process never reaches them; the epoch travels with the indices
    instead (for datasets whose ``__getitem__`` accepts such pairs, like the fine-tuning image dataset).
    """

    def __init__(self, base: Sampler):
        self.base, self.epoch = base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((int(i), epoch) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


def _seed_epoch(sampler: Sampler, seed: int, epoch: int) -> None:
    """Seed shuffling (shared by all ranks) and dropout (per rank) from the epoch, so a resumed run sees
    the batches and masks an uninterrupted one would."""
    base = getattr(sampler, "base", sampler)
    if isinstance(getattr(base, "generator", None), torch.Generator):
        base.generator.manual_seed(seed + epoch)
    torch.manual_seed(seed + 1009 * epoch + dist_utils.rank())


def _loaders(train_set: Dataset, val_set: Dataset | None, cfg: FitConfig, device: str, train_labels=None,
             sets=None):
    """Training loader (shuffled, seeded; DistributedSampler under torchrun; class-aware sampling with
    ``cfg.sample_power``: a sample of class c drawn with weight ``count_c ** -power``, single process;
    :func:`sample_weights`, set targets ``sets`` included), this
    rank's validation loader (its :func:`shard`) or None, and the sampler to call ``set_epoch`` on.

    A dataset whose ``indices_carry_epoch`` is true receives ``(index, epoch)`` pairs (:class:`EpochSampler`).
    """
    g = torch.Generator().manual_seed(cfg.seed)
    if dist_utils.is_distributed():
        base = DistributedSampler(train_set, shuffle=True, seed=cfg.seed)
    elif cfg.sample_power and train_labels is not None:
        base = WeightedRandomSampler(sample_weights(train_labels, cfg.sample_power, sets), len(train_labels), generator=g)
    else:
        base = RandomSampler(train_set, generator=g)
    sampler = EpochSampler(base) if getattr(train_set, "indices_carry_epoch", False) else base
    batch, drop_last = train_batching(len(train_set), dist_utils.world_size(), cfg.batch_size)
    if batch < cfg.batch_size and dist_utils.is_main():
        log.info("batch size %d per process for %d training samples over %d process(es)", batch, len(train_set),
                 dist_utils.world_size())
    pin, persistent = device.startswith("cuda"), cfg.workers > 0
    train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler, generator=g, num_workers=cfg.workers,
                              pin_memory=pin, drop_last=drop_last, persistent_workers=persistent)
    val_loader = None
    if val_set is not None and len(val_set) > 0:
        val_loader = DataLoader(shard(val_set), batch_size=cfg.batch_size * 2, shuffle=False, num_workers=cfg.workers,
                                pin_memory=pin, persistent_workers=persistent and len(shard(val_set)) > 0)
    return train_loader, val_loader, sampler


def scaled_lr(lr: float, world: int) -> float:
    """Linear scaling rule (Goyal et al., 2017): ``world`` processes each with ``--batch-size`` samples make a
    ``world``× larger global batch, trained at ``world``× the learning rate (after the same warm-up)."""
    return lr * world


def _optimisation(model: nn.Module, cfg: FitConfig, steps_per_epoch: int, device: str):
    """AdamW over the trainable parameters, warm-up + cosine schedule per step, AMP grad scaler."""
    lr = scaled_lr(cfg.lr, dist_utils.world_size())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.startswith("cuda"))
    return optimizer, scheduler, scaler


def _prepare(model: nn.Module, cfg: FitConfig, device: str) -> nn.Module:
    """Seed (data order: ``cfg.seed`` on every rank; dropout and other model randomness: ``seed + rank``),
    move ``model`` to ``device`` (channels-last, cuDNN autotuning on CUDA) and wrap it for DDP."""
    torch.manual_seed(cfg.seed + dist_utils.rank())
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        model.to(device, memory_format=torch.channels_last)
    else:
        model.to(device)
    return dist_utils.wrap_ddp(model, device)


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset | None, train_labels: np.ndarray, n_classes: int,
        cfg: FitConfig, device: str, work_dir: Path, config_hash: str, progress: bool = True,
        target_sets=None) -> FitResult:
    """Train ``model`` in place and leave it holding the best weights (lowest validation loss).

    Parameters
    ----------
    model : nn.Module
        Maps a batch ``x`` to logits ``(B, C)``; its parameters that require grad are trained.
    train_set, val_set : Dataset
        Yield ``(x, label)``. Without a validation set the last epoch is kept.
    train_labels : numpy.ndarray
        ``(N,)`` labels of ``train_set`` (for class weights); ``-1 - s`` is set target ``s``.
    work_dir : Path
        Holds ``last.pth`` (resume checkpoint) and ``log.csv`` while training.
    config_hash : str
        A checkpoint is resumed only if it was written with the same hash and the same number of processes.
    target_sets : array-like, optional
        ``(S, C)`` 0/1: the class sets of set targets (partial labels), trained with :class:`SetTargetLoss`.
    """
    rank0 = dist_utils.is_main()
    config_hash = f"{config_hash}-w{dist_utils.world_size()}"
    ddp_model = _prepare(model, cfg, device)
    train_loader, val_loader, sampler = _loaders(train_set, val_set, cfg, device, train_labels, target_sets)
    criterion, val_criterion = _criteria(train_labels, n_classes, cfg, device, target_sets)
    optimizer, scheduler, scaler = _optimisation(model, cfg, max(1, len(train_loader)), device)
    stopper = EarlyStopping(cfg.patience, copy.deepcopy(model.state_dict()))
    ckpt_path = work_dir / "last.pth"
    history, start = restore_resume_checkpoint(ckpt_path, config_hash, model, optimizer, scheduler, scaler, stopper, rank0)
    for epoch in range(start, cfg.epochs):
        if stopper.stopped:
            break
        t0 = time.time()
        _seed_epoch(sampler, cfg.seed, epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):  # reaches the main process's copy only (see EpochSampler)
            train_set.set_epoch(epoch)
        train_loss, train_acc = train_one_epoch(ddp_model, train_loader, criterion, optimizer, scheduler, scaler, device,
                                                cfg.amp, f"epoch {epoch + 1}/{cfg.epochs}", progress and rank0)
        val_loss, val_acc = (evaluate(model, val_loader, val_criterion, device, cfg.amp) if val_loader is not None
                             else (train_loss, float("nan")))
        history.append({
            "epoch": epoch + 1, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
            "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2),
        })
        best = stopper.step(val_loss, epoch + 1, model)
        if rank0:
            log.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f%s",
                     epoch + 1, train_loss, train_acc, val_loss, val_acc, " (best)" if best else "")
            write_csv(work_dir / "log.csv", history)
            save_resume_checkpoint(ckpt_path, config_hash, epoch, model, optimizer, scheduler, scaler, stopper, history)
            if stopper.stopped:
                log.info("early stop: validation loss has not improved for %d epochs", cfg.patience)
    model.load_state_dict(stopper.best_state)
    return FitResult(history, stopper.best_epoch, stopper.best_val_loss)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) as a CSV file with a header, atomically."""
    from .safeio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
