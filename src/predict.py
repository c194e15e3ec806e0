#!/usr/bin/env python3
"""Predict the class path of images: parent first, then down the tree to a leaf.

Examples::

    python3 src/predict.py -p sample_images/tops_t-shirt_0.jpg
    python3 src/predict.py -p sample_images/ --format csv --topk 3 > predictions.csv
    python3 src/predict.py -p a.jpg b.png photos/ --format json --min-confidence 0.8
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.outputs import WRITERS  # noqa: E402
from hiernet.paths import DEFAULT_MODELS_DIR, add_inference_args, check_inference_args  # noqa: E402
from hiernet.safeio import UserError, run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--path", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="trained models (default: <repo>/trained_models)")
    p.add_argument("--format", choices=list(WRITERS), default="text",
                   help="output format: text, json, jsonl (one object per line) or csv (default: text)")
    p.add_argument("--topk", type=int, default=1, help="also list the K most likely classes at each level (csv/json/text)")
    add_inference_args(p)
    p.add_argument("-o", "--output", type=Path, help="write the output here instead of standard output")
    p.add_argument("-v", "--verbose", action="store_true", help="log which runtime and models are used")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = check_inference_args(args.runtime, args.device, args.batch_size, args.min_confidence, args.tta_below,
                                  args.topk)
    from hiernet.outputs import OutputContext
    from hiernet.predictor import HierarchicalPredictor, iter_image_paths

    paths, problems = iter_image_paths(args.path)
    for raw, why in problems:
        print(f"warning: {raw}: {why}", file=sys.stderr)
    if not paths:
        raise UserError("no images to predict; pass image files or folders with -p")
    predictor = HierarchicalPredictor.load(args.models_dir, runtime=args.runtime, device=device,
                                           min_confidence=args.min_confidence, topk=args.topk, tta_below=args.tta_below,
                                           precision=args.precision)
    logging.getLogger("predict").info("runtime: %s, precision: %s", predictor.runtime, predictor.bundle.precision)
    preds = predictor.predict_paths(paths, batch_size=args.batch_size)
    context = OutputContext(predictor.encoders(), predictor.min_confidence)
    write_records(args.format, [pr.record() for pr in preds], context, args.output)
    n_bad = sum(1 for pr in preds if pr.error)
    if n_bad:
        print(f"warning: {n_bad} of {len(preds)} images could not be read (see their error field)", file=sys.stderr)
    return 1 if n_bad == len(preds) else 0


def write_records(fmt: str, records: list, context, output: Path | None) -> None:
    """Write ``records`` in ``fmt`` to ``output`` (through a temporary file and a rename) or standard output."""
    import contextlib

    from hiernet.outputs import open_writer
    from hiernet.safeio import atomic_path

    with contextlib.ExitStack() as stack:
        stream = sys.stdout
        if output is not None:
            tmp = stack.enter_context(atomic_path(output))
            stream = stack.enter_context(open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline=""))
        writer = open_writer(fmt, stream, context)
        for r in records:
            writer.write(r)
        writer.close()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
