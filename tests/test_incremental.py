"""Incremental training: only nodes whose dataset or recipe changed are retrained.

Pure parts first (node fingerprints, split identity, the mixed-split refusal, partial-label scoring),
then one chain of real runs on a tiny tree (Lite0 at 64 px, one epoch): ``train_lcpn.sh`` with
``--data-dir``/``--output-dir`` flags, a rerun that keeps everything, a new leaf that retrains only
its ancestors + flat + export, ``--force`` and a changed recipe, a mixed-split bundle refused, and
evaluate.py's partial-label score.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, draw_image, make_tree

sys.path.insert(0, str(REPO / "src"))

from hiernet.config import TrainConfig  # noqa: E402
from hiernet.incremental import node_fingerprint  # noqa: E402
from hiernet.metrics import partial_label_score  # noqa: E402
from hiernet.safeio import UserError  # noqa: E402
from hiernet.splits import split_identity  # noqa: E402
from hiernet.testsets import partial_test_set  # noqa: E402

THREE_LEVEL = {
    "apparel": {"upper": {"tee": "ellipse", "shirt": "cross"}, "lower": {"pants": "rectangle", "skirt": "triangle"}},
    "acc": {"hat": "triangle", "bag": "rectangle"},
}
TWO_LEVEL = {"round": {"circle": "ellipse", "plus": "cross"}, "angular": {"box": "rectangle", "tri": "triangle"}}
FAST = ["--backbone", "efficientnet-lite0", "--image-size", "64", "--epochs", "1", "--views", "1", "-q"]


def run(args, check=True, env=None):
    proc = subprocess.run([str(a) for a in args], cwd="/", capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def prepare(tree: Path, out: Path, *extra) -> dict:
    run([sys.executable, REPO / "prepare_dataset.py", "-p", tree, "-o", out, "-q", *extra])
    return json.loads((out / "hierarchy.json").read_text())


def fingerprints(doc: dict, cfg: TrainConfig = TrainConfig()) -> dict:
    return {ds: node_fingerprint(doc, ds, cfg) for ds in [*doc["datasets"], "flat"]}


def add_images(folder: Path, shape: str, n: int, seed: int) -> None:
    for i in range(n):
        draw_image(folder / f"new_{i:03d}.jpg", shape, seed + i)


# ------------------------------------------------------------------------------ pure: fingerprints
@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A 3-level tree prepared, then again with a new leaf under apparel/upper (same output folder)."""
    base = tmp_path_factory.mktemp("grown")
    tree = make_tree(base / "tree", THREE_LEVEL, per_leaf=5)
    before = prepare(tree, base / "split")
    add_images(tree / "apparel" / "upper" / "polo", "rectangle", 5, 900)
    after = prepare(tree, base / "split")
    return {"base": base, "tree": tree, "before": before, "after": after}


@pytest.mark.parametrize("fine", [True, False])
def test_a_new_leaf_changes_only_its_ancestors_and_flat(grown, fine):
    cfg = TrainConfig().override({"fine_labels": fine})
    old, new = fingerprints(grown["before"], cfg), fingerprints(grown["after"], cfg)
    changed = {ds for ds in new if old.get(ds) != new[ds]}
    assert changed == {"parent", "apparel", "apparel__upper", "flat"}


def test_re_prepare_with_more_images_keeps_the_split_identity(grown):
    assert grown["before"]["split_id"] == grown["after"]["split_id"]
    assert split_identity(grown["after"]) == grown["before"]["split_id"]


def test_another_seed_is_another_split_and_changes_every_node(grown):
    other = prepare(grown["tree"], grown["base"] / "split_seed2", "--seed", "2")
    assert other["split_id"] != grown["after"]["split_id"]
    a, b = fingerprints(grown["after"]), fingerprints(other)
    assert all(a[ds] != b[ds] for ds in a)


def test_moving_one_image_to_another_split_is_a_new_split_identity(grown):
    doc = json.loads(json.dumps(grown["after"]))
    im = doc["images"][0]
    im["split"] = "test" if im["split"] != "test" else "train"
    assert split_identity(doc, grown["after"]) != grown["after"]["split_id"]
    assert split_identity(grown["after"], grown["before"]) == grown["before"]["split_id"]


