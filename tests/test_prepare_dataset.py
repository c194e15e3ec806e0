"""prepare_dataset.py on a zoo of bad, odd and hostile inputs (real runs of the script).

Broken files are left out and listed in hierarchy.json "skipped" with a reason; odd-but-valid images
are kept; the run goes on; the input tree is never modified; output folders that are not ours are
refused; the split is one, deterministic, and shared by every node dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, draw_image

PREPARE = str(REPO / "prepare_dataset.py")


def prepare(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, PREPARE, *map(str, args)], capture_output=True, text=True, cwd="/")
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_error_line(proc, code=2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def tree_state(root: Path) -> dict:
    """Everything about a tree that a run could change: content, modes, link targets, names."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                state[p] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    state[p] = ("file", st.st_mode, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
            else:
                state[p] = ("other", st.st_mode, st.st_mtime_ns)
    return state


def img(path: Path, seed=0) -> Path:
    return draw_image(path, ("ellipse", "rectangle", "cross")[seed % 3], seed, size=32)


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def build_zoo(root: Path, outside: Path) -> dict:
    """A dataset tree holding every kind of odd and broken input; returns what to expect."""
    shirt, tee = root / "tops" / "shirt", root / "tops" / "tee"
    for i in range(5):
        img(shirt / f"img_{i}.jpg", i)
        img(tee / f"img_{i}.jpg", i + 10)  # same names in two classes
    # odd but valid: all kept
    odd = {
        "cmyk.jpg": Image.new("CMYK", (20, 20), (0, 200, 0, 0)),
        "rgba.png": Image.new("RGBA", (20, 20), (255, 0, 0, 0)),
        "la.png": Image.new("LA", (20, 20), (50, 128)),
        "sixteen.png": Image.fromarray(np.full((20, 20), 40000, np.uint16)),
        "gray.jpg": Image.new("L", (20, 20), 100),
        "one.png": Image.new("RGB", (1, 1)),
        "wide.png": Image.new("RGB", (4000, 3)),
        "UPPER.JPG": Image.new("RGB", (20, 20), (1, 2, 3)),
        "Mixed.PnG": Image.new("RGB", (20, 20), (4, 5, 6)),
        "café crème.jpg": Image.new("RGB", (20, 20)),
        "a b.c.d.jpg": Image.new("RGB", (20, 20)),
    }
    for name, im in odd.items():
        fmt = {"UPPER.JPG": "JPEG", "Mixed.PnG": "PNG"}.get(name)
        save(shirt / name, im, **({"format": fmt} if fmt else {}))
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    save(shirt / "palette.png", pal, transparency=0)
    rot = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = rot.getexif()
    exif[0x0112] = 6
    save(shirt / "rotated.jpg", rot, exif=exif)
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "green")]
    frames[0].save(shirt / "anim.gif", save_all=True, append_images=frames[1:])
    kept = [f"tops/shirt/{n}" for n in list(odd) + ["palette.png", "rotated.jpg", "anim.gif"]]
    # symlinks
    os.symlink(img(outside / "elsewhere.jpg", 3), tee / "link_to_outside.jpg")
    os.symlink("img_1.jpg", tee / "link_relative.jpg")
    os.symlink("../shirt/img_2.jpg", tee / "link_to_sibling.jpg")
    kept += ["tops/tee/link_to_outside.jpg", "tops/tee/link_relative.jpg", "tops/tee/link_to_sibling.jpg"]
    os.symlink(root / "nowhere.jpg", tee / "broken_link.jpg")
    os.symlink("loop.jpg", tee / "loop.jpg")
    (root / "bags").mkdir()
    os.symlink(shirt, root / "bags" / "linked_folder", target_is_directory=True)
    os.symlink("..", tee / "up")
    # broken files
    good = (tee / "img_0.jpg").read_bytes()
    (tee / "zero.jpg").write_bytes(b"")
    (tee / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tee / "random.png").write_bytes(np.random.default_rng(0).bytes(3000))
    (tee / "text.jpeg").write_text("<html>not an image</html>")
    os.mkfifo(tee / "pipe.jpg")
    with open(os.fsencode(tee) + b"/latin1_\xe9t\xe9.jpg", "wb") as fh:
        fh.write(good)
    # ignored entirely (hidden, non-image extension)
    (tee / ".hidden.jpg").write_bytes(good)
    (tee / "notes.txt").write_text("x")
    img(root / ".git" / "x.jpg")
    # structure problems
    img(root / "tops" / "stray.jpg")
    (root / "tops" / "empty").mkdir()
    img(root / "bags" / "tote" / "t0.jpg", 1)
    img(root / "bags" / "tote" / "t1.jpg", 2)
    img(root / "bags" / "clutch" / "c0.jpg", 3)
    for i in range(3):
        img(root / "中文 类别" / "上衣" / f"图 {i}.jpg", i)
        img(root / "中文 类别" / "裤子" / f"图 {i}.jpg", i + 5)
    for i in range(4):
        img(root / "shoes" / f"s{i}.webp", i)
    skipped = {
        "tops/tee/zero.jpg": "not an image",
        "tops/tee/truncated.jpg": "truncated",
        "tops/tee/random.png": "not an image",
        "tops/tee/text.jpeg": "not an image",
        "tops/tee/pipe.jpg": "not a regular file",
        "tops/tee/broken_link.jpg": "broken symlink",
        "tops/tee/loop.jpg": "symbolic links",
        "tops/tee/up": "symlinked folder, not followed",
        "tops/tee/latin1_\\xe9t\\xe9.jpg": "not valid UTF-8",
        "bags/linked_folder": "symlinked folder, not followed",
    }
    img(root / "stray_root.jpg")
    skipped["stray_root.jpg"] = "directly in the dataset root"
    # an image lying directly in a parent folder is a partial label of that folder: it stays
    return {"kept": kept, "skipped": skipped, "partial": {"tops/stray.jpg": "tops"}}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("zoo")
    root, out = base / "data", base / "out"
    expect = build_zoo(root, base / "outside")
    before = tree_state(root)
    proc = prepare("-p", root, "-o", out, "--seed", 7)
    doc = json.loads((out / "hierarchy.json").read_text(encoding="utf-8"))
    return {"base": base, "root": root, "out": out, "proc": proc, "doc": doc, "before": before, **expect}


