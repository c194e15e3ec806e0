"""hiernet.images: every odd-but-valid image becomes upright RGB, every broken one a short reason."""

from __future__ import annotations

import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hiernet.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    check_image,
    is_image_name,
    list_images,
    load_for_model,
    load_rgb,
    resize_for_model,
    to_array,
)


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _palette_with_transparency() -> Image.Image:
    im = Image.new("P", (30, 20), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 10, 30, 20))  # bottom half red, top half index 0 = transparent
    return im


def _i16() -> Image.Image:
    a = np.zeros((20, 30), np.uint16)
    a[:, 15:] = 65535
    return Image.fromarray(a)


def _exif_rotated() -> tuple[Image.Image, Image.Exif]:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # a red corner, top-left as stored
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return im, exif


# name -> (writer(path), expected size, {pixel: colour} checks with tolerance)
ODD_BUT_VALID = {
    "cmyk.jpg": (lambda p: save(p, Image.new("CMYK", (30, 20), (0, 255, 255, 0)), quality=95), (30, 20),
                 {(15, 10): (255, 0, 0)}),
    "rgba_transparent.png": (lambda p: save(p, Image.new("RGBA", (30, 20), (255, 0, 0, 0))), (30, 20),
                             {(5, 5): (255, 255, 255)}),  # transparent → white, not black
    "rgba_opaque.png": (lambda p: save(p, Image.new("RGBA", (30, 20), (0, 128, 0, 255))), (30, 20),
                        {(5, 5): (0, 128, 0)}),
    "la.png": (lambda p: save(p, Image.new("LA", (30, 20), (0, 0))), (30, 20), {(5, 5): (255, 255, 255)}),
    "la_opaque.png": (lambda p: save(p, Image.new("LA", (30, 20), (40, 255))), (30, 20), {(5, 5): (40, 40, 40)}),
    "sixteen_bit.png": (lambda p: save(p, _i16()), (30, 20), {(2, 2): (0, 0, 0), (25, 2): (255, 255, 255)}),
    "palette_transparency.png": (lambda p: save(p, _palette_with_transparency(), transparency=0), (30, 20),
                                 {(5, 2): (255, 255, 255), (5, 15): (255, 0, 0)}),
    "palette.gif": (lambda p: save(p, Image.new("RGB", (30, 20), (0, 0, 255)).convert("P")), (30, 20),
                    {(5, 5): (0, 0, 255)}),
    "grayscale.jpg": (lambda p: save(p, Image.new("L", (30, 20), 128), quality=95), (30, 20),
                      {(5, 5): (128, 128, 128)}),
    "bilevel.png": (lambda p: save(p, Image.new("1", (30, 20), 1)), (30, 20), {(5, 5): (255, 255, 255)}),
    "float_tiff_named.png": (lambda p: save(p, Image.fromarray(np.full((20, 30), 0.5, np.float32)), format="TIFF"),
                             (30, 20), {(5, 5): (127, 127, 127)}),
    "one_pixel.png": (lambda p: save(p, Image.new("RGB", (1, 1), (9, 8, 7))), (1, 1), {(0, 0): (9, 8, 7)}),
    "one_pixel.jpg": (lambda p: save(p, Image.new("RGB", (1, 1), (200, 200, 200)), quality=100), (1, 1),
                      {(0, 0): (200, 200, 200)}),
    "very_wide.png": (lambda p: save(p, Image.new("RGB", (4000, 3), (1, 2, 3))), (4000, 3), {(3999, 2): (1, 2, 3)}),
    "very_tall.jpg": (lambda p: save(p, Image.new("RGB", (3, 3000), (250, 0, 0)), quality=95), (3, 3000), {}),
    "webp.webp": (lambda p: save(p, Image.new("RGB", (30, 20), (0, 255, 0)), lossless=True), (30, 20),
                  {(5, 5): (0, 255, 0)}),
    "bitmap.bmp": (lambda p: save(p, Image.new("RGB", (30, 20), (0, 0, 255))), (30, 20), {(5, 5): (0, 0, 255)}),
    "UPPER.JPG": (lambda p: save(p, Image.new("RGB", (30, 20), (255, 255, 0)), format="JPEG", quality=95), (30, 20),
                  {(5, 5): (255, 255, 0)}),
    "Mixed.PnG": (lambda p: save(p, Image.new("RGB", (30, 20), (0, 255, 255)), format="PNG"), (30, 20),
                  {(5, 5): (0, 255, 255)}),
    "png_named.jpg": (lambda p: save(p, Image.new("RGB", (30, 20), (7, 7, 7)), format="PNG"), (30, 20),
                      {(5, 5): (7, 7, 7)}),  # wrong extension, real image: decoded by content
    "exif_rotated.jpg": (lambda p: save(p, _exif_rotated()[0], exif=_exif_rotated()[1], quality=95), (20, 40),
                         {(17, 2): (255, 0, 0), (2, 37): (0, 0, 255)}),
}


