#!/usr/bin/env python3
"""Run the whole pipeline on a dataset with a fixed seed and report accuracy, time and memory.

Stages, each a separate process timed from start to exit (with its peak memory):

  1. prepare   python prepare_dataset.py -p DATA -o WORK/split --seed SEED
  2. train     src/train_lcpn.sh --cache-dir CACHE --seed TRAIN_SEED [extra train flags]
               (every node, the flat baseline and the ONNX export; DATA_DIR=WORK/split, MODELS_DIR=WORK/models)
  3. evaluate  python src/evaluate.py --data-dir WORK/split --models-dir WORK/models --output WORK/results
  4. predict   python src/predict.py -p WORK/split/flat/test --format csv -o WORK/pred.csv --models-dir WORK/models

Everything is written under the work folder (never into the repository's split_datasets/ or
trained_models/). The report (markdown + a JSON twin) goes to --out and to standard output.

Examples::

    python bench/run_benchmark.py                                  # ../shared/datasets/clothing, default recipe
    python bench/run_benchmark.py -p dataset_example --work /tmp/bench_try -- --backbone efficientnet-lite0 --image-size 128 --views 1
    python bench/run_benchmark.py --keep-cache /tmp/hiernet-cache   # reuse cached features across runs
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_DATASET, REPO, RESULTS_DIR, BenchError, busy_note, children_max_rss_mib, command_line, fmt, log,
    machine_info, machine_markdown, md_table, run_cli, run_timed, write_report,
)

#: Written into a work folder this script created; only such a folder is ever cleaned for a rerun.
MARKER = ".hiernet-bench"
#: What a rerun in the same work folder removes first (all made by an earlier run of this script).
OWNED = ("split", "models", "results", "cache", "logs", "pred.csv")

NODE_RE = re.compile(r"^== training node '(.*)'")
TRAINED_RE = re.compile(r"^== trained \d+ model")
EXPORT_RE = re.compile(r"^== exporting ONNX")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--data", type=Path, default=DEFAULT_DATASET,
                   help="dataset root DATA/<parent>/<child>/images (default: <repo>/../shared/datasets/clothing)")
    p.add_argument("--work", type=Path,
                   help="work folder for the split, models, cache, results and logs, outside the repository "
                        "(default: a fresh /tmp/hiernet-bench-<timestamp>); a folder made by an earlier run is cleaned and reused")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val/test split (default 1337)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="--seed passed to train.py unless the extra train flags give one (default 0)")
    p.add_argument("--keep-cache", type=Path, metavar="DIR",
                   help="feature cache to reuse across runs (default: a fresh WORK/cache, so the training time "
                        "includes feature extraction)")
    p.add_argument("--skip-evaluate", action="store_true",
                   help="do not run src/evaluate.py (accuracy is then reported as skipped)")
    p.add_argument("--out", type=Path,
                   help="markdown report (a .json twin is written beside it; default: "
                        "<repo>/bench/results/pipeline-<dataset name>.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="echo every stage's standard output to stderr")
    p.add_argument("train_args", nargs="*", metavar="-- TRAIN_FLAGS",
                   help="extra flags for every train.py call, after --, e.g. -- --backbone efficientnet-lite0")
    return p


# ---------------------------------------------------------------------- work folder
def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def prepare_work(work: Path | None) -> Path:
    """Create (or clean, if this script made it) the work folder; refuse any folder inside the repository."""
    if work is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        work = Path(tempfile.gettempdir()) / f"hiernet-bench-{stamp}"
        k = 1
        while work.exists():
            work = Path(tempfile.gettempdir()) / f"hiernet-bench-{stamp}-{k}"
            k += 1
    work = work.expanduser().resolve()
    if _inside(work, REPO.resolve()):
        raise BenchError(f"--work {work} is inside the repository; choose a folder outside it (e.g. /tmp/hiernet-bench)")
    if work.exists() and not work.is_dir():
        raise BenchError(f"--work {work} is a file, not a folder")
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise BenchError(f"--work {work} is not empty and was not made by run_benchmark.py; "
                             "pass an empty or new folder")
        for name in OWNED:
            p = work / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by bench/run_benchmark.py; its contents may be deleted by a rerun\n",
                               encoding="utf-8")
    return work


# ---------------------------------------------------------------------- parsing stage output
def node_times(lines: list[tuple[float, str]], end: float) -> tuple[list[tuple[str, float]], float | None, float | None]:
    """Per-node training seconds from train_lcpn.sh's time-stamped ``== ...`` lines.

    Returns
    -------
    (list of (node, seconds), setup seconds before the first node, export seconds or None)
        A node's time runs from its ``== training node 'X'`` line to the next ``== `` marker.
    """
    marks = []
    for t, line in lines:
        m = NODE_RE.match(line)
        if m:
            marks.append((t, "node", m.group(1)))
        elif TRAINED_RE.match(line):
            marks.append((t, "trained", None))
        elif EXPORT_RE.match(line):
            marks.append((t, "export", None))
    nodes, export = [], None
    for k, (t, kind, name) in enumerate(marks):
        t_next = marks[k + 1][0] if k + 1 < len(marks) else end
        if kind == "node":
            nodes.append((name, t_next - t))
        elif kind == "export":
            export = end - t
    setup = marks[0][0] if marks else None
    return nodes, setup, export


def count_predictions(csv_path: Path) -> tuple[int, int]:
    """(rows, rows with an error) of predict.py's CSV output."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return len(rows), sum(1 for r in rows if r.get("error"))


