"""hiernet.hierarchy: scanning odd folder trees, and the tree's own validation.

Bad trees never crash the scan: broken things are left out with a reason (``skipped``) or a warning,
and only a tree with nothing usable at all is refused (HierarchyError, one line).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import draw_image
from hiernet.hierarchy import (
    RESERVED_DATASETS,
    ROOT_DATASET,
    Hierarchy,
    HierarchyError,
    load_hierarchy_json,
    is_safe_folder_name,
    safe_name,
    partition_labels,
    scan_tree,
)
from hiernet.images import check_image


def img(path: Path, seed: int = 0) -> Path:
    return draw_image(path, "ellipse", seed, size=24)


def leaves_tree(root: Path, leaves: dict[str, int]) -> Path:
    for leaf, n in leaves.items():
        (root / leaf).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img(root / leaf / f"img_{i}.jpg", i)
    return root


# ------------------------------------------------------------------------------ whole-tree refusals
def test_missing_path(tmp_path):
    with pytest.raises(HierarchyError, match="does not exist"):
        scan_tree(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(HierarchyError, match="is a file, not a dataset folder"):
        scan_tree(f)


def test_empty_tree(tmp_path):
    with pytest.raises(HierarchyError, match="no class folders"):
        scan_tree(tmp_path)


def test_images_only_at_root(tmp_path):
    img(tmp_path / "a.jpg")
    with pytest.raises(HierarchyError, match="no class folders"):
        scan_tree(tmp_path)


def test_only_empty_or_broken_classes(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bad.jpg").write_bytes(b"")
    with pytest.raises(HierarchyError, match="no usable images"):
        scan_tree(tmp_path, check=check_image)


# ------------------------------------------------------------------------------ left out, with a reason
def test_empty_leaf_and_empty_parent_are_dropped_with_warnings(tmp_path):
    leaves_tree(tmp_path, {"tops/shirt": 3, "tops/tee": 3, "tops/empty": 0, "bags/none": 0, "shoes": 2})
    scan = scan_tree(tmp_path)
    assert set(scan.files) == {"tops/shirt", "tops/tee", "shoes"}
    assert "bags" not in scan.hierarchy.nodes and "tops/empty" not in scan.hierarchy.nodes
    assert any("'tops/empty' has no usable images" in w for w in scan.warnings)
    assert any("'bags/none' has no usable images" in w for w in scan.warnings)
    assert any("folder 'bags' has no usable classes" in w for w in scan.warnings)
    assert scan.hierarchy.nodes[""].children == ["shoes", "tops"]


def test_tiny_leaves_are_kept(tmp_path):
    leaves_tree(tmp_path, {"a/one": 1, "a/two": 2, "b": 4})
    scan = scan_tree(tmp_path)
    assert {k: len(v) for k, v in scan.files.items()} == {"a/one": 1, "a/two": 2, "b": 4}


def test_images_directly_in_parent_are_partial_labels(tmp_path):
    leaves_tree(tmp_path, {"tops/shirt": 2, "tops/tee": 2, "bags/tote": 1})
    img(tmp_path / "tops" / "stray.jpg")
    (tmp_path / "tops" / "broken.jpg").write_bytes(b"not an image")
    img(tmp_path / "bags" / "loose.jpg")  # bags has one child: still a partial label of 'bags'
    img(tmp_path / "stray_root.png")
    (tmp_path / "hats" / "empty").mkdir(parents=True)
    img(tmp_path / "hats" / "cap.jpg")  # its only sub-folder is empty: 'hats' is a leaf
    scan = scan_tree(tmp_path, check=check_image)
    skipped = dict(scan.skipped)
    assert "dataset root" in skipped["stray_root.png"] and "move it" in skipped["stray_root.png"]
    assert "not an image" in skipped["tops/broken.jpg"]
    assert scan.partial == {"tops": ["tops/stray.jpg"], "bags": ["bags/loose.jpg"]}
    assert scan.files["hats"] == ["hats/cap.jpg"] and scan.hierarchy.nodes["hats"].is_leaf
    assert all("stray" not in p for ps in scan.files.values() for p in ps)


def test_partition_labels():
    leaves, inner = partition_labels({"a": ["1"], "a/b": ["2"], "a/b/c": ["3"], "ab": ["4"], "d/e": ["5"]})
    assert leaves == {"a/b/c": ["3"], "ab": ["4"], "d/e": ["5"]}
    assert inner == {"a": ["1"], "a/b": ["2"]}


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    leaves_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\0")
    img(tmp_path / "a" / "._img_0.jpg")  # macOS resource fork companion
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "Thumbs.db").write_bytes(b"x")
    img(tmp_path / ".git" / "objects" / "x.jpg")
    img(tmp_path / "b" / ".cache" / "y.jpg")  # hidden folder inside a leaf: still a leaf
    scan = scan_tree(tmp_path)
    assert scan.files == {"a": ["a/img_0.jpg", "a/img_1.jpg"], "b": ["b/img_0.jpg", "b/img_1.jpg"]}
    assert scan.skipped == []


def test_broken_images_are_skipped_with_reasons_and_the_rest_kept(tmp_path):
    leaves_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "zero.jpg").write_bytes(b"")
    (tmp_path / "a" / "text.png").write_text("not an image")
    good = (tmp_path / "a" / "img_0.jpg").read_bytes()
    (tmp_path / "b" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "b" / "random.gif").write_bytes(os.urandom(500))
    scan = scan_tree(tmp_path, check=check_image)
    skipped = dict(scan.skipped)
    assert set(skipped) == {"a/zero.jpg", "a/text.png", "b/truncated.jpg", "b/random.gif"}
    assert "not an image" in skipped["a/zero.jpg"] and "truncated" in skipped["b/truncated.jpg"]
    assert scan.files["a"] == ["a/img_0.jpg", "a/img_1.jpg"] and len(scan.files["b"]) == 2


def test_odd_but_valid_images_are_kept(tmp_path):
    leaf = tmp_path / "odd" / "all"
    leaf.mkdir(parents=True)
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(leaf / "cmyk.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(leaf / "rgba.png")
    Image.new("LA", (20, 20)).save(leaf / "la.png")
    Image.new("I;16", (20, 20)).save(leaf / "sixteen.png")
    Image.new("L", (20, 20)).save(leaf / "gray.JPG", format="JPEG")
    Image.new("RGB", (1, 1)).save(leaf / "one.PnG", format="PNG")
    Image.new("RGB", (4000, 3)).save(leaf / "wide.png")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(leaf / "anim.gif", save_all=True, append_images=frames[1:])
    leaves_tree(tmp_path, {"odd/other": 1})
    scan = scan_tree(tmp_path, check=check_image)
    assert scan.skipped == []
    assert len(scan.files["odd/all"]) == 8


def test_decompression_bomb_is_skipped_with_reason(tmp_path, monkeypatch):
    leaves_tree(tmp_path, {"a": 2, "b": 2})
    Image.new("RGB", (300, 300)).save(tmp_path / "a" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 24 * 24 * 2)
    scan = scan_tree(tmp_path, check=check_image)
    assert "decompression bomb" in dict(scan.skipped)["a/bomb.png"]
    assert "a/bomb.png" not in scan.files["a"] and len(scan.files["a"]) == 2


def test_names_with_unicode_spaces_dots_and_case(tmp_path):
    leaves = {"Tops & Tees/T-shirt (V)": 2, "tops/t.shirt": 2, "ÜBER/naïve café": 2, "中文/类 别": 2, "a.b.c/.d": 0}
    leaves_tree(tmp_path, {k: v for k, v in leaves.items() if v})
    img(tmp_path / "tops" / "t.shirt" / "Photo 1.final.JPG")
    img(tmp_path / "tops" / "t.shirt" / "UPPER.PnG")
    scan = scan_tree(tmp_path, check=check_image)
    assert set(scan.files) == {k for k, v in leaves.items() if v}
    assert "tops/t.shirt/Photo 1.final.JPG" in scan.files["tops/t.shirt"]
    assert "tops/t.shirt/UPPER.PnG" in scan.files["tops/t.shirt"]
    h = scan.hierarchy
    assert h.nodes["中文/类 别"].name == "类 别"
    datasets = [h.nodes[n].dataset for n in h.classifier_nodes()]
    assert len(set(datasets)) == len(datasets) and all(is_safe_folder_name(d) for d in datasets)


def test_same_file_name_in_two_classes_both_kept(tmp_path):
    leaves_tree(tmp_path, {"a": 2, "b": 2})
    assert scan_tree(tmp_path).files == {"a": ["a/img_0.jpg", "a/img_1.jpg"], "b": ["b/img_0.jpg", "b/img_1.jpg"]}


def test_symlinks(tmp_path):
    root = leaves_tree(tmp_path / "root", {"a/x": 2, "a/y": 2, "b/z": 2})
    outside = img(tmp_path / "outside" / "elsewhere.jpg")
    os.symlink(outside, root / "a" / "x" / "link_out.jpg")  # file symlink: kept
    os.symlink("img_0.jpg", root / "a" / "y" / "link_rel.jpg")  # relative file symlink: kept
    os.symlink(root / "nowhere.jpg", root / "a" / "x" / "broken.jpg")
    os.symlink("loop.jpg", root / "a" / "x" / "loop.jpg")  # points at itself
    os.symlink("loop_b.jpg", root / "b" / "z" / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "b" / "z" / "loop_b.jpg")
    os.symlink(root / "b", root / "a" / "b_link")  # folder symlink: not followed
    os.symlink("..", root / "b" / "z_up")  # a cycle through a folder symlink
    os.symlink(tmp_path / "outside", root / "outside_class")
    scan = scan_tree(root, check=check_image)
    skipped = dict(scan.skipped)
    assert "a/x/link_out.jpg" in scan.files["a/x"] and "a/y/link_rel.jpg" in scan.files["a/y"]
    assert skipped["a/x/broken.jpg"] == "broken symlink"
    for loop in ("a/x/loop.jpg", "b/z/loop_a.jpg", "b/z/loop_b.jpg"):
        assert loop in skipped and ("symbolic links" in skipped[loop] or "symlink" in skipped[loop])
    for d in ("a/b_link", "b/z_up", "outside_class"):
        assert skipped[d] == "symlinked folder, not followed"
    assert set(scan.files) == {"a/x", "a/y", "b/z"}


def test_unreadable_file_and_folder(open_tmp):
    """Run as an ordinary user (``nobody`` when the tests run as root): chmod 000 must block it."""
    from conftest import python_unprivileged

    leaves_tree(open_tmp, {"a": 2, "b": 2, "c": 2})
    (open_tmp / "a" / "img_0.jpg").chmod(0)
    (open_tmp / "c").chmod(0)
    proc = python_unprivileged(
        "import json, sys; from pathlib import Path\n"
        "from hiernet.hierarchy import scan_tree; from hiernet.images import check_image\n"
        "s = scan_tree(Path(sys.argv[1]), check=check_image)\n"
        "print(json.dumps({'skipped': dict(s.skipped), 'files': sorted(s.files), 'warnings': s.warnings}))",
        open_tmp)
    assert proc.returncode == 0, proc.stderr
    scan = json.loads(proc.stdout)
    assert scan["skipped"]["a/img_0.jpg"] == "permission denied"
    assert scan["files"] == ["a", "b"] and any("cannot list folder c" in w for w in scan["warnings"])


def test_names_that_are_not_utf8_are_skipped_with_reason(tmp_path):
    leaves_tree(tmp_path, {"a": 2, "b": 2})
    good = (tmp_path / "a" / "img_0.jpg").read_bytes()
    root = os.fsencode(tmp_path)
    with open(root + b"/a/caf\xe9.jpg", "wb") as fh:
        fh.write(good)
    os.makedirs(root + b"/b\xff/x")
    with open(root + b"/b\xff/x/1.jpg", "wb") as fh:
        fh.write(good)
    scan = scan_tree(tmp_path, check=check_image)
    skipped = dict(scan.skipped)
    assert skipped["a/caf\\xe9.jpg"] == "name is not valid UTF-8; rename it"
    assert skipped["b\\xff"] == "name is not valid UTF-8; rename it"
    json.dumps(scan.skipped, ensure_ascii=False).encode("utf-8")  # reportable as is
    assert scan.files == {"a": ["a/img_0.jpg", "a/img_1.jpg"], "b": ["b/img_0.jpg", "b/img_1.jpg"]}


def test_special_files_with_image_names_are_skipped(tmp_path):
    leaves_tree(tmp_path, {"a": 2, "b": 2})
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    os.symlink("/dev/null", tmp_path / "b" / "null.png")
    scan = scan_tree(tmp_path, check=check_image)
    skipped = dict(scan.skipped)
    assert skipped["a/pipe.jpg"] == "not a regular file" and skipped["b/null.png"] == "not a regular file"


def test_one_child_parent_warns(tmp_path):
    leaves_tree(tmp_path, {"acc/hat": 2, "tops/a": 2, "tops/b": 2})
    scan = scan_tree(tmp_path)
    assert any("'acc' has one child ('hat')" in w for w in scan.warnings)
    assert "acc" not in scan.hierarchy.classifier_nodes()


# ------------------------------------------------------------------------------ the Hierarchy object
def test_reserved_and_colliding_dataset_names():
    leaves = ["parent/a", "parent/b", "flat/a", "flat/b", "hierarchy.json/a", "hierarchy.json/b", "README.md/a",
              "README.md/b", "bin/a", "bin/b", "onnx/x", "onnx/y", "a b/x", "a b/y", "a_b/x", "a_b/y", "é/1", "é/2",
              "è/1", "è/2", "..x/1", "..x/2"]
    h = Hierarchy.from_leaf_paths(leaves)
    datasets = {n: h.nodes[n].dataset for n in h.classifier_nodes()}
    assert datasets[""] == ROOT_DATASET
    others = [d for n, d in datasets.items() if n]
    assert len(set(others)) == len(others) == 11
    assert not set(others) & RESERVED_DATASETS
    assert all(is_safe_folder_name(d) and "/" not in d and not d.startswith(".") for d in others)
    assert datasets["a b"] == "a_b" and datasets["a_b"] == "a_b-2"


def test_unicode_and_underscore_parents_below_the_top_level():
    """Regression: '中文/衣服' or '_/0' as parents gave dataset names the tree's own check refused."""
    leaves = ["中文/衣服/上衣", "中文/衣服/裤子", "中文/鞋", "_/0/a", "_/0/b", "_/1", "x_/._y/z", "x_/._y/w", "x_/q"]
    h = Hierarchy.from_leaf_paths(leaves)
    check_hierarchy(h)
    assert h.nodes["中文/衣服"].dataset == "____" and h.nodes["_/0"].dataset == "___0"


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=400))
def test_hypothesis_short_safe_name_is_always_a_safe_folder(text):
    from hiernet.hierarchy import short_safe_name

    name = short_safe_name(text)
    assert is_safe_folder_name(name) and len(name) <= 100
    assert is_safe_folder_name(safe_name(text)) or len(safe_name(text)) > 255


