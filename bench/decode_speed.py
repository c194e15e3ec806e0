#!/usr/bin/env python3
"""Decode + resize per image, with and without the JPEG decoder's reduced-size (draft) decoding.

The model input path (``hiernet.images.load_for_model``) asks the JPEG decoder for a 1/2, 1/4 or 1/8
scale when the photo is at least twice the input size; "without" decodes at full size, then resizes
(what it did before). Two sets: the clothing photos as they are (about 400 px), and catalogue-like
large shots made from them (upscaled to ``--large-side`` px, JPEG quality 90, written to a temporary
folder, never into the repository). One thread, timings per image (median of ``--repeats``).

Example::

    python bench/decode_speed.py --n 200        # writes bench/results/decode.md and decode.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (  # noqa: E402
    DEFAULT_DATASET, RESULTS_DIR, busy_note, command_line, fmt, interleaved_passes, machine_info, machine_markdown,
    md_table, write_report,
)
from hiernet.images import list_images, load_for_model, load_rgb, resize_for_model, to_array  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--data", type=Path, default=DEFAULT_DATASET, help="photos (default: the clothing dataset)")
    p.add_argument("--n", type=int, default=200, help="photos per set (default 200)")
    p.add_argument("--size", type=int, default=280, help="model input side (default 280, the cpu recipe's)")
    p.add_argument("--large-side", type=int, default=2000, help="longer side of the large shots (default 2000)")
    p.add_argument("--repeats", type=int, default=4, help="timing passes of each, interleaved; the median is reported (default 4)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "decode.md")
    return p


def make_large(paths: list[Path], folder: Path, side: int) -> list[Path]:
    """Upscaled JPEG copies of ``paths`` whose longer side is ``side`` pixels."""
    from PIL import Image

    out = []
    for i, p in enumerate(paths):
        im = load_rgb(p)
        r = side / max(im.size)
        big = im.resize((round(im.width * r), round(im.height * r)), Image.LANCZOS)
        dst = folder / f"large_{i:04d}.jpg"
        big.save(dst, quality=90)
        out.append(dst)
    return out


def per_image_ms(paths: list[Path], fns: list, repeats: int) -> list[float]:
    """Median ms per image of each of ``fns``, the passes interleaved (:func:`common.interleaved_passes`)."""
    passes = [lambda fn=fn: [fn(p) for p in paths] for fn in fns]
    return [statistics.median(t) / len(paths) * 1000 for t in interleaved_passes(passes, repeats)]


def main(args: argparse.Namespace) -> int:
    photos = list_images(args.data)
    random.Random(0).shuffle(photos)
    photos = photos[:args.n]
    size = args.size
    without = lambda p: to_array(resize_for_model(load_rgb(p), size, "crop"))  # noqa: E731
    with_draft = lambda p: load_for_model(p, size, "crop")  # noqa: E731
    rep = {"command": command_line(), "machine": machine_info(), "size": size, "n": len(photos), "sets": {}}
    with tempfile.TemporaryDirectory(prefix="hiernet-decode-") as tmp:
        large = make_large(photos, Path(tmp), args.large_side)
        for name, paths in ((f"clothing photos ({load_rgb(photos[0]).size[0]} px wide and similar)", photos),
                            (f"catalogue shots, {args.large_side} px (upscaled clothing photos)", large)):
            a, b = per_image_ms(paths, [without, with_draft], args.repeats)
            rep["sets"][name] = {"without_draft_ms": a, "with_draft_ms": b, "speedup": a / b}
    rows = [[k, fmt(v["without_draft_ms"], 2), fmt(v["with_draft_ms"], 2), f"{v['speedup']:.2f}×"] for k, v in rep["sets"].items()]
    note = busy_note(rep["machine"])
    md = "\n".join(["# Decode + resize per image (one thread)", "", f"`{rep['command']}`", "",
                    f"{len(photos)} photos per set, crop to {size} px; median of {args.repeats} passes.", "",
                    md_table(["photos", "full decode + resize (ms)", "draft decode + resize (ms)", "speed-up"], rows), "",
                    machine_markdown(rep["machine"])] + ([f"", f"> {note}"] if note else []))
    sys.stdout.write(md + "\n")
    write_report(md, rep, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
