"""hiernet.splits: one stable, hash-based split per image, shared by every node dataset; safe output folders."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from unittest import mock
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hiernet.hierarchy import FLAT_DATASET, Hierarchy, is_safe_folder_name, scan_tree
from hiernet.safeio import UserError
from hiernet.splits import (
    MIN_SPLITTABLE,
    SPLITS,
    assign_splits,
    check_paths,
    materialize,
    owned_entries,
    unit_hash,
    stored_name,
)
from test_hierarchy import check_hierarchy, trees, write_tree

RATIOS = st.tuples(st.integers(1, 10), st.integers(0, 10), st.integers(0, 10)).map(
    lambda t: tuple(x / sum(t) for x in t)
)


# ------------------------------------------------------------------------------ assignment
def check_class(ps, assignment, ratios):
    got = Counter(assignment[p] for p in ps)
    if len(ps) < MIN_SPLITTABLE:
        assert got == {"train": len(ps)} or not ps
    else:
        assert got["train"] >= 1
        assert (got["val"] >= 1) == (ratios[1] > 0) and (got["test"] >= 1) == (ratios[2] > 0)


files_dicts = st.dictionaries(
    st.text("abcé/ _.", min_size=1, max_size=6),
    st.lists(st.text("xyz0123 .é", min_size=1, max_size=5), max_size=12, unique=True),
    min_size=1, max_size=6,
).map(lambda d: {leaf: [f"{leaf}/{f}.jpg" for f in fs] for leaf, fs in d.items()})


@settings(max_examples=100, deadline=None)
@given(files=files_dicts, ratios=RATIOS, seed=st.integers(0, 2**31))
def test_assign_splits_invariants(files, ratios, seed):
    assignment, warnings = assign_splits(files, ratios, seed)
    everything = [p for ps in files.values() for p in ps]
    assert sorted(assignment) == sorted(everything)  # every image once
    assert set(assignment.values()) <= set(SPLITS)
    for leaf, ps in files.items():
        check_class(ps, assignment, ratios)
        small = any(f"class '{leaf}' has only" in w for w in warnings)
        assert small == (len(ps) < MIN_SPLITTABLE)
    # deterministic, and independent of file order and of the other leaves
    shuffled = {leaf: list(reversed(ps)) for leaf, ps in files.items()}
    assert assign_splits(shuffled, ratios, seed)[0] == assignment
    leaf = sorted(files)[0]
    alone = assign_splits({leaf: files[leaf]}, ratios, seed)[0]
    assert alone == {p: assignment[p] for p in files[leaf]}


def test_seed_changes_the_split():
    files = {"a": [f"a/{i}.jpg" for i in range(50)]}
    assert assign_splits(files, seed=1)[0] != assign_splits(files, seed=2)[0]


def test_tiny_leaves_go_to_train_with_a_warning():
    assignment, warnings = assign_splits({"one": ["one/a.jpg"], "two": ["two/a.jpg", "two/b.jpg"],
                                          "big": [f"big/{i}.jpg" for i in range(10)]})
    assert {assignment[p] for p in ("one/a.jpg", "two/a.jpg", "two/b.jpg")} == {"train"}
    assert len(warnings) == 2 and all("all go to train" in w for w in warnings)
    check_class([f"big/{i}.jpg" for i in range(10)], assignment, (0.8, 0.1, 0.1))


def natural(u, ratios):
    return "train" if u < ratios[0] else ("val" if u < ratios[0] + ratios[1] else "test")


@settings(max_examples=60, deadline=None)
@given(files=files_dicts, ratios=RATIOS, seed=st.integers(0, 2**31))
def test_split_is_the_hash_rule_except_guaranteed_slots(files, ratios, seed):
    """Outside the few images moved to give a class its val/test image, the split is u's interval."""
    assignment, _ = assign_splits(files, ratios, seed, hashes={p: f"h{p}" for ps in files.values() for p in ps})
    for ps in files.values():
        if len(ps) < MIN_SPLITTABLE:
            continue
        moved = [p for p in ps if assignment[p] != natural(unit_hash(seed, f"h{p}"), ratios)]
        assert len(moved) <= 3  # at most one per split


