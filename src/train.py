#!/usr/bin/env python3
"""Train one local classifier of the hierarchy (one node), or the flat baseline.

Examples:

    python3 src/train.py -d parent                  # the top-level classifier
    python3 src/train.py -d tops                    # the classifier below 'tops'
    python3 src/train.py -d flat                    # one classifier over all leaves (baseline)
    python3 src/train.py -d parent --preset original --device cuda   # EfficientNet-B4, fine-tuned
    torchrun --nproc_per_node=4 src/train.py -d parent --preset original
    python3 src/train.py --list-nodes               # the datasets train_lcpn.sh trains, in order

A node whose dataset (classes, image content hashes, split) and recipe are those its model.pth was
trained on is kept, not retrained ("node 'x': unchanged, kept"); --force retrains it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.paths import DEFAULT_DATA_DIR, DEFAULT_MODELS_DIR, default_cache_dir  # noqa: E402
from hiernet.safeio import UserError, run_cli  # noqa: E402

try:
    from hiernet.backbones import get_spec, list_backbones
    from hiernet.config import DEFAULT_PRESET, FLAG_FIELDS, PRESETS, TrainConfig, default_workers, preset_with_flags
except ModuleNotFoundError as _exc:  # one line, not a traceback, when the environment is incomplete
    sys.exit(f"error: Python package '{_exc.name}' is missing; install the requirements: pip install -r requirements.txt")


def _backbone_name(name: str) -> str:
    """argparse type: a registered backbone or a '+'-joined composite of them."""
    try:
        get_spec(name)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", help="node dataset to train: 'parent', a parent's name (e.g. 'tops'), or 'flat'")
    p.add_argument("--list-nodes", action="store_true", help="print the node datasets in training order (root first) and exit")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="prepared datasets (default: <repo>/split_datasets)")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_MODELS_DIR, help="where node folders go (default: <repo>/trained_models)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="feature cache (default: <repo>/.cache/hiernet or $HIERNET_CACHE)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="recipe: 'cpu' = frozen Lite1+Lite0 @280px + calibrated MLP heads on cached features (default); "
                        "'fast' = the same on one Lite0 @224px (faster, a little less accurate); 'original' = EfficientNet-B4 fine-tuned")
    g = p.add_argument_group("model (default: the preset's)")
    g.add_argument("--backbone", type=_backbone_name, metavar="NAME",
                   help=f"one of: {', '.join(list_backbones())}; or several joined by '+' (features concatenated, "
                        "one input), e.g. efficientnet-lite1+efficientnet-lite0 (the cpu preset's)")
    g.add_argument("--weights", type=Path, help="state_dict file for the backbone instead of the packaged/downloaded ImageNet weights "
                   "(a composite's: its net.state_dict(), as tune_backbone.py writes)")
    g.add_argument("--flat-classifier", type=Path, metavar="FILE",
                   help="-d flat, frozen mode: use this tuned classifier (tune_backbone.py writes <weights>.classifier.pth "
                        "beside the tuned weights; train_lcpn.sh --tune-backbone passes it) as the flat head instead of "
                        "training one; the validation split chooses its post-hoc logit adjustment (bias - tau * log prior, tau 0-1) "
                        "and fits its temperature")
    g.add_argument("--image-size", type=int, help="input side in pixels (default: the preset's, or the backbone's own for another backbone)")
    g.add_argument("--resize", choices=["crop", "squash", "pad"], help="how images become square: centre crop, stretch, or letterbox")
    g.add_argument("--mode", choices=["frozen", "finetune"], help="frozen backbone + cached features, or fine-tune the whole network")
    g.add_argument("--hidden", type=int, help="hidden units of the MLP head (0 = linear head)")
    g.add_argument("--dropout", type=float, help="dropout in the head")
    g.add_argument("--standardize", choices=["tree", "node"],
                   help="frozen mode: standardise each head's features with the whole tree's training statistics "
                        "(tree, the default; pinned in the models folder) or with the node's own (node)")
    g.add_argument("--views", type=int, help="augmented views per training image cached as features (frozen mode)")
    g.add_argument("--fine-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="train a node whose children are parents on the leaves below it, predicting their sums per child (preset: on)")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="average the image and its mirror at test time (frozen mode)")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="fit a temperature on the validation split so probabilities are calibrated (frozen mode)")
    g = p.add_argument_group("optimisation (default: the preset's)")
    g.add_argument("--epochs", type=int, help="maximum epochs")
    g.add_argument("--batch-size", type=int, help="batch size (per process under torchrun)")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW, warm-up then cosine)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--label-smoothing", type=float, help="label smoothing of the training loss")
    g.add_argument("--patience", type=int, help="early stopping: epochs without a better validation loss")
    g.add_argument("--class-weights", type=float, metavar="POWER",
                   help="class-imbalance handling: loss weight (n / (C * count)) ** POWER; 1 = balanced, 0 = none (presets: cpu 0, original 0.5)")
    g.add_argument("--logit-adjust", type=float, metavar="TAU",
                   help="long tail: train on logits + TAU * log(class prior) (logit adjustment; 1 = balanced softmax, 0 = off)")
    g.add_argument("--class-sampling", dest="sample_power", type=float, metavar="POWER",
                   help="long tail: draw training samples of class c with weight count_c ** -POWER (1 = class-balanced, 0 = off)")
    g.add_argument("--prior-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="start each head's output bias at the log prior of its training classes instead of at random "
                        "(preset: off; helps small nodes, which make few optimiser steps: see README, Long-tailed catalogues)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    g.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    g.add_argument("--no-onnx", action="store_true", help="compute cached features with PyTorch instead of onnxruntime")
    g.add_argument("--precision", choices=["auto", "fp32", "int8"],
                   help="backbone for the cached features: int8 = statically quantised in onnxruntime (1.6x as "
                        "fast on a CPU; heads are trained on the features prediction will see), fp32 = full "
                        "precision; auto (default) = int8 for frozen features on a CPU, else fp32")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes decoding images (default: min(8, CPUs per process) when fine-tuning on CUDA, else 0)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--restart", action="store_true", help="ignore an interrupted run's checkpoint instead of resuming it")
    g.add_argument("--force", action="store_true",
                   help="train even when the node's dataset and recipe are unchanged since its model.pth was trained")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The preset named by ``--preset`` with every flag that was given (unset flags keep the preset's value)."""
    flags = {name: getattr(args, name, None) for name in FLAG_FIELDS}
    flags["weights"] = str(args.weights.resolve()) if args.weights else None
    flags["flat_classifier"] = str(args.flat_classifier.resolve()) if getattr(args, "flat_classifier", None) else None
    flags["amp"] = False if args.no_amp else None
    flags["onnx"] = False if args.no_onnx else None
    return preset_with_flags(args.preset, flags)


