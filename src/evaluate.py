#!/usr/bin/env python3
"""Evaluate the whole chain (parent, then down to a leaf) on test images, beside the flat baseline.

Writes results.json, results.md, report.html, graph.png and matrix.png and prints a short summary:
leaf accuracy, accuracy per level, hierarchical F1, and (when trained_models/flat exists) the flat
baseline with one verdict on the difference (McNemar's exact test decides; the paired-bootstrap
interval is reported beside it), node by node whether the hierarchy's decision beats flat's, and a
combined decision (flat leaf probability times LCPN path probability; predict.py --decision combined).

Without --output the files go to a new run folder, result_images/runs/<time>-<models fingerprint>/,
so the results published in result_images/ are never overwritten by other models; pass
--output result_images to replace them on purpose.

Examples:
  python3 src/evaluate.py                                   # test split of split_datasets/
  python3 src/evaluate.py --data ../shared/heldout_test     # any folder tree of the same classes
  python3 src/evaluate.py --min-confidence 0.8 --output result_images/conf80
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.paths import DEFAULT_DATA_DIR, DEFAULT_MODELS_DIR, DEFAULT_RESULTS_DIR, add_inference_args  # noqa: E402
from hiernet.paths import check_inference_args  # noqa: E402
from hiernet.safeio import UserError, run_cli  # noqa: E402

#: Sub-folder of result_images/ for the default run folders (git-ignored, like everything there but
#: the published top-level results).
RUNS_DIR = "runs"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="prepared datasets whose recorded test split is evaluated; with --data, the split whose "
                        "train/val images DIR is checked against (default: <repo>/split_datasets)")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="instead: any folder tree DIR/<class>/<subclass>/images with the trained classes (a warning "
                        "counts its images that were training images, by content)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="trained models (default: <repo>/trained_models)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="folder for results.json/.md, report.html, graph.png, matrix.png (default: a new run folder "
                        "<repo>/result_images/runs/<time>-<models fingerprint>)")
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


def default_output(fingerprint: str, now: _dt.datetime | None = None) -> Path:
    """``<repo>/result_images/runs/<UTC time>-<first 8 digits of the models fingerprint>``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return DEFAULT_RESULTS_DIR / RUNS_DIR / f"{now:%Y%m%d-%H%M%S}-{fingerprint[:8]}"


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = check_inference_args(args.runtime, args.device, args.batch_size, args.min_confidence, args.tta_below)
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output.resolve()} is a file, not a folder")
    from hiernet.evaluation import evaluate
    from hiernet.report import summary_lines, write_outputs
    from hiernet.safeio import exclusive_lock

    try:
        res, hier = evaluate(args.models_dir, data_dir=args.data_dir, data_tree=args.data, runtime=args.runtime,
                             device=device, min_confidence=args.min_confidence, batch_size=args.batch_size,
                             with_flat=False if args.no_flat else None, progress=not args.quiet,
                             tta_below=args.tta_below, precision=args.precision)
        out = (args.output or default_output(res["models_fingerprint"])).resolve()
        out.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(out / ".evaluate.lock", f"evaluate.py into {out}"):
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
