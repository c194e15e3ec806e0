"""The HTTP service behind ``src/serve.py``: models that reload themselves, a micro-batcher, the app.

- :class:`ModelStore` holds the loaded :class:`LoadedModel` and polls the models folder's fingerprint
  (:func:`models_fingerprint`); when training swaps in a new folder it loads the new bundle in a
  background thread and switches. A request keeps the model it started with, so in-flight requests
  finish on the old one.
- :class:`MicroBatcher` gathers the images of concurrent requests into one batch (at most
  ``max_batch`` images, no image waiting more than ``max_wait_ms``), runs it in one inference thread,
  and isolates failures: if a batch fails, its images are retried one by one.
- :func:`create_app` is the FastAPI application (routes, limits, Prometheus metrics, the page).

The records returned by ``POST /v1/predict`` are :meth:`hiernet.predictor.Prediction.record`
written by :mod:`hiernet.outputs`' json writer: exactly what ``predict.py --format json`` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.requests import Request

from .bundle import MANIFEST, ONNX_DIR
from .images import ImageDecodeError, decode_rgb, resize_for_model, to_array
from .predictor import HierarchicalPredictor, MirrorMode, Prediction, PredictOptions, Batch

log = logging.getLogger(__name__)

MAX_TOPK = 50
PAGE = Path(__file__).with_name("serve_page.html")


@dataclass(frozen=True)
class ServeConfig:
    """How the service loads models, batches and limits requests.

    ``options`` are the defaults a request's ``topk`` / ``min_confidence`` parameters override.
    """

    models_dir: Path
    runtime: str = "auto"
    device: str = "cpu"
    options: PredictOptions = field(default_factory=PredictOptions)
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_files: int = 32
    reload_interval_s: float = 2.0
    decode_workers: int = 2


# ---------------------------------------------------------------------------------------------- models
def models_fingerprint(models_dir: Path) -> tuple:
    """``(inode, mtime_ns, size)`` of the models folder, its hierarchy.json and onnx/manifest.json
    (``None`` for a missing one): changes whenever training swaps in a new folder or rewrites them."""
    out = []
    for p in (models_dir, models_dir / "hierarchy.json", models_dir / ONNX_DIR / MANIFEST):
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass
class LoadedModel:
    """One loaded bundle: the predictor, a short ``version`` (hash of the fingerprint it was loaded
    at), the tree's display names (node id → name shown to people) and when it was loaded."""

    predictor: HierarchicalPredictor
    version: str
    fingerprint: tuple
    display: dict
    loaded_at: float

    @property
    def specs(self) -> list:
        return self.predictor.input_specs()

    def taxonomy(self) -> dict:
        """The tree as nested ``{id, name, display, children}``, root first."""
        hier = self.predictor.hier

        def node(nid: str) -> dict:
            n = hier.nodes[nid]
            return {"id": n.id, "name": n.name, "display": self.display.get(n.id, n.name),
                    "children": [node(c) for c in n.children]}

        return {"model_version": self.version, "runtime": self.predictor.runtime, "levels": hier.max_depth(),
                "tree": node(hier.root.id)}


def load_model(config: ServeConfig) -> LoadedModel:
    """Load ``config.models_dir`` (raises :class:`hiernet.safeio.UserError` when it holds no usable models)."""
    fp = models_fingerprint(config.models_dir)
    predictor = HierarchicalPredictor.load(config.models_dir, runtime=config.runtime, device=config.device,
                                           options=config.options)
    warm_up(predictor, config.max_batch)
    version = hashlib.sha256(repr(fp).encode()).hexdigest()[:12]
    return LoadedModel(predictor, version, fp, dict(predictor.display), time.time())


