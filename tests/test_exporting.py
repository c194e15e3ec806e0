"""The export's validation checks: which decision ``--decision auto`` uses, and how predict, serve and
evaluate follow it (the int8 guard's own tests are in tests/test_int8.py)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from conftest import REPO, run
from hiernet.exporting import choose_decision, validation_accuracies, validation_split


def test_choose_decision_takes_the_most_accurate_and_lcpn_among_equals():
    assert choose_decision({"lcpn": 0.80, "flat": 0.90, "combined": 0.85}, 10, "fp32")["chosen"] == "flat"
    assert choose_decision({"lcpn": 0.80, "flat": 0.85, "combined": 0.90}, 10, "fp32")["chosen"] == "combined"
    assert choose_decision({"lcpn": 0.90, "flat": 0.90, "combined": 0.90}, 10, "fp32")["chosen"] == "lcpn"
    assert choose_decision({"lcpn": 0.80, "flat": 0.90, "combined": 0.90}, 10, "fp32")["chosen"] == "combined"
    rec = choose_decision({"lcpn": 0.7}, 12, "int8")  # no flat model: the walk is all there is
    assert rec == {"chosen": "lcpn", "leaf_accuracy": {"lcpn": 0.7}, "n_images": 12, "precision": "int8"}


def numpy_predictor(decision="lcpn"):
    """A hand-built bundle on 8 px images: features = (left half mean, right half mean) in [0, 1]; root
    'solo' when bright, 'round' picks circle when the left half is brighter; the flat head leans on the
    halves too, so the three decisions disagree on some images (no mirror: a plain comparison)."""
    from hiernet.bundle import Backbone, ModelBundle, NodeModel
    from hiernet.hierarchy import Hierarchy
    from hiernet.predictor import HierarchicalPredictor, MirrorPolicy, PredictOptions

    hier = Hierarchy.from_leaf_paths(["round/circle", "round/plus", "solo/only"])

    def backbone(x):
        return np.stack([x[..., :4].mean(axis=(1, 2, 3)), x[..., 4:].mean(axis=(1, 2, 3))], 1).astype(np.float32)

    zeros = lambda f: np.zeros(len(f))  # noqa: E731
    root = NodeModel("parent", "", ["round", "solo"], ["round", "solo"], 8, "squash", False, "bb0",
                     head=lambda f: np.stack([zeros(f), 4 * (f.sum(1) - 1)], 1))
    rnd = NodeModel("round", "round", ["circle", "plus"], ["round/circle", "round/plus"], 8, "squash", False, "bb0",
                    head=lambda f: np.stack([4 * (f[:, 0] - f[:, 1]), zeros(f)], 1))
    flat = NodeModel("flat", None, ["circle", "plus", "only"], ["round/circle", "round/plus", "solo/only"], 8, "squash",
                     False, "bb0", head=lambda f: np.stack([3 * f[:, 0], 3 * f[:, 1], zeros(f) + 1.5], 1))
    bundle = ModelBundle(hier, {"": root, "round": rnd}, {"bb0": Backbone(backbone, 8, "squash")}, "numpy", flat)
    return HierarchicalPredictor(bundle, PredictOptions(decision=decision, mirror=MirrorPolicy(0.0)))


def test_validation_accuracies_score_each_decision_from_one_pass(tmp_path):
    from PIL import Image

    paths, leaves = [], []
    for left in (0.1, 0.3, 0.5, 0.7, 0.9):
        for right in (0.1, 0.3, 0.5, 0.7, 0.9):
            a = np.zeros((8, 8, 3), np.uint8)
            a[:, :4], a[:, 4:] = round(left * 255), round(right * 255)
            paths.append(str(tmp_path / f"{left}-{right}.png"))
            Image.fromarray(a).save(paths[-1])
            leaves.append("solo/only" if left + right > 0.99 else "round/circle" if left >= right else "round/plus")
    paths.append(str(tmp_path / "broken.png"))  # unreadable: wrong for every decision
    (tmp_path / "broken.png").write_bytes(b"not an image")
    leaves.append("round/circle")
    acc = validation_accuracies(numpy_predictor(), paths, leaves)
    want = {}
    for decision in ("lcpn", "flat", "combined"):
        preds = numpy_predictor(decision).predict_paths(paths)
        want[decision] = float(np.mean([p.error is None and p.node == leaf for p, leaf in zip(preds, leaves)]))
    assert acc == pytest.approx(want, abs=1e-12)
    assert len(set(want.values())) == 3  # the images tell the decisions apart
    no_flat = numpy_predictor()
    no_flat.bundle.flat = None
    assert set(validation_accuracies(no_flat, paths, leaves)) == {"lcpn"}


def _manifest(models):
    return json.loads((models / "onnx" / "manifest.json").read_text())


def _accuracy(predictor, paths, leaves):
    return float(np.mean([p.node == leaf for p, leaf in zip(predictor.predict_paths(paths), leaves)]))


def test_the_export_records_each_decisions_validation_accuracy(pipeline):
    from hiernet.hierarchy import load_hierarchy_json
    from hiernet.predictor import HierarchicalPredictor

    rec = _manifest(pipeline["models"])["decision"]
    hier, _ = load_hierarchy_json(pipeline["split"] / "hierarchy.json")
    paths, leaves = validation_split(pipeline["split"], hier)
    assert rec["n_images"] == len(paths) > 0 and rec["precision"] == "fp32"
    assert set(rec["leaf_accuracy"]) == {"lcpn", "flat", "combined"}
    for decision, acc in rec["leaf_accuracy"].items():  # each as predict.py would score with that decision
        got = _accuracy(HierarchicalPredictor.load(pipeline["models"], decision=decision), paths, leaves)
        assert got == pytest.approx(acc, abs=1.01 / len(paths)), decision  # a mirrored close call may differ
    assert rec["chosen"] == choose_decision(rec["leaf_accuracy"], rec["n_images"], "fp32")["chosen"]
    assert "decision: validation leaf accuracy lcpn" in pipeline["train"].stdout


@pytest.fixture()
def models_copy(pipeline, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(pipeline["models"], models)
    return models


def _set_choice(models, chosen):
    doc = _manifest(models)
    if chosen is None:
        doc.pop("decision", None)
    else:
        doc["decision"] = {**doc["decision"], "chosen": chosen}
    (models / "onnx" / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("chosen", ["flat", "combined", "lcpn"])
def test_auto_follows_the_exports_choice(pipeline, models_copy, chosen):
    from hiernet.predictor import HierarchicalPredictor

    _set_choice(models_copy, chosen)
    auto = HierarchicalPredictor.load(models_copy, decision="auto")
    assert auto.options.decision == chosen and (auto.flat is not None) == (chosen != "lcpn")
    imgs = [str(p) for p in sorted(pipeline["data"].rglob("*.jpg"))[::5]]
    want = HierarchicalPredictor.load(models_copy, decision=chosen).predict_paths(imgs)
    assert [p.node_ids for p in auto.predict_paths(imgs)] == [p.node_ids for p in want]


def test_auto_is_lcpn_without_a_current_choice(models_copy):
    from hiernet.predictor import HierarchicalPredictor, PredictOptions

    from hiernet.bundle import chosen_decision

    _set_choice(models_copy, "flat")
    assert chosen_decision(models_copy)[0] == "flat"
    (models_copy / "flat" / "model.pth").write_bytes(b"retrained since")  # the export is stale now
    assert chosen_decision(models_copy) == ("lcpn", None)
    shutil.rmtree(models_copy / "flat")
    _set_choice(models_copy, None)  # an export without a record (older, or no validation split)
    assert chosen_decision(models_copy) == ("lcpn", None)
    assert HierarchicalPredictor.load(models_copy, decision="auto").options.decision == "lcpn"
    with pytest.raises(Exception, match="unknown decision"):
        PredictOptions(decision="vote")


def test_predict_cli_defaults_to_auto_and_says_which(pipeline, models_copy, tmp_path):
    _set_choice(models_copy, "combined")
    from hiernet.predictor import HierarchicalPredictor

    imgs = [str(p) for p in sorted(pipeline["data"].rglob("*.jpg"))[::4]]
    out = run([sys.executable, REPO / "src" / "predict.py", "--models-dir", models_copy, *imgs, "-v",
               "-o", tmp_path / "p.json"], cwd="/")
    assert "decision: combined (the export's choice on" in out.stderr
    want = HierarchicalPredictor.load(models_copy, decision="combined").predict_paths(imgs)
    got = json.loads((tmp_path / "p.json").read_text())
    assert [r["node"] for r in got] == [p.node for p in want]
    assert [r["confidence"] for r in got] == pytest.approx([p.confidence for p in want], rel=1e-4)


def test_evaluate_names_the_decision_predict_uses(pipeline, models_copy):
    from hiernet.evaluation import evaluate
    from hiernet.report import summary_lines

    _set_choice(models_copy, "flat")
    res, _ = evaluate(models_copy, data_dir=pipeline["split"])
    assert res["auto_decision"]["chosen"] == "flat" and res["auto_decision"]["n_images"] > 0
    assert any(line.startswith("predict.py --decision auto (its default) uses flat: the most accurate decision on")
               for line in summary_lines(res))


def test_the_service_follows_the_choice_and_reloads_it(models_copy):
    from hiernet.predictor import PredictOptions
    from hiernet.serving import ServeConfig, load_model, models_fingerprint

    _set_choice(models_copy, "flat")
    config = ServeConfig(models_copy, options=PredictOptions(decision="auto"), max_batch=2)
    assert load_model(config).predictor.options.decision == "flat"
    before = models_fingerprint(models_copy)
    _set_choice(models_copy, "combined")  # a new export: the manifest is rewritten, the service reloads
    assert models_fingerprint(models_copy) != before
    assert load_model(config).predictor.options.decision == "combined"