def test_a_changed_recipe_changes_every_node(grown):
    a = fingerprints(grown["after"])
    for change in ({"epochs": 2}, {"backbone": "efficientnet-lite0"}, {"hidden": 0}):
        b = fingerprints(grown["after"], TrainConfig().override(change))
        assert all(a[ds] != b[ds] for ds in a), change
    # the preset's name alone is not a recipe
    assert fingerprints(grown["after"], TrainConfig().override({"preset": "renamed"})) == a


def test_the_flat_classifier_file_is_part_of_the_flat_recipe(grown, tmp_path, monkeypatch):
    """A tuned classifier as the flat head: its content (not only its path) is in the fingerprint; without
    one the fingerprints are those of the versions before the option existed."""
    clf = tmp_path / "t.classifier.pth"
    clf.write_bytes(b"one classifier")
    cfg = TrainConfig().override({"flat_classifier": str(clf), "hidden": 0})
    one = node_fingerprint(grown["after"], "flat", cfg)
    assert one != node_fingerprint(grown["after"], "flat", TrainConfig().override({"hidden": 0}))
    clf.write_bytes(b"another classifier")  # tuned again, same path
    assert node_fingerprint(grown["after"], "flat", cfg) != one
    a = fingerprints(grown["after"])
    to_dict = TrainConfig.to_dict

    def older(self):  # a TrainConfig of the versions before --flat-classifier: no such field
        d = to_dict(self)
        del d["flat_classifier"]
        return d

    monkeypatch.setattr(TrainConfig, "to_dict", older)
    assert fingerprints(grown["after"]) == a


def test_fp32_precision_keeps_the_fingerprints_of_models_trained_before_it_existed(grown, monkeypatch):
    a = fingerprints(grown["after"])  # default recipe: precision "auto", which trains fp32
    assert fingerprints(grown["after"], TrainConfig().override({"precision": "fp32"})) == a  # what train_node records
    b = fingerprints(grown["after"], TrainConfig().override({"precision": "int8"}))
    assert all(a[ds] != b[ds] for ds in a)
    to_dict = TrainConfig.to_dict  # a TrainConfig of the versions before --precision: no such field

    def older(self):
        d = to_dict(self)
        del d["precision"]
        return d

    monkeypatch.setattr(TrainConfig, "to_dict", older)
    assert fingerprints(grown["after"]) == a


