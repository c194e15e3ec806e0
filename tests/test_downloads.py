"""hiernet.downloads against a loopback HTTP server (127.0.0.1, ephemeral port; no internet)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from hiernet.downloads import DownloadCache, DownloadError, DownloadSettings, is_url


def jpeg_bytes(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, format="JPEG")
    return buf.getvalue()


GOOD = jpeg_bytes()
OTHER = jpeg_bytes((10, 200, 10))


class Handler(BaseHTTPRequestHandler):
    """Routes: /good.jpg, /other, /missing (404), /slow, /loop, /redirect, /huge, /huge-nolength,
    /page.html (HTML), /flaky (503 twice, then the image), /error (500 always)."""

    hits: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code, body=b"", ctype="image/jpeg", length=True, headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in headers:
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (size limit, timeout)
            self.close_connection = True

    def do_GET(self):  # noqa: N802 - http.server API
        with self.lock:
            n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        p = self.path
        if p == "/good.jpg":
            self._send(200, GOOD)
        elif p == "/other":
            self._send(200, OTHER, ctype="application/octet-stream")
        elif p == "/slow":
            time.sleep(1.0)
            self._send(200, GOOD)
        elif p == "/loop":
            self._send(302, headers=[("Location", "/loop2")])
        elif p == "/loop2":
            self._send(302, headers=[("Location", "/loop")])
        elif p == "/redirect":
            self._send(301, headers=[("Location", "/good.jpg")])
        elif p == "/to-file":
            self._send(302, headers=[("Location", "file:///etc/passwd")])
        elif p == "/ftp":
            self._send(302, headers=[("Location", "ftp://127.0.0.1/x.jpg")])
        elif p == "/huge":
            self._send(200, GOOD + b"\0" * (3 << 20))
        elif p == "/huge-nolength":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * (1 << 16))
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        elif p == "/page.html":
            self._send(200, b"<html><body>not an image</body></html>", ctype="text/html")
        elif p == "/flaky":
            self._send(503, b"busy", ctype="text/plain") if n <= 2 else self._send(200, GOOD)
        elif p == "/error":
            self._send(500, b"oops", ctype="text/plain")
        else:
            self._send(404, b"no", ctype="text/plain")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


FAST = DownloadSettings(timeout=0.3, retries=2, backoff=0.01, max_bytes=1 << 20, max_redirects=3)


@pytest.fixture
def cache(tmp_path):
    Handler.hits.clear()
    return DownloadCache(tmp_path / "dl", FAST)


def test_is_url():
    assert is_url("http://x/a.jpg") and is_url("HTTPS://x") and not is_url("ftp://x") and not is_url("images/a.jpg")


def test_good_image_cached_by_content_and_not_fetched_twice(server, cache, tmp_path):
    p = cache.fetch(f"{server}/good.jpg")
    assert p.read_bytes() == GOOD and p.suffix == ".jpg"
    assert p.stem == hashlib.sha256(GOOD).hexdigest()  # content-addressed
    out = cache.fetch_all([f"{server}/good.jpg", f"{server}/other", f"{server}/other"], workers=2, progress=False)
    assert out[f"{server}/other"].read_bytes() == OTHER  # a name without extension: the format decides
    assert Handler.hits == {"/good.jpg": 1, "/other": 1}
    index = json.loads((tmp_path / "dl" / "index.json").read_text())
    assert set(index) == {f"{server}/good.jpg", f"{server}/other"}
    assert index[f"{server}/other"]["sha256"] == hashlib.sha256(OTHER).hexdigest()
    # a new cache object (a second run) reads the index and downloads nothing
    again = DownloadCache(tmp_path / "dl", FAST)
    again.fetch_all([f"{server}/other"], progress=False)
    assert Handler.hits["/other"] == 1
    assert not list((tmp_path / "dl" / "tmp").iterdir())  # no temporary file left behind


@pytest.mark.parametrize("path, reason, attempts", [
    ("/missing", "HTTP 404", 1),            # not retried
    ("/error", "HTTP 500", 3),              # retried, then given up
    ("/slow", "timed out", 3),
    ("/loop", "redirect not followed.*infinite loop", None),
    ("/to-file", "redirect not followed.*not allowed", None),
    ("/ftp", "redirected to a non-http(s) address", None),
    ("/huge", "larger than the limit", 1),
    ("/huge-nolength", "larger than the limit", 1),
    ("/page.html", "not an image", 1),
])
def test_failures_give_a_reason(server, cache, tmp_path, path, reason, attempts):
    with pytest.raises(DownloadError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        cache.fetch(server + path)
    if attempts is not None:
        assert Handler.hits[path] == attempts
    blobs = list((tmp_path / "dl").rglob("sha256/*/*"))
    assert blobs == [] and not list((tmp_path / "dl" / "tmp").iterdir())


def test_retry_with_backoff_then_success(server, cache):
    start = time.monotonic()
    p = cache.fetch(f"{server}/flaky")
    assert p.read_bytes() == GOOD and Handler.hits["/flaky"] == 3
    assert time.monotonic() - start >= 0.01 + 0.02  # two backoff sleeps, doubling


def test_redirect_followed(server, cache):
    assert cache.fetch(f"{server}/redirect").read_bytes() == GOOD


def test_fetch_all_reports_failures_per_url(server, cache):
    out = cache.fetch_all([f"{server}/good.jpg", f"{server}/missing"], workers=4, progress=False)
    assert out[f"{server}/good.jpg"].read_bytes() == GOOD
    assert out[f"{server}/missing"].startswith("download failed: HTTP 404")


def test_refused_connection_is_a_reason(cache):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(DownloadError, match="cannot connect"):
        cache.fetch(f"http://127.0.0.1:{port}/x.jpg")
