"""hiernet.artifacts: a node folder is loaded only if it is complete, consistent and plain data.

``model.pth`` goes through ``torch.load(weights_only=True)`` and ``bin/encoder.pickle`` through the
allow-list unpickler; files carrying code are refused and the code never runs (real payloads that
would create a marker file).
"""

from __future__ import annotations

import builtins
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import Payload  # noqa: E402
from hiernet.artifacts import (  # noqa: E402
    FORMAT,
    FORMAT_VERSION,
    ArtifactError,
    load_node,
    publish,
    read_checkpoint,
    save_checkpoint,
    staging_dir,
)
from hiernet.models import Head  # noqa: E402
from hiernet.safeio import UserError, pickle_atomic  # noqa: E402

CLASSES = ["angular", "round"]


def config(classes=CLASSES) -> dict:
    return {
        "node": {"id": "", "dataset": "parent", "classes": list(classes), "class_nodes": list(classes), "kind": "node"},
        "hierarchy_fingerprint": "0123456789abcdef",
        "backbone": {"name": "efficientnet-lite0", "image_size": 64, "resize": "crop", "weights_fingerprint": "w",
                     "weights_file": None, "trainable": False},
        "head": {"in_dim": 8, "n_classes": len(classes), "hidden": 0, "dropout": 0.0},
        "tta": False,
    }


@pytest.fixture
def node(tmp_path) -> Path:
    """A complete node folder as train.py writes it (tiny head)."""
    folder = tmp_path / "models" / "parent"
    save_checkpoint(folder / "model.pth", config(), {"head": Head(8, 2).state_dict()})
    pickle_atomic(folder / "bin" / "encoder.pickle", dict(enumerate(CLASSES)))
    pickle_atomic(folder / "bin" / "test_transforms.pickle", {"size": 64})
    return folder


def system_payload(marker: Path) -> Payload:
    return Payload(os.system, f"touch '{marker}'")


def exec_payload(marker: Path) -> Payload:
    return Payload(builtins.exec, f"open({str(marker)!r}, 'w').write('pwned')")


def test_intact_node_loads(node):
    art = load_node(node)
    assert art.classes == CLASSES and art.class_nodes == CLASSES and art.folder == node
    assert art.checkpoint["format"] == FORMAT and art.checkpoint["version"] == FORMAT_VERSION
    head = Head(8, 2)
    head.load_state_dict(art.checkpoint["state_dict"]["head"])


def test_node_without_encoder_pickle_still_loads(node):
    (node / "bin" / "encoder.pickle").unlink()
    assert load_node(node).classes == CLASSES


