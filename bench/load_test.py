#!/usr/bin/env python3
"""Load-test src/serve.py on this machine (loopback only): 1, 4 and 16 concurrent clients.

The script starts the server itself on 127.0.0.1 (a free port), warms it up, then runs one phase per
client count: each client sends one photo per request (``POST /v1/predict``, one keep-alive
connection per client) until the phase has sent its share of --requests or --phase-seconds have
passed. It reports throughput, p50/p95/p99 latency and errors per phase, and the server's resident
memory (VmRSS) after a warm-up at the largest concurrency and after all phases. The baseline is predict.py's batch throughput
on the same photos: ``HierarchicalPredictor.predict_paths`` in batches of --batch-size, models loaded
and warmed up, in its own process before the server starts (what predict.py does, minus start-up).

Goals (2 cores): 16 clients >= 80 % of the baseline's images/s, single-client p99 <= 100 ms, 0 errors,
RSS growth <= 5 %.

Example::

    python bench/load_test.py --models-dir /tmp/base/models --images ../shared/datasets/clothing
    python bench/load_test.py --models-dir /tmp/tm --images dataset_example --requests 600 --phase-seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_DATASET, REPO, RESULTS_DIR, BenchError, busy_note, command_line, fmt, log, machine_info, machine_markdown,
    md_table, run_cli, sample_images, write_report,
)

sys.path.insert(0, str(REPO / "src"))

GOAL_THROUGHPUT = 0.8  # 16 clients vs predict.py batch throughput
GOAL_P99_MS = 100.0  # single client
GOAL_RSS_GROWTH = 0.05


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=REPO / "trained_models", help="models to serve")
    p.add_argument("--images", type=Path, default=DEFAULT_DATASET, help="photos (searched recursively)")
    p.add_argument("--n", type=int, default=200, help="distinct photos to send, in turn (default 200)")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per phase (default 1,4,16)")
    p.add_argument("--requests", type=int, default=10000, help="requests in all, split evenly over the phases")
    p.add_argument("--phase-seconds", type=float, default=180.0, help="a phase stops after this long (default 180)")
    p.add_argument("--batch-size", type=int, default=32, help="baseline batch size and server --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="server --max-wait-ms (default 10)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "load-test.md", help="markdown report (+ .json twin)")
    return p


# ---------------------------------------------------------------------- the baseline
def baseline(paths: list[str], models_dir: Path, batch_size: int) -> dict:
    """predict.py's batch throughput on ``paths``, steady state, measured in a child process."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(paths, f)
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; from predict_speed import time_in_process;"
            "from pathlib import Path; paths = json.load(open(sys.argv[3]));"
            "print(json.dumps(time_in_process(paths, Path(sys.argv[4]), int(sys.argv[5]), 2)))")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(REPO / "bench"), str(REPO / "src"), f.name,
                              str(models_dir), str(batch_size)], capture_output=True, text=True, timeout=900)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise BenchError(f"the baseline failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models_dir: Path, port: int, batch_size: int, max_wait_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "src" / "serve.py"), "--models-dir", str(models_dir), "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(batch_size), "--max-wait-ms", str(max_wait_ms)]
    log_file = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server must never block on it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log_file.seek(0)
            raise BenchError(f"the server exited: {log_file.read().strip()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise BenchError("the server did not start within 180 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# ---------------------------------------------------------------------- the clients
def build_request(path: str, port: int) -> bytes:
    """One complete ``POST /v1/predict`` HTTP/1.1 request uploading ``path`` (keep-alive)."""
    boundary = uuid.uuid4().hex
    data = Path(path).read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{Path(path).name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _exchange(reader, writer, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(ln.split(":", 1)[1]) for ln in lines if ln.lower().startswith("content-length:")), 0)
    body = await reader.readexactly(length)
    if status == 200 and not body.startswith(b"["):
        return -1
    return status


async def _client(port: int, requests: list, start: int, stop: dict, out: list) -> None:
    reader = writer = None
    i = start
    while not stop["now"] and stop["left"] > 0:
        stop["left"] -= 1
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status = await _exchange(reader, writer, requests[i % len(requests)])
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            status, writer = f"{type(exc).__name__}", None
        out.append((time.perf_counter() - t0, status))
        i += 1
    if writer is not None:
        writer.close()


async def run_phase(port: int, requests: list, clients: int, count: int, seconds: float) -> dict:
    """``clients`` concurrent clients sending ``count`` requests in all (or for ``seconds``)."""
    stop, out = {"now": False, "left": count}, []
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(_client(port, requests, k * 7, stop, out)) for k in range(clients)]
    done, _ = await asyncio.wait(tasks, timeout=seconds)
    stop["now"] = True
    await asyncio.wait(tasks, timeout=60)
    wall = time.perf_counter() - t0
    return summarize(clients, out, wall, timed_out=len(done) < len(tasks))


