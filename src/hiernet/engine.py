"""Train and evaluate one node classifier (a head on features, or a whole network on images).

One loop serves both: ``model.train()`` for training batches and ``model.eval()`` for validation,
one AdamW optimiser and one warm-up + cosine schedule per run, class-weighted cross-entropy with
label smoothing (optionally on logit-adjusted logits, and with class-aware sampling), early stopping on validation loss that restores the best weights, AMP on CUDA,
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as dist_utils
from .config import FitConfig

__all__ = ["FitConfig", "FitResult", "class_weights", "logit_adjustment", "LogitAdjustedLoss", "predict_logits", "fit", "train_one_epoch", "evaluate",
           "EarlyStopping", "save_resume_checkpoint", "restore_resume_checkpoint", "write_csv"]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """History rows (one dict per epoch) and the epoch whose weights were kept."""

    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency loss weights ``(n / (C * count_c)) ** power``; classes with no samples get 0.

    ``power`` 1 fully balances the classes, 0 leaves the loss unweighted (the ``cpu`` recipe: weighting
    cost leaf accuracy in cross-validation); the ``original`` recipe uses 0.5.
    """
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, (len(labels) / (n_classes * np.maximum(counts, 1))) ** power, 0.0)
    return torch.tensor(w, dtype=torch.float32)


def logit_adjustment(labels: np.ndarray, n_classes: int, tau: float) -> torch.Tensor:
    """``tau * log(prior)`` ``(C,)`` of the training labels ``(N,)`` (Menon et al., 2021, logit adjustment).

    A class without samples counts as one (a finite shift). Added to the logits in the training loss,
    it makes the raw logits estimate class-balanced scores; ``tau`` 1 is the balanced softmax (Ren et al., 2020).
    """
    counts = np.maximum(np.bincount(labels, minlength=n_classes).astype(np.float64), 1.0)
    return torch.tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)


class LogitAdjustedLoss(nn.Module):
    """``loss(logits + shift, y)``: a loss on logits ``(B, C)`` shifted by a fixed ``(C,)`` vector."""

    def __init__(self, loss: nn.Module, shift: torch.Tensor):
        super().__init__()
        self.loss = loss
        self.register_buffer("shift", shift)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(logits + self.shift, y)


def _criteria(train_labels: np.ndarray, n_classes: int, cfg: FitConfig, device: str):
    """Training loss (label smoothing) and validation loss: class-weighted CE, on adjusted logits if asked."""
    weight = class_weights(train_labels, n_classes, cfg.class_weight_power).to(device) if cfg.class_weight_power else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    val_criterion = nn.CrossEntropyLoss(weight=weight)
    if cfg.logit_adjust:
        shift = logit_adjustment(train_labels, n_classes, cfg.logit_adjust)
        criterion, val_criterion = LogitAdjustedLoss(criterion, shift).to(device), LogitAdjustedLoss(val_criterion, shift).to(device)
    return criterion, val_criterion