def test_is_safe_folder_name():
    for ok in ("parent", "a_b", "_", "___0", "a.b", "x-2", "0"):
        assert is_safe_folder_name(ok)
    for bad in ("", ".", "..", ".hidden", "a/b", "../x", "a b", "é", "x" * 256, None, 3):
        assert not is_safe_folder_name(bad)


def test_long_names_give_short_unique_dataset_names():
    long = "x" * 200
    leaves = [f"{long}/{long}/{long}{i}/leaf{j}" for i in range(2) for j in range(2)] + [f"{long}/other/z"]
    h = Hierarchy.from_leaf_paths(leaves)
    names = [h.nodes[n].dataset for n in h.classifier_nodes()]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 100 and is_safe_folder_name(n) for n in names)
    assert Hierarchy.from_dict(h.to_dict()).fingerprint() == h.fingerprint()


def test_invalid_leaf_ids():
    for bad in (["a//b"], ["/a"], ["a/"], [""]):
        with pytest.raises(HierarchyError, match="invalid leaf id"):
            Hierarchy.from_leaf_paths(bad)
    with pytest.raises(HierarchyError, match="both a class"):
        Hierarchy.from_leaf_paths(["a", "a/b"])


def _tree():
    return Hierarchy.from_leaf_paths(["a/x", "a/y", "b"]).to_dict()


