#!/usr/bin/env python3
"""Serve the trained models over HTTP: micro-batched predictions, the taxonomy, metrics and a page to try it.

Examples:

    python3 src/serve.py                       # http://127.0.0.1:8000/ (page), /v1/predict (API)
    curl -F file=@sample_images/tops_t-shirt_0.jpg 'http://127.0.0.1:8000/v1/predict?topk=3'
    python3 src/serve.py --host 0.0.0.0 --port 9000 --max-batch 32 --max-wait-ms 10

When the models folder is replaced (training swaps a new one in) the server loads it in the
background and switches between requests. SIGTERM (or Ctrl-C) finishes the requests in flight, then exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiernet.paths import DEFAULT_MODELS_DIR, add_inference_args, check_inference_args  # noqa: E402
from hiernet.safeio import UserError, run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="trained models (default: <repo>/trained_models)")
    p.add_argument("--decision", choices=["auto", "lcpn", "flat", "combined"], default="auto",
                   help="how the leaf is chosen (as predict.py --decision; default: auto, the export's choice on "
                        "the validation split, else lcpn)")
    p.add_argument("--topk", type=int, default=1, help="default top-k per level (a request's topk overrides it)")
    add_inference_args(p)
    p.add_argument("--max-batch", type=int, default=None,
                   help="most images in one model batch (default: --batch-size)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="longest an image waits for others to fill its batch (default: 10)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MB (default: 32)")
    p.add_argument("--max-files", type=int, default=32, help="most images in one request (default: 32)")
    p.add_argument("--reload-interval", type=float, default=2.0,
                   help="seconds between checks for new models (0 = never reload; default: 2)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request and model switch")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = check_inference_args(args.runtime, args.device, args.batch_size, args.min_confidence, args.tta_below,
                                  args.topk)
    max_batch = args.batch_size if args.max_batch is None else args.max_batch
    if max_batch < 1 or args.max_files < 1:
        raise UserError("--max-batch and --max-files must be at least 1")
    if args.max_wait_ms < 0 or args.max_body_mb <= 0 or args.reload_interval < 0 or not 0 <= args.port <= 65535:
        raise UserError("--max-wait-ms and --reload-interval must be >= 0, --max-body-mb > 0, --port 0..65535")
    import uvicorn

    from hiernet.predictor import MirrorPolicy, PredictOptions
    from hiernet.serving import ServeConfig, create_app

    mirror = MirrorPolicy() if args.tta_below is None else MirrorPolicy(args.tta_below)
    config = ServeConfig(args.models_dir, args.runtime, device, PredictOptions(args.min_confidence, args.topk, mirror,
                                                                                 decision=args.decision),
                         max_batch=max_batch, max_wait_ms=args.max_wait_ms,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_files=args.max_files,
                         reload_interval_s=args.reload_interval)
    app = create_app(config)
    logging.getLogger("serve").warning("serving %s (models version %s) on http://%s:%d/", args.models_dir,
                                       app.state.store.current.version, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                access_log=args.verbose, timeout_graceful_shutdown=30, limit_concurrency=512)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
