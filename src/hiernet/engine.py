"""Train and evaluate one node classifier (a head on features, or a whole network on images).

One loop serves both: ``model.train()`` for training batches and ``model.eval()`` for validation,
one AdamW optimiser and one warm-up + cosine schedule per run, class-weighted cross-entropy with
label smoothing, early stopping on validation loss that restores the best weights, AMP on CUDA,
a per-epoch CSV log, a resumable checkpoint after every epoch, and DistributedDataParallel when
launched by torchrun.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as dist_utils

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """Hyper-parameters of one training run (all JSON-serialisable)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    patience: int = 6
    warmup_epochs: float = 1.0
    class_weight_power: float = 0.5
    amp: bool = True
    workers: int = 0
    seed: int = 0


@dataclass
class FitResult:
    """History rows (one dict per epoch) and the epoch whose weights were kept."""

    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    resumed_from: int = -1


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency loss weights ``(n / (C * count_c)) ** power``; classes with no samples get 0.

    ``power`` 1 fully balances the classes, 0 leaves the loss unweighted; the default recipe uses 0.5,
    which lifts rare classes without trading away as much overall accuracy.
    """
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, (len(labels) / (n_classes * np.maximum(counts, 1))) ** power, 0.0)
    return torch.tensor(w, dtype=torch.float32)


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


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    train_labels: np.ndarray,
    n_classes: int,
    cfg: FitConfig,
    device: str,
    work_dir: Path,
    config_hash: str,
    progress: bool = True,
    params=None,
) -> FitResult:
    """Train ``model`` in place and leave it holding the best weights (lowest validation loss).

    Parameters
    ----------
    model : nn.Module
        Maps a batch ``x`` to logits ``(B, C)``.
    train_set, val_set : Dataset
        Yield ``(x, label)``. Without a validation set the last epoch is kept.
    train_labels : numpy.ndarray
        ``(N,)`` labels of ``train_set`` (for class weights).
    work_dir : Path
        Holds ``last.pth`` (resume checkpoint) and ``log.csv`` while training.
    config_hash : str
        A checkpoint is resumed only if it was written with the same hash.
    params : iterable, optional
        Parameters to optimise (default: all that require grad).

    Returns
    -------
    FitResult
    """
    from tqdm import tqdm

    rank0 = dist_utils.is_main()
    torch.manual_seed(cfg.seed)
    model.to(device)
    ddp_model = dist_utils.wrap_ddp(model, device)
    sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed) if dist_utils.is_distributed() else None
    g = torch.Generator().manual_seed(cfg.seed)
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
    weight = class_weights(train_labels, n_classes, cfg.class_weight_power).to(device) if cfg.class_weight_power else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    val_criterion = nn.CrossEntropyLoss(weight=weight)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.startswith("cuda"))

    result = FitResult()
    best_state = copy.deepcopy(model.state_dict())
    bad_epochs, start_epoch = 0, 0
    ckpt_path = work_dir / "last.pth"
    if ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if ck.get("config_hash") == config_hash:
                model.load_state_dict(ck["model"])
                optimizer.load_state_dict(ck["optimizer"])
                scheduler.load_state_dict(ck["scheduler"])
                scaler.load_state_dict(ck["scaler"])
                best_state = ck["best_state"]
                result = FitResult(ck["history"], ck["best_epoch"], ck["best_val_loss"], ck["epoch"])
                bad_epochs, start_epoch = ck["bad_epochs"], ck["epoch"] + 1
                if rank0:
                    log.info("resuming from epoch %d (checkpoint %s)", start_epoch, ckpt_path)
            elif rank0:
                log.info("ignoring checkpoint %s written with other settings", ckpt_path)
        except Exception as exc:  # a torn or foreign checkpoint: start over
            if rank0:
                log.warning("cannot resume from %s (%s); starting over", ckpt_path, type(exc).__name__)

    stopped = bad_epochs >= cfg.patience
    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        t0 = time.time()
        # shuffling and dropout seeded per epoch: a resumed run sees the batches an uninterrupted one would
        g.manual_seed(cfg.seed + epoch)
        torch.manual_seed(cfg.seed + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        ddp_model.train()
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not (progress and rank0))
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, cfg.amp):
                out = ddp_model(x)
                loss = criterion(out.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            tot_loss += loss.item() * len(y)
            tot_correct += (out.argmax(1) == y).sum().item()
            tot_n += len(y)
        tot = dist_utils.all_reduce_sum([tot_loss, tot_correct, tot_n], device)
        train_loss, train_acc = tot[0] / max(1, tot[2]), tot[1] / max(1, tot[2])
        if val_loader is not None:
            logits, labels = predict_logits(model, val_loader, device, cfg.amp)
            lt = torch.from_numpy(logits).to(device)
            val_loss = float(val_criterion(lt, torch.from_numpy(labels).to(device)).item())
            val_acc = float((logits.argmax(1) == labels).mean())
        else:
            val_loss, val_acc = train_loss, float("nan")
        row = {
            "epoch": epoch + 1, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
            "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2),
        }
        result.history.append(row)
        if val_loss < result.best_val_loss - 1e-6:
            result.best_val_loss, result.best_epoch, bad_epochs = val_loss, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        stopped = bad_epochs >= cfg.patience
        if rank0:
            log.info(
                "epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f%s",
                epoch + 1, train_loss, train_acc, val_loss, val_acc, " (best)" if bad_epochs == 0 else "",
            )
            _write_csv(work_dir / "log.csv", result.history)
            ck = {
                "config_hash": config_hash, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "best_state": best_state, "history": result.history, "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss, "bad_epochs": bad_epochs,
            }
            from .safeio import atomic_path

            with atomic_path(ckpt_path) as tmp:
                torch.save(ck, tmp)
        if stopped and rank0:
            log.info("early stop: validation loss has not improved for %d epochs", cfg.patience)
    model.load_state_dict(best_state)
    return result


def _write_csv(path: Path, rows: list[dict]) -> None:
    from .safeio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
