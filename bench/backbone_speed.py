#!/usr/bin/env python3
"""What an input resolution costs: a backbone's raw onnxruntime throughput at several input sides.

For each ``--sizes`` side the backbone (a registry name or a ``+`` composite such as the default recipe's
``efficientnet-lite1+efficientnet-lite0``) is built with its ImageNet weights (or ``--weights``, e.g. a
``tune_backbone.py`` output), exported to ONNX as training and prediction export it (fp32), and, with
``--precisions int8``, quantised as ``train.py --precision int8`` does (calibrated on a seeded choice of the
photos). The ``--n`` photos are decoded and resized once (not timed); then only the backbone calls are timed,
in batches of ``--batch-size``, best of ``--repeats``; every model is built first and their timed passes are
interleaved (a model timed right after another was quantised ran up to a third slower here). This is the
network's share of ``predict.py``'s time: decoding, heads and routing come on top (``bench/predict_speed.py``
measures the whole process of a trained models folder). The weights change nothing about the speed, so the
ImageNet ones stand in for tuned ones.

Example::

    python bench/backbone_speed.py --backbone efficientnet-lite1+efficientnet-lite0 --sizes 280 320 \\
        --out bench/results/backbone-speed.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (  # noqa: E402
    DEFAULT_DATASET, RESULTS_DIR, busy_note, command_line, fmt, interleaved_passes, machine_info,
    machine_markdown, md_table, run_cli, sample_images, write_report,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet-lite1+efficientnet-lite0",
                   help="a registered backbone or a '+' composite (default: the cpu recipe's)")
    p.add_argument("--weights", type=Path, default=None, help="a state_dict file instead of the ImageNet weights")
    p.add_argument("--sizes", type=int, nargs="+", default=[280, 320], help="input sides to time (default 280 320)")
    p.add_argument("--precisions", default="fp32,int8", help="comma-separated: fp32, int8 (default both)")
    p.add_argument("-p", "--images", type=Path, default=DEFAULT_DATASET,
                   help="folder searched for photos: the timed inputs and the int8 calibration (default: the clothing photos)")
    p.add_argument("--n", type=int, default=128, help="photos timed per pass (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="images per backbone call (default 32, predict.py's)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best counts (default 3)")
    p.add_argument("--resize", default="crop", choices=["crop", "squash", "pad"], help="how photos become square")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the ONNX files go (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "backbone-speed.md", help="markdown report (and a .json twin)")
    return p


def interleaved_rates(runners: list, batches: list[list[np.ndarray]], repeats: int) -> list[float]:
    """Best-of-``repeats`` images/s of each runner over its batches, the passes interleaved
    (:func:`common.interleaved_passes`); one warm-up call each, not timed."""
    for run, b in zip(runners, batches):
        run(b[0])
    passes = [lambda run=run, b=b: [run(x) for x in b] for run, b in zip(runners, batches)]
    return [sum(map(len, b)) / min(t) for b, t in zip(batches, interleaved_passes(passes, repeats))]


def build_size(args: argparse.Namespace, size: int, photos: list[Path], cache_dir: Path) -> list[tuple[dict, object, list]]:
    """For the backbone at ``size`` px, one ``(row, runner, batches)`` per precision: the ONNX model (fp32
    export, or int8 quantised as train.py does) in onnxruntime and the photos as its input batches."""
    from hiernet.backbones import create_backbone
    from hiernet.features import fp32_onnx_backbone, int8_feature_backbone
    from hiernet.images import load_for_model
    from hiernet.runtime import OrtRunner

    backbone = create_backbone(args.backbone, weights=args.weights, image_size=size)
    x = np.stack([load_for_model(p, size, args.resize) for p in photos])
    batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    out = []
    for precision in args.precisions.split(","):
        if precision == "int8":
            model = int8_feature_backbone(backbone, args.resize, cache_dir, photos, seed=0)
        else:
            model = fp32_onnx_backbone(backbone, cache_dir)
        runner = OrtRunner(model)
        row = {"size": size, "precision": precision, "onnx_input_side": runner.session.get_inputs()[0].shape[-1],
               "feature_dim": int(runner(batches[0][:1]).shape[-1])}
        out.append((row, runner, batches))
    return out


def time_all(args: argparse.Namespace, photos: list[Path], cache_dir: Path) -> list[dict]:
    """Every size and precision built first, then timed together (:func:`interleaved_rates`)."""
    built = [b for size in args.sizes for b in build_size(args, size, photos, cache_dir)]
    rates = interleaved_rates([r for _, r, _ in built], [b for _, _, b in built], args.repeats)
    rows = []
    for (row, _, _), rate in zip(built, rates):
        logging.info("%s @ %d px, %s: %.1f images/s", args.backbone, row["size"], row["precision"], rate)
        rows.append({**row, "images_per_s": rate})
    return rows


def report(args: argparse.Namespace, rows: list[dict], n: int, info: dict) -> str:
    """The markdown report: one row per size and precision, speed against the first size's."""
    base = {r["precision"]: r["images_per_s"] for r in rows if r["size"] == args.sizes[0]}
    table = [[f"{r['size']} px", r["precision"], fmt(r["images_per_s"], 1), fmt(1000 / r["images_per_s"], 2),
              f"{r['images_per_s'] / base[r['precision']]:.2f}×", f"{(r['size'] / args.sizes[0]) ** 2:.2f}×"]
             for r in rows]
    note = busy_note(info)
    return "\n".join([f"# {args.backbone}: raw onnxruntime throughput by input side", "", f"`{command_line()}`", "",
                      f"{n} photos decoded and resized once (not timed), then the backbone alone in batches of "
                      f"{args.batch_size}; best of {args.repeats} passes, every model's passes interleaved. Decoding, heads and routing come on top.", "",
                      md_table(["input", "precision", "images/s", "ms per image", f"speed vs {args.sizes[0]} px",
                                f"pixels vs {args.sizes[0]} px"], table), "",
                      machine_markdown(info)] + (["", f"> {note}"] if note else []))


def main(args: argparse.Namespace) -> int:
    from hiernet.safeio import UserError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bad = sorted(set(args.precisions.split(",")) - {"fp32", "int8"})
    if bad:
        raise UserError(f"--precisions: unknown {', '.join(bad)}; use fp32, int8 or both")
    photos, _ = sample_images(args.images, args.n, strict=False, flag="-p")
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="hiernet-backbone-speed-") as tmp:
        cache = args.cache_dir or Path(tmp)
        rows = time_all(args, photos, cache)
    md = report(args, rows, len(photos), info)
    sys.stdout.write(md + "\n")
    write_report(md, {"command": command_line(), "machine": info, "backbone": args.backbone, "n": len(photos),
                      "batch_size": args.batch_size, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main, get_args_parser)
