"""Tests for tools/make_example_dataset.py (small, fast, real runs into tmp_path)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_example_dataset.py"
PER_LEAF = 3
SIZE = 64


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_example_dataset", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _run(out, samples, *extra):
    argv = ["--out", str(out), "--samples-out", str(samples),
            "--per-leaf", str(PER_LEAF), "--size", str(SIZE), *extra]
    tool.main(tool.get_args_parser().parse_args(argv))


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    _run(base / "ds", base / "samples")
    return base / "ds", base / "samples"


def test_defaults_resolve_from_file_not_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = tool.get_args_parser().parse_args([])
    repo = TOOL.parent.parent
    assert Path(args.out) == repo / "dataset_example"
    assert Path(args.samples_out) == repo / "sample_images"
    assert (args.per_leaf, args.samples_per_leaf, args.size, args.seed) == (45, 1, 192, 0)


def test_layout(generated):
    ds, _ = generated
    assert (ds / tool.MARKER).is_file()
    parents = sorted(p for p in ds.iterdir() if p.is_dir())
    assert len(parents) >= 4
    for parent in parents:
        children = sorted(c for c in parent.iterdir() if c.is_dir())
        assert 2 <= len(children) <= 4, parent
        for child in children:
            assert child.name == child.name.lower() and child.name.isascii()
            files = sorted(child.iterdir())
            assert [f.name for f in files] == [f"{child.name}_{i:03d}.jpg" for i in range(PER_LEAF)]
            for f in files:
                with Image.open(f) as img:
                    assert img.format == "JPEG"
                    assert img.mode == "RGB"
                    assert img.size == (SIZE, SIZE)
    # no temporary or backup folders left next to the output
    assert sorted(p.name for p in ds.parent.iterdir()) == ["ds", "samples"]


def test_deterministic(generated, tmp_path):
    ds, samples = generated
    _run(tmp_path / "ds", tmp_path / "samples")
    assert _files(tmp_path / "ds") == _files(ds)
    assert _files(tmp_path / "samples") == _files(samples)


def test_rerun_replaces_previous_output(tmp_path):
    _run(tmp_path / "ds", tmp_path / "samples")
    (tmp_path / "ds" / "tops" / "stale.txt").write_text("old")
    _run(tmp_path / "ds", tmp_path / "samples", "--seed", "1")
    assert not (tmp_path / "ds" / "tops" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "samples"]


def test_samples_are_unseen(generated):
    ds, samples = generated
    leaves = {(c.parent.name, c.name) for c in ds.glob("*/*") if c.is_dir()}
    sample_files = sorted(samples.glob("*.jpg"))
    assert sorted(f.name for f in sample_files) == sorted(f"{p}_{c}_0.jpg" for p, c in leaves)
    train = [np.asarray(Image.open(f)) for f in sorted(ds.rglob("*.jpg"))]
    train_bytes = {f.read_bytes() for f in ds.rglob("*.jpg")}
    for f in sample_files:
        assert f.read_bytes() not in train_bytes
        pixels = np.asarray(Image.open(f))
        assert pixels.shape == (SIZE, SIZE, 3)
        assert all(not np.array_equal(pixels, t) for t in train)


def test_refuses_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        _run(foreign, tmp_path / "samples")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing" in err
    assert _files(foreign) == {"notes.txt": b"keep me"}
    # nothing else was written: no samples, no temporary folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_leftovers_of_an_interrupted_run_are_removed(tmp_path):
    _run(tmp_path / "ds", tmp_path / "samples")
    # what a run killed mid-way leaves: its build folder, an old folder set aside, an older version's build
    for name in (".ds.tmp-999", ".ds.old-999", "ds.tmp-5", ".samples.tmp-7"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"x")
    _run(tmp_path / "ds", tmp_path / "samples")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "samples"]
    assert (tmp_path / "ds" / tool.MARKER).is_file()