def warm_up_sizes(max_batch: int) -> list[int]:
    """Batch sizes :func:`warm_up` runs: 1, 2, 4, ... up to ``max_batch``, and ``max_batch`` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max(1, max_batch)]


def warm_up(predictor: HierarchicalPredictor, max_batch: int) -> None:
    """Run a batch of random images of each :func:`warm_up_sizes` size through ``predictor`` before it
    serves: onnxruntime's memory arenas and kernels grow to the batch sizes requests will bring, so the
    first requests are not slow and memory stays flat afterwards (measured: +6.4 % RSS over 10,000
    requests without this, the arenas still growing at new batch sizes)."""
    rng = np.random.default_rng(0)
    specs = predictor.input_specs()
    sizes, t = warm_up_sizes(max_batch), time.perf_counter()
    for b in sizes:
        inputs = [{spec: rng.random((3, spec[0], spec[0]), dtype=np.float32) for spec in specs} for _ in range(b)]
        predictor.predict_arrays(inputs, [f"warm-up-{i}" for i in range(b)])
    log.info("warmed up at batch sizes %s in %.1f s", sizes, time.perf_counter() - t)


class ModelStore:
    """The current :class:`LoadedModel`, reloaded in a background thread when the folder changes.

    ``on_change`` (if set) is called from that thread after each reload attempt: with the new
    :class:`LoadedModel`, or ``None`` when the changed folder could not be loaded.
    """

    def __init__(self, config: ServeConfig, on_change=None):
        self.config = config
        self.current = load_model(config)
        self._seen = self.current.fingerprint
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Reload if the fingerprint changed since the last look; True when a new model is in use.

        A folder that fails to load is logged and skipped (the old model stays) until it changes again.
        """
        fp = models_fingerprint(self.config.models_dir)
        if fp == self._seen:
            return False
        self._seen = fp
        try:
            new = load_model(self.config)
        except Exception as exc:  # a half-written or broken folder must not take the service down
            log.warning("models in %s changed but could not be loaded (keeping version %s): %s",
                        self.config.models_dir, self.current.version, exc)
            if self.on_change:
                self.on_change(None)
            return False
        self.current = new
        log.info("switched to models version %s (%s)", new.version, new.predictor.runtime)
        if self.on_change:
            self.on_change(new)
        return True

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.config.reload_interval_s):
                self.check()

        if self.config.reload_interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=loop, name="hiernet-model-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def prepare_upload(data: bytes, specs: list) -> dict:
    """Decode an upload's bytes into the model inputs ``{(size, resize): float32 (3, size, size)}``.

    Raises
    ------
    ImageDecodeError
        Not an image, truncated, or refused as a decompression bomb.
    """
    img = decode_rgb(data, min_size=max(s for s, _ in specs) if specs else None)
    return {spec: to_array(resize_for_model(img, spec[0], spec[1])) for spec in specs}


# ---------------------------------------------------------------------------------------------- batching
@dataclass
class _Item:
    model: LoadedModel
    inputs: dict
    name: str
    options: tuple  # (topk, min_confidence)
    future: asyncio.Future
    t0: float


def predict_items(model: LoadedModel, items: list) -> list[Prediction]:
    """Predict one batch of :class:`_Item` on ``model``; the backbones run once for the whole batch even
    when requests asked for different ``topk`` / ``min_confidence``."""
    base = model.predictor
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.options, []).append(i)

    def predictor_for(opts):
        same = opts == (base.options.topk, base.options.min_confidence)
        return base if same else base.with_options(topk=opts[0], min_confidence=opts[1])

    if len(groups) == 1:
        opts = next(iter(groups))
        return predictor_for(opts).predict_arrays([it.inputs for it in items], [it.name for it in items])
    batch = Batch(base.bundle, [it.inputs for it in items], base.options.mirror, MirrorMode.INLINE)
    feats = {g: batch.features(g) for g in base.bundle.backbones}
    out: list = [None] * len(items)
    for opts, idx in groups.items():
        sub = np.asarray(idx)
        preds, _, _ = predictor_for(opts)._run([items[i].inputs for i in idx], [items[i].name for i in idx],
                                               MirrorMode.INLINE, feats={g: f[sub] for g, f in feats.items()})
        for i, pr in zip(idx, preds):
            out[i] = pr
    return out


def predict_isolated(model: LoadedModel, items: list) -> list:
    """:func:`predict_items`, but a failing batch is retried image by image: each entry is a
    :class:`Prediction` or the exception that image alone raised."""
    try:
        return predict_items(model, items)
    except Exception as exc:
        if len(items) == 1:
            return [exc]
        log.warning("a batch of %d failed (%s); retrying its images one by one", len(items), exc)
    out = []
    for it in items:
        try:
            out.extend(predict_items(model, [it]))
        except Exception as exc:  # noqa: PERF203 - one image's failure is its own
            out.append(exc)
    return out


