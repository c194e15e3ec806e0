#!/usr/bin/env python3
"""Tune the last block(s) of a frozen backbone on the tree's training images, on a CPU; train on it after.

The backbone is cut before its last --tune-blocks MBConv blocks; the maps before the cut are computed
once per image and view (onnxruntime, feature cache) and the last blocks, the head convolution and a
linear classifier over the leaves are trained on them (minutes on 2 cores for a few thousand photos). The
tuned backbone is written as a plain weights file; train.py --weights then uses it like the ImageNet one
(feature cache, int8 export and prediction unchanged). A '+' composite (the default recipe's
efficientnet-lite1+efficientnet-lite0) has the last blocks of each member tuned, each on its own maps;
its weights file is the composite's. The members' tuned linear classifiers, averaged, are written
beside it (<out stem>.classifier.pth): train_lcpn.sh --flat-classifier makes it the flat head (by
cross-validation it beats a flat head trained on the tuned features afterwards). Only the training split
is read; the validation split scores the tuned classifier(s).

Examples:

    python3 src/tune_backbone.py                       # Lite0 @ 224 px, last block -> tuned_backbones/
    src/train_lcpn.sh --backbone efficientnet-lite0 --image-size 224 \\
        --weights tuned_backbones/efficientnet-lite0-224px-last1.pth \\
        --flat-classifier tuned_backbones/efficientnet-lite0-224px-last1.classifier.pth
    python3 src/tune_backbone.py --backbone efficientnet-lite1+efficientnet-lite0   # the recipe's, @ 280 px
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.paths import DEFAULT_DATA_DIR, REPO_ROOT, default_cache_dir  # noqa: E402
from hiernet.safeio import UserError, run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="prepared datasets (default: <repo>/split_datasets)")
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="a registered backbone, or a '+' composite such as the default recipe's "
                        "efficientnet-lite1+efficientnet-lite0 (the last blocks of every member tuned)")
    p.add_argument("--weights", type=Path, help="start from this state_dict file instead of the ImageNet weights")
    p.add_argument("--image-size", type=int,
                   help="input side in pixels (default: what train.py uses with this --backbone: 280 for the "
                        "default recipe's composite, else the backbone's own)")
    p.add_argument("--resize", choices=["crop", "squash", "pad"], default="crop",
                   help="how images become square (use the same in train.py)")
    p.add_argument("--tune-blocks", type=int, default=1, help="how many of the last MBConv blocks to tune")
    p.add_argument("--epochs", type=int, default=12, help="epochs of tuning")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the tuned blocks (the classifier: 10x)")
    p.add_argument("--views", type=int, default=2, help="augmented views cached per image besides the eval view and its mirror")
    p.add_argument("--seed", type=int, default=0, help="seed of the views, the order and the initialisation")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="feature cache (default: <repo>/.cache/hiernet or $HIERNET_CACHE)")
    p.add_argument("-o", "--out", type=Path,
                   help="weights file to write (default: <repo>/tuned_backbones/<backbone>-<size>px-last<N>.pth)")
    p.add_argument("--force", action="store_true",
                   help="tune even when --out was tuned from the same training images and settings (else it is kept)")
    p.add_argument("--no-hint", action="store_true",
                   help="do not print the train_lcpn.sh command to run next (train_lcpn.sh --tune-backbone passes it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.image_size is not None and not 32 <= args.image_size <= 2048:
        raise UserError(f"--image-size must be between 32 and 2048 pixels, got {args.image_size}")
    for flag in ("epochs", "tune_blocks"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.views < 0 or not args.lr > 0:
        raise UserError("--views must be at least 0 and --lr above 0")
    try:
        import torch

        from hiernet.backbones import get_spec
        from hiernet.config import DEFAULT_PRESET, preset_with_flags
        from hiernet.safeio import atomic_path, write_json_atomic
        from hiernet.tailtune import TuneConfig, classifier_path, save_classifier, tune_backbone
    except ModuleNotFoundError as exc:
        raise UserError(f"Python package '{exc.name}' is missing; install the requirements: pip install -r requirements.txt") from None

    spec = get_spec(args.backbone)
    size = args.image_size or preset_with_flags(DEFAULT_PRESET, {"backbone": args.backbone}).image_size or spec.image_size
    out = args.out or REPO_ROOT / "tuned_backbones" / f"{args.backbone}-{size}px-last{args.tune_blocks}.pth"
    cfg = TuneConfig(blocks=args.tune_blocks, epochs=args.epochs, lr=args.lr, views=args.views, seed=args.seed)
    sd, classifier, summary = tune_backbone(args.data_dir, args.backbone, size, cfg, args.cache_dir, args.resize,
                                            str(args.weights.resolve()) if args.weights else None, not args.quiet,
                                            keep=None if args.force else out)
    if sd is None:
        print(f"{out}: tuned from the same training images and settings, kept (--force tunes again)")
        return 0
    with atomic_path(out) as tmp:
        torch.save(sd, tmp)
    save_classifier(classifier_path(out), classifier["weight"], classifier["bias"], classifier["classes"],
                    args.backbone, size, classifier["weights_fingerprint"])
    write_json_atomic(out.with_suffix(".json"), summary)  # last: it vouches for the two files above
    val, val_clf = summary["val_accuracy"], summary["val_accuracy_classifier"]
    print(f"tuned the last {cfg.blocks} block(s) of {args.backbone} @ {size} px on {summary['train_images']} images "
          f"in {summary['seconds']:.0f} s; validation leaf accuracy (linear) "
          f"{'n/a' if val is None else f'{val:.4f}'} -> {out}")
    print(f"tuned classifier (the flat head of train.py --flat-classifier): validation leaf accuracy "
          f"{'n/a' if val_clf is None else f'{val_clf:.4f}'} -> {classifier_path(out)}")
    if not args.no_hint:
        print(f"next: src/train_lcpn.sh --backbone {args.backbone} --image-size {size} --resize {args.resize} --weights {out} "
              f"--flat-classifier {classifier_path(out)}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
