#!/usr/bin/env python3
"""Split a ROOT/<parent>/<child>/images tree, or a catalogue CSV, into one dataset per classifier node.

Examples:

    python3 prepare_dataset.py -p ./dataset_example
    python3 prepare_dataset.py -p ../shared/datasets/clothing -o split_datasets --seed 1337
    python3 prepare_dataset.py --csv styles.csv --image-column image \
        --label-columns masterCategory,subCategory,articleType --id-column id -o split_datasets
    python3 prepare_dataset.py --csv shop.csv --image-column url --label-column category --separator " > "
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from hiernet.catalogue import CatalogueSpec, load_catalogue  # noqa: E402
from hiernet.downloads import DownloadCache, DownloadSettings  # noqa: E402
from hiernet.paths import DEFAULT_DATA_DIR, default_cache_dir  # noqa: E402
from hiernet.preparing import labelled_tree, prepare, summary  # noqa: E402
from hiernet.safeio import UserError, exclusive_lock, run_cli  # noqa: E402
from hiernet.splits import check_paths, check_ratios, owned_entries  # noqa: E402

log = logging.getLogger("prepare_dataset")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--path", type=Path, help="dataset root: ROOT/<parent>/<child>/images (any depth)")
    src.add_argument("--csv", type=Path, help="a catalogue CSV (one row per image; see --image-column, --label-columns)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_DATA_DIR, help="output folder (default: <repo>/split_datasets)")
    p.add_argument("--ratio", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"), help="split shares (default 0.8 0.1 0.1)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the one split shared by all nodes (default 1337)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only warnings and the summary")
    c = p.add_argument_group("catalogue CSV (--csv)")
    c.add_argument("--image-column", help="column with the image: a path relative to the CSV, an absolute path or an http(s) URL")
    c.add_argument("--label-columns", help="comma-separated columns, one category level each, top first (empty trailing levels: a partial label)")
    c.add_argument("--label-column", help="one column holding the category path, split on --separator")
    c.add_argument("--separator", default=" > ", help='level separator for --label-column (default " > ")')
    c.add_argument("--id-column", help="column with a unique product id (kept in hierarchy.json)")
    c.add_argument("--split-column", help="column with a given split (train/val/validation/test), used as is")
    c.add_argument("--encoding", default="utf-8-sig", help="the CSV's text encoding (default utf-8, with or without BOM)")
    c.add_argument("--download-dir", type=Path, help="cache of downloaded images (default <repo>/.cache/hiernet/downloads)")
    c.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    c.add_argument("--download-timeout", type=float, default=15.0, help="seconds per network operation (default 15)")
    c.add_argument("--download-retries", type=int, default=3, help="retries after a timeout, connection error or 5xx (default 3)")
    c.add_argument("--max-download-mb", type=float, default=50.0, help="largest image accepted, MB (default 50)")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except OSError as exc:  # unwritable -o, disk full, a file vanishing mid-run: one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(
            f"file system error: {exc.strerror or exc}{where}; check that -p is readable and -o writable, then rerun"
        ) from None


def _catalogue_spec(args: argparse.Namespace) -> CatalogueSpec:
    if not args.image_column:
        raise UserError("--csv needs --image-column NAME (the column with the image path or URL)")
    if bool(args.label_columns) == bool(args.label_column):
        raise UserError("--csv needs exactly one of --label-columns A,B,C or --label-column NAME (with --separator)")
    if args.label_columns:
        cols = [c.strip() for c in args.label_columns.split(",")]
        if not all(cols):
            raise UserError(f"--label-columns {args.label_columns!r} has an empty name; use A,B,C")
    else:
        cols = [args.label_column]
    if args.label_column and not args.separator:
        raise UserError("--separator must not be empty")
    if args.download_workers < 1 or args.max_download_mb <= 0 or args.download_timeout <= 0 or args.download_retries < 0:
        raise UserError("--download-workers, --download-timeout and --max-download-mb must be > 0, --download-retries >= 0")
    return CatalogueSpec(args.csv, args.image_column, cols, args.separator if args.label_column else None,
                         args.id_column, args.split_column, args.encoding)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    out, progress = args.output, not args.quiet and sys.stderr.isatty()
    check_ratios(tuple(args.ratio))
    if args.csv is not None:
        spec = _catalogue_spec(args)
        if not args.csv.is_file():
            raise UserError(f"catalogue {args.csv} not found (or not a file); pass --csv FILE")
        src, meta = None, {"version": 1, "source": str(args.csv.resolve()), "source_kind": "csv",
                           "columns": {"image": spec.image_column, "labels": spec.label_columns,
                                       "separator": spec.separator, "id": spec.id_column, "split": spec.split_column}}
    else:
        src = args.path
        if not src.exists():
            raise UserError(f"dataset folder {src} does not exist; pass -p ROOT with ROOT/<parent>/<child>/images")
        if not src.is_dir():
            raise UserError(f"{src} is a file, not a dataset folder; pass -p ROOT with ROOT/<parent>/<child>/images")
        check_paths(src, out)
        meta = {"version": 1, "source": str(src.resolve()), "source_kind": "tree"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{out.name}.lock", f"prepare_dataset.py into {out}"):
        owned_entries(out)  # a foreign or unusable -o: refuse before any work
        if args.csv is not None:
            settings = DownloadSettings(args.download_timeout, args.download_retries,
                                        max_bytes=int(args.max_download_mb * 2**20))
            cache = DownloadCache(args.download_dir or default_cache_dir() / "downloads", settings)
            labelled = load_catalogue(spec, cache, args.download_workers, progress)
            doc = prepare(labelled, None, out, tuple(args.ratio), args.seed, meta)
        else:
            labelled, warnings = labelled_tree(src, progress)
            doc = prepare(labelled, src, out, tuple(args.ratio), args.seed, meta, warnings)
    for line in summary(doc):
        print(line)
    print(f"wrote {out}/ (hierarchy.json, {len(doc['datasets'])} node datasets + flat)")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
