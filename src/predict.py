#!/usr/bin/env python3
"""Predict the class path of images: parent first, then down the tree to a leaf.

Examples:

    python3 src/predict.py sample_images/tops_t-shirt_0.jpg
    python3 src/predict.py -p sample_images/ --format csv --topk 3 > predictions.csv
    python3 src/predict.py a.jpg b.png photos/ -o out.json --min-confidence 0.8
    python3 src/predict.py -p list.txt -o out.jsonl --resume            # rerun after a crash: finishes out.jsonl
    python3 src/predict.py --csv catalogue.csv --image-column image --id-column sku -o out.csv
    torchrun --nproc_per_node=2 src/predict.py shop/ -o out.jsonl     # one merged file, input order
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.outputs import WRITERS  # noqa: E402
from hiernet.paths import DEFAULT_MODELS_DIR, add_inference_args, check_inference_args  # noqa: E402
from hiernet.safeio import UserError, run_cli  # noqa: E402

log = logging.getLogger("predict")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="PATH", help="image files, folders (searched recursively) or .txt lists")
    p.add_argument("-p", "--path", nargs="+", default=[],
                   help="the same as PATH (read after them): image files, folders, or .txt lists of paths "
                        "(one per line; relative lines are read from the list's folder)")
    p.add_argument("--csv", type=Path, help="a catalogue CSV to read the images from (see --image-column)")
    p.add_argument("--image-column", default="image", help="--csv column with the image path (default: image; "
                   "relative paths are read from the CSV's folder)")
    p.add_argument("--id-column", help="--csv column with an id to carry into every record (an id field)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="trained models (default: <repo>/trained_models)")
    p.add_argument("--format", choices=list(WRITERS), default=None,
                   help="text, json, jsonl (one object per line) or csv (default: from the -o suffix "
                        ".json/.jsonl/.csv/.txt, else text)")
    p.add_argument("--decision", choices=["auto", "lcpn", "flat", "combined"], default="auto",
                   help="how the leaf is chosen: lcpn = level by level with the node classifiers; flat = the "
                        "flat model's most likely leaf; combined = the leaf maximising flat x LCPN path probability "
                        "(the last two need the flat model); auto (default) = the one most accurate on the "
                        "validation split when export.py ran (it says which), else lcpn")
    p.add_argument("--topk", type=int, default=1, help="also list the K most likely classes at each level (csv/json/text)")
    add_inference_args(p)
    p.add_argument("-o", "--output", help="write here instead of standard output (- = standard output); a file "
                   "is replaced only once complete; devices and FIFOs are written through; symlinks are followed")
    p.add_argument("--resume", action="store_true", help="with -o FILE (jsonl or csv): skip the inputs already in "
                   "FILE, append the rest as they are predicted (survives a crash; rerun the same command)")
    p.add_argument("--shard", default=None, metavar="K/N", help="predict only inputs i with i %% N == K "
                   "(K = 0..N-1), for splitting one job over N machines")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no 'wrote N predictions' line")
    p.add_argument("-v", "--verbose", action="store_true", help="list the models used (runtime, backbone, nodes)")
    return p


def check_args(args: argparse.Namespace):
    """Everything about the flags that can be refused before models load; returns (device, format, shard)."""
    from hiernet.batchpredict import infer_format
    from hiernet.inputs import parse_shard
    from hiernet.safeio import check_output_path

    device = check_inference_args(args.runtime, args.device, args.batch_size, args.min_confidence, args.tta_below,
                                  args.topk)
    if not (args.inputs or args.path or args.csv):
        raise UserError("no images given; pass image files, folders or a .txt list (predict.py photo.jpg shop/), "
                        "or --csv catalogue.csv")
    fmt = infer_format(args.format, args.output)
    check_output_path(args.output)
    if args.resume and (args.output in (None, "-")):
        raise UserError("--resume needs -o FILE: the file whose inputs are skipped and appended to")
    if args.resume and fmt not in ("jsonl", "csv"):
        raise UserError(f"--resume needs --format jsonl or csv (a {fmt} file cannot be appended to); "
                        "use -o FILE.jsonl or -o FILE.csv")
    if args.id_column and not args.csv:
        raise UserError("--id-column needs --csv catalogue.csv")
    return device, fmt, parse_shard(args.shard) if args.shard else (0, 1)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device, fmt, shard = check_args(args)
    from hiernet import batchpredict as bp
    from hiernet.bundle import models_display
    from hiernet.outputs import OutputContext
    from hiernet.predictor import HierarchicalPredictor

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        from hiernet.distributed import broadcast_object, init_from_env

        device = init_from_env(device)
    with_display = bool(models_display(args.models_dir.resolve()))
    fields = OutputContext(with_id=args.id_column is not None, with_display=with_display).fields
    state = bp.resume_state(args.output, fmt, fields) if args.resume and rank == 0 else bp.ResumeState()
    if world > 1:  # every rank skips the same inputs
        state = broadcast_object(state)
    items = Inputs(args, shard, state.done, rank == 0)
    if next(items.iter(warn=False), None) is None:
        if state.done:
            print(f"nothing to do: all {len(state.done)} inputs are already in {Path(args.output).resolve()}",
                  file=sys.stderr)
            return 0
        for _ in items.iter():  # names the inputs that held nothing
            pass
        raise UserError("no images to predict in the inputs given")
    models_dir = args.models_dir.resolve()
    predictor = HierarchicalPredictor.load(models_dir, runtime=args.runtime, device=device,
                                           min_confidence=args.min_confidence, topk=args.topk, tta_below=args.tta_below,
                                           precision=args.precision, decision=args.decision)
    if args.verbose and rank == 0:
        describe_models(models_dir, predictor)
    context = OutputContext(predictor.encoders(), predictor.min_confidence, with_id=args.id_column is not None,
                            header=not state.has_header, with_display=bool(predictor.display))
    want_bar = rank == 0 and not args.quiet and (args.progress or sys.stderr.isatty())
    total = sum(1 for _ in items.iter(warn=False)) if want_bar else None
    show_bar = want_bar and (args.progress or total > 1)  # no bar for a single image on a terminal
    local = bp.stream_records(bp.take_rank(items.iter(), rank, world),
                              lambda paths: predictor.predict_iter(paths, batch_size=args.batch_size))
    if world == 1:
        try:
            counts = write_all(bp.batched(local, args.batch_size), fmt, context, args, total, show_bar)
        except BrokenPipeError:  # the reader (e.g. `| head`) stopped reading: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        return report(counts, args, len(state.done))
    from hiernet.distributed import all_gather_object, cleanup

    batches = bp.gather_in_order(local, args.batch_size, rank, world, all_gather_object)
    if rank != 0:
        for _ in batches:  # the other ranks take part in every round; rank 0 writes
            pass
        cleanup()
        return 0
    counts = write_all(batches, fmt, context, args, total, show_bar)
    cleanup()
    return report(counts, args, len(state.done))


class Inputs:
    """The inputs of this run, read lazily each time :meth:`iter` is called: every input once, this
    ``--shard``, without those already ``done`` (in the output being resumed)."""

    def __init__(self, args: argparse.Namespace, shard: tuple[int, int], done: set, speak: bool):
        self.args, self.shard, self.done, self.speak = args, shard, done, speak

    def iter(self, warn: bool = True):
        from hiernet.inputs import CatalogueColumns, iter_inputs, take_shard

        a = self.args
        say = (lambda raw, why: print(f"warning: {raw}: {why}", file=sys.stderr)) if warn and self.speak else None
        it = iter_inputs(a.inputs + a.path, str(a.csv) if a.csv else None, CatalogueColumns(a.image_column, a.id_column),
                         say or (lambda raw, why: None))
        return (x for x in take_shard(it, *self.shard) if x.path not in self.done)


def write_all(batches, fmt, context, args, total, show_bar) -> dict:
    """Write every batch of records to ``-o`` (or stdout); count them and their errors."""
    from tqdm import tqdm

    from hiernet.batchpredict import write_stream
    from hiernet.outputs import open_writer
    from hiernet.safeio import open_output

    counts = {"n": 0, "errors": 0, "first_error": None}

    def counted(bs):
        for b in bs:
            for r in b:
                if r.get("error"):
                    counts["errors"] += 1
                    counts["first_error"] = counts["first_error"] or f"{r['path']}: {r['error']}"
            yield b

    bar = tqdm(total=total, unit="img", desc="predict", disable=not show_bar, dynamic_ncols=True, file=sys.stderr)
    with open_output(args.output, append=args.resume) as stream:
        writer = open_writer(fmt, stream, context)
        counts["n"] = write_stream(writer, counted(batches), durable=args.resume, bar=bar)
        writer.close()
        stream.flush()
    bar.close()
    return counts


def report(counts: dict, args, n_done_before: int) -> int:
    """The closing lines on stderr; the exit code (1 when no input could be read)."""
    n, bad = counts["n"], counts["errors"]
    if bad == n:
        print(f"error: none of the {n} inputs could be read (e.g. {counts['first_error']})", file=sys.stderr)
        return 1
    if bad:
        print(f"warning: {bad} of {n} inputs could not be read (see their error field)", file=sys.stderr)
    if args.output not in (None, "-") and not args.quiet:
        extra = f" (after {n_done_before} already there)" if n_done_before else ""
        print(f"wrote {n} predictions to {Path(args.output).resolve()}{extra}", file=sys.stderr)
    return 0


def describe_models(models_dir: Path, predictor) -> None:
    """Log the bundle: runtime, backbones, nodes, where the hierarchy came from (for -v)."""
    import json

    b = predictor.bundle
    try:
        source = json.loads((models_dir / "hierarchy.json").read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError):
        source = None
    log.info("models: %s", models_dir)
    log.info("runtime: %s%s, precision: %s", b.runtime, f" on {b.device}" if b.runtime == "torch" else "", b.precision)
    log.info("hierarchy source: %s", source or "(not recorded)")
    for nid, nm in b.nodes.items():
        perf = models_dir / nm.dataset / "performance.txt"
        bb = next((ln.split(":", 1)[1].strip() for ln in _lines(perf) if ln.startswith("backbone:")), "?")
        log.info("node %-20s %d classes (%s), backbone %s", nid or "root", len(nm.classes), ", ".join(nm.classes), bb)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
