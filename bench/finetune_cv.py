#!/usr/bin/env python3
"""Fine-tuning the whole backbone, by k-fold cross-validation on train+val: the lever of the long-tail work
(README "Long-tailed catalogues") a 2-core CPU cannot afford, measured as ``bench/tail_tuning.py`` measures the
frozen and last-block recipes: the same folds and held-out parts for the same ``--seed`` and ``--folds``
(:func:`tail_tuning.fold_parts`), the same scores, and its out-of-fold logits saved in the same format
(``REPORT.logits.npz``: ``tail_tuning.py --rescore``, ``--base`` and ``--node-from`` read them).

Per fold, one network: ``--backbone`` with its ImageNet weights (or ``--weights``) and a linear classifier
over all leaves, trained together on augmented images (``train.py --mode finetune``'s augmentation and
:func:`hiernet.engine.fit`: AdamW, warm-up + cosine, label smoothing, AMP and channels-last on CUDA, early
stopping on the held-out part's loss restoring the best epoch) of the training fold less its seeded held-out
ninth; then the eval view and its mirror of the held-out and test images are scored, and the prior
adjustment's ``tau`` is chosen on the held-out part (train.py's rule; the other criteria as tail_tuning.py's).
The test split is never read.

Each finished fold's logits are kept under ``--work`` (and a fold's training checkpoint while it trains):
a run stopped by a time limit is started again with the same command and goes on where it stopped.

A GPU job: a 2-core CPU trains Lite0 @ 224 px at a few images/s. Example (the catalogue's split, as
README "Long-tailed catalogues" prepares it)::

    python3 bench/finetune_cv.py --data-dir /tmp/fp/split --work /tmp/ft --epochs 15 \\
        --out /tmp/ft/finetune-lite0-224.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

log = logging.getLogger("finetune_cv")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO / "split_datasets", help="prepared datasets (train+val are used)")
    p.add_argument("--work", type=Path, required=True,
                   help="folder for each fold's checkpoint and logits, outside the repository (a rerun resumes from it)")
    p.add_argument("--out", type=Path, required=True, help="markdown report (with a .json twin and the .logits.npz)")
    p.add_argument("--backbone", default="efficientnet-lite0", help="one backbone of the registry (default: Lite0)")
    p.add_argument("--weights", type=Path, help="a backbone state_dict file instead of the ImageNet weights")
    p.add_argument("--image-size", type=int, help="input side (default: the backbone's own; Lite0: 224)")
    p.add_argument("--epochs", type=int, default=15, help="most epochs per fold (early stopping may end sooner)")
    p.add_argument("--patience", type=int, default=5, help="epochs without a better held-out loss before stopping")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the whole network")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds over train+val (as tail_tuning.py's)")
    p.add_argument("--max-folds", type=int, help="hold out only the first N folds (scored on their images)")
    p.add_argument("--tail-max", type=int, default=100, help="a leaf with at most this many images is a tail leaf")
    p.add_argument("--seed", type=int, default=0, help="fold and training seed (as tail_tuning.py's)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=int, help="image-decoding worker processes (default: min(8, cores) on a GPU, else 0)")
    p.add_argument("--no-amp", action="store_true", help="train in float32 on CUDA too")
    return p


def run_key(args, paths: list, y: np.ndarray) -> str:
    """What a fold's saved work depends on: the images and their classes and every setting that changes the
    training (not ``--max-folds``, ``--workers`` or ``--out``), hashed."""
    what = {"images": [str(p) for p in paths], "y": y.tolist(),
            **{k: str(getattr(args, k)) for k in ("backbone", "weights", "image_size", "epochs", "patience",
                                                  "batch_size", "lr", "weight_decay", "folds", "seed", "no_amp")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class Mirrored:
    """A dataset's items with the image flipped left-right: ``(tensor (3, S, S), label)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, label = self.dataset[i]
        return x.flip(-1), label