def test_zoo_run_goes_on_and_reports(zoo):
    assert zoo["proc"].returncode == 0
    first = zoo["proc"].stdout.splitlines()[0]
    assert f"{len(zoo['skipped'])} skipped" in first and "depth 2" in first and "1 partial" in first


def test_zoo_partial_label_trains_only_the_nodes_above_it(zoo):
    doc, out = zoo["doc"], zoo["out"]
    (entry,) = doc["partial_images"]
    assert entry["path"] == "tops/stray.jpg" and entry["node"] == "tops" and "leaf" not in entry
    assert len(entry["sha256"]) == 64 and entry["sha256"] == hashlib.sha256((zoo["root"] / entry["path"]).read_bytes()).hexdigest()
    assert doc["partial"] == {"tops": {s: int(s == entry["split"]) for s in ("train", "val", "test")}}
    holding = sorted(str(p.relative_to(out)) for p in out.rglob(entry["file"]))
    assert holding == [f"parent/{entry['split']}/tops/{entry['file']}"]  # not in tops/ (no child is right), not in flat/
    assert doc["datasets"]["parent"]["counts"][entry["split"]]["tops"] == 1 + sum(
        1 for im in doc["images"] if im["leaf"].startswith("tops/") and im["split"] == entry["split"])


def test_zoo_broken_inputs_are_listed_with_reasons(zoo):
    skipped = {s["path"]: s["reason"] for s in zoo["doc"]["skipped"]}
    assert set(skipped) == set(zoo["skipped"])
    for path, reason in zoo["skipped"].items():
        assert reason in skipped[path], (path, skipped[path])
        assert f"skipped {path}: " in zoo["proc"].stderr
    images = {im["path"] for im in zoo["doc"]["images"]}
    assert not images & set(skipped)


def test_zoo_odd_images_kept_and_hidden_ignored(zoo):
    images = {im["path"] for im in zoo["doc"]["images"]}
    assert set(zoo["kept"]) <= images
    assert not any("hidden" in p or "notes" in p or ".git" in p for p in images)
    assert {f"tops/shirt/img_{i}.jpg" for i in range(5)} | {f"tops/tee/img_{i}.jpg" for i in range(5)} <= images


