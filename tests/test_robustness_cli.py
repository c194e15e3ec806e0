"""Damaged, foreign and hostile inputs through the real scripts: one clear line, never a traceback.

The default run builds a ``trained_models/`` folder in-process in the exact format train.py writes
(real Lite0 backbone fingerprint, untrained heads: the refusals do not depend on the weights), so it
stays fast. The ``slow`` tests train the same 2 × 2 tree for real (Lite0 at 64 px, 2 epochs) and
repeat the damage sweep on that, plus the kill -9 test. Every test copies the models folder before
damaging it. Hostile files carry real payloads (``os.system``/``exec`` writing a marker file); each
test checks the marker never appears.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TWO_LEVEL, draw_image, make_tree

PY = sys.executable
PREDICT = str(REPO / "src" / "predict.py")
TRAIN = str(REPO / "src" / "train.py")
PREPARE = str(REPO / "prepare_dataset.py")
FAST = ["--backbone", "efficientnet-lite0", "--image-size", "64", "--epochs", "2", "--views", "0", "-q"]


def run(args, check=True, **kw):
    proc = subprocess.run(args, capture_output=True, text=True, cwd="/", **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_args(t: dict, node: str, models: Path | None = None, extra=()) -> list[str]:
    return [PY, TRAIN, "-d", node, "--data-dir", str(t["split"]), "--output-dir", str(models or t["models"]),
            "--cache-dir", str(t["cache"]), *FAST, *extra]


def _prepared(base: Path) -> dict:
    data = make_tree(base / "data", TWO_LEVEL, per_leaf=5, size=64)
    t = {"base": base, "data": data, "split": base / "split", "models": base / "models", "cache": base / "cache"}
    run([PY, PREPARE, "-p", str(data), "-o", str(t["split"]), "-q"])
    t["nodes"] = ["parent", "angular", "round"]
    t["image"] = data / "round" / "circle" / "img_000.jpg"
    return t


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """A 2 × 2 tree prepared by prepare_dataset.py, and node folders written as train.py writes them.

    The heads are random (no training): enough for every load/refuse path and for predicting.
    """
    import torch

    from hiernet.artifacts import save_checkpoint
    from hiernet.backbones import create_backbone
    from hiernet.hierarchy import load_hierarchy_json
    from hiernet.models import Head
    from hiernet.safeio import pickle_atomic
    from hiernet.training import write_models_hierarchy

    t = _prepared(tmp_path_factory.mktemp("synthetic"))
    hier, doc = load_hierarchy_json(t["split"] / "hierarchy.json")
    assert [hier.nodes[n].dataset for n in hier.classifier_nodes()] == t["nodes"]
    bb = create_backbone("efficientnet-lite0", image_size=64)
    torch.manual_seed(0)
    for ds in t["nodes"]:
        info = doc["datasets"][ds]
        head = Head(bb.spec.feature_dim, len(info["classes"]))
        config = {
            "node": {"id": info["node"], "dataset": ds, "classes": info["classes"],
                     "class_nodes": info["class_nodes"], "kind": "node"},
            "hierarchy_fingerprint": hier.fingerprint(),
            "backbone": {"name": bb.spec.name, "image_size": 64, "resize": "crop",
                         "weights_fingerprint": bb.weights_fingerprint, "weights_file": None, "trainable": False},
            "head": {"in_dim": bb.spec.feature_dim, "n_classes": len(info["classes"]), "hidden": 0, "dropout": 0.0},
            "tta": False,
        }
        node = t["models"] / ds
        save_checkpoint(node / "model.pth", config, {"head": head.state_dict()})
        pickle_atomic(node / "bin" / "encoder.pickle", dict(enumerate(info["classes"])))
        pickle_atomic(node / "bin" / "test_transforms.pickle", {"resize": 64})
        pickle_atomic(node / "bin" / "inv_normalize.pickle", {"mean": [0.5] * 3})
    write_models_hierarchy(t["models"], doc)
    return t


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """prepare_dataset.py + train.py for every node of the 2 × 2 tree, 5 images per leaf (slow tests)."""
    t = _prepared(tmp_path_factory.mktemp("trained"))
    nodes = run([PY, TRAIN, "--list-nodes", "--data-dir", str(t["split"])]).stdout.split()
    assert nodes == t["nodes"]
    run(train_args(t, nodes[0]))  # fills the feature cache; the children then only read it, in parallel
    procs = [subprocess.Popen(train_args(t, n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
             for n in nodes[1:]]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    return t


@pytest.fixture
def models(synthetic, tmp_path) -> Path:
    """A private copy of the models to damage."""
    dst = tmp_path / "models"
    shutil.copytree(synthetic["models"], dst)
    return dst


@pytest.fixture
def trained_models(trained, tmp_path) -> Path:
    dst = tmp_path / "models"
    shutil.copytree(trained["models"], dst)
    return dst


# ------------------------------------------------------------------------------------ payloads
class SystemPayload:
    """Unpickling it would run ``touch MARKER`` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload:
    """Unpickling it would run Python code through builtins.exec."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def rename_leaf(models: Path) -> None:
    """Edit trained_models/hierarchy.json so the models belong to another tree ('tri' → 'triangle')."""
    doc = json.loads((models / "hierarchy.json").read_text())
    for n in doc["tree"]["nodes"]:
        n["children"] = [c.replace("angular/tri", "angular/triangle") for c in n["children"]]
        if n["id"] == "angular/tri":
            n["id"], n["name"] = "angular/triangle", "triangle"
    (models / "hierarchy.json").write_text(json.dumps(doc))


def _truncate(p: Path, frac: float = 1 / 3) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * frac)])


def _edit_checkpoint(p: Path, edit) -> None:
    """Rewrite a plain model.pth with ``edit(checkpoint)`` applied (a tampered, still code-free file)."""
    import torch

    ck = torch.load(p, weights_only=True)
    edit(ck)
    torch.save(ck, p)


def _torch_save_payload(p: Path, payload) -> None:
    import torch

    torch.save({"format": "fashion-hiernet-node", "version": 1, "config": {}, "state_dict": {"x": payload}}, p)


# name -> (damage(models, marker), text the one error line must contain)
DAMAGE = {
    "missing_node_model": (lambda m, mk: (m / "angular" / "model.pth").unlink(), "missing"),
    "missing_node_folder": (lambda m, mk: shutil.rmtree(m / "round"), "missing"),
    "encoder_disagrees": (lambda m, mk: (m / "angular" / "bin" / "encoder.pickle").write_bytes(
        pickle.dumps({0: "tri", 1: "box"})), "disagrees"),
    "truncated_model": (lambda m, mk: _truncate(m / "parent" / "model.pth"), "damaged or truncated"),
    "other_hierarchy": (lambda m, mk: rename_leaf(m), "another hierarchy"),
    "model_of_other_node": (lambda m, mk: (shutil.rmtree(m / "round"), shutil.copytree(m / "angular", m / "round")),
                            "another hierarchy"),
    "model_pth_os_system": (lambda m, mk: _torch_save_payload(m / "round" / "model.pth", SystemPayload(mk)), "refused"),
    "model_pth_exec_legacy_pickle": (lambda m, mk: (m / "parent" / "model.pth").write_bytes(
        pickle.dumps({"format": "fashion-hiernet-node", "x": ExecPayload(mk)}, protocol=2)), "refused"),
    "encoder_os_system": (lambda m, mk: (m / "round" / "bin" / "encoder.pickle").write_bytes(
        pickle.dumps(SystemPayload(mk))), "refused"),
    "encoder_exec": (lambda m, mk: (m / "angular" / "bin" / "encoder.pickle").write_bytes(
        pickle.dumps(ExecPayload(mk), protocol=4)), "refused"),
}


#: The node folder each damage case is in: its error line must name it (the folder or ``-d NODE``).
#: Cases that damage the shared hierarchy.json name that file instead.
NODE_OF = {
    "missing_node_model": "angular", "missing_node_folder": "round", "encoder_disagrees": "angular",
    "truncated_model": "parent", "model_of_other_node": "round", "model_pth_os_system": "round",
    "model_pth_exec_legacy_pickle": "parent", "encoder_os_system": "round", "encoder_exec": "angular",
    "encoder_string_keys": "angular", "encoder_is_folder": "round", "encoder_truncated": "round",
    "model_empty_file": "round", "model_random_bytes": "round", "model_is_folder": "round",
    "model_plain_but_malformed": "round", "head_weights_wrong_shape": "angular", "head_weights_not_tensors": "angular",
    "no_hierarchy_fingerprint": "round", "huge_image_size": "round", "unknown_resize_policy": "round",
    "unknown_backbone": "parent", "model_wrong_version": "round", "model_not_ours": "round",
    "model_of_other_backbone": "parent",
}


def assert_names_node(line: str, name: str) -> None:
    """The error line names the damaged node's folder (``.../round/...`` or ``-d round``), or hierarchy.json."""
    import re

    node = NODE_OF.get(name)
    if node is None:
        assert "hierarchy.json" in line, line
    else:
        assert re.search(rf"/{node}(?![\w.-])|-d {node}\b", line), (node, line)