def test_split_follows_content_not_path():
    a = assign_splits({"x": [f"x/{i}.jpg" for i in range(40)]}, seed=3, hashes={f"x/{i}.jpg": f"c{i}" for i in range(40)})[0]
    renamed = {f"y/renamed_{i}.jpg": f"c{i}" for i in range(40)}
    b = assign_splits({"other": sorted(renamed)}, seed=3, hashes=renamed)[0]
    assert [a[f"x/{i}.jpg"] for i in range(40)] == [b[f"y/renamed_{i}.jpg"] for i in range(40)]


def test_adding_images_moves_no_existing_image():
    """Re-splitting with the earlier split as ``previous``: old images stay; new ones keep the ratios."""
    ratios = (0.8, 0.1, 0.1)
    files = {f"c{k}": [f"c{k}/{i}.jpg" for i in range(n)] for k, n in enumerate([3, 4, 10, 40, 200])}
    hashes = {p: f"h-{p}" for ps in files.values() for p in ps}
    first, _ = assign_splits(files, ratios, 7, hashes)
    previous = {hashes[p]: s for p, s in first.items()}
    grown = {c: ps + [f"{c}/new{i}.jpg" for i in range(max(1, len(ps) // 10))] for c, ps in files.items()}
    hashes.update({p: f"h-{p}" for ps in grown.values() for p in ps})
    second, _ = assign_splits(grown, ratios, 7, hashes, previous)
    assert {p: second[p] for p in first} == first
    for ps in grown.values():
        check_class(ps, second, ratios)
    big = Counter(second[p] for p in grown["c4"])  # 220 images: within 3 binomial sigmas of the ratios
    for s, r in zip(SPLITS, ratios):
        assert abs(big[s] - r * 220) <= 3 * (220 * r * (1 - r)) ** 0.5 + 1, big


@pytest.mark.parametrize("ratios", [(0.5, 0.5), (0.8, 0.1, 0.2), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5, 0.0, 0.0)])
def test_bad_ratios_refused(ratios):
    with pytest.raises(UserError, match="--ratio"):
        assign_splits({"a": ["a/x.jpg"]}, ratios)


def test_stored_names_are_distinct_and_safe():
    rels = ["a/img.jpg", "b/img.jpg", "a/IMG.JPG", "中文/类 别/图 片.PnG", "a/.../x.y.z.jpeg", "a/" + "n" * 300 + ".png"]
    names = [stored_name(r) for r in rels]
    assert len(set(names)) == len(names)
    for n in names:
        assert is_safe_folder_name(n) and len(n) < 100 and n == n.strip()
        assert os.path.splitext(n)[1] in {".jpg", ".png", ".jpeg"}


# ------------------------------------------------------------------------------ output folder safety
def test_check_paths(tmp_path):
    src = tmp_path / "data"
    (src / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="inside the input folder"):
        check_paths(src, src / "a" / "out")
    with pytest.raises(UserError, match="inside the input folder"):
        check_paths(src, src)
    with pytest.raises(UserError, match="input folder .* is inside the output folder"):
        check_paths(src, tmp_path)
    os.symlink(src / "a", tmp_path / "sneaky")  # an output reached through a symlink into the input
    with pytest.raises(UserError, match="inside the input folder"):
        check_paths(src, tmp_path / "sneaky" / "out")
    check_paths(src, tmp_path / "out")  # a sibling is fine


def test_owned_entries(tmp_path):
    out = tmp_path / "out"
    assert owned_entries(out) == []
    out.mkdir()
    (out / "README.md").write_text("kept")
    (out / ".gitkeep").write_text("")
    assert owned_entries(out) == []  # only files we keep around: counts as empty
    (out / "thesis.docx").write_text("precious")
    with pytest.raises(UserError, match="not written by prepare_dataset.py"):
        owned_entries(out)
    (out / "hierarchy.json").write_text(json.dumps({"tree": {}, "fingerprint": "x"}))  # like trained_models/
    with pytest.raises(UserError, match="not written by prepare_dataset.py"):
        owned_entries(out)
    (out / "hierarchy.json").write_text("{garbage")
    with pytest.raises(UserError, match="unreadable"):
        owned_entries(out)
    (out / "hierarchy.json").write_text(json.dumps({"datasets": {"parent": {}, "tops": {}}, "images": []}))
    (out / "parent").mkdir()
    assert owned_entries(out) == ["parent", "hierarchy.json"]  # thesis.docx is not ours: kept
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        owned_entries(tmp_path / "file")


def _materialize(root: Path, out: Path, ratios=(0.6, 0.2, 0.2), seed=3, check=None):
    scan = scan_tree(root, check=check)
    assignment, _ = assign_splits(scan.files, ratios, seed)
    doc = materialize(scan.hierarchy, scan.files, assignment, root, out, {"seed": seed})
    return scan, assignment, doc


def check_output(out: Path, h: Hierarchy, files: dict, assignment: dict, doc: dict) -> None:
    """Every image sits in exactly the datasets on its path, in its one split, under its class."""
    assert {im["path"] for im in doc["images"]} == set(assignment)
    stored = [im["file"] for im in doc["images"]]
    assert len(set(stored)) == len(stored)
    flat = doc["flat"]
    assert flat["class_nodes"] == h.leaves() and len(set(flat["classes"])) == len(flat["classes"])
    assert all(is_safe_folder_name(c) for c in flat["classes"])
    folder_of = dict(zip(flat["class_nodes"], flat["classes"]))
    expected = set()
    leaf_of = {p: leaf for leaf, ps in files.items() for p in ps}
    for im in doc["images"]:
        assert im["split"] == assignment[im["path"]] and im["leaf"] == leaf_of[im["path"]]
        expected.add(f"{FLAT_DATASET}/{im['split']}/{folder_of[im['leaf']]}/{im['file']}")
        for nid in h.classifier_nodes():
            child = h.child_towards(nid, im["leaf"])
            if child is not None:
                ds = h.nodes[nid].dataset
                expected.add(f"{ds}/{im['split']}/{h.nodes[child].name}/{im['file']}")
    actual = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "hierarchy.json"}
    assert actual == expected
    assert set(doc["datasets"]) == {h.nodes[n].dataset for n in h.classifier_nodes()}
    for ds, info in list(doc["datasets"].items()) + [(FLAT_DATASET, flat)]:
        for s in SPLITS:  # every class folder exists in every split (stable class lists for loaders)
            assert sorted(p.name for p in (out / ds / s).iterdir()) == sorted(info["classes"])
            assert sum(info["counts"][s].values()) == sum(1 for e in expected if e.startswith(f"{ds}/{s}/"))
    # the one shared split: no test (or val) image of any node is in any node's train folder
    by_split = {s: {e.rsplit("/", 1)[1] for e in expected if e.split("/")[1] == s} for s in SPLITS}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    assert not list(out.glob(".staging-*")) and not list(out.glob(".trash-*"))


@settings(max_examples=30, deadline=None)
@given(tree=trees, seed=st.integers(0, 1000))
def test_hypothesis_random_trees_split_and_materialize(tree, seed):
    with tempfile.TemporaryDirectory() as tmp, mock.patch("os.fsync"):  # invariants, not durability: skip disk syncs
        root, out = Path(tmp) / "data", Path(tmp) / "out"
        root.mkdir()
        expected, _ = write_tree(root, tree)
        if not expected:
            return
        scan, assignment, doc = _materialize(root, out, seed=seed)
        check_hierarchy(scan.hierarchy)
        check_output(out, scan.hierarchy, scan.files, assignment, doc)
        assert Hierarchy.from_dict(doc["tree"]).fingerprint() == doc["fingerprint"]
        # a second run into the same folder replaces it with the same content
        _, _, again = _materialize(root, out, seed=seed)
        assert again == doc
        check_output(out, scan.hierarchy, scan.files, assignment, again)


def test_leaf_folder_names_that_collide_stay_apart(tmp_path):
    root = tmp_path / "data"
    for leaf in ("top/a b", "top/a_b", "top/é", "top/è", "top/ü"):
        (root / leaf).mkdir(parents=True)
        for i in range(3):
            (root / leaf / f"{i}.jpg").write_bytes(b"")
    scan, assignment, doc = _materialize(root, tmp_path / "out")
    assert len(set(doc["flat"]["classes"])) == 5
    check_output(tmp_path / "out", scan.hierarchy, scan.files, assignment, doc)


def test_class_folders_named_like_output_files(tmp_path):
    """A class folder called 'hierarchy.json' or 'README.md' must not clash with those files."""
    root = tmp_path / "data"
    for leaf in ("hierarchy.json/x", "hierarchy.json/y", "README.md/x", "README.md/y", "flat/x", "flat/y"):
        (root / leaf).mkdir(parents=True)
        for i in range(3):
            (root / leaf / f"{i}.jpg").write_bytes(b"")
    out = tmp_path / "out"
    scan, assignment, doc = _materialize(root, out)
    assert json.loads((out / "hierarchy.json").read_text())["fingerprint"] == doc["fingerprint"]
    check_output(out, scan.hierarchy, scan.files, assignment, doc)


def test_materialize_never_touches_the_input(tmp_path):
    root = tmp_path / "data"
    for leaf in ("a", "b"):
        (root / leaf).mkdir(parents=True)
        for i in range(4):
            (root / leaf / f"{i}.jpg").write_bytes(f"{leaf}{i}".encode())
    def state():
        return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mode, p.stat().st_mtime_ns)
                for p in [root, *root.rglob("*")]}

    before = state()
    _materialize(root, tmp_path / "out")
    assert state() == before  # content, modes, mtimes; folders gain nothing (hard links share inodes)


