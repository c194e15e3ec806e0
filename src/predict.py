#!/usr/bin/env python3
"""Predict the class path of images: parent first, then down the tree to a leaf.

Examples::

    python3 src/predict.py -p sample_images/tops_t-shirt_0.jpg
    python3 src/predict.py -p sample_images/ --format csv --topk 3 > predictions.csv
    python3 src/predict.py -p a.jpg b.png photos/ --format json --min-confidence 0.8
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.paths import DEFAULT_MODELS_DIR, add_inference_args  # noqa: E402
from hiernet.safeio import UserError, run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--path", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="trained models (default: <repo>/trained_models)")
    p.add_argument("--format", choices=["text", "csv", "json"], default="text", help="output format (default: text)")
    p.add_argument("--topk", type=int, default=1, help="also list the K most likely classes at each level (csv/json/text)")
    add_inference_args(p)
    p.add_argument("-o", "--output", type=Path, help="write csv/json here instead of standard output")
    p.add_argument("-v", "--verbose", action="store_true", help="log which runtime and models are used")
    return p


LEVEL_NAMES = {1: "Parent class prediction"}


def level_title(level: int, n_levels: int) -> str:
    if level == n_levels:
        return "Final Prediction"
    return LEVEL_NAMES.get(level, f"Level {level} prediction")


def render_text(preds, predictor) -> str:
    lines = []
    enc = predictor.encoders()
    for pr in preds:
        lines.append(f"== {pr.path}")
        if pr.error:
            lines.append(f"error: cannot read image: {pr.error}")
            continue
        parent = ""
        n = len(pr.labels)
        for level, (label, nid, prob) in enumerate(zip(pr.labels, pr.node_ids, pr.probs), start=1):
            if parent in enc:
                lines.append(f"Encoder: {enc[parent]}")
            title = level_title(level, n) if pr.complete else LEVEL_NAMES.get(level, f"Level {level} prediction")
            lines.append(f"{title}:  {label}  (p={prob:.4f})")
            if len(pr.topk[level - 1]) > 1:
                lines.append("  top-k: " + ", ".join(f"{a} {b:.4f}" for a, b in pr.topk[level - 1]))
            parent = nid
        if not pr.complete:
            lines.append(f"Final Prediction:  {pr.labels[-1] if pr.labels else '(none)'}  "
                         f"(stopped: the next level would fall below --min-confidence {predictor.min_confidence})")
        lines.append(f"Path: {' > '.join(pr.labels)}  (confidence {pr.confidence:.4f})")
    return "\n".join(lines) + "\n"


def render_csv(preds) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "labels", "probs", "confidence", "complete", "topk", "error"])
    for pr in preds:
        topk = " | ".join(";".join(f"{a}:{b:.6f}" for a, b in level) for level in pr.topk)
        w.writerow([pr.path, "/".join(pr.labels), ";".join(f"{p:.6f}" for p in pr.probs),
                    f"{pr.confidence:.6f}", int(pr.complete), topk, pr.error or ""])
    return buf.getvalue()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.topk < 1:
        raise UserError("--topk must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise UserError("--min-confidence must be between 0 and 1")
    from hiernet.predictor import HierarchicalPredictor, iter_image_paths

    paths, problems = iter_image_paths(args.path)
    for raw, why in problems:
        print(f"warning: {raw}: {why}", file=sys.stderr)
    if not paths:
        raise UserError("no images to predict; pass image files or folders with -p")
    device = args.device
    if args.runtime == "torch" or device != "cpu":
        from hiernet.runtime import resolve_device

        device = resolve_device(device)
    predictor = HierarchicalPredictor.load(args.models_dir, runtime=args.runtime, device=device,
                                           min_confidence=args.min_confidence, topk=args.topk, tta_below=args.tta_below)
    logging.getLogger("predict").info("runtime: %s", predictor.runtime)
    preds = predictor.predict_paths(paths, batch_size=args.batch_size)
    if args.format == "json":
        text = json.dumps([pr.to_dict() for pr in preds], indent=2, ensure_ascii=False) + "\n"
    elif args.format == "csv":
        text = render_csv(preds)
    else:
        text = render_text(preds, predictor)
    if args.output:
        from hiernet.safeio import write_text_atomic

        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    n_bad = sum(1 for pr in preds if pr.error)
    if n_bad:
        print(f"warning: {n_bad} of {len(preds)} images could not be read (see their error field)", file=sys.stderr)
    return 1 if n_bad == len(preds) else 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