# ---------------------------------------------------------------------- report
def _pts(v) -> str:
    return "n/a" if v is None or v != v else f"{v * 100:+.2f}"


def _diff_text(d, ci) -> str:
    """``+1.23 (95% CI -0.50 to +2.90)`` in percentage points."""
    if d is None:
        return "n/a"
    lo, hi = (list(ci) + [None, None])[:2] if ci else (None, None)
    return f"{_pts(d)} (95% CI {_pts(lo)} to {_pts(hi)})"


def render(rep: dict) -> str:
    out = [f"# Pipeline benchmark: {rep['dataset_name']}", ""]
    out += [f"Command (run from {rep['cwd']}):", "", "```", rep["command"], "```", ""]
    s = rep["settings"]
    out.append(md_table(["setting", "value"], [
        ("dataset", s["dataset"]),
        ("work folder", s["work"]),
        ("split seed / train seed", f"{s['seed']} / {s['train_seed']}"),
        ("extra train flags", " ".join(s["train_args"]) or "(none: default recipe)"),
        ("feature cache", s["cache"] + (" (kept across runs)" if s["cache_kept"] else " (fresh: timing includes feature extraction)")),
    ]))
    out += ["", "## Accuracy (test split)", ""]
    acc = rep.get("accuracy")
    if acc is None:
        out.append(f"Evaluation {rep['stages'].get('evaluate', {}).get('status', 'skipped')}: no accuracy figures.")
    else:
        rows = [("test images", acc.get("n_images")), ("leaf accuracy (end-to-end)", fmt(acc.get("leaf_accuracy"), 4))]
        for k, v in enumerate(acc.get("level_accuracy") or [], 1):
            rows.append((f"level {k} accuracy", fmt(v, 4)))
        rows.append(("hierarchical F1", fmt(acc.get("hierarchical_f1"), 4)))
        if acc.get("flat_leaf_accuracy") is not None or acc.get("difference") is not None:
            rows.append(("flat baseline leaf accuracy", fmt(acc.get("flat_leaf_accuracy"), 4)))
            ci = acc.get("ci95") or [None, None]
            d = acc.get("difference")
            rows.append(("LCPN − flat (leaf accuracy, points)", _diff_text(d, ci)))
            rows.append(("McNemar p", fmt(acc.get("p_value"), 4)))
        else:
            rows.append(("flat baseline", "not evaluated"))
        out.append(md_table(["metric", "value"], rows))
    out += ["", "## Time and memory", ""]
    if busy_note(rep["machine"]):
        out += [busy_note(rep["machine"]), ""]
    rows = []
    for name, st in rep["stages"].items():
        rows.append((name, st.get("status", "ok"), fmt(st.get("wall_s"), 1), fmt(st.get("max_rss_mib"), 0)))
    rows.append(("**total**", "", fmt(rep["total_wall_s"], 1), fmt(rep["peak_rss_mib"], 0)))
    out.append(md_table(["stage", "status", "wall (s)", "peak RSS (MiB)"], rows))
    pr = rep.get("predict")
    if pr:
        out += ["", f"predict.py: {pr['images']} test images in {pr['wall_s']:.2f} s (whole process, start-up included) "
                    f"= **{pr['images_per_s']:.1f} images/s**" + (f"; {pr['errors']} unreadable" if pr["errors"] else "")]
    tr = rep.get("train_detail")
    if tr and tr.get("nodes"):
        extraction = "features already in the --keep-cache cache are not extracted again" if rep["settings"]["cache_kept"] \
            else "feature extraction included (fresh cache)"
        out += ["", "Training time per node (from train_lcpn.sh's `== training node` lines; each includes its process's "
                    f"start-up; {extraction}):", ""]
        rows = [(n, fmt(t, 1)) for n, t in tr["nodes"]]
        if tr.get("setup_s") is not None:
            rows.insert(0, ("(listing nodes)", fmt(tr["setup_s"], 1)))
        if tr.get("export_s") is not None:
            rows.append(("(ONNX export)", fmt(tr["export_s"], 1)))
        out.append(md_table(["node", "wall (s)"], rows))
    out += ["", "Peak RSS is `ru_maxrss` of each stage's process tree (the largest single process, not a sum); "
                "the total is `getrusage(RUSAGE_CHILDREN)` over all stages.", ""]
    out += ["## Machine", "", machine_markdown(rep["machine"]), ""]
    out.append("Timings depend on the machine and on whatever else runs on it; compare runs from the same machine only.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    data = args.data.expanduser()
    if not data.is_dir():
        print(f"error: dataset folder {data} not found; pass -p DATA (a DATA/<parent>/<child>/images tree)", file=sys.stderr)
        return 2
    data = data.resolve()
    try:
        work = prepare_work(args.work)
        if args.keep_cache:
            cache = args.keep_cache.expanduser().resolve()
            cache.mkdir(parents=True, exist_ok=True)
        else:
            cache = work / "cache"
        out_path = args.out or RESULTS_DIR / f"pipeline-{data.name}.md"
        if out_path.suffix == ".json":
            raise BenchError(f"--out {out_path} must not end in .json (the JSON twin is written beside it)")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    py = sys.executable
    split, models, results, logs = work / "split", work / "models", work / "results", work / "logs"
    pred_csv = work / "pred.csv"
    train_args = list(args.train_args)
    if not any(a == "--seed" or a.startswith("--seed=") for a in train_args):
        train_args += ["--seed", str(args.train_seed)]
    env = dict(os.environ, DATA_DIR=str(split), MODELS_DIR=str(models), PYTHON=py, PYTHONUNBUFFERED="1")

    stages = [
        ("prepare", [py, REPO / "prepare_dataset.py", "-p", data, "-o", split, "--seed", args.seed, "-q"]),
        ("train", ["bash", REPO / "src" / "train_lcpn.sh", "--cache-dir", cache, *train_args]),
        ("evaluate", [py, REPO / "src" / "evaluate.py", "--data-dir", split, "--models-dir", models,
                      "--output", results, "-q"]),
        ("predict", [py, REPO / "src" / "predict.py", "-p", split / "flat" / "test", "--format", "csv",
                     "-o", pred_csv, "--models-dir", models]),
    ]
    rep = {
        "dataset_name": data.name,
        "command": command_line(),
        "cwd": os.getcwd(),
        "settings": {"dataset": str(data), "work": str(work), "seed": args.seed, "train_seed": args.train_seed,
                     "train_args": list(args.train_args), "cache": str(cache), "cache_kept": bool(args.keep_cache)},
        "machine": machine_info(),
        "stages": {},
    }
    log(f"work folder {work}")

    def echo(t: float, line: str) -> None:
        if args.verbose or NODE_RE.match(line) or EXPORT_RE.match(line) or TRAINED_RE.match(line):
            print(f"[bench]   {t:7.1f} s  {line}", file=sys.stderr, flush=True)

    total = 0.0
    for name, cmd in stages:
        if name == "evaluate" and args.skip_evaluate:
            rep["stages"][name] = {"status": "skipped (--skip-evaluate)"}
            log("evaluate: skipped (--skip-evaluate)")
            continue
        log(f"{name}: {' '.join(str(c) for c in cmd)}")
        run = run_timed(cmd, log_dir=logs, name=name, env=env if name == "train" else dict(os.environ, PYTHONUNBUFFERED="1"),
                        on_line=echo)
        total += run.wall_s
        rep["stages"][name] = {"status": "ok" if run.returncode == 0 else f"failed (exit {run.returncode})",
                               "wall_s": run.wall_s, "max_rss_mib": run.max_rss_mib,
                               "cmd": [str(c) for c in cmd]}
        if run.returncode != 0:
            tail = run.stderr_tail(20) or "\n".join(line for _, line in run.stdout_lines[-20:])
            hint = " (rerun with --skip-evaluate to benchmark the other stages)" if name == "evaluate" else ""
            print(f"error: stage '{name}' failed (exit {run.returncode}) after {run.wall_s:.1f} s{hint}; "
                  f"logs: {logs}/{name}.stdout.log, {logs}/{name}.stderr.log; last lines of its stderr:", file=sys.stderr)
            if tail:
                print("\n".join("    " + ln for ln in tail.splitlines()), file=sys.stderr)
            return 1
        log(f"{name}: done in {run.wall_s:.1f} s, peak RSS {run.max_rss_mib:.0f} MiB")
        if name == "train":
            nodes, setup, export = node_times(run.stdout_lines, run.wall_s)
            rep["train_detail"] = {"nodes": nodes, "setup_s": setup, "export_s": export}
        if name == "predict":
            n, bad = count_predictions(pred_csv)
            rep["predict"] = {"images": n, "errors": bad, "wall_s": run.wall_s,
                              "images_per_s": n / run.wall_s if run.wall_s > 0 else None}
    rep["total_wall_s"] = total
    rep["peak_rss_mib"] = children_max_rss_mib()

    if not args.skip_evaluate:
        res_path = results / "results.json"
        try:
            res = json.loads(res_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"error: stage 'evaluate' wrote no readable {res_path} ({type(exc).__name__}); "
                  "rerun with --skip-evaluate to benchmark the other stages", file=sys.stderr)
            return 1
        comp = res.get("comparison") or {}
        rep["accuracy"] = {
            "n_images": res.get("n_images"),
            "leaf_accuracy": res.get("leaf_accuracy"),
            "level_accuracy": res.get("level_accuracy"),
            "hierarchical_f1": res.get("hierarchical_f1"),
            "flat_leaf_accuracy": (res.get("flat") or {}).get("leaf_accuracy"),
            "difference": comp.get("difference"),
            "ci95": comp.get("ci95"),
            "p_value": comp.get("p_value"),
        }
        rep["results_json"] = str(res_path)
    md = render(rep)
    sys.stdout.write(md)
    sys.stdout.flush()
    try:
        md_path, js_path = write_report(md, rep, out_path)
    except (BenchError, OSError) as exc:
        print(f"error: cannot write the report to {out_path}: {exc}", file=sys.stderr)
        return 2
    log(f"wrote {md_path} and {js_path}")
    return 0


if __name__ == "__main__":
    run_cli(main, get_args_parser)