def close(a, b, tol=12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_but_valid_images_load_as_rgb(tmp_path, name):
    writer, size, pixels = ODD_BUT_VALID[name]
    path = writer(tmp_path / name)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == size
    assert np.asarray(img).shape == (size[1], size[0], 3)
    for xy, colour in pixels.items():
        assert close(img.getpixel(xy), colour), (xy, img.getpixel(xy), colour)
    assert check_image(path) is None
    # the model input path (JPEG draft decoding included) agrees on orientation and is well formed
    small = load_rgb(path, min_size=4)
    assert small.mode == "RGB" and (small.width >= small.height) == (size[0] >= size[1])
    for policy in ("squash", "crop", "pad"):
        arr = load_for_model(path, 16, policy)
        assert arr.shape == (3, 16, 16) and arr.dtype == np.float32
        assert 0.0 <= arr.min() and arr.max() <= 1.0 and np.isfinite(arr).all()


def test_exif_orientation_applied_with_draft_decoding(tmp_path):
    im, exif = _exif_rotated()
    big = im.resize((400, 200))
    path = save(tmp_path / "big_rotated.jpg", big, exif=exif, quality=95)
    full, draft = load_rgb(path), load_rgb(path, min_size=50)
    assert full.size == (200, 400)
    assert draft.size[0] * 2 == draft.size[1] and draft.width >= 50 and draft.width < 200  # smaller, upright
    assert close(draft.getpixel((draft.width - 3, 3)), (255, 0, 0), 30)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 20), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.is_animated and im.n_frames == 3
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (30, 20) and close(img.getpixel((3, 3)), (255, 0, 0))


def test_animated_png_gives_first_frame(tmp_path):
    frames = [Image.new("RGBA", (30, 20), c) for c in [(0, 0, 255, 255), (255, 0, 0, 255)]]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    img = load_rgb(path)
    assert img.mode == "RGB" and close(img.getpixel((3, 3)), (0, 0, 255))


def _good_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _good_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


