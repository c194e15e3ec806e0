"""A content-addressed download cache for catalogue images given as http(s) URLs (stdlib only, no torch).

Each URL is fetched once: the bytes are streamed to a temporary file (aborted past a size limit),
checked to decode as an image, and renamed to ``<root>/sha256/<ab>/<sha256><ext>``. ``index.json``
maps every fetched URL to its hash, so a second run reads the cache and does not download again.
Timeouts, connection errors and 5xx/429 answers are retried with exponential backoff; 404 and other
4xx answers, redirect loops, oversized bodies and non-image bodies are not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .images import check_image
from .safeio import write_json_atomic

log = logging.getLogger(__name__)

INDEX = "index.json"
_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


def is_url(value: str) -> bool:
    """True for an ``http://`` or ``https://`` address (case-insensitive scheme)."""
    return value[:8].lower().startswith(("http://", "https://"))


class DownloadError(Exception):
    """A download that failed for good; ``retry`` says whether trying again later may help."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most ``max_redirections`` redirects, to http(s) only."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib API
        if not is_url(newurl):
            raise DownloadError(f"redirected to a non-http(s) address {newurl[:80]!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass
class DownloadSettings:
    """How downloads behave: seconds per socket operation, attempts, first backoff, byte and redirect limits."""

    timeout: float = 15.0
    retries: int = 3
    backoff: float = 0.5
    max_bytes: int = 50 << 20
    max_redirects: int = 5


class DownloadCache:
    """URL → local image file, downloaded at most once.

    Parameters
    ----------
    root : path-like
        Cache folder (created); holds ``index.json``, ``sha256/`` and ``tmp/``.
    settings : DownloadSettings, optional
    """

    def __init__(self, root: str | os.PathLike, settings: DownloadSettings | None = None):
        self.root = Path(root)
        self.settings = settings or DownloadSettings()
        self._lock = threading.Lock()
        self.index: dict[str, dict] = self._read_index()
        self.downloaded = 0
        handler = _LimitedRedirects()
        handler.max_redirections = self.settings.max_redirects
        handler.max_repeats = 1  # the same address twice in one chain is a loop
        self._opener = urllib.request.build_opener(handler)

    def _read_index(self) -> dict[str, dict]:
        try:
            doc = json.loads((self.root / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def blob_path(self, digest: str, ext: str) -> Path:
        return self.root / "sha256" / digest[:2] / f"{digest}{ext}"

    def cached(self, url: str) -> Path | None:
        """The cached file for ``url`` if the index knows it and the file is still there."""
        e = self.index.get(url)
        if isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("ext"), str):
            p = self.blob_path(e["sha256"], e["ext"])
            if p.is_file():
                return p
        return None

    def fetch(self, url: str) -> Path:
        """The local file for ``url``, downloading it if needed.

        Raises
        ------
        DownloadError
            With a short reason (``HTTP 404``, ``timed out after 3 attempts``, ``not an image: ...``).
        """
        hit = self.cached(url)
        if hit is not None:
            return hit
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                return self._download(url)
            except DownloadError as exc:
                if not exc.retry or attempt == s.retries:
                    if exc.retry:
                        raise DownloadError(f"{exc} (after {attempt + 1} attempts)") from None
                    raise
                time.sleep(s.backoff * (2 ** attempt))
        raise AssertionError("unreachable")

    def _download(self, url: str) -> Path:
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="dl-", dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                digest = self._stream(url, fh)
            reason = check_image(tmp)
            if reason is not None:
                raise DownloadError(f"not an image: {reason}")
            from PIL import Image

            with Image.open(tmp) as im:
                ext = _EXT.get(im.format or "", ".img")
            dst = self.blob_path(digest, ext)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        with self._lock:
            self.index[url] = {"sha256": digest, "ext": ext}
            self.downloaded += 1
        return dst

    def _stream(self, url: str, fh) -> str:
        """Write the body of ``url`` to ``fh``; returns its SHA-256 (hex)."""
        s = self.settings
        req = urllib.request.Request(url, headers={"User-Agent": "hiernet-prepare/1"})
        h = hashlib.sha256()
        try:
            with self._opener.open(req, timeout=s.timeout) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > s.max_bytes:
                    raise DownloadError(f"larger than the limit of {s.max_bytes / 2**20:g} MB ({int(length)} bytes)")
                total = 0
                while chunk := resp.read(1 << 16):
                    total += len(chunk)
                    if total > s.max_bytes:
                        raise DownloadError(f"larger than the limit of {s.max_bytes / 2**20:g} MB")
                    h.update(chunk)
                    fh.write(chunk)
        except DownloadError:
            raise
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                why = str(exc.reason).splitlines()[0] if exc.reason else ""
                raise DownloadError(f"redirect not followed (HTTP {exc.code}: {why})") from None
            raise DownloadError(f"HTTP {exc.code} {exc.reason}", retry=exc.code >= 500 or exc.code == 429) from None
        except (TimeoutError, socket.timeout):
            raise DownloadError(f"timed out ({s.timeout:g} s)", retry=True) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise DownloadError(f"timed out ({s.timeout:g} s)", retry=True) from None
            raise DownloadError(f"cannot connect: {reason}", retry=True) from None
        except (OSError, ValueError) as exc:  # connection reset mid-body, malformed URL or answer
            raise DownloadError(f"download failed: {type(exc).__name__}: {exc}", retry=isinstance(exc, OSError)) from None
        return h.hexdigest()

    def fetch_all(self, urls: list[str], workers: int = 8, progress: bool = True) -> dict[str, Path | str]:
        """Fetch distinct ``urls`` with at most ``workers`` at a time; saves the index at the end.

        Returns
        -------
        dict
            url → local :class:`~pathlib.Path`, or url → reason (str) for a failed download.
        """
        from tqdm import tqdm

        todo = sorted(set(urls))
        out: dict[str, Path | str] = {}

        def one(url: str) -> tuple[str, Path | str]:
            try:
                return url, self.fetch(url)
            except DownloadError as exc:
                return url, f"download failed: {exc}"

        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                bar = tqdm(pool.map(one, todo), total=len(todo), desc="downloading", unit="url",
                           disable=not progress or not todo)
                for url, result in bar:
                    out[url] = result
        finally:
            if self.downloaded:
                with self._lock:
                    write_json_atomic(self.root / INDEX, self.index)
        return out