def test_zoo_tree_structure_and_warnings(zoo):
    doc = zoo["doc"]
    leaves = doc["flat"]["class_nodes"]
    assert leaves == sorted(["bags/clutch", "bags/tote", "shoes", "tops/shirt", "tops/tee", "中文 类别/上衣", "中文 类别/裤子"])
    assert set(doc["datasets"]) == {"parent", "bags", "tops", "_"}  # '中文 类别' → '_'
    assert doc["datasets"]["_"]["classes"] == ["上衣", "裤子"]
    warnings = "\n".join(doc["warnings"])
    assert "'tops/empty' has no usable images" in warnings
    assert "'bags/clutch' has only 1 image" in warnings and "'bags/tote' has only 2 image" in warnings
    tiny = {im["path"]: im["split"] for im in doc["images"] if im["leaf"] in ("bags/clutch", "bags/tote")}
    assert len(tiny) == 3 and set(tiny.values()) == {"train"}
    assert (zoo["out"] / "_" / "train" / "上衣").is_dir()


def test_zoo_same_name_in_two_classes_both_kept(zoo):
    files = {im["path"]: im["file"] for im in zoo["doc"]["images"]}
    assert files["tops/shirt/img_0.jpg"] != files["tops/tee/img_0.jpg"]
    assert len(set(files.values())) == len(files)


def test_zoo_input_tree_never_modified(zoo):
    assert tree_state(zoo["root"]) == zoo["before"]


def test_zoo_stored_files_are_the_source_images(zoo):
    out, root = zoo["out"], zoo["root"]
    for im in zoo["doc"]["images"]:
        stored = out / "flat" / im["split"] / next(
            c for c, n in zip(zoo["doc"]["flat"]["classes"], zoo["doc"]["flat"]["class_nodes"]) if n == im["leaf"]
        ) / im["file"]
        assert stored.read_bytes() == (root / im["path"]).read_bytes()
        assert not stored.is_symlink()  # regression: relative symlinks were carried over, dangling


def test_zoo_one_split_shared_by_every_node_dataset(zoo):
    """No test image of any node is in any node's train folder (checked by file name)."""
    out = zoo["out"]
    where: dict[str, set] = {}
    for ds in list(zoo["doc"]["datasets"]) + ["flat"]:
        for split in ("train", "val", "test"):
            for f in (out / ds / split).rglob("*"):
                if f.is_file():
                    where.setdefault(f.name, set()).add(split)
    assert all(len(splits) == 1 for splits in where.values()), {k: v for k, v in where.items() if len(v) > 1}
    by_file = {im["file"]: im["split"] for im in zoo["doc"]["images"] + zoo["doc"]["partial_images"]}
    assert {name: splits.pop() for name, splits in where.items()} == by_file


def test_deterministic_and_seeded(zoo):
    again = zoo["base"] / "again"
    prepare("-p", zoo["root"], "-o", again, "--seed", 7, "-q")
    doc = json.loads((again / "hierarchy.json").read_text(encoding="utf-8"))
    assert doc["images"] == zoo["doc"]["images"] and doc["fingerprint"] == zoo["doc"]["fingerprint"]
    other = zoo["base"] / "other_seed"
    prepare("-p", zoo["root"], "-o", other, "--seed", 8, "-q")
    doc8 = json.loads((other / "hierarchy.json").read_text(encoding="utf-8"))
    assert [i["split"] for i in doc8["images"]] != [i["split"] for i in zoo["doc"]["images"]]
    assert [i["path"] for i in doc8["images"]] == [i["path"] for i in zoo["doc"]["images"]]


# ------------------------------------------------------------------------------ output folder rules
def simple_tree(root: Path, layout: dict[str, int]) -> Path:
    for leaf, n in layout.items():
        for i in range(n):
            img(root / leaf / f"{i}.jpg", i)
    return root


def test_refuses_output_inside_input(tmp_path):
    root = simple_tree(tmp_path / "data", {"a/x": 3, "a/y": 3})
    before = tree_state(root)
    for out in (root / "split", root / "a" / "x" / "out", root):
        line = one_error_line(prepare("-p", root, "-o", out, check=False))
        assert "inside the input folder" in line
    assert tree_state(root) == before


