"""Tests for report.html (hiernet.htmlreport) on a hand-built case whose answers are known.

Tree (names chosen to need escaping)::

        a                 b&c
    <i>x     y        z     w

Seven images: two confused pairs of different size, partial predictions, and correct ones of known
confidence. A real headless Chromium opens the page in the last test.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest
from PIL import Image

from hiernet.evaluation import assemble_results
from hiernet.hierarchy import Hierarchy
from hiernet.htmlreport import HtmlLimits, render_html, thumbnail_uri
from hiernet.report import OUTPUT_FILES, write_outputs

HIER = Hierarchy.from_leaf_paths(["a/<i>x", "a/y", "b&c/z", "b&c/w"])
X, Y, Z, W = "a/<i>x", "a/y", "b&c/z", "b&c/w"

# (file name, true leaf, predicted path, confidence)
CASES = [
    ("x_as_y_hi.png", X, ["a", Y], 0.90),  # pair x -> y (3 images), most confident first
    ("x_as_y_lo.png", X, ["a", Y], 0.40),
    ("x_as_y_mid.png", X, ["a", Y], 0.70),
    ("z_as_x.png", Z, ["a", X], 0.55),  # pair z -> a/x (1 image)
    ("y_right_sure.png", Y, ["a", Y], 0.99),  # correct, confident
    ("w_right_unsure.png", W, ["b&c", W], 0.51),  # correct, least confident
    ("quote's <b>.png", Z, ["b&c", Z], 0.80),  # correct; a file name to escape
]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    images = []
    for k, (name, true, pred, conf) in enumerate(CASES):
        path = folder / name
        Image.new("RGB", (200, 150), (30 * k, 255 - 30 * k, 90)).save(path)
        images.append({"path": str(path), "true": true, "pred": pred, "confidence": conf, "flat": true})
    res = assemble_results(HIER, [c[1] for c in CASES], [c[2] for c in CASES], confidences=[c[3] for c in CASES])
    res.update(images=images, n_unreadable=0, runtime="onnx", source="hand-built", models_dir="/m",
               models_fingerprint="0123456789abcdef")
    return res


def _paths_in_order(page: str) -> list[str]:
    return [m.split("/")[-1] for m in re.findall(r"data-path='([^']*)'", page)]


def test_pairs_by_count_photos_by_confidence(case):
    page = render_html(HIER, case)
    heads = re.findall(r"<h3 class='pair'>(.*?)</h3>", page)
    assert len(heads) == 2
    assert heads[0].startswith("a / &lt;i&gt;x → a / y: 3 images")  # the larger pair first
    assert heads[1].startswith("b&amp;c / z → a / &lt;i&gt;x: 1 image")
    shown = _paths_in_order(page)
    assert shown[:4] == ["x_as_y_hi.png", "x_as_y_mid.png", "x_as_y_lo.png", "z_as_x.png"]
    # then the correct ones, least confident first
    assert shown[4:] == ["w_right_unsure.png", "quote&#x27;s &lt;b&gt;.png", "y_right_sure.png"]
    assert "confidence 0.900" in page and "predicted: a / y" in page


def test_names_are_escaped_and_nothing_external(case):
    page = render_html(HIER, case)
    assert "<i>x" not in page and "<b>.png" not in page and "quote's" not in page
    assert "&lt;i&gt;x" in page and "b&amp;c" in page
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page)  # every resource is inline
    assert "http://" not in page and "https://" not in page


def test_thumbnails_are_small_jpeg_data_uris(case):
    uri = thumbnail_uri(case["images"][0]["path"], 96)
    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.format == "JPEG" and max(im.size) == 96
    assert thumbnail_uri("/no/such/file.png") is None


def test_tree_confusion_and_bounds(case):
    page = render_html(HIER, case, HtmlLimits(pairs=1, per_pair=2, unsure=1))
    assert "(1 more not shown)" in page and "1 more pairs not shown." in page
    assert _paths_in_order(page) == ["x_as_y_hi.png", "x_as_y_mid.png", "w_right_unsure.png"]
    assert "at most 1 pairs and 2 photos per pair" in page
    # the tree: leaf recall and support (x: 0 of 3 right; z: 1 of 2)
    assert re.search(r"&lt;i&gt;x <span class='muted'>leaf: recall <span class='acc'>0.000</span>, 3 images",
                     page)
    assert re.search(r"z <span class='muted'>leaf: recall <span class='acc'>0.500</span>, 2 images", page)
    # the confusion matrix: the x row holds 3 in the y column, coloured red (off-diagonal)
    assert "title='a/&lt;i&gt;x → a/y: 3'" in page
    assert re.search(r"<td style='background:rgba\(198,40,40,0\.90\)' title='a/&lt;i&gt;x → a/y: 3'>3</td>",
                     page)


def test_write_outputs_writes_report_html(case, tmp_path):
    files = write_outputs(HIER, case, tmp_path / "out")
    assert [f.name for f in files] == list(OUTPUT_FILES) and "report.html" in OUTPUT_FILES
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<img ") == len(CASES)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
def test_chromium_renders_the_galleries(case, tmp_path):
    out = tmp_path / "out"
    write_outputs(HIER, case, out)
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    # the browser parsed the page: the galleries' figures and their inline images are in the DOM
    figures = re.findall(r'<figure class="photo" data-path="([^"]*)">\s*<img src="data:image/jpeg;base64,', dom)
    assert [f.split("/")[-1] for f in figures][:4] == ["x_as_y_hi.png", "x_as_y_mid.png", "x_as_y_lo.png", "z_as_x.png"]
    assert len(figures) == len(CASES)
    assert dom.count('<div class="gallery"') == 3 and 'id="unsure"' in dom
    # the escaped names come back as text, not as elements
    assert "&lt;i&gt;x" in dom and "<i>x" not in dom


def test_display_names_are_shown_where_nodes_are_shown_to_people(case):
    """A catalogue tree's display names (results.json → display) replace the ids in the tree, the
    confusion matrix and the galleries; without them (above) the page shows the node names."""
    display = {"a": "Apparel & Co", "a/y": "Y / Tops", "b&c/z": "Zed"}
    page = render_html(HIER, {**case, "display": display})
    assert "<b>Apparel &amp; Co</b>" in page and "Y / Tops <span class='muted'>leaf: recall" in page
    assert "title='Apparel &amp; Co / &lt;i&gt;x → Apparel &amp; Co / Y / Tops: 3'" in page  # confusion cell
    assert "<th class='l'>b&amp;c / Zed</th>" in page
    assert "true: Apparel &amp; Co / &lt;i&gt;x<br>predicted: Apparel &amp; Co / Y / Tops" in page  # gallery
    assert "Apparel" not in render_html(HIER, case)