def test_partial_labels_count_for_the_nodes_above_them_only(grown, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(grown["tree"], tree)
    add_images(tree / "apparel" / "upper", "cross", 3, 700)  # labelled 'apparel/upper', no leaf
    shutil.copytree(grown["base"] / "split", tmp_path / "split")  # re-prepared where it was: same split
    doc = prepare(tree, tmp_path / "split")
    assert list(doc["partial"]) == ["apparel/upper"] and sum(doc["partial"]["apparel/upper"].values()) == 3
    old, new = fingerprints(grown["after"]), fingerprints(doc)
    assert {ds for ds in new if old[ds] != new[ds]} == {"parent", "apparel"}


def test_fingerprint_refuses_an_unknown_node(grown):
    with pytest.raises(UserError, match="no dataset 'nope'"):
        node_fingerprint(grown["after"], "nope", TrainConfig())


# ------------------------------------------------------------------------------ pure: splits, partial scoring
def test_bundle_refuses_models_of_different_splits(tmp_path, caplog):
    from hiernet.bundle import check_one_split

    with pytest.raises(UserError, match=r"different splits of the data \(split a: parent, round; split b: angular\)"):
        check_one_split(tmp_path, {"parent": "a", "round": "a", "angular": "b"})
    check_one_split(tmp_path, {"parent": "a", "round": "a"})
    with caplog.at_level("WARNING"):
        check_one_split(tmp_path, {"parent": "a", "round": None})
    assert "node(s) round of" in caplog.text and "record no split" in caplog.text


def test_partial_label_score_counts_a_path_through_the_node_as_correct():
    nodes = ["a", "a", "a/b", "a/b"]
    paths = [["a", "a/x"], ["c", "c/y"], ["a", "a/b", "a/b/z"], ["a", "a/x"]]
    res = partial_label_score(nodes, paths)
    assert res["n_images"] == 4 and res["accuracy"] == 0.5
    assert res["per_node"] == {"a": {"n_images": 2, "accuracy": 0.5}, "a/b": {"n_images": 2, "accuracy": 0.5}}
    assert partial_label_score([], [])["accuracy"] is None


def test_partial_test_set_reads_test_images_from_the_dataset_above(tmp_path):
    tree = make_tree(tmp_path / "tree", THREE_LEVEL, per_leaf=4)
    add_images(tree / "apparel" / "upper", "cross", 6, 500)
    add_images(tree / "acc", "ellipse", 6, 600)
    doc = prepare(tree, tmp_path / "split")
    test = partial_test_set(tmp_path / "split", doc)
    want = {im["file"]: im["node"] for im in doc["partial_images"] if im["split"] == "test"}
    assert want and sorted(test.leaves) == sorted(want.values())
    for path, node in zip(test.paths, test.leaves):
        p = Path(path)
        assert p.is_file() and want[p.name] == node
        # apparel/upper's images sit in apparel's dataset, acc's in the root's
        assert p.parts[-4:-2] == (("apparel", "test") if node == "apparel/upper" else ("parent", "test"))


# ------------------------------------------------------------------------------ the real chain
def mtimes(models: Path) -> dict:
    return {ds: (models / ds / "model.pth").stat().st_mtime_ns for ds in ("parent", "angular", "round", "flat")}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """train_lcpn.sh with --data-dir/--output-dir flags (no DATA_DIR/MODELS_DIR), then a rerun, then a new leaf."""
    base = tmp_path_factory.mktemp("chain")
    tree = make_tree(base / "tree", TWO_LEVEL, per_leaf=6)
    add_images(tree / "round", "ellipse", 4, 400)  # partial labels at 'round'
    split, models, cache = base / "split", base / "models", base / "cache"
    prepare(tree, split)
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "MODELS_DIR")}
    env["PYTHON"] = sys.executable
    cmd = ["bash", REPO / "src" / "train_lcpn.sh", "--data-dir", split, "--output-dir", models, "--cache-dir", cache, *FAST]
    out = {"first": run(cmd, env=env)}
    out["t_first"] = mtimes(models)
    out["manifest_first"] = (models / "onnx" / "manifest.json").stat().st_mtime_ns
    out["rerun"] = run(cmd, env=env)
    out["t_rerun"] = mtimes(models)
    out["metrics_round"] = (models / "round" / "metrics.json").read_bytes()
    out["n_train_first"] = sum(im["split"] == "train" for im in json.loads((split / "hierarchy.json").read_text())["images"])
    add_images(tree / "angular" / "hex", "cross", 6, 800)
    prepare(tree, split)
    out["grown"] = run(cmd, env=env)
    out["t_grown"] = mtimes(models)
    return {**out, "base": base, "split": split, "models": models, "cache": cache, "env": env}


def test_flags_choose_every_folder(chain):
    models = chain["models"]
    for ds in ("parent", "angular", "round", "flat"):
        assert (models / ds / "model.pth").is_file()
    assert (models / "onnx" / "manifest.json").is_file()
    assert "exported" in chain["first"].stdout


def test_a_rerun_keeps_every_unchanged_node_and_the_export(chain):
    out = chain["rerun"].stdout
    for ds in ("parent", "angular", "round", "flat"):
        assert f"node '{ds}': unchanged, kept" in out
    assert "is current, kept" in out
    assert chain["t_rerun"] == chain["t_first"]