class MicroBatcher:
    """Gathers concurrent images into batches of at most ``max_batch``; the first image of a batch waits
    at most ``max_wait_s`` for others. Runs the batches in one inference thread, in arrival order.

    Use ``await submit(...)`` from request handlers, ``start()`` / ``await stop()`` from the app's
    lifespan (``stop`` finishes every image already queued).
    """

    def __init__(self, max_batch: int, max_wait_s: float, observe_batch=None):
        self.max_batch, self.max_wait_s = max(1, int(max_batch)), max(0.0, float(max_wait_s))
        self.observe_batch = observe_batch or (lambda n: None)
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hiernet-infer")
        self.stopping = False

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            await self.queue.put(None)
            await self.task
        self.executor.shutdown(wait=True)

    async def submit(self, model: LoadedModel, inputs: dict, name: str, options: tuple) -> Prediction:
        """Queue one decoded image; returns its :class:`Prediction` (raises what predicting it raised)."""
        loop = asyncio.get_running_loop()
        item = _Item(model, inputs, name, options, loop.create_future(), loop.time())
        await self.queue.put(item)
        return await item.future

    async def _gather(self, first: _Item) -> tuple[list, bool]:
        """``first`` and what else arrives before its deadline (up to ``max_batch``); True at the end marker."""
        loop, items = asyncio.get_running_loop(), [first]
        deadline = first.t0 + self.max_wait_s
        while len(items) < self.max_batch:
            try:
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or self.stopping:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if nxt is None:
                return items, True
            items.append(nxt)
        return items, False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            if first is None:
                return
            items, last = await self._gather(first)
            self.observe_batch(len(items))
            by_model: dict[int, list] = {}
            for it in items:  # a request keeps the model it started with
                by_model.setdefault(id(it.model), []).append(it)
            for group in by_model.values():
                results = await loop.run_in_executor(self.executor, predict_isolated, group[0].model, group)
                for it, res in zip(group, results):
                    if it.future.done():  # the request went away
                        continue
                    if isinstance(res, BaseException):
                        it.future.set_exception(res)
                    else:
                        it.future.set_result(res)
            if last:
                return


