#!/usr/bin/env python3
"""Evaluate the whole chain (parent, then down to a leaf) on test images, beside the flat baseline.

Writes results.json, results.md, graph.png and matrix.png into the output folder and prints a short
summary: leaf accuracy, accuracy per level, hierarchical F1, and (when trained_models/flat exists)
the flat baseline with a paired comparison (bootstrap interval, McNemar test).

Examples::

    python3 src/evaluate.py                                   # test split of split_datasets/
    python3 src/evaluate.py --data ../shared/heldout_test     # any folder tree of the same classes
    python3 src/evaluate.py --min-confidence 0.8 --output result_images/conf80
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.paths import DEFAULT_DATA_DIR, DEFAULT_MODELS_DIR, DEFAULT_RESULTS_DIR, add_inference_args  # noqa: E402
from hiernet.paths import check_inference_args  # noqa: E402
from hiernet.safeio import UserError, run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                     help="prepared datasets whose recorded test split is evaluated (default: <repo>/split_datasets)")
    src.add_argument("--data", type=Path, metavar="DIR",
                     help="instead: any folder tree DIR/<class>/<subclass>/images with the trained classes")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="trained models (default: <repo>/trained_models)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_RESULTS_DIR,
                   help="folder for results.json/.md, graph.png, matrix.png (default: <repo>/result_images)")
    add_inference_args(p)
    p.add_argument("--no-flat", action="store_true", help="skip the flat baseline even if trained_models/flat exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log which runtime and models are used")
    return p


#: The flag that sets each library parameter a :class:`UserError` can name (``UserError.arg``).
FLAGS = {"data_dir": "--data-dir", "data_tree": "--data", "out_dir": "--output"}


def _flag_error(exc: UserError) -> UserError:
    """``exc`` with the flag in front; a problem with the prepared data also points to ``--data``."""
    err = exc.for_flags(FLAGS)
    if exc.arg == "data_dir":
        err = UserError(f"{err}; or evaluate a folder tree with --data DIR", exc.arg)
    return err


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = check_inference_args(args.runtime, args.device, args.batch_size, args.min_confidence, args.tta_below)
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output} is a file, not a folder")
    from hiernet.evaluation import evaluate
    from hiernet.report import summary_lines, write_outputs
    from hiernet.safeio import exclusive_lock

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / ".evaluate.lock", f"evaluate.py into {out}"):
        try:
            res, hier = evaluate(args.models_dir, data_dir=args.data_dir, data_tree=args.data, runtime=args.runtime,
                                 device=device, min_confidence=args.min_confidence, batch_size=args.batch_size,
                                 with_flat=False if args.no_flat else None, progress=not args.quiet,
                                 tta_below=args.tta_below, precision=args.precision)
            files = write_outputs(hier, res, out)
        except UserError as exc:
            raise _flag_error(exc) from None
    print("\n".join(summary_lines(res)))
    print(f"wrote {', '.join(str(f) for f in files)}")
    if res["n_unreadable"]:
        print(f"warning: {res['n_unreadable']} images could not be evaluated (listed in results.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