def summarize(clients: int, out: list, wall: float, timed_out: bool) -> dict:
    import numpy as np

    lat = np.array([t for t, s in out if s == 200]) * 1000.0
    errors = sum(1 for _, s in out if s != 200)
    kinds = sorted({str(s) for _, s in out if s != 200})
    q = (lambda p: float(np.percentile(lat, p))) if len(lat) else (lambda p: None)
    return {"clients": clients, "requests": len(out), "ok": int(len(lat)), "errors": errors, "error_kinds": kinds,
            "wall_s": wall, "requests_per_s": len(lat) / wall if wall else None, "p50_ms": q(50), "p95_ms": q(95),
            "p99_ms": q(99), "max_ms": float(lat.max()) if len(lat) else None, "stopped_by_time": timed_out}


# ---------------------------------------------------------------------- report and main
def render(rep: dict) -> str:
    rows = [(p["clients"], p["requests"], p["errors"], p["requests_per_s"], p["p50_ms"], p["p95_ms"], p["p99_ms"],
             p["max_ms"]) for p in rep["phases"]]
    g = rep["goals"]
    lines = ["# Load test: src/serve.py on loopback", "", f"Command: `{rep['command']}`", "",
             f"Models: `{rep['models_dir']}` ({rep['runtime']}); {rep['n_images']} photos from `{rep['images']}`, "
             f"one photo per request; server `--max-batch {rep['batch_size']} --max-wait-ms {rep['max_wait_ms']}`.",
             "", md_table(["clients", "requests", "errors", "images/s", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows),
             "", f"Baseline, predict.py batch throughput (predict_paths, batch {rep['batch_size']}, steady state): "
             f"{fmt(rep['baseline']['images_per_s'], 1)} images/s.",
             f"Server RSS: {fmt(rep['rss_before_mib'], 1)} MiB after the warm-up, {fmt(rep['rss_after_mib'], 1)} MiB "
             f"after {rep['total_requests']} more requests ({fmt(rep['rss_growth'], 3, pct=True)}).", "",
             md_table(["goal", "target", "measured", "met"], [
                 ("16 clients vs baseline", ">= 80 %", fmt(g["throughput_ratio"], 3, pct=True), g["throughput_ok"]),
                 ("single-client p99", "<= 100 ms", fmt(g["p99_ms"], 1), g["p99_ok"]),
                 ("errors", "0", g["errors"], g["errors_ok"]),
                 ("RSS growth", "<= 5 %", fmt(rep["rss_growth"], 3, pct=True), g["rss_ok"])]),
             "", machine_markdown(rep["machine"])]
    note = busy_note(rep["machine"])
    return "\n".join(lines + ([note] if note else [])) + "\n"


def goals(rep: dict) -> dict:
    by = {p["clients"]: p for p in rep["phases"]}
    ratio = (by[16]["requests_per_s"] / rep["baseline"]["images_per_s"]) if 16 in by else None
    p99 = by[1]["p99_ms"] if 1 in by else None
    errors = sum(p["errors"] for p in rep["phases"])
    return {"throughput_ratio": ratio, "throughput_ok": None if ratio is None else ratio >= GOAL_THROUGHPUT,
            "p99_ms": p99, "p99_ok": None if p99 is None else p99 <= GOAL_P99_MS, "errors": errors,
            "errors_ok": errors == 0, "rss_ok": rep["rss_growth"] <= GOAL_RSS_GROWTH}


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1 or args.requests < len(clients) or args.phase_seconds <= 0:
        raise BenchError("--clients must list positive counts, --requests at least one per phase, --phase-seconds > 0")
    if not (args.models_dir / "hierarchy.json").is_file():
        raise BenchError(f"no trained models in {args.models_dir}; pass --models-dir")
    rep = {"command": command_line(), "machine": machine_info(), "models_dir": str(args.models_dir),
           "images": str(args.images), "batch_size": args.batch_size, "max_wait_ms": args.max_wait_ms}
    found, _ = sample_images(args.images, args.n)
    paths = [str(p) for p in found]
    rep["n_images"] = len(paths)
    log(f"baseline: predict_paths on {len(paths)} photos")
    rep["baseline"] = baseline(paths, args.models_dir, args.batch_size)
    rep["runtime"] = rep["baseline"]["runtime"]
    port = free_port()
    server = start_server(args.models_dir, port, args.batch_size, args.max_wait_ms)
    try:
        requests = [build_request(p, port) for p in paths]
        log("warm-up")  # at the largest concurrency: the batch sizes (and memory arenas) of the run
        asyncio.run(run_phase(port, requests, max(clients), 2 * len(requests), args.phase_seconds))
        rep["rss_before_mib"] = rss_mib(server.pid)
        per_phase, rep["phases"] = -(-args.requests // len(clients)), []
        for c in clients:
            log(f"{c} client(s)")
            rep["phases"].append(asyncio.run(run_phase(port, requests, c, per_phase, args.phase_seconds)))
        rep["rss_after_mib"] = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    rep["total_requests"] = sum(p["requests"] for p in rep["phases"])
    rep["rss_growth"] = rep["rss_after_mib"] / rep["rss_before_mib"] - 1
    rep["goals"] = goals(rep)
    md = render(rep)
    write_report(md, rep, args.out)
    print(md)
    return 0


if __name__ == "__main__":
    run_cli(main, get_args_parser)