# ---------------------------------------------------------------------------------------------- metrics
class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app)."""

    ENDPOINTS = ("/", "/v1/predict", "/v1/taxonomy", "/healthz", "/readyz", "/metrics")

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("hiernet_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("hiernet_errors", "Failed requests by kind", ["kind"], registry=r)
        self.latency = Histogram("hiernet_request_latency_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=(.005, .01, .02, .03, .05, .075, .1, .15, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.batch_size = Histogram("hiernet_batch_size", "Images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.images = Counter("hiernet_images", "Images predicted", registry=r)
        self.model = Gauge("hiernet_model_info", "The model version in use (value 1)", ["version", "runtime"],
                           registry=r)
        self.reloads = Counter("hiernet_model_reloads", "Model reloads by result", ["result"], registry=r)

    def endpoint(self, path: str) -> str:
        return path if path in self.ENDPOINTS else "other"

    def set_model(self, model: LoadedModel) -> None:
        self.model.clear()
        self.model.labels(model.version, model.predictor.runtime).set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------------- HTTP
class _BodyTooLarge(Exception):
    pass


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


class LimitsMiddleware:
    """Pure ASGI middleware: refuses bodies over ``max_bytes`` with 413 (by Content-Length at once, or
    while streaming when there is none) and counts requests and their latency per endpoint."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def _reply(self, send, status: int, error: str) -> None:
        body = _json_bytes({"error": error})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, endpoint = time.perf_counter(), self.metrics.endpoint(scope.get("path", ""))
        state = {"status": 500, "started": False, "received": 0}
        too_large = f"request body over the {self.max_bytes} byte limit; send fewer or smaller images"

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > self.max_bytes:
                    raise _BodyTooLarge
            return msg

        async def tracking_send(msg):
            if msg["type"] == "http.response.start":
                state["status"], state["started"] = msg["status"], True
            await send(msg)

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                self.metrics.errors.labels("too_large" if length.isdigit() else "bad_request").inc()
                state["status"] = 413 if length.isdigit() else 400
                await self._reply(send, state["status"], too_large if length.isdigit() else "bad Content-Length")
            else:
                await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            self.metrics.errors.labels("too_large").inc()
            if not state["started"]:
                state["status"] = 413
                await self._reply(send, 413, too_large)
        finally:
            self.metrics.requests.labels(endpoint, str(state["status"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def request_options(params: dict, defaults: PredictOptions) -> tuple[int, float]:
    """``(topk, min_confidence)`` from a request's ``topk`` / ``min_confidence`` parameters.

    Raises
    ------
    ValueError
        A value that is not a number or out of range (the message says which).
    """
    topk, minc = defaults.topk, defaults.min_confidence
    if params.get("topk") not in (None, ""):
        try:
            topk = int(params["topk"])
        except ValueError:
            raise ValueError(f"topk must be an integer, got {params['topk']!r}") from None
        if not 1 <= topk <= MAX_TOPK:
            raise ValueError(f"topk must be between 1 and {MAX_TOPK}, got {topk}")
    if params.get("min_confidence") not in (None, ""):
        try:
            minc = float(params["min_confidence"])
        except ValueError:
            raise ValueError(f"min_confidence must be a number, got {params['min_confidence']!r}") from None
        if not 0.0 <= minc <= 1.0:
            raise ValueError(f"min_confidence must be between 0 and 1, got {minc}")
    return topk, minc


class _Reject(Exception):
    """A request refused with ``status`` and ``{"error": message}``, counted under ``kind``."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind = status, kind


async def _read_uploads(request, config: ServeConfig) -> tuple[list, dict]:
    """The request's uploaded files ``[(name, bytes)]`` and its other form fields (raises :class:`_Reject`)."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    try:
        form = await request.form(max_files=config.max_files, max_fields=32)
    except HTTPException as exc:
        if "too many files" in str(exc.detail).lower():
            raise _Reject(413, "too_many_files", f"too many files; send at most {config.max_files} per request")
        raise _Reject(400, "bad_request", f"cannot parse the upload: {exc.detail}") from None
    try:
        files, fields = [], {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or f"upload-{len(files)}", await value.read()))
            else:
                fields[key] = value
    finally:
        await form.close()
    if not files:
        raise _Reject(400, "bad_request", "no image in the request; upload images as multipart/form-data "
                                          "file fields (curl -F file=@photo.jpg)")
    if len(files) > config.max_files:
        raise _Reject(413, "too_many_files", f"too many files; send at most {config.max_files} per request")
    return files, fields


async def _decode_all(files: list, model: LoadedModel, pool: ThreadPoolExecutor) -> list[dict]:
    """Decode every upload in ``pool``; raises :class:`_Reject` (400) naming each file that is not an image."""
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*[loop.run_in_executor(pool, prepare_upload, data, model.specs)
                                     for _, data in files], return_exceptions=True)
    bad = [f"{name}: {res}" for (name, _), res in zip(files, results) if isinstance(res, ImageDecodeError)]
    if bad:
        raise _Reject(400, "bad_image", "not a usable image: " + "; ".join(bad))
    for res in results:
        if isinstance(res, BaseException):
            raise res
    return results


def _predict_route(app, config: ServeConfig, pool: ThreadPoolExecutor):
    from fastapi.responses import JSONResponse, Response

    from .outputs import render

    store, batcher, metrics = app.state.store, app.state.batcher, app.state.metrics

    @app.post("/v1/predict")
    async def predict(request: Request):
        model = store.current  # the whole request runs on the model it started with
        try:
            files, fields = await _read_uploads(request, config)
            opts = request_options({**fields, **request.query_params}, config.options)
            inputs = await _decode_all(files, model, pool)
            preds = await asyncio.gather(*[batcher.submit(model, x, name, opts)
                                           for (name, _), x in zip(files, inputs)])
        except _Reject as exc:
            metrics.errors.labels(exc.kind).inc()
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except _BodyTooLarge:
            raise  # LimitsMiddleware answers 413
        except ValueError as exc:
            metrics.errors.labels("bad_request").inc()
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:  # never crash the server; say what failed
            log.exception("prediction failed")
            metrics.errors.labels("internal").inc()
            return JSONResponse({"error": f"prediction failed: {type(exc).__name__}: {exc}"}, status_code=500)
        metrics.images.inc(len(preds))
        body = render("json", [p.record() for p in preds])
        return Response(body, media_type="application/json", headers={"X-Model-Version": model.version})


def create_app(config: ServeConfig, store: ModelStore | None = None):
    """The FastAPI app: ``POST /v1/predict``, ``GET /v1/taxonomy``, ``/healthz``, ``/readyz``, ``/metrics``
    and the page at ``/``. Loads the models now (raises ``UserError`` when there are none) unless
    ``store`` is given; batching and the model watcher run while the app's lifespan does."""
    from fastapi import FastAPI

    metrics = Metrics()
    store = store or ModelStore(config)
    metrics.set_model(store.current)

    def on_change(new):
        metrics.reloads.labels("ok" if new else "failed").inc()
        if new:
            metrics.set_model(new)

    store.on_change = on_change
    batcher = MicroBatcher(config.max_batch, config.max_wait_ms / 1000.0, metrics.batch_size.observe)
    pool = ThreadPoolExecutor(max_workers=max(1, config.decode_workers), thread_name_prefix="hiernet-decode")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        store.start()
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish; finish anything still queued
            await batcher.stop()
            store.stop()
            pool.shutdown(wait=True)

    app = FastAPI(title="Fashion-Hiernet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.batcher, app.state.metrics, app.state.config = store, batcher, metrics, config
    app.add_middleware(LimitsMiddleware, max_bytes=config.max_body_bytes, metrics=metrics)
    _predict_route(app, config, pool)
    _info_routes(app, PAGE.read_text(encoding="utf-8"))
    return app


def _info_routes(app, page: str) -> None:
    """``GET /`` (the page), ``/v1/taxonomy``, ``/healthz``, ``/readyz`` and ``/metrics``."""
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    store, batcher, metrics = app.state.store, app.state.batcher, app.state.metrics

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/v1/taxonomy")
    async def taxonomy():
        return JSONResponse(store.current.taxonomy())

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if batcher.stopping or batcher.task is None:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "model_version": store.current.version, "runtime": store.current.predictor.runtime}

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)