# ------------------------------------------------------------------------------ code in model.pth
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("how", ["torch.save", "legacy torch.save", "plain pickle"])
def test_model_pth_carrying_code_is_refused_and_never_runs(node, tmp_path, kind, how):
    marker = tmp_path / "MARKER"
    payload = system_payload(marker) if kind == "os.system" else exec_payload(marker)
    ck = {"format": FORMAT, "version": FORMAT_VERSION, "config": config(), "state_dict": {"head": {}, "x": payload}}
    path = node / "model.pth"
    if how == "torch.save":
        torch.save(ck, path)
    elif how == "legacy torch.save":
        torch.save(ck, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(ck, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused quietly: no warning lines on top of the error line
        with pytest.raises(ArtifactError, match="refused: it is not a plain weights file") as ei:
            read_checkpoint(path)
        with pytest.raises(ArtifactError):
            load_node(node)
    assert isinstance(ei.value, UserError) and "\n" not in str(ei.value)
    assert not marker.exists(), "the payload ran"
    # sanity check of the test: an unrestricted load would have run it
    if how == "torch.save" and kind == "os.system":
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_model_pth_payload_names_the_global(node, tmp_path):
    torch.save({"x": system_payload(tmp_path / "M")}, node / "model.pth")
    with pytest.raises(ArtifactError, match=r"it names posix\.system, i\.e\. it carries code"):
        read_checkpoint(node / "model.pth")


# ------------------------------------------------------------------------------ damaged model.pth
DAMAGED = {
    "missing": (lambda p: p.unlink(), "is missing; train this node with: python3 src/train.py -d parent"),
    "folder": (lambda p: (p.unlink(), p.mkdir()), "is missing"),
    "empty": (lambda p: p.write_bytes(b""), "damaged or truncated"),
    "truncated half": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "damaged or truncated"),
    "truncated 100 bytes": (lambda p: p.write_bytes(p.read_bytes()[:100]), "damaged or truncated"),
    "random bytes": (lambda p: p.write_bytes(random.Random(0).randbytes(5000)), "refused"),  # seeded: torch.load fails in one way
    "text": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n"), "refused"),
    "a bare tensor": (lambda p: torch.save(torch.zeros(3), p), "not a Fashion-Hiernet node model"),
    "another format": (lambda p: torch.save({"format": "other", "state_dict": {}}, p), "not a Fashion-Hiernet"),
    "other version": (lambda p: torch.save({"format": FORMAT, "version": 2}, p), "format version 2"),
    "no config": (lambda p: torch.save({"format": FORMAT, "version": 1, "state_dict": {"head": {}}}, p), "lacks"),
    "no head weights": (lambda p: torch.save({"format": FORMAT, "version": 1, "config": config(), "state_dict": {}}, p),
                        "lacks"),
    "classes not a list": (lambda p: torch.save({"format": FORMAT, "version": 1, "state_dict": {"head": {}},
                                                 "config": {**config(), "node": {"classes": 5, "class_nodes": []}}}, p),
                           "malformed"),
    "class lists differ": (lambda p: torch.save({"format": FORMAT, "version": 1, "state_dict": {"head": {}},
                                                 "config": {**config(), "node": {"classes": ["a", "b"],
                                                                                 "class_nodes": ["a"]}}}, p),
                           "malformed"),
    "n_classes a string": (lambda p: torch.save({"format": FORMAT, "version": 1, "state_dict": {"head": {}},
                                                 "config": {**config(), "head": {"n_classes": "2"}}}, p),
                           "malformed"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_model_pth_is_refused_with_one_line(node, name):
    damage, expect = DAMAGED[name]
    damage(node / "model.pth")
    with pytest.raises(ArtifactError) as ei:
        load_node(node)
    msg = str(ei.value)
    assert expect in msg and "\n" not in msg and "model.pth" in msg and "train" in msg


def test_head_size_must_match_classes(node):
    cfg = config()
    cfg["head"]["n_classes"] = 3
    save_checkpoint(node / "model.pth", cfg, {"head": Head(8, 3).state_dict()})
    with pytest.raises(ArtifactError, match="head size does not match"):
        load_node(node)


# ------------------------------------------------------------------------------ encoder.pickle
ENCODERS = {
    "swapped": ({0: "round", 1: "angular"}, "disagrees"),
    "one class missing": ({0: "angular"}, "disagrees"),
    "string keys": ({"a": "angular", "b": "round"}, "disagrees"),
    "tuple keys": ({(0,): "angular", (1,): "round"}, "disagrees"),
    "a list": (["angular", "round"], "disagrees"),
    "None": (None, "disagrees"),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_that_disagrees_is_refused(node, name):
    obj, expect = ENCODERS[name]
    (node / "bin" / "encoder.pickle").write_bytes(pickle.dumps(obj))
    with pytest.raises(ArtifactError, match=expect):
        load_node(node)


def test_encoder_with_string_digit_keys_agrees(node):
    (node / "bin" / "encoder.pickle").write_bytes(pickle.dumps({"0": "angular", "1": "round"}, protocol=2))
    assert load_node(node).classes == CLASSES


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.Popen"])
def test_encoder_carrying_code_is_refused_and_never_runs(node, tmp_path, kind):
    import subprocess

    marker = tmp_path / "MARKER"
    payload = {"os.system": system_payload(marker), "builtins.exec": exec_payload(marker),
               "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)])}[kind]
    (node / "bin" / "encoder.pickle").write_bytes(pickle.dumps({0: "angular", 1: payload}))
    with pytest.raises(ArtifactError, match="refused .*is not allowed.*may carry code"):
        load_node(node)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "folder", "broken symlink", "empty"])
def test_unreadable_encoder_is_refused(node, damage):
    enc = node / "bin" / "encoder.pickle"
    if damage == "truncated":
        enc.write_bytes(enc.read_bytes()[:-4])
    elif damage == "folder":
        enc.unlink()
        enc.mkdir()
    elif damage == "broken symlink":
        enc.unlink()
        os.symlink(node / "nowhere", enc)
    else:
        enc.write_bytes(b"")
    with pytest.raises(ArtifactError) as ei:
        load_node(node)
    assert "encoder.pickle" in str(ei.value) and "\n" not in str(ei.value)


def test_transform_pickles_are_never_unpickled(node, tmp_path):
    marker = tmp_path / "MARKER"
    (node / "bin" / "test_transforms.pickle").write_bytes(pickle.dumps(system_payload(marker)))
    (node / "bin" / "inv_normalize.pickle").write_bytes(pickle.dumps(exec_payload(marker)))
    assert load_node(node).classes == CLASSES
    assert not marker.exists()


# ------------------------------------------------------------------------------ staging and publishing
def test_publish_replaces_old_folder_only_when_complete(node):
    models = node.parent
    old = (node / "model.pth").read_bytes()
    stage = staging_dir(models, "parent")
    assert stage.name.startswith(".parent.tmp-") and (stage / "bin").is_dir()
    save_checkpoint(stage / "model.pth", config(), {"head": Head(8, 2).state_dict()})
    assert (node / "model.pth").read_bytes() == old  # untouched until publish
    publish(stage, models, "parent")
    assert (node / "model.pth").read_bytes() != old and not stage.exists()
    assert sorted(p.name for p in models.iterdir()) == ["parent"]
    load_node(node)


def test_staging_dir_clears_leftovers_of_a_killed_run(node):
    models = node.parent
    for junk in (".parent.tmp-99999", ".parent.old-99999"):
        (models / junk / "bin").mkdir(parents=True)
    stage = staging_dir(models, "parent")
    assert sorted(p.name for p in models.iterdir()) == sorted([stage.name, "parent"])
    shutil.rmtree(stage)


def test_head_temperature_is_restored_and_older_checkpoints_default_to_one(node):
    from hiernet.artifacts import backbone_key, build_torch_model

    shared = {backbone_key(config()): "the shared backbone"}  # the head is what is checked here
    head = Head(8, 2)
    head.temperature.fill_(2.5)
    save_checkpoint(node / "model.pth", config(), {"head": head.state_dict()})
    _, loaded, _ = build_torch_model(load_node(node), shared)
    assert float(loaded.temperature) == 2.5
    old = {k: v for k, v in Head(8, 2).state_dict().items() if k != "temperature"}  # written before calibration
    save_checkpoint(node / "model.pth", config(), {"head": old})
    _, loaded, _ = build_torch_model(load_node(node), shared)
    assert float(loaded.temperature) == 1.0