def test_refuses_input_inside_output(tmp_path):
    root = simple_tree(tmp_path / "work" / "data", {"a": 3, "b": 3})
    line = one_error_line(prepare("-p", root, "-o", tmp_path / "work", check=False))
    assert "is inside the output folder" in line
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["data"]


@pytest.mark.parametrize("foreign", ["notes", "trained_models"])
def test_refuses_non_empty_foreign_folder(tmp_path, foreign):
    root = simple_tree(tmp_path / "data", {"a": 3, "b": 3})
    out = tmp_path / "out"
    out.mkdir()
    if foreign == "notes":
        (out / "thesis.docx").write_text("precious")
    else:  # a trained_models/ folder also has a hierarchy.json: it is not ours to replace
        (out / "hierarchy.json").write_text(json.dumps({"version": 1, "tree": {}, "fingerprint": "f"}))
        (out / "parent").mkdir()
        (out / "parent" / "model.pth").write_bytes(b"weights")
    before = tree_state(out)
    line = one_error_line(prepare("-p", root, "-o", out, check=False))
    assert "not written by prepare_dataset.py" in line and "-o" in line
    assert tree_state(out) == before


def test_rerun_replaces_own_output_and_keeps_readme(tmp_path):
    out = tmp_path / "split"
    out.mkdir()
    (out / "README.md").write_text("# split_datasets\nshipped with the repo\n")
    (out / ".gitkeep").write_text("")
    first = simple_tree(tmp_path / "one", {"tops/a": 3, "tops/b": 3, "bags/c": 3, "bags/d": 3})
    prepare("-p", first, "-o", out, "-q")
    assert {p.name for p in out.iterdir()} == {"README.md", ".gitkeep", "hierarchy.json", "parent", "tops", "bags", "flat"}
    second = simple_tree(tmp_path / "two", {"shoes/e": 3, "shoes/f": 3, "hats": 3})
    prepare("-p", second, "-o", out, "-q")
    assert {p.name for p in out.iterdir()} == {"README.md", ".gitkeep", "hierarchy.json", "parent", "shoes", "flat"}
    assert (out / "README.md").read_text() == "# split_datasets\nshipped with the repo\n"
    doc = json.loads((out / "hierarchy.json").read_text())
    assert doc["flat"]["class_nodes"] == ["hats", "shoes/e", "shoes/f"]
    assert sorted(p.name for p in (out / "flat" / "train").iterdir()) == ["hats", "shoes__e", "shoes__f"]
    # same input again: identical result, nothing left over from staging
    prepare("-p", second, "-o", out, "-q")
    assert json.loads((out / "hierarchy.json").read_text())["images"] == doc["images"]
    assert not [p for p in out.iterdir() if p.name.startswith((".staging", ".trash"))]


def test_output_parent_is_a_file(tmp_path):
    root = simple_tree(tmp_path / "data", {"a": 3, "b": 3})
    (tmp_path / "file").write_text("x")
    line = one_error_line(prepare("-p", root, "-o", tmp_path / "file" / "out", check=False))
    assert "file" in line and "-o" in line


def test_output_is_a_file(tmp_path):
    root = simple_tree(tmp_path / "data", {"a": 3, "b": 3})
    (tmp_path / "out").write_text("x")
    assert "not a folder" in one_error_line(prepare("-p", root, "-o", tmp_path / "out", check=False))
    assert (tmp_path / "out").read_text() == "x"