def _autocast(device: str, enabled: bool):
    return torch.autocast("cuda", dtype=torch.float16, enabled=enabled and device.startswith("cuda"))


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, device: str, amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, C)`` and labels ``(N,)`` of a loader in eval mode."""
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        with _autocast(device, amp):
            out = model(x.to(device, non_blocking=True))
        outs.append(out.float().cpu())
        ys.append(y)
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(outs).numpy(), torch.cat(ys).numpy()


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

    Returns
    -------
    (float, float)
        Mean training loss and accuracy over all ranks.
    """
    from tqdm import tqdm

    model.train()
    tot_loss, tot_correct, tot_n = 0.0, 0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            out = model(x)
            loss = criterion(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        tot_loss += loss.item() * len(y)
        tot_correct += (out.argmax(1) == y).sum().item()
        tot_n += len(y)
    tot = dist_utils.all_reduce_sum([tot_loss, tot_correct, tot_n], device)
    return tot[0] / max(1, tot[2]), tot[1] / max(1, tot[2])


def evaluate(model: nn.Module, loader: DataLoader, criterion, device: str, amp: bool) -> tuple[float, float]:
    """Loss (``criterion``, no label smoothing) and accuracy of ``model`` on ``loader`` in eval mode."""
    logits, labels = predict_logits(model, loader, device, amp)
    loss = float(criterion(torch.from_numpy(logits).to(device), torch.from_numpy(labels).to(device)).item())
    return loss, float((logits.argmax(1) == labels).mean())


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


def restore_resume_checkpoint(path: Path, config_hash: str, model, optimizer, scheduler, scaler,
                              stopper: EarlyStopping, log_it: bool = True) -> tuple[list, int]:
    """Load ``path`` into the objects if it was written with ``config_hash``.

    Returns
    -------
    (list, int)
        The history so far and the (0-based) epoch to start at; ``([], 0)`` when nothing was resumed.
    """
    if not path.exists():
        return [], 0
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("config_hash") != config_hash:
            if log_it:
                log.info("ignoring checkpoint %s written with other settings", path)
            return [], 0
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        stopper.best_state, stopper.best_epoch, stopper.best_val_loss = ck["best_state"], ck["best_epoch"], ck["best_val_loss"]
        stopper.bad_epochs = ck["bad_epochs"]
        if log_it:
            log.info("resuming from epoch %d (checkpoint %s)", ck["epoch"] + 1, path)
        return ck["history"], ck["epoch"] + 1
    except Exception as exc:  # a torn or foreign checkpoint: start over
        if log_it:
            log.warning("cannot resume from %s (%s); starting over", path, type(exc).__name__)
        return [], 0


def _loaders(train_set: Dataset, val_set: Dataset | None, cfg: FitConfig, device: str, train_labels=None):
    """Training loader (shuffled, seeded; DistributedSampler under torchrun; class-aware sampling with
    ``cfg.sample_power``: a sample of class c is drawn with weight ``count_c ** -power``), validation loader or None."""
    sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed) if dist_utils.is_distributed() else None
    g = torch.Generator().manual_seed(cfg.seed)
    if sampler is None and cfg.sample_power and train_labels is not None:
        counts = np.bincount(train_labels).astype(np.float64)
        sampler = torch.utils.data.WeightedRandomSampler(counts[train_labels] ** -cfg.sample_power, len(train_labels), generator=g)
    pin = device.startswith("cuda")
    train_loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=g,
        num_workers=cfg.workers, pin_memory=pin, drop_last=len(train_set) > cfg.batch_size * 2,
        persistent_workers=cfg.workers > 0,
    )
    val_loader = (
        DataLoader(val_set, batch_size=cfg.batch_size * 2, shuffle=False, num_workers=cfg.workers, pin_memory=pin)
        if val_set is not None and len(val_set) > 0
        else None
    )
    return train_loader, val_loader, sampler


def _optimisation(model: nn.Module, cfg: FitConfig, steps_per_epoch: int, device: str):
    """AdamW over the trainable parameters, warm-up + cosine schedule per step, AMP grad scaler."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.startswith("cuda"))
    return optimizer, scheduler, scaler


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset | None, train_labels: np.ndarray, n_classes: int,
        cfg: FitConfig, device: str, work_dir: Path, config_hash: str, progress: bool = True) -> FitResult:
    """Train ``model`` in place and leave it holding the best weights (lowest validation loss).

    Parameters
    ----------
    model : nn.Module
        Maps a batch ``x`` to logits ``(B, C)``; its parameters that require grad are trained.
    train_set, val_set : Dataset
        Yield ``(x, label)``. Without a validation set the last epoch is kept.
    train_labels : numpy.ndarray
        ``(N,)`` labels of ``train_set`` (for class weights).
    work_dir : Path
        Holds ``last.pth`` (resume checkpoint) and ``log.csv`` while training.
    config_hash : str
        A checkpoint is resumed only if it was written with the same hash.
    """
    rank0 = dist_utils.is_main()
    torch.manual_seed(cfg.seed)
    model.to(device)
    ddp_model = dist_utils.wrap_ddp(model, device)
    train_loader, val_loader, sampler = _loaders(train_set, val_set, cfg, device, train_labels)
    criterion, val_criterion = _criteria(train_labels, n_classes, cfg, device)
    optimizer, scheduler, scaler = _optimisation(model, cfg, max(1, len(train_loader)), device)
    stopper = EarlyStopping(cfg.patience, copy.deepcopy(model.state_dict()))
    ckpt_path = work_dir / "last.pth"
    history, start = restore_resume_checkpoint(ckpt_path, config_hash, model, optimizer, scheduler, scaler, stopper, rank0)
    for epoch in range(start, cfg.epochs):
        if stopper.stopped:
            break
        t0 = time.time()
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
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