def _mutate(fn):
    d = _tree()
    fn({n["id"]: n for n in d["nodes"]}, d)
    return d


BAD_TREES = {
    "not a dict": ([1, 2], "malformed"),
    "no nodes": ({}, "malformed"),
    "nodes not a list": ({"nodes": {"": {}}}, "malformed"),
    "node not an object": ({"nodes": ["x"]}, "malformed"),
    "parent is a list": (_mutate(lambda n, d: n["b"].update(parent=[1])), "parent and dataset must be strings"),
    "parent list first": ({"nodes": [{"id": "a", "name": "a", "parent": [""], "children": [], "dataset": None},
                                     {"id": "", "name": "", "parent": None, "children": ["a"], "dataset": "parent"}]},
                          "malformed"),
    "children a string": (_mutate(lambda n, d: n["a"].update(children="a/x")), "malformed"),
    "id a number": (_mutate(lambda n, d: n["b"].update(id=5)), "malformed"),
    "duplicate id": (_mutate(lambda n, d: d["nodes"].append(dict(n["b"]))), "appears twice"),
    "no root": (_mutate(lambda n, d: d["nodes"].remove(n[""])), "no root"),
    "unknown parent": (_mutate(lambda n, d: n["b"].update(parent="zz")), "does not point back"),
    "id not path": (_mutate(lambda n, d: n["a/x"].update(name="q")), "parent's path"),
    "child twice": (_mutate(lambda n, d: n["a"]["children"].append("a/x")), "child twice"),
    "unreachable": (_mutate(lambda n, d: d["nodes"].append({"id": "z", "name": "z", "parent": "q", "children": [],
                                                            "dataset": None})), "unknown parent"),
    "unsafe dataset": (_mutate(lambda n, d: n["a"].update(dataset="../../etc")), "unsafe"),
    "reserved dataset": (_mutate(lambda n, d: n["a"].update(dataset="flat")), "reserved"),
    "dataset repeated": (_mutate(lambda n, d: n["a"].update(dataset="parent")), "repeated"),
    "internal without dataset": (_mutate(lambda n, d: n["a"].update(dataset=None)), "no dataset"),
    "no classes": ({"nodes": [{"id": "", "name": "", "parent": None, "children": [], "dataset": "parent"}]},
                   "no classes"),
}


