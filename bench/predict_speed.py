#!/usr/bin/env python3
"""Measure prediction speed on a fixed sample of photos, against targets, in one run.

  a. predict.py throughput: wall time of the whole process ``src/predict.py -p <N images> --format csv``
     (start-up, model loading, decoding, hierarchy and writing included); best of --repeats.
  b. time to first prediction: ``src/predict.py -p <1 image>``, whole process; best of --first-repeats.
  c. raw network throughput in the same runtime: the N images preprocessed once (not timed), then only
     the shared backbone calls timed in batches of --batch-size: one forward per image plus the mirrored
     forwards predict.py's selective mirror averaging really runs (counted by routing the images once);
     nodes with their own network are timed on the images routed to them.
     whole-process overhead = raw images/s / predict.py images/s - 1 (start-up and loading included).
  e. the same prediction in-process, steady state: models loaded and warmed up on one batch (not timed),
     then ``HierarchicalPredictor.predict_paths`` on the N paths timed (decoding, resizing, every backbone
     and head call, routing, mirror averaging); best of --repeats.
     overhead = raw images/s / e images/s - 1: what decoding, routing and the hierarchy add over the raw
     backbone pass (the target; start-up has its own target, b).
  d. "seed-style" prediction like the original research script: PyTorch eager, one full network
     (backbone + head, each with its own backbone copy) per classifier node, loaded once; then one image
     at a time: decode, run the root's network, pick the child, run that child's network, ... (no TTA).

Targets: predict.py >= 5x seed-style, >= 40 images/s, overhead <= 25 %, first prediction <= 3 s.

Example::

    python bench/predict_speed.py                                   # 300 photos of ../shared/datasets/clothing
    python bench/predict_speed.py --images dataset_example --n 100 --models-dir /tmp/tm_test
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_DATASET, REPO, RESULTS_DIR, BenchError, busy_note, command_line, fmt, log, machine_info, machine_markdown,
    every_kth, md_table, run_cli, run_timed, sample_images, usable_cores, write_report,
)

sys.path.insert(0, str(REPO / "src"))

TARGET_SPEEDUP = 5.0  # predict.py images/s >= 5x seed-style
TARGET_IMG_S = 40.0  # predict.py images/s
TARGET_OVERHEAD = 0.25  # raw / in-process steady-state prediction - 1
TARGET_FIRST_S = 3.0  # whole process, one image


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=DEFAULT_DATASET,
                   help="folder searched recursively for photos (default: <repo>/../shared/datasets/clothing)")
    p.add_argument("--n", type=int, default=300,
                   help="photos to use: every k-th of the sorted list so that N are taken (default 300)")
    p.add_argument("--models-dir", type=Path, default=REPO / "trained_models",
                   help="trained models, ideally with an ONNX export (default: <repo>/trained_models)")
    p.add_argument("--repeats", type=int, default=2, help="runs of the N-image predict.py; the best counts (default 2)")
    p.add_argument("--first-repeats", type=int, default=3,
                   help="runs of the one-image predict.py; the best counts (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of predict.py and of the raw timing (default 32)")
    p.add_argument("--seed-style-n", type=int, default=60,
                   help="images timed for the seed-style predictor (a subset of the N, every k-th; default 60; "
                        "0 skips it)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads for the seed-style predictor (default 0: all usable cores)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "predict-speed.md",
                   help="markdown report; a .json twin is written beside it (default: <repo>/bench/results/predict-speed.md)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    return p


# ---------------------------------------------------------------------- a, b: whole predict.py processes
def time_predict(paths: list[str], models_dir: Path, out_csv: Path, repeats: int, batch_size: int,
                 what: str) -> tuple[float, list[float]]:
    cmd = [sys.executable, REPO / "src" / "predict.py", "-p", *paths, "--format", "csv", "-o", out_csv,
           "--models-dir", models_dir, "--batch-size", str(batch_size)]
    walls = []
    for r in range(max(1, repeats)):
        run = run_timed(cmd, name="predict")
        if run.returncode != 0:
            raise BenchError(f"{what}: predict.py failed (exit {run.returncode}): "
                             + (run.stderr_tail(8).replace("\n", " | ") or "no error output"))
        walls.append(run.wall_s)
        if run.stderr_path:
            run.stderr_path.unlink(missing_ok=True)
        log(f"{what}: run {r + 1}: {run.wall_s:.2f} s")
    return min(walls), walls


def read_csv_labels(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: row["labels"] for row in csv.DictReader(fh)}


# ---------------------------------------------------------------------- c: raw network forwards
def time_raw(paths: list[str], models_dir: Path, batch_size: int) -> dict:
    import numpy as np

    from hiernet.hierarchy import ROOT_ID
    from hiernet.images import load_for_model
    from hiernet.predictor import HierarchicalPredictor

    t = time.perf_counter()
    pred = HierarchicalPredictor.load(models_dir, runtime="auto")
    load_s = time.perf_counter() - t
    specs = pred.input_specs()
    t = time.perf_counter()
    arrays = {spec: np.stack([load_for_model(p, spec[0], spec[1]) for p in paths]) for spec in specs}
    prep_s = time.perf_counter() - t
    n = len(paths)
    parts, total = [], 0.0
    # how many backbone forwards predict.py really runs per image: one, plus the mirror where its
    # selective mirror averaging (--tta-below) asks for it; counted by routing the images once
    counted = {g: 0 for g in pred.backbones}
    originals = dict(pred.backbones)
    for g, (run, size, resize) in originals.items():
        def counting(x, _run=run, _g=g):
            counted[_g] += len(x)
            return _run(x)
        pred.backbones[g] = (counting, size, resize)
    inputs = [{spec: arrays[spec][i] for spec in specs} for i in range(n)]
    for i in range(0, n, batch_size):
        pred.predict_arrays(inputs[i : i + batch_size], paths[i : i + batch_size])
    pred.backbones.update(originals)
    for g, (run, size, resize) in pred.backbones.items():
        x = arrays[(size, resize)]
        n_mirror = max(0, counted[g] - n)
        run(x[:batch_size])  # warm-up (not timed): first-call allocations
        t = time.perf_counter()
        for i in range(0, n, batch_size):
            run(x[i : i + batch_size])
        for i in range(0, n_mirror, batch_size):
            run(np.ascontiguousarray(x[i : min(i + batch_size, n_mirror), :, :, ::-1]))
        dt = time.perf_counter() - t
        total += dt
        parts.append({"network": f"shared backbone {g} ({size}px, {resize})", "images": n,
                      "forwards_per_image": round(1 + n_mirror / n, 3), "seconds": dt})
    full_nodes = {nid: nm for nid, nm in pred.nodes.items() if nm.full is not None}
    if full_nodes:  # own networks run only on the images routed to them: route once, then time exactly those
        inputs = [{spec: arrays[spec][i] for spec in specs} for i in range(n)]
        routed = pred.predict_arrays(inputs, paths)
        for nid, nm in full_nodes.items():
            idx = [i for i, pr in enumerate(routed) if nid == ROOT_ID or nid in pr.node_ids]
            if not idx:
                continue
            x = arrays[(nm.image_size, nm.resize)][np.asarray(idx)]
            nm.full(x[:batch_size])
            t = time.perf_counter()
            for i in range(0, len(x), batch_size):
                nm.full(x[i : i + batch_size])
            dt = time.perf_counter() - t
            total += dt
            parts.append({"network": f"own network of node '{nm.dataset}'", "images": len(idx),
                          "forwards_per_image": 1, "seconds": dt})
    return {"runtime": pred.runtime, "load_s": load_s, "preprocess_s": prep_s, "seconds": total,
            "images_per_s": n / total if total > 0 else None, "parts": parts}


# ---------------------------------------------------------------------- e: in-process, steady state
def time_in_process(paths: list[str], models_dir: Path, batch_size: int, repeats: int) -> dict:
    from hiernet.predictor import HierarchicalPredictor

    pred = HierarchicalPredictor.load(models_dir, runtime="auto")
    pred.predict_paths(paths[:batch_size], batch_size=batch_size)  # warm-up: first-call allocations
    walls = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        pred.predict_paths(paths, batch_size=batch_size)
        walls.append(time.perf_counter() - t)
    return {"wall_s": min(walls), "walls_s": walls, "images_per_s": len(paths) / min(walls), "runtime": pred.runtime}


# ---------------------------------------------------------------------- d: seed-style predictor
def time_seed_style(paths: list[str], models_dir: Path, threads: int = 0) -> dict:
    import torch

    from hiernet.artifacts import build_torch_model, load_node
    from hiernet.images import load_rgb, resize_for_model, to_array
    from hiernet.predictor import read_models_hierarchy

    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    hier, _ = read_models_hierarchy(models_dir)
    nets = {}
    t = time.perf_counter()
    for nid in hier.classifier_nodes():
        art = load_node(models_dir / hier.nodes[nid].dataset)
        backbone, head, _own = build_torch_model(art)  # no shared dict: every node gets its own backbone copy
        bb = art.config["backbone"]
        nets[nid] = (torch.nn.Sequential(backbone, head).eval(), int(bb["image_size"]), bb["resize"],
                     art.classes, art.class_nodes)
    load_s = time.perf_counter() - t

    def predict_one(path: str) -> str:
        img = load_rgb(path)  # full decode, as the original script's PIL open + convert
        nid, names = "", []
        while hier.nodes[nid].children:
            children = hier.nodes[nid].children
            if len(children) == 1:
                nid = children[0]
                names.append(hier.nodes[nid].name)
                continue
            net, size, resize, classes, class_nodes = nets[nid]
            x = torch.from_numpy(to_array(resize_for_model(img, size, resize)))[None]
            with torch.inference_mode():
                best = int(net(x)[0].argmax())
            names.append(classes[best])
            nid = class_nodes[best]
        return "/".join(names)

    predict_one(paths[0])  # warm-up (not timed)
    out = {}
    t = time.perf_counter()
    for p in paths:
        out[p] = predict_one(p)
    dt = time.perf_counter() - t
    return {"images": len(paths), "seconds": dt, "images_per_s": len(paths) / dt if dt > 0 else None,
            "load_s": load_s, "networks": len(nets), "torch_threads": threads, "labels": out}


# ---------------------------------------------------------------------- report
def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def render(rep: dict) -> str:
    a, b, c, d, e = rep["predict"], rep["first_prediction"], rep["raw"], rep.get("seed_style"), rep["in_process"]
    out = ["# Prediction speed", "",
           f"Command (run from {rep['cwd']}):", "", "```", rep["command"], "```", "",
           f"{rep['n_images']} photos: every {rep['every_k']}-th of the {rep['n_available']} under {rep['images_dir']} "
           f"(sorted paths); models: {rep['models_dir']} (runtime: **{c['runtime']}**).", ""]
    if busy_note(rep["machine"]):
        out += [busy_note(rep["machine"]), ""]
    out.append("## Targets")
    out.append("")
    out.append(md_table(["target", "measured", "goal", "result"], [(t["name"], t["measured"], t["goal"], verdict(t["pass"]))
                                                                   for t in rep["targets"]]))
    out += ["", "## Figures", ""]
    rows = [
        ("a. predict.py, whole process, N images", f"{fmt(a['images_per_s'], 1)} images/s",
         f"best of {len(a['walls_s'])}: {fmt(a['wall_s'], 2)} s ({', '.join(fmt(w, 2) for w in a['walls_s'])})"),
        ("b. predict.py, 1 image, start to result", f"{fmt(b['wall_s'], 2)} s",
         f"best of {len(b['walls_s'])} ({', '.join(fmt(w, 2) for w in b['walls_s'])})"),
        ("c. raw network forwards only", f"{fmt(c['images_per_s'], 1)} images/s",
         f"{fmt(c['seconds'], 2)} s for {rep['n_images']} images, batches of {rep['batch_size']}; "
         f"preprocessing ({fmt(c['preprocess_s'], 1)} s) and loading ({fmt(c['load_s'], 1)} s) not timed"),
        ("e. prediction in-process, models loaded and warm", f"{fmt(e['images_per_s'], 1)} images/s",
         f"best of {len(e['walls_s'])}: {fmt(e['wall_s'], 2)} s ({', '.join(fmt(w, 2) for w in e['walls_s'])}); "
         "decoding, resizing, backbone and head calls, routing, mirror averaging"),
        ("overhead of decoding, routing and the hierarchy", fmt(rep["overhead"], 3, pct=True) if rep["overhead"] is not None else "n/a",
         "raw images/s ÷ e images/s − 1"),
        ("overhead of the whole predict.py process", fmt(rep["overhead_process"], 3, pct=True) if rep["overhead_process"] is not None else "n/a",
         "raw images/s ÷ a images/s − 1 (adds start-up, imports, model loading, first-call allocations, writing)"),
    ]
    if d:
        rows.append(("d. seed-style (torch eager, 1 network per level, 1 image at a time)",
                     f"{fmt(d['images_per_s'], 2)} images/s",
                     f"timed on {d['images']} of the {rep['n_images']} photos (every k-th), {d['networks']} networks "
                     f"loaded once ({fmt(d['load_s'], 1)} s, not timed), torch threads: {d['torch_threads']}, no TTA"))
        rows.append(("speed-up of predict.py over seed-style", f"{fmt(rep['speedup'], 1)}x", ""))
        if d.get("agreement") is not None:
            rows.append(("seed-style path = predict.py path", f"{d['agreement']}/{d['images']}",
                         "sanity check (differs where predict.py's mirror TTA changes a close call)"))
    else:
        rows.append(("d. seed-style", "skipped", "--seed-style-n 0"))
    out.append(md_table(["measure", "value", "how"], rows))
    out += ["", "Raw forward time per network:", ""]
    out.append(md_table(["network", "images", "forwards per image", "seconds"],
                        [(p["network"], p["images"], p["forwards_per_image"], fmt(p["seconds"], 2)) for p in c["parts"]]))
    out += ["", "## Machine", "", machine_markdown(rep["machine"]), "",
            "Timings depend on the machine and on whatever else runs on it; compare runs from the same machine only."]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.first_repeats < 1 or args.batch_size < 1 or args.seed_style_n < 0 or args.torch_threads < 0:
        raise BenchError("--repeats, --first-repeats and --batch-size must be at least 1, --seed-style-n and --torch-threads at least 0")
    if args.out.suffix == ".json":
        raise BenchError(f"--out {args.out} must not end in .json (the JSON twin is written beside it)")
    models_dir = args.models_dir.expanduser().resolve()
    if not (models_dir / "hierarchy.json").exists():
        raise BenchError(f"no trained models in {models_dir} (hierarchy.json missing); pass --models-dir")
    images_dir = args.images.expanduser().resolve()
    found, n_avail = sample_images(images_dir, args.n)
    paths = [str(p) for p in found]
    n = len(paths)
    machine = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="hiernet-predict-speed-"))
    try:
        # whole processes first, while this process is still small
        log(f"a. predict.py on {n} images, {args.repeats}x")
        csv_path = tmp / "pred.csv"
        wall_a, walls_a = time_predict(paths, models_dir, csv_path, args.repeats, args.batch_size, "a")
        labels = read_csv_labels(csv_path)
        log(f"b. predict.py on 1 image, {args.first_repeats}x")
        wall_b, walls_b = time_predict(paths[:1], models_dir, tmp / "one.csv", args.first_repeats, args.batch_size, "b")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    predict_img_s = n / wall_a
    log("c. raw network forwards")
    raw = time_raw(paths, models_dir, args.batch_size)
    log(f"c. {raw['images_per_s']:.1f} images/s ({raw['runtime']})")
    log(f"e. prediction in-process, {args.repeats}x")
    steady = time_in_process(paths, models_dir, args.batch_size, args.repeats)
    log(f"e. {steady['images_per_s']:.1f} images/s")
    seed = None
    if args.seed_style_n:
        sub = every_kth(paths, args.seed_style_n)
        log(f"d. seed-style predictor on {len(sub)} images")
        seed = time_seed_style(sub, models_dir, args.torch_threads)
        seed["agreement"] = sum(1 for p, lab in seed["labels"].items() if labels.get(p) == lab) if labels else None
        log(f"d. {seed['images_per_s']:.2f} images/s")
    overhead = raw["images_per_s"] / steady["images_per_s"] - 1 if raw["images_per_s"] else None
    overhead_process = raw["images_per_s"] / predict_img_s - 1 if raw["images_per_s"] else None
    speedup = predict_img_s / seed["images_per_s"] if seed and seed["images_per_s"] else None
    targets = [
        {"name": "predict.py vs seed-style", "measured": f"{fmt(speedup, 1)}x", "goal": f">= {TARGET_SPEEDUP:g}x",
         "pass": None if speedup is None else speedup >= TARGET_SPEEDUP, "value": speedup},
        {"name": "predict.py throughput", "measured": f"{predict_img_s:.1f} images/s", "goal": f">= {TARGET_IMG_S:g} images/s",
         "pass": predict_img_s >= TARGET_IMG_S, "value": predict_img_s},
        {"name": "decoding, routing and hierarchy over the raw backbone pass (e vs c)", "measured": fmt(overhead, 3, pct=True),
         "goal": f"<= {TARGET_OVERHEAD:.0%}",
         "pass": None if overhead is None else overhead <= TARGET_OVERHEAD, "value": overhead},
        {"name": "first prediction (whole process)", "measured": f"{wall_b:.2f} s", "goal": f"<= {TARGET_FIRST_S:g} s",
         "pass": wall_b <= TARGET_FIRST_S, "value": wall_b},
    ]
    rep = {
        "command": command_line(), "cwd": os.getcwd(),
        "images_dir": str(images_dir), "n_available": n_avail, "n_images": n, "every_k": n_avail // args.n,
        "models_dir": str(models_dir), "batch_size": args.batch_size,
        "predict": {"wall_s": wall_a, "walls_s": walls_a, "images_per_s": predict_img_s},
        "first_prediction": {"wall_s": wall_b, "walls_s": walls_b},
        "raw": raw, "in_process": steady, "overhead": overhead, "overhead_process": overhead_process,
        "seed_style": None if seed is None else {k: v for k, v in seed.items() if k != "labels"},
        "speedup": speedup, "targets": targets, "machine": machine,
    }
    md = render(rep)
    sys.stdout.write(md)
    sys.stdout.flush()
    md_path, js_path = write_report(md, rep, args.out)
    log(f"wrote {md_path} and {js_path}")
    if args.strict and any(t["pass"] is False for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main, get_args_parser)