def view_logits(model, items: list, size: int, batch_size: int, workers: int, device: str, amp: bool) -> np.ndarray:
    """Logits ``(n, 2, C)`` of the eval view (centre crop) and its mirror of ``items`` ``[(path, label)]``."""
    from torch.utils.data import DataLoader

    from hiernet.engine import predict_logits
    from hiernet.training import ImageDataset

    ev = ImageDataset(items, size, "crop", False)
    out = []
    for ds in (ev, Mirrored(ev)):
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=device.startswith("cuda"))
        out.append(predict_logits(model, loader, device, amp)[0])
    return np.stack(out, 1).astype(np.float32)


def finetune_fold(args, items: list, fit: np.ndarray, hold: np.ndarray, n_classes: int, device: str,
                  work_dir: Path, key: str, pretrained: bool = True):
    """One fold's network: ``args.backbone`` + a linear classifier over ``n_classes`` leaves, trained on the
    images ``fit`` of ``items`` (augmented, seeded by ``args.seed``), stopped early on ``hold``'s loss;
    ``work_dir`` holds its resume checkpoint. Returns the network, the best epoch and the seconds taken."""
    from hiernet.backbones import create_backbone
    from hiernet.config import FitConfig, HeadConfig
    from hiernet.engine import fit as fit_network
    from hiernet.models import Head, NodeNet
    from hiernet.training import ImageDataset

    t0 = time.time()
    backbone = create_backbone(args.backbone, pretrained, args.weights, args.image_size)
    model = NodeNet(backbone, Head(backbone.spec.feature_dim, n_classes, 0, HeadConfig().dropout))
    cfg = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    patience=args.patience, amp=not args.no_amp, workers=args.workers, seed=args.seed)
    size = backbone.image_size
    train_set = ImageDataset([items[i] for i in fit], size, "crop", True, args.seed)
    val_set = ImageDataset([items[i] for i in hold], size, "crop", False)
    labels = np.array([items[i][1] for i in fit])
    work_dir.mkdir(parents=True, exist_ok=True)
    result = fit_network(model, train_set, val_set, labels, n_classes, cfg, device, work_dir, key, progress=False)
    return model, result.best_epoch, time.time() - t0