@pytest.mark.parametrize("name", sorted(BAD_TREES))
def test_from_dict_refuses_bad_trees(name):
    data, match = BAD_TREES[name]
    assert match  # an empty pattern would match any message
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_dict(data)


def test_cycle_is_refused():
    d = _tree()
    nodes = {n["id"]: n for n in d["nodes"]}
    nodes["a/x"]["children"] = ["a"]  # a → a/x → a
    with pytest.raises(HierarchyError):
        Hierarchy.from_dict(d)


@pytest.mark.parametrize("text,match", [
    (None, "not found"), ("", "not readable JSON"), ("{{", "not readable JSON"), ("[" * 50000, "not readable JSON"),
    ("[]", "no 'tree'"), ('{"tree": 3}', "malformed"), ("\udcff", "not readable JSON"),
])
def test_load_hierarchy_json_bad_files(tmp_path, text, match):
    path = tmp_path / "hierarchy.json"
    if text == "\udcff":
        path.write_bytes(b"\xff\xfe{")
    elif text is not None:
        path.write_text(text)
    with pytest.raises(HierarchyError, match=match):
        load_hierarchy_json(path)


def test_load_hierarchy_json_is_a_folder(tmp_path):
    (tmp_path / "hierarchy.json").mkdir()
    with pytest.raises(HierarchyError, match="not readable"):
        load_hierarchy_json(tmp_path / "hierarchy.json")