def test_materialize_refuses_foreign_folder_and_leaves_it_alone(tmp_path):
    root = tmp_path / "data"
    for leaf in ("a", "b"):
        (root / leaf).mkdir(parents=True)
        (root / leaf / "0.jpg").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by prepare_dataset.py"):
        _materialize(root, out)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def _leaves(root: Path, leaves: list[str]) -> Path:
    for leaf in leaves:
        (root / leaf).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (root / leaf / f"{i}.jpg").write_bytes(f"{leaf}{i}".encode())
    return root


def test_rerun_swaps_datasets_in_and_drops_the_ones_no_longer_made(tmp_path):
    out = tmp_path / "out"
    scan, assignment, doc = _materialize(_leaves(tmp_path / "one", ["a/x", "a/y", "b/z", "b/w"]), out)
    assert sorted(doc["datasets"]) == ["a", "b", "parent"]
    (out / ".b.old-77").mkdir()  # left aside by a swap that was killed earlier
    (out / "notes.txt").write_text("mine")  # not ours: kept
    scan, assignment, doc = _materialize(_leaves(tmp_path / "two", ["a/x", "a/y", "b"]), out)
    assert sorted(doc["datasets"]) == ["a", "parent"]
    assert sorted(p.name for p in out.iterdir()) == ["a", "flat", "hierarchy.json", "notes.txt", "parent"]
    (out / "notes.txt").unlink()
    check_output(out, scan.hierarchy, scan.files, assignment, doc)


def test_refuses_to_replace_a_foreign_entry_named_like_a_dataset(tmp_path):
    out = tmp_path / "out"
    _materialize(_leaves(tmp_path / "one", ["a/x", "a/y", "b"]), out)
    (out / "c").mkdir()
    (out / "c" / "thesis.docx").write_text("keep me")  # the user's, not listed by hierarchy.json
    before = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    with pytest.raises(UserError, match=r"holds c not written by prepare_dataset.py"):
        _materialize(_leaves(tmp_path / "two", ["a/x", "a/y", "c/u", "c/v"]), out)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*")} == before
