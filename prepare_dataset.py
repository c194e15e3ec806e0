#!/usr/bin/env python3
"""Split a ``ROOT/<parent>/<child>/images`` tree into one dataset per classifier node.

Example::

    python3 prepare_dataset.py -p ./dataset_example
    python3 prepare_dataset.py -p ../shared/datasets/clothing -o split_datasets --seed 1337
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from hiernet.hierarchy import HierarchyError, scan_tree  # noqa: E402
from hiernet.images import check_image  # noqa: E402
from hiernet.paths import DEFAULT_DATA_DIR  # noqa: E402
from hiernet.safeio import UserError, exclusive_lock, run_cli  # noqa: E402
from hiernet.splits import assign_splits, check_paths, materialize  # noqa: E402

log = logging.getLogger("prepare_dataset")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--path", required=True, type=Path, help="dataset root: ROOT/<parent>/<child>/images (any depth)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_DATA_DIR, help="output folder (default: <repo>/split_datasets)")
    p.add_argument("--ratio", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"), help="split shares (default 0.8 0.1 0.1)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the one split shared by all nodes (default 1337)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only warnings and the summary")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except OSError as exc:  # unwritable -o, disk full, a file vanishing mid-run: one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(
            f"file system error: {exc.strerror or exc}{where}; check that -p is readable and -o writable, then rerun"
        ) from None


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    src, out = args.path, args.output
    if not src.exists():
        raise UserError(f"dataset folder {src} does not exist; pass -p ROOT with ROOT/<parent>/<child>/images")
    if not src.is_dir():
        raise UserError(f"{src} is a file, not a dataset folder; pass -p ROOT with ROOT/<parent>/<child>/images")
    check_paths(src, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{out.name}.lock", f"prepare_dataset.py into {out}"):
        try:
            scan = scan_tree(src, check=check_image)
        except HierarchyError as exc:
            raise UserError(str(exc)) from None
        assignment, split_warnings = assign_splits(scan.files, tuple(args.ratio), args.seed)
        for path, reason in scan.skipped:
            log.warning("skipped %s: %s", path, reason)
        for w in scan.warnings + split_warnings:
            log.warning("warning: %s", w)
        meta = {
            "version": 1,
            "source": str(src.resolve()),
            "seed": args.seed,
            "ratios": list(args.ratio),
            "skipped": [{"path": p, "reason": r} for p, r in scan.skipped],
            "warnings": scan.warnings + split_warnings,
        }
        doc = materialize(scan.hierarchy, scan.files, assignment, src, out, meta)
    hier = scan.hierarchy
    n = {s: sum(1 for im in doc["images"] if im["split"] == s) for s in ("train", "val", "test")}
    print(
        f"{len(doc['images'])} images, {len(hier.leaves())} classes, depth {hier.max_depth()}: "
        f"train {n['train']} / val {n['val']} / test {n['test']}; {len(scan.skipped)} skipped"
    )
    for ds, info in doc["datasets"].items():
        counts = {c: sum(info["counts"][s][c] for s in info["counts"]) for c in info["classes"]}
        print(f"  {ds}: {counts}")
    print(f"wrote {out}/ (hierarchy.json, {len(doc['datasets'])} node datasets + flat)")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