def list_nodes(data_dir: Path) -> int:
    from hiernet.training import load_prepared

    hier, doc = load_prepared(data_dir)
    for nid in hier.classifier_nodes():
        print(hier.nodes[nid].dataset)
    # on stderr, so scripts reading the node list (train_lcpn.sh) get node datasets only
    print("(also 'flat': the flat baseline over all leaves, trained last by train_lcpn.sh; "
          "train it alone with: train.py -d flat)", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.list_nodes:
        return list_nodes(args.data_dir)
    if not args.dataset:
        raise UserError("say which node to train with -d NODE (see --list-nodes), or use src/train_lcpn.sh for all")
    from hiernet.hierarchy import is_safe_folder_name

    if not is_safe_folder_name(args.dataset):
        raise UserError(f"-d {args.dataset!r} is not a node dataset name; see: python3 src/train.py --list-nodes")
    for flag in ("epochs", "batch_size", "views", "patience", "hidden"):
        value = getattr(args, flag)
        minimum = 0 if flag in ("views", "hidden") else 1
        if value is not None and value < minimum:
            raise UserError(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    for flag, name in (("logit_adjust", "--logit-adjust"), ("sample_power", "--class-sampling")):
        if getattr(args, flag) is not None and not 0 <= getattr(args, flag) <= 2:
            raise UserError(f"{name} must be between 0 and 2, got {getattr(args, flag)}")
    if args.image_size is not None and not 32 <= args.image_size <= 2048:
        raise UserError(f"--image-size must be between 32 and 2048 pixels, got {args.image_size}")
    from hiernet.incremental import node_is_current

    if not args.force and node_is_current(build_config(args), args.dataset, args.data_dir, args.output_dir):
        print(f"node '{args.dataset}': unchanged, kept ({args.output_dir / args.dataset}/; --force retrains it)")
        return 0
    try:
        from hiernet import distributed as dist_utils
        from hiernet.runtime import resolve_device
        from hiernet.training import node_lock, train_node
    except ModuleNotFoundError as exc:  # one line, not a traceback, when the environment is incomplete
        raise UserError(f"Python package '{exc.name}' is missing; install the requirements: pip install -r requirements.txt") from None

    device = dist_utils.init_from_env(resolve_device(args.device))
    cfg = build_config(args)
    if args.workers is None:
        import os

        cfg = cfg.override({"workers": default_workers(cfg.mode, device, os.cpu_count() or 1,
                                                       int(os.environ.get("LOCAL_WORLD_SIZE", "1")))})
    try:
        dist_utils.check_shared_storage([args.output_dir, args.cache_dir])
        if dist_utils.is_main():
            args.output_dir.mkdir(parents=True, exist_ok=True)
            with node_lock(args.output_dir, args.dataset):
                if args.restart:  # rank 0 alone, inside the lock; the others never read the checkpoint
                    import shutil

                    shutil.rmtree(args.output_dir / f".{args.dataset}.work", ignore_errors=True)
                summary = train_node(cfg, args.dataset, args.data_dir, args.output_dir, device, args.cache_dir, not args.quiet,
                                     recalibrate=args.force)
        else:
            summary = train_node(cfg, args.dataset, args.data_dir, args.output_dir, device, args.cache_dir, not args.quiet,
                                 recalibrate=args.force)
        if dist_utils.is_main():
            print(f"node '{args.dataset}': test accuracy {summary['accuracy']:.4f} on {summary['n_images']} images, "
                  f"macro F1 {summary['macro_f1']:.4f} -> {args.output_dir / args.dataset}/")
    finally:
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
