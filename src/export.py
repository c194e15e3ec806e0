#!/usr/bin/env python3
"""Export the trained models to ONNX so predict.py can run them in onnxruntime (much faster on CPU).

With the prepared datasets at hand (--data-dir), the export also predicts their validation split: the
int8 guard, and which decision (LCPN walk, flat head, combined) predict.py --decision auto will use.

Example:
  python3 src/export.py                 # writes trained_models/onnx/ (train_lcpn.sh runs this)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.paths import DEFAULT_DATA_DIR, DEFAULT_MODELS_DIR, default_cache_dir  # noqa: E402
from hiernet.safeio import run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="trained models (default: <repo>/trained_models)")
    p.add_argument("--no-flat", action="store_true", help="do not export the flat baseline even if it is trained")
    p.add_argument("--if-stale", action="store_true",
                   help="export only when the export is missing or older than a model.pth (train_lcpn.sh uses this)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="the training's feature cache, where an int8 backbone is taken from (default: <repo>/.cache/hiernet or $HIERNET_CACHE)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="prepared datasets whose validation split the int8 guard predicts (default: <repo>/split_datasets)")
    p.add_argument("--int8-max-drop", type=float, default=0.5, metavar="POINTS",
                   help="keep fp32 for prediction when int8 loses more than POINTS of validation leaf accuracy (default 0.5)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from hiernet.exporting import export_models

    with_flat = False if args.no_flat else None
    if args.if_stale:
        from hiernet.bundle import onnx_problem, read_models_hierarchy

        hier, _ = read_models_hierarchy(args.models_dir)
        flat = (args.models_dir / "flat" / "model.pth").exists() and not args.no_flat
        problem = onnx_problem(args.models_dir, hier, flat)
        if problem is None:
            print(f"ONNX export in {args.models_dir / 'onnx'}/ is current, kept")
            return 0
        logging.getLogger(__name__).info("exporting: %s", problem)
    man = export_models(args.models_dir, with_flat=with_flat, cache_dir=args.cache_dir, data_dir=args.data_dir,
                        max_drop=args.int8_max_drop / 100)
    print(f"exported {len(man['backbones'])} backbone(s) and {len(man['nodes'])} node model(s) to "
          f"{args.models_dir / 'onnx'}/ (max |torch - onnx| = {man['max_abs_diff']:.1e}); prediction precision: "
          f"{man['precision']}")
    for line in (guard_line(man.get("guard")), decision_line(man.get("decision"))):
        if line:
            print(line)
    return 0


def guard_line(guard: dict | None) -> str | None:
    """The one line that reports the int8 guard (``None`` when it did not run)."""
    if not guard:
        return None
    f32, i8 = 100 * guard["fp32_leaf_accuracy"], 100 * guard["int8_leaf_accuracy"]
    what = (f"int8 loses {f32 - i8:.2f} points (more than {100 * guard['max_drop']:.2f}): prediction keeps fp32"
            if guard["kept"] == "fp32" else "prediction uses int8")
    return f"int8 guard: validation leaf accuracy fp32 {f32:.2f} %, int8 {i8:.2f} % on {guard['n_images']} images; {what}"


def decision_line(decision: dict | None) -> str | None:
    """The one line that says which decision ``--decision auto`` will use (``None`` when none was chosen)."""
    if not decision:
        return None
    from hiernet.bundle import decision_accuracies

    return (f"decision: validation leaf accuracy {decision_accuracies(decision)} on {decision['n_images']} images; predict.py and serve.py "
            f"use {decision['chosen']} (--decision auto)")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