BROKEN = {
    "zero_bytes.jpg": (lambda p: p.write_bytes(b""), "not an image"),
    "text.png": (lambda p: p.write_text("hello, I am not a picture"), "not an image"),
    "html.jpg": (lambda p: p.write_text("<html><body>404</body></html>"), "not an image"),
    "random.jpg": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(3000)), "not an image"),
    "truncated.jpg": (lambda p: p.write_bytes(_good_jpeg()[:300]), "truncated"),
    "truncated.png": (lambda p: p.write_bytes(_good_png()[:400]), "truncated"),
    "header_only.png": (lambda p: p.write_bytes(_good_png()[:33]), "not an image"),
    "jpeg_soi_then_garbage.jpg": (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50), "not an image"),
    "missing.jpg": (lambda p: None, "file not found"),
    "folder.jpg": (lambda p: p.mkdir(), "is a folder"),
    "broken_link.jpg": (lambda p: os.symlink(p.parent / "nowhere.jpg", p), "file not found"),
    "loop.jpg": (lambda p: os.symlink(p.name, p), "symbolic links"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_give_a_reason(tmp_path, name):
    make, reason = BROKEN[name]
    assert reason  # an empty reason would be found in any message
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb(path)
    msg = str(ei.value)
    assert msg and "\n" not in msg and reason in msg
    assert check_image(path) == msg
    with pytest.raises(ImageDecodeError):
        load_for_model(path, 32)


def test_unreadable_file_permission(open_tmp):
    """Run as an ordinary user (``nobody`` when the tests run as root): chmod 000 must block it."""
    from conftest import python_unprivileged

    path = save(open_tmp / "locked.png", Image.new("RGB", (4, 4)))
    path.chmod(0)
    proc = python_unprivileged("import sys; from hiernet.images import check_image; print(check_image(sys.argv[1]))", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "permission denied"


@pytest.mark.parametrize("pixels", [(12, 12), (20, 20), (1000, 1)])  # 144: warning zone; 400, 1000: error zone
def test_decompression_bomb_refused_and_guard_stays_on(tmp_path, monkeypatch, pixels):
    path = save(tmp_path / "bomb.png", Image.new("RGB", pixels))
    assert load_rgb(path).size == pixels  # fine under the default limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_rgb(path)
    assert "decompression bomb" in check_image(path)
    ok = save(tmp_path / "small.png", Image.new("RGB", (10, 10)))
    assert load_rgb(ok).size == (10, 10)  # at the limit: allowed


def test_decompression_bomb_guard_is_thread_safe(tmp_path, monkeypatch):
    """Many threads decoding at once (as predict does) never let an over-limit image through."""
    bombs = [save(tmp_path / f"bomb{i}.png", Image.new("RGB", (15, 10))) for i in range(8)]  # 150 px
    good = [save(tmp_path / f"ok{i}.png", Image.new("RGB", (5, 5))) for i in range(8)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    filters_before = list(warnings.filters)
    barrier = threading.Barrier(4)

    def work(path):
        try:
            barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return check_image(path)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, (bombs + good) * 5))
    for path, reason in zip((bombs + good) * 5, results):
        if path in bombs:
            assert reason and "decompression bomb" in reason
        else:
            assert reason is None
    assert warnings.filters == filters_before


def test_random_bytes_never_escape_as_other_errors(tmp_path):
    rng = np.random.default_rng(7)
    for i in range(40):
        path = tmp_path / f"r{i}{sorted(IMAGE_EXTENSIONS)[i % len(IMAGE_EXTENSIONS)]}"
        path.write_bytes(rng.bytes(int(rng.integers(0, 4000))))
        assert isinstance(check_image(path), str)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=2048))
def test_hypothesis_random_bytes_as_jpg(tmp_path, data):
    path = tmp_path / "random.jpg"
    path.write_bytes(data)
    try:
        img = load_rgb(path)
    except ImageDecodeError as exc:
        assert str(exc)
    else:
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


_SEEDS = {"jpg": _good_jpeg(), "png": _good_png()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(_SEEDS)), cut=st.integers(0, 5000),
       flips=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=8))
def test_hypothesis_damaged_real_images(tmp_path, kind, cut, flips):
    """Real images cut short and with bytes overwritten reach deep into the decoders."""
    data = bytearray(_SEEDS[kind])
    for pos, val in flips:
        data[pos % len(data)] = val
    path = tmp_path / f"damaged.{kind}"
    path.write_bytes(bytes(data[: max(0, len(data) - cut)]))
    try:
        img = load_rgb(path, min_size=16)
    except ImageDecodeError as exc:
        assert str(exc)
    else:
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


@pytest.mark.parametrize("size", [(1, 1), (4000, 3), (3, 4000), (50, 50)])
@pytest.mark.parametrize("policy", ["squash", "crop", "pad"])
def test_resize_for_model_any_shape(size, policy):
    out = resize_for_model(Image.new("RGB", size, (10, 20, 30)), 24, policy)
    assert out.size == (24, 24) and out.mode == "RGB"


