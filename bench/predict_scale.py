#!/usr/bin/env python3
"""Batch prediction at catalogue scale: throughput over a long run, bounded memory, kill -9 and --resume.

1. Generates --n photos on disk (320x400 JPEGs of coloured shapes, in folders of 1,000) and, unless
   --models-dir is given, trains small fast models on a tiny generated tree (EfficientNet-Lite0 at
   64 px, frozen, 2 levels: what tests use; the figures measure the pipeline around the networks).
2. ``predict.py PHOTOS --format jsonl`` on all --n photos, records read from its stdout as they come:
   throughput (images/s) over the first and the last 10 % of the records, and the peak RSS of the
   process; the same on the first --small photos: peak RSS at --n vs at --small (goal: within 15 %).
3. ``predict.py PHOTOS -o out.jsonl --resume`` killed with SIGKILL at a random moment, then run again:
   the file must hold every photo exactly once, in input order, and no torn line.

Example:

    python3 bench/predict_scale.py                      # 20,000 photos, results in bench/results/predict-scale.md
    python3 bench/predict_scale.py --n 2000 --small 200 --out /tmp/scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO, RESULTS_DIR, BenchError, busy_note, command_line, fmt, log, machine_info, machine_markdown, md_table,
    run_cli, run_timed, write_report,
)

SHAPES = {"round/circle": "ellipse", "round/plus": "cross", "angular/box": "rectangle", "angular/tri": "triangle"}
FAST = ["--backbone", "efficientnet-lite0", "--image-size", "64", "--epochs", "3", "--views", "1", "-q"]
PER_FOLDER = 1000


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="photos to generate and predict (default: 20000)")
    p.add_argument("--small", type=int, default=2000, help="the smaller run for the memory comparison (default: 2000)")
    p.add_argument("--models-dir", type=Path, help="trained models to use (default: train small ones on a tiny tree)")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary folder, removed at the end)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seeds the photos and the moment of the kill")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "predict-scale.md", help="markdown report (+ .json twin)")
    return p


def draw(path: Path, shape: str, seed: int, size: tuple[int, int] = (320, 400)) -> None:
    """A coloured ``shape`` on a light, noisy background, saved as a JPEG of ``size`` (w, h)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    bg = rng.integers(190, 256, 3)
    arr = np.clip(bg + rng.normal(0, 8, (h // 8, w // 8, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((w, h))
    d = ImageDraw.Draw(img)
    fg = tuple(int(v) for v in rng.integers(0, 150, 3))
    m = int(rng.integers(w // 12, w // 5))
    box = (m, m, w - m, h - m)
    if shape == "ellipse":
        d.ellipse(box, fill=fg)
    elif shape == "rectangle":
        d.rectangle(box, fill=fg)
    elif shape == "triangle":
        d.polygon([(w // 2, m), (m, h - m), (w - m, h - m)], fill=fg)
    else:
        t = w // 8
        d.rectangle((w // 2 - t, m, w // 2 + t, h - m), fill=fg)
        d.rectangle((m, h // 2 - t, w - m, h // 2 + t), fill=fg)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=85)


def _photo(root: Path, i: int) -> Path:
    return root / f"part_{i // PER_FOLDER:03d}" / f"{i:06d}.jpg"


def _draw_chunk(args) -> int:
    root, start, stop, seed, size = args
    shapes = list(SHAPES.values())
    for i in range(start, stop):
        draw(_photo(Path(root), i), shapes[i % len(shapes)], seed * 10**7 + i, size)
    return stop - start


def generate_photos(root: Path, n: int, seed: int, distinct: int = 500, size=(320, 400)) -> float:
    """``n`` photos under ``root/part_NNN/`` (1,000 per folder): ``distinct`` drawn (in parallel), the
    rest byte copies of them (decoding costs the same; drawing 20,000 would dominate the bench).
    Returns the seconds taken."""
    t0 = time.perf_counter()
    distinct = min(distinct, n)
    chunks = [(str(root), a, min(a + 100, distinct), seed, size) for a in range(0, distinct, 100)]
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        assert sum(pool.map(_draw_chunk, chunks)) == distinct
    for i in range(distinct, n):
        dst = _photo(root, i)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_photo(root, i % distinct), dst)
    return time.perf_counter() - t0


def train_small_models(work: Path, seed: int) -> Path:
    """prepare_dataset.py → train_lcpn.sh (no flat baseline) on a tiny tree of 64 px shapes; the models folder."""
    tree, split, models = work / "tree", work / "split", work / "models"
    for k, (leaf, shape) in enumerate(SHAPES.items()):
        for i in range(8):
            draw(tree / leaf / f"img_{i:02d}.jpg", shape, seed * 1000 + k * 100 + i, (64, 64))
    py = sys.executable
    subprocess.run([py, str(REPO / "prepare_dataset.py"), "-p", str(tree), "-o", str(split), "-q"], check=True)
    env = dict(os.environ, PYTHON=py, DATA_DIR=str(split), MODELS_DIR=str(models), NO_FLAT="1")
    subprocess.run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--cache-dir", str(work / "cache"), *FAST],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return models


def rate(times: list[float], a: int, b: int) -> float:
    """Images/s between record ``a`` and record ``b`` (0-based indices into ``times``)."""
    return (b - a) / max(times[b] - times[a], 1e-9)


def timed_run(models: Path, inputs: list[Path], batch: int, name: str, log_dir: Path) -> dict:
    """predict.py on ``inputs`` writing jsonl to stdout; per-record arrival times, wall time, peak RSS."""
    cmd = [sys.executable, REPO / "src" / "predict.py", *inputs, "--models-dir", models, "--format", "jsonl",
           "--batch-size", str(batch), "-q"]
    r = run_timed(cmd, log_dir, name)
    if r.returncode != 0:
        raise BenchError(f"{name} failed ({r.returncode}):\n{r.stderr_tail()}")
    times = [t for t, line in r.stdout_lines if line.startswith("{")]
    n = len(times)
    tenth = max(1, n // 10)
    return {"n": n, "wall_s": r.wall_s, "max_rss_mib": r.max_rss_mib, "first_record_s": times[0],
            "first_10pct_images_per_s": rate(times, 0, tenth), "last_10pct_images_per_s": rate(times, n - 1 - tenth, n - 1),
            "overall_images_per_s": rate(times, 0, n - 1)}


def kill_and_resume(models: Path, photos: Path, n: int, batch: int, expect_s: float, seed: int, work: Path) -> dict:
    """Kill a --resume run with SIGKILL at a random moment, rerun it; check every photo is there once."""
    out = work / "resume.jsonl"
    cmd = [sys.executable, str(REPO / "src" / "predict.py"), str(photos), "--models-dir", str(models), "-o", str(out),
           "--resume", "--batch-size", str(batch), "-q"]
    at = random.Random(seed).uniform(0.2, 0.8) * expect_s
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(at)
    proc.kill()
    proc.wait()
    data = out.read_bytes() if out.exists() else b""
    before = data.count(b"\n")
    torn = bool(data) and not data.endswith(b"\n")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    rerun_s = time.perf_counter() - t0
    paths = [json.loads(line)["path"] for line in out.read_text(encoding="utf-8").splitlines()]
    want = [str(p) for p in sorted(photos.rglob("*.jpg"))]
    return {"killed_after_s": at, "records_before_kill": before, "torn_line_at_kill": torn, "rerun_s": rerun_s,
            "records_after_resume": len(paths), "unique": len(set(paths)), "in_input_order": paths == want,
            "ok": len(paths) == n and len(set(paths)) == n and paths == want}


def report(rep: dict) -> str:
    big, small, kr = rep["runs"]["large"], rep["runs"]["small"], rep["resume"]
    rows = [
        ["photos", f"{small['n']:,}", f"{big['n']:,}"],
        ["throughput, first 10 % of records", f"{fmt(small['first_10pct_images_per_s'], 1)} img/s",
         f"{fmt(big['first_10pct_images_per_s'], 1)} img/s"],
        ["throughput, last 10 % of records", f"{fmt(small['last_10pct_images_per_s'], 1)} img/s",
         f"{fmt(big['last_10pct_images_per_s'], 1)} img/s"],
        ["whole process", f"{fmt(small['wall_s'], 1)} s", f"{fmt(big['wall_s'], 1)} s"],
        ["peak RSS", f"{fmt(small['max_rss_mib'], 0)} MiB", f"{fmt(big['max_rss_mib'], 0)} MiB"],
    ]
    lines = [
        "# Batch prediction at scale (bench/predict_scale.py)", "",
        f"Command: `{rep['command']}`", "",
        f"Models: {rep['models']}. Photos: {rep['n']:,} 320×400 JPEGs in folders of 1,000 (500 drawn, "
        f"the rest byte copies; {fmt(rep['generate_s'], 0)} s).", "",
        md_table(["", "small run", "large run"], rows), "",
        f"- Peak RSS at {big['n']:,} vs {small['n']:,} photos: **{rep['rss_growth'] * 100:+.1f} %** "
        f"(goal: within 15 %): {'met' if rep['rss_ok'] else 'NOT met'}.",
        f"- Throughput of the last 10 % vs the first 10 % of the large run: "
        f"{rep['slowdown'] * 100:+.1f} % (negative = slower at the end; on a busy machine this follows the load).",
        f"- kill -9 after {fmt(kr['killed_after_s'], 1)} s ({kr['records_before_kill']:,} records on disk, "
        f"torn last line: {'yes' if kr['torn_line_at_kill'] else 'no'}), then the same command again "
        f"({fmt(kr['rerun_s'], 1)} s): {kr['records_after_resume']:,} records, {kr['unique']:,} distinct, "
        f"in input order: {'yes' if kr['in_input_order'] else 'no'} → **{'OK' if kr['ok'] else 'FAILED'}**.", "",
        machine_markdown(rep["machine"]),
    ]
    note = busy_note(rep["machine"])
    return "\n".join(lines + ([note] if note else []))


def main(args: argparse.Namespace) -> int:
    if args.small >= args.n or args.small < PER_FOLDER or args.small % PER_FOLDER:
        raise BenchError(f"--small must be a multiple of {PER_FOLDER} below --n")
    work = args.work or Path(tempfile.mkdtemp(prefix="predict-scale-"))
    try:
        photos = work / "photos"
        log(f"generating {args.n} photos in {photos}")
        gen_s = generate_photos(photos, args.n, args.seed) if not photos.exists() else 0.0
        models = args.models_dir
        if models is None:
            log("training small models (Lite0, 64 px) on a tiny tree")
            models = train_small_models(work, args.seed)
        runs = {}
        log(f"predicting {args.small} photos")
        small_dirs = sorted(photos.iterdir())[: args.small // PER_FOLDER]
        runs["small"] = timed_run(models, small_dirs, args.batch_size, "small", work / "logs")
        log(f"predicting {args.n} photos")
        runs["large"] = timed_run(models, [photos], args.batch_size, "large", work / "logs")
        log("kill -9 and --resume")
        resume = kill_and_resume(models, photos, args.n, args.batch_size, runs["large"]["wall_s"], args.seed, work)
        big, small = runs["large"], runs["small"]
        rep = {"command": command_line(), "n": args.n, "generate_s": gen_s, "runs": runs, "resume": resume,
               "models": "given: " + str(models) if args.models_dir else
               "EfficientNet-Lite0 at 64 px, frozen, 2-level tree of 4 leaves (trained by this bench)",
               "rss_growth": big["max_rss_mib"] / small["max_rss_mib"] - 1,
               "slowdown": big["last_10pct_images_per_s"] / big["first_10pct_images_per_s"] - 1,
               "machine": machine_info()}
        rep["rss_ok"] = rep["rss_growth"] <= 0.15
        md = report(rep)
        print(md)
        write_report(md, rep, args.out)
        return 0 if resume["ok"] else 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser)