def test_a_new_leaf_retrains_its_ancestors_flat_and_export_only(chain):
    out, t0, t1 = chain["grown"].stdout, chain["t_rerun"], chain["t_grown"]
    assert "node 'round': unchanged, kept" in out
    assert t1["round"] == t0["round"]
    assert (chain["models"] / "round" / "metrics.json").read_bytes() == chain["metrics_round"]
    for ds in ("parent", "angular", "flat"):
        assert t1[ds] != t0[ds] and f"node '{ds}': unchanged" not in out
    assert (chain["models"] / "onnx" / "manifest.json").stat().st_mtime_ns != chain["manifest_first"]
    # the default int8 features: new images do not recalibrate the int8 backbone (that would change the
    # kept node's features), so the kept and the retrained nodes share it and the export carries it
    pin = json.loads((chain["models"] / "int8.json").read_text())["models"]
    assert len(pin) == 1 and len(list((chain["cache"] / "int8").glob("backbone-*.onnx"))) == 1
    # nor restandardise: the retrained heads use the tree statistics the kept one was trained with
    import torch

    (stats,) = json.loads((chain["models"] / "tree_stats.json").read_text())["stats"].values()
    assert stats["n_images"] == chain["n_train_first"]
    means = {ds: torch.load(chain["models"] / ds / "model.pth", weights_only=True)["state_dict"]["head"]["mean"]
             for ds in ("parent", "angular", "round", "flat")}
    assert all(torch.allclose(m, means["round"]) for m in means.values())
    man = json.loads((chain["models"] / "onnx" / "manifest.json").read_text())
    assert all(b.get("int8_file") for b in man["backbones"].values())
    # the kept node and the retrained ones form one bundle for the new tree
    r = run([sys.executable, REPO / "src" / "predict.py", "--models-dir", chain["models"], "-p",
             chain["base"] / "tree" / "angular" / "hex" / "new_000.jpg"])
    assert "hex" in r.stdout or "angular" in r.stdout


def test_force_and_a_changed_recipe_retrain(chain):
    train = [sys.executable, REPO / "src" / "train.py", "-d", "round", "--data-dir", chain["split"],
             "--output-dir", chain["models"], "--cache-dir", chain["cache"]]
    before = mtimes(chain["models"])["round"]
    assert "unchanged, kept" in run([*train, *FAST]).stdout
    assert mtimes(chain["models"])["round"] == before
    assert "test accuracy" in run([*train, *FAST, "--force"]).stdout
    forced = mtimes(chain["models"])["round"]
    assert forced != before
    recipe = [*FAST[:-3], "--views", "0", "-q"]  # one setting changed: no augmented views
    assert "test accuracy" in run([*train, *recipe]).stdout
    assert mtimes(chain["models"])["round"] != forced


def test_predict_and_evaluate_refuse_a_bundle_of_mixed_splits(chain, tmp_path):
    import torch

    models = tmp_path / "models"
    shutil.copytree(chain["models"], models)
    path = models / "angular" / "model.pth"
    ck = torch.load(path, weights_only=True)
    ck["config"]["split"]["id"] = "0" * 16
    torch.save(ck, path)
    image = chain["base"] / "tree" / "round" / "circle" / "img_000.jpg"
    r = run([sys.executable, REPO / "src" / "predict.py", "--models-dir", models, "-p", image], check=False)
    assert r.returncode != 0 and "different splits" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run([sys.executable, REPO / "src" / "evaluate.py", "--models-dir", models, "--data-dir", chain["split"],
             "--output", tmp_path / "out"], check=False)
    assert r.returncode != 0 and "different splits" in r.stderr


def test_evaluate_scores_partial_labels_at_their_own_depth(chain, tmp_path):
    doc = json.loads((chain["split"] / "hierarchy.json").read_text())
    n_test = sum(1 for im in doc["partial_images"] if im["split"] == "test")
    run([sys.executable, REPO / "src" / "evaluate.py", "--models-dir", chain["models"], "--data-dir", chain["split"],
         "--output", tmp_path / "out", "-q"])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert n_test >= 1 and res["partial"]["n_images"] == n_test
    assert 0.0 <= res["partial"]["accuracy"] <= 1.0 and list(res["partial"]["per_node"]) == ["round"]