#: The damage cases whose predict.py run is part of the fast default run (all of DAMAGE run as
#: processes in the slow tests, on really trained models, and all run in-process by default).
DEFAULT_PROCESS_CASES = ("model_pth_os_system", "encoder_exec")


def _damaged_runs(src: dict, base: Path, names) -> dict:
    """Run ``predict.py`` on a damaged copy per DAMAGE entry, all at once (independent processes)."""
    procs = {}
    for name in names:
        damage = DAMAGE[name][0]
        m = base / name / "models"
        shutil.copytree(src["models"], m)
        marker = base / name / "MARKER"
        damage(m, marker)
        args = [PY, PREDICT, "-p", str(src["image"]), "--models-dir", str(m), "--format", "json"]
        procs[name] = (subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"), marker)
    out = {}
    for name, (p, marker) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = {"rc": p.returncode, "stdout": stdout, "stderr": stderr, "marker": marker}
    return out


@pytest.fixture(scope="module")
def damaged_runs(synthetic, tmp_path_factory) -> dict:
    return _damaged_runs(synthetic, tmp_path_factory.mktemp("damaged"), DEFAULT_PROCESS_CASES)


@pytest.fixture(scope="module")
def damaged_trained_runs(trained, tmp_path_factory) -> dict:
    return _damaged_runs(trained, tmp_path_factory.mktemp("damaged_trained"), sorted(DAMAGE))


def assert_one_error_line(rc: int, stderr: str, expect: str = "") -> str:
    lines = stderr.strip().splitlines()
    assert rc != 0
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    assert expect in lines[0], stderr
    return lines[0]


# ------------------------------------------------------------------------------------ tests
def _check_damaged(r: dict, name: str) -> None:
    line = assert_one_error_line(r["rc"], r["stderr"], DAMAGE[name][1])
    assert r["stdout"] == ""  # no partial predictions from a half-loaded tree
    assert "train" in line.lower()  # says what to do: retrain / train this node / train_lcpn.sh
    if name != "other_hierarchy":  # the tree changed under every node: any node may be named
        assert_names_node(line, name)
    assert not r["marker"].exists(), "a payload ran"


@pytest.mark.parametrize("name", DEFAULT_PROCESS_CASES)
def test_damaged_models_refused_with_one_line(damaged_runs, name):
    _check_damaged(damaged_runs[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_trained_models_refused_with_one_line(damaged_trained_runs, name):
    _check_damaged(damaged_trained_runs[name], name)


@pytest.mark.slow
def test_trained_models_predict(trained):
    proc = run([PY, PREDICT, "-p", str(trained["image"]), "--models-dir", str(trained["models"]), "--format", "json"])
    (pred,) = json.loads(proc.stdout)
    assert "error" not in pred and len(pred["labels"]) == 2 and pred["complete"]


# in-process checks of more damage through predict.main + run_cli (no interpreter start-up per case)
def _predict_inprocess(args, capsys):
    import predict  # src/predict.py (src is on sys.path via conftest)

    from hiernet.safeio import run_cli

    with pytest.raises(SystemExit) as ei:
        run_cli(lambda: predict.main(predict.get_args_parser().parse_args(args)))
    out, err = capsys.readouterr()
    return ei.value.code, out, err


MORE_DAMAGE = {
    "hierarchy_json_missing": (lambda m, mk: (m / "hierarchy.json").unlink(), "hierarchy.json missing"),
    "hierarchy_json_garbage": (lambda m, mk: (m / "hierarchy.json").write_text("{{{ not json"), "not readable JSON"),
    "hierarchy_json_deep": (lambda m, mk: (m / "hierarchy.json").write_text("[" * 100000 + "]" * 100000), "not readable"),
    "hierarchy_json_wrong_types": (lambda m, mk: (m / "hierarchy.json").write_text(json.dumps({"tree": {"nodes": [
        {"id": "a", "name": "a", "parent": [1], "children": [], "dataset": None},
        {"id": "", "name": "", "parent": None, "children": ["a"], "dataset": "parent"}]}})), "malformed"),
    "hierarchy_json_escaping_dataset": (lambda m, mk: (m / "hierarchy.json").write_text(
        (m / "hierarchy.json").read_text().replace('"dataset": "angular"', '"dataset": "../../etc"')), "unsafe"),
    "encoder_string_keys": (lambda m, mk: (m / "angular" / "bin" / "encoder.pickle").write_bytes(
        pickle.dumps({"x": "box", "y": "tri"})), "disagrees"),
    "encoder_is_folder": (lambda m, mk: ((m / "round" / "bin" / "encoder.pickle").unlink(),
                                     (m / "round" / "bin" / "encoder.pickle").mkdir()), "cannot be read"),
    "encoder_truncated": (lambda m, mk: _truncate(m / "round" / "bin" / "encoder.pickle", 0.5), "refused"),
    "model_empty_file": (lambda m, mk: (m / "round" / "model.pth").write_bytes(b""), "damaged or truncated"),
    "model_random_bytes": (lambda m, mk: (m / "round" / "model.pth").write_bytes(__import__("random").Random(0).randbytes(4096)), "refused"),
    "model_is_folder": (lambda m, mk: ((m / "round" / "model.pth").unlink(), (m / "round" / "model.pth").mkdir()), "missing"),
    "model_plain_but_malformed": (lambda m, mk: __import__("torch").save(
        {"format": "fashion-hiernet-node", "version": 1, "config": {"node": {"classes": 3, "class_nodes": []},
         "backbone": {"name": "x"}, "head": {"n_classes": 2}}, "state_dict": {"head": {}}}, m / "round" / "model.pth"),
        "malformed"),
    "head_weights_wrong_shape": (lambda m, mk: _edit_checkpoint(
        m / "angular" / "model.pth", lambda ck: ck["state_dict"]["head"].update(
            {k: __import__("torch").zeros(3, 3) for k in ck["state_dict"]["head"]})), "head weights do not fit"),
    "head_weights_not_tensors": (lambda m, mk: _edit_checkpoint(
        m / "angular" / "model.pth", lambda ck: ck["state_dict"].update(head={"net.1.weight": [1, 2]})),
        "head weights do not fit"),
    "no_hierarchy_fingerprint": (lambda m, mk: _edit_checkpoint(
        m / "round" / "model.pth", lambda ck: ck["config"].update(hierarchy_fingerprint=None)), "malformed"),
    "huge_image_size": (lambda m, mk: _edit_checkpoint(
        m / "round" / "model.pth", lambda ck: ck["config"]["backbone"].update(image_size=10**9)), "malformed"),
    "unknown_resize_policy": (lambda m, mk: _edit_checkpoint(
        m / "round" / "model.pth", lambda ck: ck["config"]["backbone"].update(resize="stretch")), "malformed"),
    "unknown_backbone": (lambda m, mk: _edit_checkpoint(
        m / "parent" / "model.pth", lambda ck: ck["config"]["backbone"].update(name="efficientnet-b99")),
        "unknown to this version"),
    "model_of_other_backbone": (lambda m, mk: _edit_checkpoint(  # Lite1 has Lite0's feature size: only the
        m / "parent" / "model.pth", lambda ck: ck["config"]["backbone"].update(name="efficientnet-lite1")),  # weights tell
        "differ from those it was trained on"),
    "model_wrong_version": (lambda m, mk: __import__("torch").save({"format": "fashion-hiernet-node", "version": 99},
                                                               m / "round" / "model.pth"), "format version"),
    "model_not_ours": (lambda m, mk: __import__("torch").save({"weights": __import__("torch").zeros(3)},
                                                          m / "round" / "model.pth"), "not a Fashion-Hiernet"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE) + sorted(MORE_DAMAGE))
def test_damage_refused_in_process(synthetic, models, tmp_path, capsys, name):
    """predict.main under run_cli, as the script runs it: any exception but UserError would escape."""
    damage, expect = {**DAMAGE, **MORE_DAMAGE}[name]
    marker = tmp_path / "MARKER"
    damage(models, marker)
    code, out, err = _predict_inprocess(["-p", str(synthetic["image"]), "--models-dir", str(models)], capsys)
    assert code == 2 and out == ""
    line = assert_one_error_line(code, err, expect)
    assert "train" in line.lower()  # says what to do: retrain / train this node / train_lcpn.sh
    if name != "other_hierarchy":  # the tree changed under every node: any node may be named
        assert_names_node(line, name)
    assert not marker.exists(), "a payload ran"


def test_predict_mix_of_good_and_bad_images_and_unread_pickles(synthetic, models, tmp_path):
    """Good images predicted, bad ones reported per image, exit 0; code in the transform pickles
    (which the suite never unpickles) does not run."""
    import csv
    import io

    markers = [tmp_path / "MARKER_system", tmp_path / "MARKER_exec"]
    for node in synthetic["nodes"]:
        (models / node / "bin" / "test_transforms.pickle").write_bytes(pickle.dumps(SystemPayload(markers[0])))
        (models / node / "bin" / "inv_normalize.pickle").write_bytes(pickle.dumps(ExecPayload(markers[1])))
    data = synthetic["data"]
    good = [str(synthetic["image"]), str(data / "angular" / "box" / "img_001.jpg")]
    bad = {"zero.jpg": b"", "text.png": b"this is not a png", "random.jpg": os.urandom(2048),
           "truncated.jpg": synthetic["image"].read_bytes()[:200]}
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "broken_link.jpg")
    bad_paths = [str(tmp_path / n) for n in bad] + [str(tmp_path / "broken_link.jpg")]
    folder = tmp_path / "photos"  # a folder: upper-case extension found, hidden file not an input
    draw_image(folder / "ok.PNG", "ellipse", 1)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (folder / ".hidden.jpg").write_bytes(b"")
    missing = str(tmp_path / "does_not_exist.jpg")
    proc = run([PY, PREDICT, "-p", *good, *bad_paths, missing, str(folder), "--models-dir", str(models),
                "--format", "csv"])
    assert "Traceback" not in proc.stderr
    rows = {r["path"]: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    good += [str(folder / "ok.PNG")]
    bad_paths += [str(folder / "broken.jpg")]
    bad_paths += [missing]  # a missing file gets its row, with the error, like an unreadable one
    assert set(rows) == set(good) | set(bad_paths)
    for g in good:
        assert not rows[g]["error"] and rows[g]["labels"].count("/") == 1  # a full 2-level path
    for b in bad_paths:
        assert rows[b]["error"] and not rows[b]["labels"]
    assert rows[missing]["error"] == "file not found"
    assert f"{len(bad_paths)} of {len(rows)} inputs could not be read" in proc.stderr
    assert not any(m.exists() for m in markers)


def test_predict_only_bad_images_fails(synthetic, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(os.urandom(100))
    proc = run([PY, PREDICT, "-p", str(tmp_path / "a.jpg"), str(tmp_path / "b.png"), "--models-dir",
                str(synthetic["models"]), "--format", "json"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    preds = json.loads(proc.stdout)
    assert len(preds) == 2 and all(p["error"] for p in preds)


def test_predict_nothing_to_predict_is_one_line(synthetic, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = _predict_inprocess(["-p", str(tmp_path / "empty"), "--models-dir", str(synthetic["models"])],
                                        capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: no images to predict") and "Traceback" not in err
    assert any("folder holds no images" in ln for ln in lines)
    # a missing file is an input: its row says why, and alone it fails with one line naming it
    code, out, err = _predict_inprocess(["-p", str(tmp_path / "empty"), str(tmp_path / "nope.jpg"),
                                         "--models-dir", str(synthetic["models"]), "--format", "jsonl"], capsys)
    assert code == 1 and json.loads(out)["error"] == "file not found"
    assert "none of the 1 inputs could be read" in err and "nope.jpg: file not found" in err


def test_prepare_dataset_missing_or_file_path(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for p in (tmp_path / "nope", tmp_path / "file.txt"):
        proc = run([PY, PREPARE, "-p", str(p), "-o", str(tmp_path / "out")], check=False)
        assert proc.returncode == 2 and proc.stdout == ""
        line = assert_one_error_line(proc.returncode, proc.stderr)
        assert str(p) in line and "-p" in line
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ processes
def test_second_training_of_same_node_refused_by_lock(synthetic, models):
    from hiernet.safeio import LockHeld, exclusive_lock
    from hiernet.training import node_lock

    before = sha256(models / "parent" / "model.pth")
    # hold the lock train.py takes, as another training of the node would
    with exclusive_lock(models / ".parent.lock", "another training"):
        with pytest.raises(LockHeld):  # it is node_lock's path
            with node_lock(models, "parent"):
                pass
        proc = run(train_args(synthetic, "parent", models), check=False)
    assert proc.returncode == 2
    line = assert_one_error_line(proc.returncode, proc.stderr, "already running")
    assert "lock" in line and "training of node 'parent'" in line
    assert sha256(models / "parent" / "model.pth") == before
    with exclusive_lock(models / ".parent.lock", "check"):  # and it was released with the with-block
        pass


@pytest.mark.slow
def test_kill_9_mid_training_keeps_previous_model(trained, trained_models):
    models = trained_models
    from hiernet.artifacts import load_node

    node = models / "parent"
    before = sha256(node / "model.pth")
    snapshot = {p.relative_to(node): sha256(p) for p in node.rglob("*") if p.is_file()}
    long = train_args(trained, "parent", models, ["--epochs", "1000000", "--patience", "1000000"])
    proc = subprocess.Popen(long, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # wait until it is inside the epoch loop (its resume checkpoint exists), then a bit more
        while not (models / ".parent.work" / "last.pth").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never reached its epoch loop"
            time.sleep(0.05)
        time.sleep(1.0)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert sha256(node / "model.pth") == before
    assert {p.relative_to(node): sha256(p) for p in node.rglob("*") if p.is_file()} == snapshot
    art = load_node(node)
    assert art.classes == ["angular", "round"]
    # the rerun replaces the model cleanly and leaves no staging folders behind (--force: the node's data and
    # recipe are unchanged, so without it train.py would keep the model)
    run(train_args(trained, "parent", models, ["--force"]))
    assert sha256(node / "model.pth") != before
    load_node(node)
    assert not list(models.glob(".parent.tmp-*")) and not list(models.glob(".parent.old-*"))
    assert not (models / ".parent.work").exists()


def test_predict_output_file_with_non_utf8_image_name(synthetic, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.jpg"
    with open(raw, "wb") as fh:
        fh.write(synthetic["image"].read_bytes())
    out = tmp_path / "pred.json"
    code, stdout, err = _predict_inprocess(["-p", str(folder), "--models-dir", str(synthetic["models"]),
                                            "--format", "json", "-o", str(out)], capsys)
    assert code == 0 and "Traceback" not in err
    (pred,) = json.loads(out.read_bytes().decode("utf-8"))
    assert os.fsencode(pred["path"]) == raw and len(pred["labels"]) == 2


@pytest.mark.slow
def test_interrupted_training_resumes_and_restart_starts_over(trained, trained_models):
    """kill -9 after a few epochs; a rerun continues from the checkpoint, ``--restart`` begins again.

    The work folder's ``log.csv`` is rewritten whole after every epoch, so the first one a run writes
    tells whether it resumed (all earlier epochs in it) or started over (one row).
    """
    models = trained_models
    log = models / ".parent.work" / "log.csv"
    long = train_args(trained, "parent", models, ["--epochs", "1000000", "--patience", "1000000"])

    def run_until(args, rows_at_least, timeout=120):
        """Start ``args``, wait until the work folder's log has that many epoch rows, kill -9; the rows."""
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "training made no progress"
                rows = log.read_text().splitlines()[1:] if log.exists() else []
                if len(rows) >= rows_at_least:
                    return [int(r.split(",")[0]) for r in rows]
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()

    first = run_until(long, 4)
    assert first == list(range(1, len(first) + 1))
    # the log is rewritten whole after every epoch: the first one a rerun writes shows where it started
    log.unlink()
    resumed = run_until(long, 1)
    assert len(resumed) >= len(first) and resumed == list(range(1, len(resumed) + 1))  # continued, not restarted
    log.unlink()
    restarted = run_until([*long, "--restart"], 1)
    assert len(restarted) < len(first) - 1  # --restart discarded the checkpoint: it began at epoch 1 again


def test_list_nodes_prints_node_datasets_and_names_flat_apart(tmp_path):
    t = _prepared(tmp_path)
    proc = run([PY, TRAIN, "--list-nodes", "--data-dir", str(t["split"])])
    assert proc.stdout.split() == t["nodes"]  # what train_lcpn.sh reads: node datasets only
    assert "'flat'" in proc.stderr and "train.py -d flat" in proc.stderr


@pytest.mark.parametrize("script", ["prepare_dataset.py", "src/train.py", "src/predict.py", "src/evaluate.py",
                                    "src/export.py", "src/serve.py"])
def test_help_text_is_plain_text(script):
    """--help is read in a terminal: no reStructuredText leftovers (``Examples::``, double back-ticks)."""
    proc = run([PY, str(REPO / script), "--help"])
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert "::" not in proc.stdout and "``" not in proc.stdout
