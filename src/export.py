#!/usr/bin/env python3
"""Export the trained models to ONNX so predict.py can run them in onnxruntime (much faster on CPU).

Example:
  python3 src/export.py                 # writes trained_models/onnx/ (train_lcpn.sh runs this)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.paths import DEFAULT_MODELS_DIR  # noqa: E402
from hiernet.safeio import run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="trained models (default: <repo>/trained_models)")
    p.add_argument("--no-flat", action="store_true", help="do not export the flat baseline even if it is trained")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from hiernet.exporting import export_models

    man = export_models(args.models_dir, with_flat=False if args.no_flat else None)
    print(f"exported {len(man['backbones'])} backbone(s) and {len(man['nodes'])} node model(s) to "
          f"{args.models_dir / 'onnx'}/ (max |torch - onnx| = {man['max_abs_diff']:.1e})")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