def fold_logits(args, items: list, fold: int, te: np.ndarray, fit: np.ndarray, hold: np.ndarray, n_classes: int,
                device: str, key: str, pretrained: bool = True) -> dict:
    """Fold ``fold``'s out-of-fold logits ``{"z_te": (n, 2, C), "z_hold": (h, 2, C), "log_prior": (C,),
    "seconds", "best_epoch"}``: read from ``--work`` when a run with the same ``key`` finished it, else
    :func:`finetune_fold` and :func:`view_logits`, then kept there (temporary file, renamed)."""
    from hiernet.engine import logit_adjustment

    done = args.work / f"fold{fold}-{key}.npz"
    if done.is_file():
        with np.load(done, allow_pickle=False) as f:
            saved = {k: f[k] for k in f.files}
        if np.array_equal(saved["te"], te) and np.array_equal(saved["hold"], hold):
            log.info("fold %d: finished before (%s), not trained again", fold, done)
            return saved
    model, best_epoch, seconds = finetune_fold(args, items, fit, hold, n_classes, device, args.work / f"fold{fold}-{key}",
                                               pretrained)
    amp, workers, size = not args.no_amp, args.workers, model.backbone.image_size
    out = {"te": te, "hold": hold, "z_te": view_logits(model, [items[i] for i in te], size, args.batch_size, workers, device, amp),
           "z_hold": view_logits(model, [items[i] for i in hold], size, args.batch_size, workers, device, amp),
           "log_prior": logit_adjustment(np.array([items[i][1] for i in fit]), n_classes, 1.0).numpy(),
           "seconds": np.float64(seconds), "best_epoch": np.int64(best_epoch)}
    tmp = done.with_name(done.name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(done)
    (args.work / f"fold{fold}-{key}" / "last.pth").unlink(missing_ok=True)  # the fold is done: its log.csv stays
    return out


def cross_validate(args, paths: list, leaves: np.ndarray, device: str, pretrained: bool = True) -> tuple[dict, float]:
    """Every fold of :func:`tail_tuning.fold_parts` fine-tuned (:func:`fold_logits`). Returns the out-of-fold
    logits as ``tail_tuning.save_logits`` takes them and the seconds all folds took to train and score."""
    import tail_tuning

    leaf_ids = sorted(set(leaves))
    y = np.array([leaf_ids.index(leaf) for leaf in leaves])
    items = [(p, int(c)) for p, c in zip(paths, y)]
    key = run_key(args, paths, y)
    oof = {"z": np.full((len(y), 2, len(leaf_ids)), np.nan, np.float32), "y": y, "leaf_ids": leaf_ids, "folds": [],
           "fold": np.full(len(y), -1)}
    seconds = 0.0
    for fold, _, te, fit, hold in tail_tuning.fold_parts(y, args.folds, args.seed, args.max_folds):
        got = fold_logits(args, items, fold, te, fit, hold, len(leaf_ids), device, key, pretrained)
        oof["z"][te], oof["fold"][te] = got["z_te"], fold
        oof["folds"].append({"hold": hold, "z_hold": got["z_hold"], "log_prior": got["log_prior"]})
        seconds += float(got["seconds"])
        log.info("fold %d: best epoch %d, %.0f s; leaf accuracy %.4f (eval view + mirror, not adjusted)", fold,
                 int(got["best_epoch"]), float(got["seconds"]),
                 np.mean((got["z_te"].mean(1)).argmax(1) == y[te]))
    return oof, seconds


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import tail as tail_bench
    import tail_tuning

    from hiernet.backbones import get_spec
    from hiernet.runtime import cpu_threads, resolve_device
    from hiernet.safeio import UserError

    if args.work.resolve().is_relative_to(REPO):
        raise SystemExit(f"--work must be outside the repository ({REPO})")
    try:
        spec = get_spec(args.backbone)
        device = resolve_device(args.device)
    except UserError as exc:
        raise SystemExit(str(exc)) from None
    if spec.parts:
        raise SystemExit("--backbone: one backbone is fine-tuned here, not a '+' composite")
    if not (args.data_dir / "hierarchy.json").is_file():
        raise SystemExit(f"no prepared datasets in {args.data_dir} (no hierarchy.json); run prepare_dataset.py first")
    args.image_size = args.image_size or spec.image_size
    if args.workers is None:
        args.workers = min(8, cpu_threads()) if device.startswith("cuda") else 0
    paths, leaves, _ = tail_bench.trainval_images(args.data_dir)
    args.work.mkdir(parents=True, exist_ok=True)
    oof, seconds = cross_validate(args, paths, leaves, device)
    logits = args.out.with_suffix(".logits.npz")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tail_tuning.save_logits(logits, oof)
    short = tail_tuning._short([args.backbone])
    preds, taus, leaves = tail_tuning.rescore(logits, short, f"{short} @ {args.image_size} px fine-tuned whole")
    support, tail = tail_bench.support_and_tail(leaves, args.tail_max, args.folds)
    rows = tail_bench.score_rows(preds, dict.fromkeys(preds, seconds), leaves, tail)
    header = (f"# Fine-tuning the whole of {args.backbone} @ {args.image_size} px with a linear classifier over the leaves: "
              f"{args.folds}-fold CV on train+val of {args.data_dir} ({len(leaves)} images, {len(support)} leaves; "
              f"test split unused{f'; only the first {args.max_folds} fold(s) held out' if args.max_folds else ''}); "
              f"at most {args.epochs} epochs (patience {args.patience}), batch {args.batch_size}, lr {args.lr:g}, "
              f"on {device}; trained on the training fold less a held-out ninth, where the prior adjustment's tau was "
              f"chosen, fold by fold {tail_tuning._criteria_header(taus)}")
    tail_bench.write_report(args.out, rows, tail, support, header, f"python3 bench/finetune_cv.py {shlex.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