# ------------------------------------------------------------------------------ property-based trees
NAME_CHARS = list("abcXY09 ._-()&+'é中ßñ")
names = st.text(alphabet=st.sampled_from(NAME_CHARS), min_size=1, max_size=6).filter(
    lambda n: not n.startswith(".")
)
IMAGE_NAMES = ["img 0.jpg", "IMG_1.JPG", "x.y.PnG", "photo.jpeg", "p.webp"]


def subtree(depth: int):
    leaf = st.builds(lambda n: ("leaf", n), st.integers(0, 5))
    if depth == 1:
        return leaf
    folder = st.builds(lambda kids, stray: ("dir", kids, stray),
                       st.dictionaries(names, subtree(depth - 1), min_size=1, max_size=3), st.integers(0, 1))
    return st.one_of(leaf, folder)


#: Random trees: ROOT with 1-3 top-level folders, depth 1-3, leaf sizes 0-5, some stray images.
trees = st.integers(1, 3).flatmap(lambda d: st.dictionaries(names, subtree(d), min_size=1, max_size=3))


def write_tree(root: Path, tree: dict) -> tuple[dict, list]:
    """Write ``tree`` (empty files); returns (expected leaf → sorted files, expected stray paths)."""
    expected, strays = {}, []

    def walk(node: dict, prefix: str) -> None:
        for name, spec in node.items():
            rel = f"{prefix}{name}"
            (root / rel).mkdir(parents=True)
            if spec[0] == "leaf":
                files = [f"{rel}/{IMAGE_NAMES[i]}" for i in range(spec[1])]
                for f in files:
                    (root / f).write_bytes(b"")
                (root / rel / "notes.txt").write_text("ignored")
                if files:
                    expected[rel] = sorted(files)
            else:
                for i in range(spec[2]):
                    (root / rel / f"stray{i}.jpg").write_bytes(b"")
                    strays.append(f"{rel}/stray{i}.jpg")
                walk(spec[1], rel + "/")

    walk(tree, "")
    return expected, strays