@pytest.mark.parametrize("wide", [True, False])
def test_crop_keeps_only_the_centred_square(wide):
    # three 30-pixel bands: red | green | blue along the long side; "crop" must see only green
    bands = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    img = Image.new("RGB", (90, 30) if wide else (30, 90))
    for i, colour in enumerate(bands):
        img.paste(colour, (30 * i, 0, 30 * i + 30, 30) if wide else (0, 30 * i, 30, 30 * i + 30))
    arr = np.asarray(resize_for_model(img, 16, "crop"), dtype=int)
    assert arr.shape == (16, 16, 3)
    # the bilinear filter may blend a sliver of the neighbouring band into the outermost pixels only
    assert np.abs(arr[1:-1, 1:-1] - np.array([0, 255, 0])).max() <= 1
    assert arr[..., 1].min() >= 192 and arr[..., 0].max() <= 64 and arr[..., 2].max() <= 64


def test_to_array_layout_and_range():
    img = Image.new("RGB", (5, 3), (255, 0, 51))
    img.putpixel((4, 2), (0, 255, 0))
    x = to_array(img)
    assert x.shape == (3, 3, 5) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert x[0, 0, 0] == 1.0 and x[1, 0, 0] == 0.0 and abs(x[2, 0, 0] - 0.2) < 1e-7
    assert x[:, 2, 4].tolist() == [0.0, 1.0, 0.0]


def test_resize_unknown_policy():
    with pytest.raises(ValueError, match="squash, crop or pad"):
        resize_for_model(Image.new("RGB", (4, 4)), 8, "stretch")


def test_is_image_name_and_list_images(tmp_path):
    assert is_image_name("a.JPG") and is_image_name("b.PnG") and is_image_name("c.jpeg") and is_image_name("x.y.webp")
    assert not is_image_name(".hidden.jpg") and not is_image_name("notes.txt") and not is_image_name("jpg")
    assert not is_image_name("photo.jpg.txt")
    for rel in ["a/x.JPG", "a/.hid.jpg", "b/y.png", "b/z.txt", ".secret/s.jpg", "c/d/e.GIF", "ünï cødé/ñ.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/x.JPG", "b/y.png", "c/d/e.GIF", "ünï cødé/ñ.jpg"]


def test_fifo_with_image_name_is_refused_not_waited_on(tmp_path):
    """Opening a named pipe would block forever; it is refused before any read."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result = []
    t = threading.Thread(target=lambda: result.append(check_image(fifo)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "load_rgb blocked on a FIFO"
    assert result == ["not a regular file (a pipe or device)"]
    assert check_image("/dev/null") == "not a regular file (a pipe or device)"


def _photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, textured picture (gradients, a garment-like blob, mild noise): what JPEG photos look like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([200 + 40 * np.sin(xx / w * 3 + c) * np.cos(yy / h * 2 - c) for c in range(3)], axis=-1)
    blob = ((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 2.5)) ** 2 < 1
    arr[blob] = arr[blob] * 0.3 + np.array([40, 60, 140]) * (1 + 0.2 * np.sin(xx[blob] / 9))[:, None]
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("policy", ["crop", "squash", "pad"])
def test_large_jpeg_is_draft_decoded_to_nearly_the_same_model_input(tmp_path, policy):
    path = save(tmp_path / "large.jpg", _photo_like(1200, 900), quality=90)
    drafted = load_rgb(path, min_size=128)
    assert drafted.size == (300, 225)  # the decoder's 1/4 scale: the smallest one still >= 128 px per side
    with_draft = load_for_model(path, 128, policy)
    without = to_array(resize_for_model(load_rgb(path), 128, policy))
    assert with_draft.shape == without.shape == (3, 128, 128)
    assert np.abs(with_draft - without).mean() < 0.01  # of a [0, 1] range


def test_draft_is_not_used_below_twice_the_input_size(tmp_path):
    path = save(tmp_path / "small.jpg", _photo_like(250, 250), quality=90)
    assert load_rgb(path, min_size=128).size == (250, 250)
    assert np.array_equal(load_for_model(path, 128, "crop"), to_array(resize_for_model(load_rgb(path), 128, "crop")))
