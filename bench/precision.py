#!/usr/bin/env python3
"""fp32 vs int8 backbone, side by side: training time, predict.py speed and leaf accuracy.

For each dataset (the clothing tree and the fashion-product CSV export by default) the data is prepared
once; then, per precision, from an EMPTY feature cache:

  train     src/train_lcpn.sh --cache-dir WORK/<ds>/<precision>/cache --precision P [extra train flags]
  evaluate  python src/evaluate.py (leaf accuracy on the test split; the models' precision)
  predict   python src/predict.py -p <the test split> --format csv (whole process: images/s)

``--tune-backbone NAME`` trains with ``train_lcpn.sh --tune-backbone NAME`` (``--image-size`` ``--tune-size``):
the last block of NAME tuned on the training split first (same empty cache; its time is part of training). ``--with-flat``
trains the flat baseline too (with ``--tune-backbone``: the tuned classifier) and reports every decision (LCPN,
flat, combined: leaf accuracy and macro F1 on the test split) and the one ``--decision auto`` chose on the
validation split, which predict.py then uses. ``--limit K`` keeps K images per leaf class (a quick subset run; label it as such). Everything goes
under the work folder (default: a fresh /tmp folder). The report goes to ``--out`` (markdown + JSON).

Examples::

    python bench/precision.py                                   # both datasets, everything (long)
    python bench/precision.py --limit 12 --datasets clothing -- --epochs 5    # a quick subset
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS_DIR, busy_note, command_line, fmt, log, machine_info, machine_markdown, md_table, run_timed, write_report  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"
if not SHARED.is_dir():  # a worktree beside the main checkout
    SHARED = Path("/work/shared/datasets")
DATASETS = {
    "clothing": {"tree": SHARED / "clothing"},
    "fashion-product": {"csv": SHARED / "fashion-product" / "styles.csv", "image_column": "image", "id_column": "id",
                        "label_columns": "masterCategory,subCategory,articleType"},
}
PRECISIONS = ("fp32", "int8")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="clothing,fashion-product", help="comma-separated: clothing, fashion-product")
    p.add_argument("--limit", type=int, help="keep at most K images per leaf class (a subset run)")
    p.add_argument("--work", type=Path, help="work folder (default: a fresh /tmp/hiernet-precision-<time>)")
    p.add_argument("--seed", type=int, default=1337, help="split seed (default 1337)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "precision.md", help="report (default: bench/results/precision.md)")
    p.add_argument("--reuse-trained", action="store_true",
                   help="keep the models and training times of the earlier run in --work (its report is --out): "
                        "rerun evaluate and predict only")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: fp32, int8")
    p.add_argument("--tune-backbone", metavar="NAME",
                   help="tune the last block of this backbone first (src/tune_backbone.py) and train on it")
    p.add_argument("--tune-size", type=int, help="input side for --tune-backbone (default: its own)")
    p.add_argument("--with-flat", action="store_true",
                   help="train the flat baseline too and report every decision (lcpn, flat, combined) and auto's choice")
    p.add_argument("train_args", nargs="*", help="extra train.py flags (after --)")
    return p


def subset_tree(src: Path, dst: Path, limit: int) -> Path:
    """``dst``: the same class folders as ``src`` with symbolic links to the first ``limit`` images of each."""
    for leaf in sorted({p.parent for p in src.rglob("*") if p.is_file()}):
        files = sorted(f for f in leaf.iterdir() if f.is_file())[:limit]
        out = dst / leaf.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            (out / f.name).symlink_to(f)
    return dst


def subset_csv(src: Path, dst: Path, label_columns: str, image_column: str, limit: int) -> Path:
    """``dst``: the rows of ``src`` with at most ``limit`` per label path, image paths made absolute."""
    cols, seen = label_columns.split(","), {}
    with open(src, newline="", encoding="utf-8") as fh, open(dst, "w", newline="", encoding="utf-8") as out:
        reader = csv.DictReader(fh)
        writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
        writer.writeheader()
        for row in reader:
            key = tuple(row[c] for c in cols)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= limit:
                row[image_column] = str((src.parent / row[image_column]).resolve())
                writer.writerow(row)
    return dst


def prepare_cmd(name: str, spec: dict, work: Path, limit: int | None, seed: int) -> list:
    py, split = sys.executable, work / "split"
    if "tree" in spec:
        src = subset_tree(spec["tree"], work / "data", limit) if limit else spec["tree"]
        return [py, REPO / "prepare_dataset.py", "-p", src, "-o", split, "--seed", seed, "-q"]
    src = subset_csv(spec["csv"], work / "styles.csv", spec["label_columns"], spec["image_column"], limit) if limit else spec["csv"]
    return [py, REPO / "prepare_dataset.py", "--csv", src, "--image-column", spec["image_column"], "--label-columns",
            spec["label_columns"], "--id-column", spec["id_column"], "-o", split, "--seed", seed, "-q"]


def run_precision(work: Path, precision: str, train_args: list, trained: dict | None = None,
                  tune: tuple | None = None, with_flat: bool = False) -> dict:
    """Train (empty cache), evaluate and predict with one precision; the figures of one table row.

    ``tune``: ``(backbone, image size or None)``: ``train_lcpn.sh --tune-backbone`` tunes its last block
    first and trains on it (the tuning's seconds, part of ``train_s``, are kept as ``tune_s``). ``with_flat``:
    the flat baseline is trained and evaluated too; the row gains ``decisions`` (:func:`decision_scores`).

    ``trained``: this precision's row of an earlier run in the same work folder; its models are reused
    (training is not rerun; nor evaluation when its results are there) and its times and guard line kept.
    """
    py, split, base = sys.executable, work / "split", work / precision
    models, cache, logs = base / "models", base / "cache", base / "logs"
    env = dict(os.environ, DATA_DIR=str(split), MODELS_DIR=str(models), PYTHON=py, PYTHONUNBUFFERED="1",
               **({} if with_flat else {"NO_FLAT": "1"}))
    row = {"precision": precision}
    if trained is not None:
        row.update({k: trained.get(k) for k in ("train_s", "tune_s", "evaluate_s", "guard") if k in trained}, train_reused=True)
    if tune is not None:  # train_lcpn.sh tunes the backbone first (its seconds are in tuned_backbone.json)
        train_args = ["--tune-backbone", tune[0], *([] if tune[1] is None else ["--image-size", tune[1]]), *train_args]
    stages = [("train", ["bash", REPO / "src" / "train_lcpn.sh", "--cache-dir", cache, "--precision", precision, *train_args]),
              ("evaluate", [py, REPO / "src" / "evaluate.py", "--data-dir", split, "--models-dir", models,
                            "--output", base / "results", *([] if with_flat else ["--no-flat"]), "-q"]),
              ("predict", [py, REPO / "src" / "predict.py", "-p", split / "flat" / "test", "--format", "csv",
                           "-o", base / "pred.csv", "--models-dir", models])]
    if trained is not None:
        done = {"train"} | ({"evaluate"} if (base / "results" / "results.json").exists() else set())
        stages = [s for s in stages if s[0] not in done]
    for name, cmd in stages:
        log(f"{precision} {name}: {' '.join(str(c) for c in cmd)}")
        r = run_timed(cmd, log_dir=logs, name=name, env=env)
        row[f"{name}_s"] = r.wall_s
        if r.returncode != 0:
            row["error"] = f"{name} failed (exit {r.returncode}): {r.stderr_tail(3)}"
            return row
        if name == "train" and tune is not None:
            row["tune_s"] = json.loads((models / "tuned_backbone.json").read_text(encoding="utf-8"))["seconds"]
        if name == "train":
            row["guard"] = next((ln for _, ln in r.stdout_lines if ln.startswith("int8 guard:")), None)
    res = json.loads((base / "results" / "results.json").read_text(encoding="utf-8"))
    with open(base / "pred.csv", newline="", encoding="utf-8") as fh:
        n = sum(1 for _ in csv.DictReader(fh))
    man = json.loads((models / "onnx" / "manifest.json").read_text(encoding="utf-8"))
    row.update(leaf_accuracy=res["leaf_accuracy"], n_test=res["n_images"], predict_images=n,
               images_per_s=n / row["predict_s"], used_precision=res.get("precision"), manifest_precision=man["precision"])
    if with_flat:
        row["decisions"] = decision_scores(res)
    return row


def decision_scores(res: dict) -> dict:
    """Every decision's test leaf accuracy and macro F1 from evaluate.py's ``results.json`` ``res``, and the one
    ``--decision auto`` chose on the validation split: ``{"lcpn": {...}, "flat": {...}, "combined": {...},
    "auto": name, "auto_validation": {decision: accuracy}}`` (a decision missing from ``res`` is left out)."""
    out = {"lcpn": {"leaf_accuracy": res["leaf_accuracy"], "macro_f1": res.get("macro_f1")}}
    for name in ("flat", "combined"):
        if isinstance(res.get(name), dict):
            out[name] = {"leaf_accuracy": res[name].get("leaf_accuracy"), "macro_f1": res[name].get("macro_f1")}
    auto = res.get("auto_decision") or {}
    out["auto"] = auto.get("chosen", "lcpn")
    out["auto_validation"] = auto.get("leaf_accuracy")
    return out


def decision_lines(rows: list) -> list:
    """The markdown table of each row's :func:`decision_scores` (none without them)."""
    out = []
    for r in rows:
        d = r.get("decisions")
        if not d:
            continue
        val = d.get("auto_validation") or {}
        out += ["", f"Decisions ({r['precision']}), test split; `--decision auto` chose **{d['auto']}** on the validation split"
                f"{' (' + ', '.join(f'{k} {fmt(v, 4, pct=True)}' for k, v in val.items()) + ')' if val else ''}:", "",
                md_table(["decision", "leaf accuracy", "macro F1 (leaves)"],
                         [[k + (" (auto)" if k == d["auto"] else ""), fmt(v["leaf_accuracy"], 4, pct=True), fmt(v["macro_f1"], 3)]
                          for k, v in d.items() if isinstance(v, dict) and "leaf_accuracy" in v])]
    return out


def render(rep: dict) -> str:
    lines = ["# fp32 vs int8 backbone", "", f"`{rep['command']}` — {rep['created']}", ""]
    if rep.get("trained_by"):
        lines += [f"Models and training times from the earlier run `{rep['trained_by']}`; evaluate/predict as above.", ""]
    if rep["limit"]:
        lines += [f"**Subset run: at most {rep['limit']} images per leaf class** (not the full datasets).", ""]
    note = busy_note(rep["machine"])
    lines += [machine_markdown(rep["machine"]), ""] + ([f"> {note}", ""] if note else [])
    if rep.get("tune"):
        lines += [f"Tuned backbone: the last block of {rep['tune'][0]} tuned on the training split first "
                  f"(`src/tune_backbone.py`); its time is part of the training time.", ""]
    for ds, rows in rep["datasets"].items():
        lines += [f"## {ds}", "", f"prepare: {fmt(rep['prepare_s'][ds], 1)} s", ""]
        lines.append(md_table(["precision", "train (empty cache) s", "predict.py images/s", "test images",
                               "leaf accuracy", "prediction used"],
                              [[r["precision"], fmt(r.get("train_s"), 1), fmt(r.get("images_per_s"), 1), r.get("n_test", "-"),
                                fmt(r.get("leaf_accuracy"), pct=True), r.get("used_precision") or r.get("error", "-")]
                               for r in rows]))
        lines += decision_lines(rows)
        lines += [""] + [f"- {r['guard']}" for r in rows if r.get("guard")]
        lines += [f"- {r['precision']}: tuning took {fmt(r['tune_s'], 1)} s of the training time" for r in rows
                  if r.get("tune_s") is not None] + [""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        print(f"error: unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}", file=sys.stderr)
        return 2
    if args.reuse_trained and not (args.work and args.out.with_suffix(".json").exists()):
        print("error: --reuse-trained needs the --work folder and the --out report of an earlier run", file=sys.stderr)
        return 2
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if not precisions or any(x not in PRECISIONS for x in precisions):
        print(f"error: --precisions takes {', '.join(PRECISIONS)}, got {args.precisions!r}", file=sys.stderr)
        return 2
    tune = (args.tune_backbone, args.tune_size) if args.tune_backbone else None
    work = args.work or Path(tempfile.mkdtemp(prefix=f"hiernet-precision-{dt.datetime.now():%Y%m%d-%H%M%S}-"))
    rep = {"command": command_line(), "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "limit": args.limit, "train_args": args.train_args, "machine": machine_info(), "work": str(work),
           "datasets": {}, "prepare_s": {}, "tune": list(tune) if tune else None, "with_flat": args.with_flat}
    earlier = json.loads(args.out.with_suffix(".json").read_text(encoding="utf-8")) if args.reuse_trained else None
    if earlier:
        rep["trained_by"] = earlier.get("trained_by") or earlier["command"]
    for ds in names:
        dw = work / ds
        dw.mkdir(parents=True, exist_ok=True)
        if earlier:
            rep["prepare_s"][ds] = earlier["prepare_s"][ds]
            rows = {r["precision"]: r for r in earlier["datasets"][ds]}
            rep["datasets"][ds] = [run_precision(dw, p, args.train_args, rows[p], tune, args.with_flat) for p in precisions]
            write_report(render(rep), rep, args.out)
            continue
        r = run_timed(prepare_cmd(ds, DATASETS[ds], dw, args.limit, args.seed), log_dir=dw / "logs", name="prepare")
        rep["prepare_s"][ds] = r.wall_s
        if r.returncode != 0:
            print(f"error: preparing {ds} failed: {r.stderr_tail(5)}", file=sys.stderr)
            return 1
        rep["datasets"][ds] = [run_precision(dw, p, args.train_args, tune=tune, with_flat=args.with_flat) for p in precisions]
        write_report(render(rep), rep, args.out)  # a partial report survives a later failure
    md = render(rep)
    sys.stdout.write(md)
    write_report(md, rep, args.out)
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