def test_unwritable_output(open_tmp):
    """Run as an ordinary user (``nobody`` when the tests run as root): a read-only folder must block it."""
    from conftest import run_unprivileged

    root = simple_tree(open_tmp / "data", {"a": 3, "b": 3})
    locked = open_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = run_unprivileged([sys.executable, PREPARE, "-p", root, "-o", locked / "out"], cwd="/",
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Permission denied" in one_error_line(proc)
    assert not (locked / "out").exists()


def test_concurrent_run_refused_by_lock(tmp_path):
    from hiernet.safeio import exclusive_lock

    root = simple_tree(tmp_path / "data", {"a": 3, "b": 3})
    out = tmp_path / "split"
    with exclusive_lock(tmp_path / ".split.lock", "another prepare_dataset.py"):
        line = one_error_line(prepare("-p", root, "-o", out, check=False))
    assert "already running" in line and "lock" in line
    assert not out.exists()


@pytest.mark.parametrize("path", ["missing", "file"])
def test_missing_or_file_input(tmp_path, path):
    p = tmp_path / "nope"
    if path == "file":
        p.write_text("x")
    line = one_error_line(prepare("-p", p, "-o", tmp_path / "out", check=False))
    assert ("does not exist" if path == "missing" else "is a file") in line and "-p" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout,match", [({}, "no class folders"), ({"a": 0, "b": 0}, "no usable images")])
def test_empty_trees(tmp_path, layout, match):
    root = tmp_path / "data"
    root.mkdir()
    for leaf in layout:
        (root / leaf).mkdir()
    (root / "a.txt").write_text("x")
    assert match in one_error_line(prepare("-p", root, "-o", tmp_path / "out", check=False))


@pytest.mark.parametrize("ratio", [["0.5", "0.5", "0.5"], ["1", "0", "-0"], ["0", "0.5", "0.5"]])
def test_bad_ratio(tmp_path, ratio):
    root = simple_tree(tmp_path / "data", {"a": 3, "b": 3})
    proc = prepare("-p", root, "-o", tmp_path / "out", "--ratio", *ratio, check=False)
    if ratio == ["1", "0", "-0"]:  # -0 is 0: a valid all-train split
        assert proc.returncode == 0
    else:
        assert "--ratio" in one_error_line(proc)


def test_decompression_bomb_refused_in_a_real_run(tmp_path, monkeypatch, capsys):
    """In-process run of the script's main() with a small pixel limit: the big image is skipped."""
    import importlib.util

    root = simple_tree(tmp_path / "data", {"a": 3, "b": 3})
    save(root / "a" / "bomb.png", Image.new("RGB", (200, 200)))
    spec = importlib.util.spec_from_file_location("prepare_dataset_mod", PREPARE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 * 2)
    assert mod.main(mod.get_args_parser().parse_args(["-p", str(root), "-o", str(tmp_path / "out"), "-q"])) == 0
    doc = json.loads((tmp_path / "out" / "hierarchy.json").read_text())
    assert "decompression bomb" in {s["path"]: s["reason"] for s in doc["skipped"]}["a/bomb.png"]
    assert "a/bomb.png" not in {im["path"] for im in doc["images"]}


# ------------------------------------------------------------------------------ stable split (CLI)
def test_adding_ten_percent_moves_no_image(tmp_path):
    """Re-preparing a grown tree into the same -o: no existing image changes split; leaf ratios hold."""
    from conftest import TWO_LEVEL, make_tree

    root, out = make_tree(tmp_path / "data", TWO_LEVEL, per_leaf=30, size=24), tmp_path / "out"
    prepare("-p", root, "-o", out, "-q")
    before = json.loads((out / "hierarchy.json").read_text())
    old = {im["sha256"]: im["split"] for im in before["images"]}
    for k, leaf in enumerate(("round/circle", "round/plus", "angular/box", "angular/tri")):
        for i in range(3):  # +10 %
            img(root / leaf / f"new_{i}.jpg", 5000 + 10 * k + i)
    prepare("-p", root, "-o", out, "-q")
    after = json.loads((out / "hierarchy.json").read_text())
    new = {im["sha256"]: im["split"] for im in after["images"]}
    assert len(new) == len(old) + 12
    assert {h: new[h] for h in old} == old
    # per leaf (33 images): each split within 3 binomial sigmas of its share, at least one val and test
    for leaf in after["flat"]["class_nodes"]:
        got = Counter(im["split"] for im in after["images"] if im["leaf"] == leaf)
        assert got["val"] >= 1 and got["test"] >= 1
        for s, r in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
            assert abs(got[s] - r * 33) <= 3 * (33 * r * (1 - r)) ** 0.5 + 1, (leaf, got)
    # the split follows the bytes: a fresh -o gives the same split to every image but the few guaranteed slots
    prepare("-p", root, "-o", tmp_path / "fresh", "-q")
    fresh = {im["sha256"]: im["split"] for im in json.loads((tmp_path / "fresh" / "hierarchy.json").read_text())["images"]}
    assert sum(fresh[h] != new[h] for h in new) <= 3 * 4


# ------------------------------------------------------------------------------ catalogue CSV (CLI)
from test_downloads import GOOD, Handler, server  # noqa: E402,F401  (the loopback HTTP server fixture)


def write_catalogue(path: Path, header: list[str], rows: list[list[str]], encoding="utf-8") -> Path:
    import csv

    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def catalogue(tmp_path, server):
    """A CSV with local images (relative and absolute), URLs (good and failing), a partial label, bad rows."""
    Handler.hits.clear()
    imgs = tmp_path / "shop" / "images"
    rows = []
    for k, (master, sub, article) in enumerate([("Apparel", "Topwear", "Tshirts"), ("Apparel", "Topwear", "Shirts"),
                                                ("Apparel", "Bottom wear", "Jeans"), ("Foot wear", "Shoes", "Sneakers")]):
        for i in range(4):
            img(imgs / f"{k}_{i}.jpg", 10 * k + i)
            rows.append([f"p{k}{i}", master, sub, article, f"images/{k}_{i}.jpg", f"item, \"{k}\"\nline two"])
    rows.append(["u1", "Foot wear", "Shoes", "Sneakers", f"{server}/good.jpg", "from the web"])
    rows.append(["u2", "Foot wear", "Shoes", "Sneakers", f"{server}/missing", "404"])
    rows.append(["u3", "Foot wear", "Shoes", "Sneakers", f"{server}/page.html", "html"])
    img(imgs / "partial.jpg", 99)
    rows.append(["x1", "Apparel", "Topwear", "", str(imgs / "partial.jpg"), "partial label"])
    rows.append(["p00", "Apparel", "Topwear", "Tshirts", "images/0_1.jpg", "duplicate id"])
    rows.append(["x2", "Apparel", "", "", "images/nope.jpg", "missing file"])
    csv_path = write_catalogue(tmp_path / "shop" / "styles.csv", ["id", "master", "sub", "article", "image", "title"], rows)
    return {"csv": csv_path, "server": server, "dl": tmp_path / "dl"}


def csv_args(cat, out, *extra):
    return ("--csv", cat["csv"], "--image-column", "image", "--label-columns", "master,sub,article", "--id-column", "id",
            "-o", out, "--download-dir", cat["dl"], "--download-timeout", "2", "--download-retries", "0", *extra)


def test_csv_end_to_end(tmp_path, catalogue):
    out = tmp_path / "out"
    proc = prepare(*csv_args(catalogue, out))
    doc = json.loads((out / "hierarchy.json").read_text())
    first = proc.stdout.splitlines()[0]
    assert first.startswith("17 images, 4 classes, depth 3") and "1 partial; 4 skipped" in first, first
    skipped = {s["line"]: s["reason"] for s in doc["skipped"]}
    # header line 1; each local row takes 2 lines (a quoted newline): URLs start on line 34
    assert "HTTP 404" in skipped[35] and "not an image" in skipped[36]
    assert "duplicate id 'p00'" in skipped[38] and "not found" in skipped[39]
    assert all(f"skipped line {n}: " in proc.stderr for n in skipped)
    # the same layout as from a tree: parent/, one folder per classifier node, flat/
    assert set(doc["datasets"]) == {"parent", "Apparel", "Apparel__Topwear"}
    assert doc["datasets"]["Apparel"]["classes"] == ["Bottom_wear", "Topwear"]
    assert doc["display"] == {"Apparel/Bottom_wear": "Bottom wear", "Foot_wear": "Foot wear"}
    for ds in ["parent", "Apparel", "Apparel__Topwear", "flat"]:
        assert {p.name for p in (out / ds).iterdir()} == {"train", "val", "test"}
    web = next(im for im in doc["images"] if im["id"] == "u1")
    assert web["url"].endswith("/good.jpg") and web["leaf"] == "Foot_wear/Shoes/Sneakers"
    assert web["sha256"] == hashlib.sha256(GOOD).hexdigest() and web["label"] == ["Foot wear", "Shoes", "Sneakers"]
    (part,) = doc["partial_images"]
    assert part["node"] == "Apparel/Topwear" and part["id"] == "x1" and part["line"] == 37
    assert sorted(str(p.relative_to(out)) for p in out.rglob(part["file"])) == [
        f"Apparel/{part['split']}/Topwear/{part['file']}", f"parent/{part['split']}/Apparel/{part['file']}"]
    assert doc["partial"]["Apparel/Topwear"][part["split"]] == 1
    # a second run reads the download cache: nothing is fetched again
    hits = dict(Handler.hits)
    prepare(*csv_args(catalogue, out))
    assert Handler.hits["/good.jpg"] == hits["/good.jpg"] == 1
    again = json.loads((out / "hierarchy.json").read_text())
    assert [im["split"] for im in again["images"]] == [im["split"] for im in doc["images"]]


def test_csv_errors_are_one_line_and_keep_earlier_output(tmp_path, catalogue):
    out = tmp_path / "out"
    prepare(*csv_args(catalogue, out))
    before = tree_state(out)
    proc = prepare("--csv", catalogue["csv"], "--image-column", "image", "--label-columns", "master,articleType",
                   "-o", out, check=False)
    line = one_error_line(proc)
    assert "no column 'articleType'" in line and "its columns are: id, master, sub, article, image, title" in line
    latin = write_catalogue(tmp_path / "latin.csv", ["image", "cat"], [["a.jpg", "Caf\u00e9"]], encoding="latin-1")
    line = one_error_line(prepare("--csv", latin, "--image-column", "image", "--label-column", "cat", "-o", out, check=False))
    assert "line 2" in line and "--encoding latin-1" in line
    for bad in (("--label-columns", "a,b", "--label-column", "c"), ("--label-columns", "a,,b"), ()):
        line = one_error_line(prepare("--csv", catalogue["csv"], "--image-column", "image", *bad, "-o", out, check=False))
        assert "--label-column" in line
    line = one_error_line(prepare("--csv", tmp_path / "nope.csv", "--image-column", "i", "--label-column", "c",
                                  "-o", out, check=False))
    assert line.endswith("not found (or not a file); pass --csv FILE")
    everything_bad = write_catalogue(tmp_path / "bad.csv", ["image", "cat"], [["nope.jpg", "a"], ["", "b"]])
    line = one_error_line(prepare("--csv", everything_bad, "--image-column", "image", "--label-column", "cat", "-o", out,
                                  check=False))
    assert "no usable images" in line
    assert tree_state(out) == before  # the earlier prepared datasets are intact


def test_csv_and_tree_are_exclusive(tmp_path, catalogue):
    proc = prepare("--csv", catalogue["csv"], "-p", tmp_path, check=False)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_csv_split_column_used_as_is(tmp_path):
    rows = []
    for i in range(6):
        img(tmp_path / f"{i}.jpg", i)
        rows.append([f"{i}.jpg", "Apparel > Tops" if i % 2 else "Apparel > Jeans", ["train", "Val", "TEST"][i % 3]])
    csv_path = write_catalogue(tmp_path / "c.csv", ["image", "category", "split"], rows)
    prepare("--csv", csv_path, "--image-column", "image", "--label-column", "category", "--split-column", "split",
            "-o", tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "hierarchy.json").read_text())
    assert {Path(im["path"]).name: im["split"] for im in doc["images"]} == {
        f"{i}.jpg": ["train", "val", "test"][i % 3] for i in range(6)}


def test_zoo_partial_label_is_a_set_target_of_the_leaves_below_its_node(zoo):
    """A fine-label node with a partial label below it still trains on its leaves; the partial image's
    target is the set of leaves below its node (training.leaf_targets)."""
    from hiernet.hierarchy import Hierarchy
    from hiernet.training import fine_label_targets, leaf_targets

    doc = zoo["doc"]
    hier = Hierarchy.from_dict(doc["tree"])
    leaves, _ = fine_label_targets(hier, doc, "", hier.nodes[""].children)
    (entry,) = doc["partial_images"]
    split = {entry["split"]: [(Path(entry["file"]), 0)]}
    targets, sets = leaf_targets(hier, doc, leaves, split)
    assert targets[entry["split"]].tolist() == [-1]
    assert sets == [[1.0 if leaf.startswith("tops/") else 0.0 for leaf in leaves]] and 0 < sum(sets[0]) < len(leaves)