def check_hierarchy(h: Hierarchy) -> None:
    """Every structural invariant a valid tree must hold."""
    ids = list(h.nodes)
    assert len(ids) == len(set(ids)) and set(h.iter_ids()) == set(ids)
    for nid, n in h.nodes.items():
        if nid:
            assert nid == (f"{n.parent}/{n.name}" if n.parent else n.name)
            assert nid in h.nodes[n.parent].children
        assert n.children == sorted(n.children)
        assert (n.dataset is None) == n.is_leaf or nid == ""
    datasets = [h.nodes[n].dataset for n in h.internal_nodes()]
    assert len(set(datasets)) == len(datasets) and h.root.dataset == ROOT_DATASET
    for d in datasets:
        assert is_safe_folder_name(d) and 0 < len(d) <= 100 and "/" not in d and not d.startswith(".")
        assert d == ROOT_DATASET or d not in RESERVED_DATASETS
    assert all(len(h.nodes[n].children) >= 2 for n in h.classifier_nodes())
    again = Hierarchy.from_dict(json.loads(json.dumps(h.to_dict())))
    assert again.to_dict() == h.to_dict() and again.fingerprint() == h.fingerprint()
    for leaf in h.leaves():
        assert h.path(leaf)[-1] == leaf and h.subtree_leaves(leaf) == [leaf]
        assert all(h.child_towards(a, leaf) in h.nodes[a].children for a in [""] + h.path(leaf)[:-1])


@settings(max_examples=40, deadline=None)
@given(tree=trees)
def test_hypothesis_random_trees_scan_and_validate(tree):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        expected, strays = write_tree(root, tree)
        groups = {k: list(v) for k, v in expected.items()}
        for s in strays:  # an image in a folder with sub-folders: a partial label of that folder
            groups.setdefault(s.rsplit("/", 1)[0], []).append(s)
        leaves = {n: sorted(ps) for n, ps in groups.items() if not any(m.startswith(n + "/") for m in groups)}
        partial = {n: sorted(ps) for n, ps in groups.items() if n not in leaves}
        if not leaves:
            with pytest.raises(HierarchyError):
                scan_tree(root)
            return
        scan = scan_tree(root)
        assert scan.files == leaves and scan.partial == partial
        assert scan.hierarchy.leaves() == sorted(leaves)
        assert all(n in scan.hierarchy.nodes and not scan.hierarchy.nodes[n].is_leaf for n in partial)
        assert scan.skipped == []
        check_hierarchy(scan.hierarchy)
        shutil.rmtree(root)


def test_tree_distance_counts_edges_through_the_lowest_common_ancestor():
    #        c          i
    #     d     g
    #   e   f
    h = Hierarchy.from_leaf_paths(["c/d/e", "c/d/f", "c/g", "i"])
    assert h.tree_distance("c/d/e", "c/d/e") == 0
    assert h.tree_distance("c/d/e", "c/d/f") == 2  # siblings
    assert h.tree_distance("c/d/e", "c/d") == 1  # its parent
    assert h.tree_distance("c/d/e", "c/g") == 3  # up to c, down to g
    assert h.tree_distance("c/d/e", "i") == h.tree_distance("i", "c/d/e") == 4  # through the root
    assert h.tree_distance("c/d/e", "") == 3  # the root itself


def test_fine_label_matrix_maps_each_leaf_below_a_node_to_its_child():
    hier = Hierarchy.from_leaf_paths(["a/x/1", "a/x/2", "a/y", "b/z/3", "b/w"])
    leaves, matrix = hier.fine_label_matrix("a")
    assert leaves == ["a/x/1", "a/x/2", "a/y"]
    assert hier.nodes["a"].children == ["a/x", "a/y"]
    assert matrix == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    # another column order, and the root (whose children are all parents)
    assert hier.fine_label_matrix("a", ["a/y", "a/x"])[1] == [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    leaves, matrix = hier.fine_label_matrix("")
    assert leaves == ["a/x/1", "a/x/2", "a/y", "b/w", "b/z/3"]
    assert matrix == [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert all(sum(row) == 1.0 for row in matrix)
    # children that are all leaves: nothing finer to learn
    assert hier.fine_label_matrix("a/x") is None
