"""The HTTP service (src/serve.py, hiernet.serving) on tiny trained models, over real HTTP on 127.0.0.1.

One module-scoped training run (the tree of test_pipeline: leaves at different depths, one-child
parents); servers run as subprocesses on ephemeral ports.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_tree
from test_pipeline import FAST, THREE_LEVEL, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    data = make_tree(base / "catalogue", THREE_LEVEL, per_leaf=7)
    split, models = base / "split", base / "models"
    run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(data), "-o", str(split), "-q"], cwd="/")
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=str(split), MODELS_DIR=str(models))
    run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--cache-dir", str(base / "cache"), *FAST], cwd=str(base), env=env)
    images = sorted(data.rglob("*.jpg"))
    return {"base": base, "models": models, "images": images}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``src/serve.py`` in a subprocess on a free loopback port."""

    def __init__(self, models: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(REPO / "src" / "serve.py"), "--models-dir", str(models),
                                      "--port", str(self.port), *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not become ready")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stdout.read()

    def metric(self, name: str) -> float:
        """Sum of every sample of ``name`` in /metrics."""
        text = httpx.get(self.url + "/metrics").text
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def upload(server: Server, files: list, params: dict | None = None, timeout: float = 30) -> httpx.Response:
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
    return httpx.post(server.url + "/v1/predict", files=parts, params=params or {}, timeout=timeout)


def image_files(paths) -> list:
    return [(p.name, p.read_bytes()) for p in paths]


@pytest.fixture(scope="module")
def server(trained):
    s = Server(trained["models"], "--max-batch", "8", "--max-wait-ms", "300", "--max-files", "4",
               "--max-body-mb", "1", "--reload-interval", "0")
    yield s
    s.stop()


def bad_uploads(tmp: Path, good: Path) -> dict:
    """A text file, a truncated JPEG and a PNG bigger than Pillow's decompression-bomb limit."""
    data = good.read_bytes()
    buf = io.BytesIO()
    side = int((Image.MAX_IMAGE_PIXELS + 1) ** 0.5) + 1
    Image.new("1", (side, side)).save(buf, format="PNG")
    return {"notes.jpg": b"this is not an image", "cut.jpg": data[: len(data) // 2], "bomb.png": buf.getvalue()}


# ------------------------------------------------------------------------------------------ API
def test_predict_returns_exactly_predict_py_json_records(server, trained):
    imgs = trained["images"][::8][:4]
    r = upload(server, image_files(imgs), {"topk": 2})
    assert r.status_code == 200, r.text
    cli = run([sys.executable, str(REPO / "src" / "predict.py"), "--models-dir", str(trained["models"]), "-p",
               *map(str, imgs), "--format", "json", "--topk", "2"], cwd="/")
    expected = json.loads(cli.stdout)
    for rec in expected:
        rec["path"] = Path(rec["path"]).name
    assert r.json() == expected
    assert all(len(level) == 2 for rec in r.json() for level in rec["topk"][:1])
    assert r.headers["X-Model-Version"] == httpx.get(server.url + "/readyz").json()["model_version"]
    # min_confidence 1 stops an image whose path probability is below 1 above its leaf: the least sure of
    # the training drawings and a few noise images (the tiny models can be sure of every drawing)
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        noise.append((f"noise_{i}.png", buf.getvalue()))
    candidates = image_files(trained["images"][::4][:8]) + noise
    confidence = {}
    for k in range(0, len(candidates), 4):
        for (name, data), rec in zip(candidates[k:k + 4], upload(server, candidates[k:k + 4]).json()):
            confidence[name] = (rec["confidence"], data)
    name, (conf, data) = min(confidence.items(), key=lambda kv: kv[1][0])
    assert conf < 1.0, "every image has confidence 1"
    r = upload(server, [(name, data)], {"min_confidence": 1.0})
    assert r.status_code == 200 and r.json()[0]["complete"] is False


def test_concurrent_requests_share_one_batch_within_the_wait(server, trained):
    before_n, before_sum = server.metric("hiernet_batch_size_count"), server.metric("hiernet_batch_size_sum")
    results, lock = [], threading.Lock()

    def one(p):
        t0 = time.perf_counter()
        r = upload(server, image_files([p]))
        with lock:
            results.append((r.status_code, time.perf_counter() - t0))

    threads = [threading.Thread(target=one, args=(p,)) for p in trained["images"][:6]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c for c, _ in results] == [200] * 6
    batches = server.metric("hiernet_batch_size_count") - before_n
    assert server.metric("hiernet_batch_size_sum") - before_sum == 6
    assert batches <= 3, f"6 concurrent requests ran in {batches} batches"
    # a lone request is not held back waiting for a full batch: max-wait (0.3 s) plus inference
    t0 = time.perf_counter()
    assert upload(server, image_files(trained["images"][:1])).status_code == 200
    assert time.perf_counter() - t0 < 1.5


def test_bad_uploads_get_400_and_never_fail_the_others(server, trained, tmp_path):
    bad = bad_uploads(tmp_path, trained["images"][0])
    jobs = [[(n, d)] for n, d in bad.items()] + [image_files([p]) for p in trained["images"][1:4]]
    out = [None] * len(jobs)

    def one(i):
        out[i] = upload(server, jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, (name, _) in zip(out[:3], bad.items()):
        assert r.status_code == 400 and name in r.json()["error"], r.text
    assert "decompression bomb" in out[2].json()["error"]
    assert "truncated" in out[1].json()["error"]
    assert [r.status_code for r in out[3:]] == [200, 200, 200]
    # a good and a bad image in one request: the request is refused, naming the bad one
    r = upload(server, image_files(trained["images"][:1]) + [("notes.jpg", bad["notes.jpg"])])
    assert r.status_code == 400 and "notes.jpg" in r.json()["error"]
    assert server.metric("hiernet_errors_total") >= 4


def test_limits_and_bad_requests(server, trained):
    imgs = image_files(trained["images"][:5])
    r = upload(server, imgs)  # --max-files 4
    assert r.status_code == 413 and "at most 4" in r.json()["error"]
    big = [("big.jpg", os.urandom(1_200_000))]  # --max-body-mb 1
    r = upload(server, big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(server.url + "/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert upload(server, imgs[:1], {"topk": 0}).status_code == 400
    assert "min_confidence" in upload(server, imgs[:1], {"min_confidence": "x"}).json()["error"]
    r = httpx.post(server.url + "/v1/predict", data={"topk": "2"})
    assert r.status_code == 400 and "no image" in r.json()["error"]
    assert server.metric('hiernet_errors_total{kind="too_large"}') >= 2
    assert server.metric('hiernet_errors_total{kind="too_many_files"}') >= 1


def test_slow_and_vanishing_clients_do_not_block_others(server, trained):
    img = image_files(trained["images"][:1])
    slow = socket.create_connection(("127.0.0.1", server.port))
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            f"Content-Length: 100000\r\n\r\n--zz\r\n").encode()
    slow.sendall(head)  # ... and never sends the rest
    gone = socket.create_connection(("127.0.0.1", server.port))
    gone.sendall(head)
    gone.close()
    try:
        t0 = time.perf_counter()
        r = upload(server, img)
        assert r.status_code == 200 and time.perf_counter() - t0 < 2
    finally:
        slow.close()
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert upload(server, img).status_code == 200


def test_taxonomy_health_metrics_and_page(server, trained):
    tax = httpx.get(server.url + "/v1/taxonomy").json()
    root = tax["tree"]
    assert tax["levels"] == 3 and [c["name"] for c in root["children"]] == ["accessories", "apparel"]
    apparel = root["children"][1]
    assert apparel["display"] == "apparel" and [c["id"] for c in apparel["children"]] == ["apparel/lower", "apparel/upper"]
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    text = httpx.get(server.url + "/metrics").text
    for name in ["hiernet_requests_total", "hiernet_request_latency_seconds_bucket", "hiernet_batch_size_bucket",
                 "hiernet_model_info", "hiernet_errors_total"]:
        assert name in text
    assert f'version="{tax["model_version"]}"' in text
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "v1/predict" in page.text and "<script" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN


# ------------------------------------------------------------------------------------------ models
def swap_in(models: Path, new: Path) -> None:
    """Replace ``models`` by ``new`` the way training does: two renames."""
    old = models.with_name(models.name + ".old")
    os.rename(models, old)
    os.rename(new, models)
    shutil.rmtree(old)


def test_replaced_models_load_in_background_and_in_flight_requests_finish_on_the_old(trained, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trained["models"], models)
    s = Server(models, "--max-wait-ms", "4000", "--max-batch", "8", "--reload-interval", "0.2")
    try:
        old = httpx.get(s.url + "/readyz").json()["model_version"]
        new = tmp_path / "new"
        shutil.copytree(models, new)
        doc = json.loads((new / "hierarchy.json").read_text())
        doc["display"] = {"apparel": "Apparel & co"}
        (new / "hierarchy.json").write_text(json.dumps(doc))
        box = {}
        t = threading.Thread(target=lambda: box.update(r=upload(s, image_files(trained["images"][:1]))))
        t.start()  # waits up to 4 s in the batcher for company
        time.sleep(0.5)
        swap_in(models, new)
        deadline = time.time() + 20
        while httpx.get(s.url + "/readyz").json()["model_version"] == old and time.time() < deadline:
            time.sleep(0.1)
        now = httpx.get(s.url + "/readyz").json()["model_version"]
        assert now != old
        t.join()
        assert box["r"].status_code == 200 and box["r"].headers["X-Model-Version"] == old
        tax = httpx.get(s.url + "/v1/taxonomy").json()
        assert tax["model_version"] == now and tax["tree"]["children"][1]["display"] == "Apparel & co"
        assert s.metric('hiernet_model_reloads_total{result="ok"}') == 1
        # a broken replacement is refused; the server keeps answering on the last good models
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "hierarchy.json").write_text("{not json")
        swap_in(models, broken)
        deadline = time.time() + 20
        while s.metric('hiernet_model_reloads_total{result="failed"}') < 1 and time.time() < deadline:
            time.sleep(0.1)
        r = upload(s, image_files(trained["images"][:1]))
        assert r.status_code == 200 and r.headers["X-Model-Version"] == now
    finally:
        s.stop()


def test_sigterm_drains_in_flight_requests_then_exits(trained):
    s = Server(trained["models"], "--max-wait-ms", "1500", "--reload-interval", "0")
    box = {}
    t = threading.Thread(target=lambda: box.update(r=upload(s, image_files(trained["images"][:3]))))
    t.start()
    time.sleep(0.4)  # the request is in the batcher, waiting for company
    s.proc.send_signal(signal.SIGTERM)
    t.join()
    assert box["r"].status_code == 200 and len(box["r"].json()) == 3
    # uvicorn re-raises the signal once it has shut down cleanly: killed by SIGTERM, after the drain
    assert s.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Traceback" not in s.stop()


def test_a_failing_batch_is_retried_image_by_image(trained):
    from hiernet.serving import ServeConfig, _Item, load_model, predict_isolated

    model = load_model(ServeConfig(trained["models"]))
    size = model.specs[0][0]
    good = {spec: np.full((3, spec[0], spec[0]), 0.5, np.float32) for spec in model.specs}
    broken = {spec: np.zeros((3, size + 1, size), np.float32) for spec in model.specs}  # cannot be stacked
    items = [_Item(model, x, n, (1, 0.0), None, 0.0) for n, x in [("a", good), ("b", broken), ("c", good)]]
    out = predict_isolated(model, items)
    assert [type(o).__name__ for o in out] == ["Prediction", out[1].__class__.__name__, "Prediction"]
    assert isinstance(out[1], Exception) and out[0].path == "a" and out[2].path == "c" and out[0].labels


def same_records(a, b) -> bool:
    """Equal nested records, floats compared to a relative 1e-5 (float32 rounding of different batch sizes)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_records(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_records(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_mixed_options_in_one_batch_match_separate_batches(trained):
    from hiernet.serving import ServeConfig, _Item, load_model, predict_items, prepare_upload

    model = load_model(ServeConfig(trained["models"]))
    xs = [prepare_upload(p.read_bytes(), model.specs) for p in trained["images"][::5][:4]]
    opts = [(1, 0.0), (3, 0.0), (1, 0.9), (3, 0.0)]
    items = [_Item(model, x, str(i), o, None, 0.0) for i, (x, o) in enumerate(zip(xs, opts))]
    mixed = [p.record() for p in predict_items(model, items)]
    alone = [predict_items(model, [it])[0].record() for it in items]
    # same labels, nodes, stops and topk lengths; probabilities equal up to the last float32 bits, which
    # onnxruntime's kernels round differently for a batch of 1 and a batch of several
    assert same_records(mixed, alone)
    assert len(mixed[1]["topk"][0]) == 2 and len(mixed[0]["topk"][0]) == 1  # the root has 2 classes


def test_serve_refuses_missing_models_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "src" / "serve.py"), "--models-dir", str(tmp_path / "none"),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no trained models" in proc.stderr


# ------------------------------------------------------------------------------------------ the page
def chromium_driver(width: int = 1000, height: int = 800):
    """Selenium driving Debian's chromium + chromium-driver, headless (skips the test when missing)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_page_in_a_real_browser_shows_the_predicted_path(server, trained):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    img = trained["images"][-1]
    expected = upload(server, image_files([img]), {"topk": 3}).json()[0]
    browser = chromium_driver()
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "file").send_keys(str(img))
        path = WebDriverWait(browser, 20).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#results .path")))
        assert path.text == " > ".join(expected["labels"])
        assert path.get_attribute("data-node") == expected["node"]
        levels = browser.find_elements(By.CSS_SELECTOR, "#results .level")
        assert len(levels) == len(expected["labels"])
        bars = levels[0].find_elements(By.CSS_SELECTOR, ".bar")
        assert [b.find_element(By.CSS_SELECTOR, ".l").text for b in bars] == [t["label"] for t in expected["topk"][0]]
        assert "Model version" in browser.find_element(By.ID, "status").text
        if os.environ.get("SERVE_SCREENSHOT"):
            browser.save_screenshot(os.environ["SERVE_SCREENSHOT"])
    finally:
        browser.quit()


def test_models_are_warmed_up_at_every_power_of_two_batch_size_up_to_max_batch(trained, monkeypatch):
    from hiernet import serving
    from hiernet.predictor import HierarchicalPredictor

    assert serving.warm_up_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert serving.warm_up_sizes(12) == [1, 2, 4, 8, 12] and serving.warm_up_sizes(1) == [1]
    seen = []
    real = HierarchicalPredictor.predict_arrays

    def counting(self, inputs, names):
        seen.append(len(inputs))
        return real(self, inputs, names)

    monkeypatch.setattr(HierarchicalPredictor, "predict_arrays", counting)
    model = serving.load_model(serving.ServeConfig(trained["models"], max_batch=6))
    assert seen == [1, 2, 4, 6] and model.predictor is not None
