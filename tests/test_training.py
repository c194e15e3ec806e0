"""One node's training steps (training.py) on tiny hand-built trees: fine-label targets with partial
labels (set targets over the leaves below their node), and a real node trained on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, draw_image, make_tree

from hiernet.config import TrainConfig
from hiernet.training import load_node_data, train_node

TREE = {"round": {"circle": "ellipse", "plus": "cross"}, "angular": {"box": "rectangle", "tri": "triangle"}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The 2-level tree with 6 partial labels at 'round' (images directly in round/), prepared."""
    base = tmp_path_factory.mktemp("partial")
    tree = make_tree(base / "tree", TREE, per_leaf=8)
    for i in range(6):
        draw_image(tree / "round" / f"stray_{i}.jpg", "ellipse", 500 + i)
    out = base / "split"
    subprocess.run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(tree), "-o", str(out), "-q"],
                   check=True, capture_output=True)
    return out


def test_partial_labels_are_set_targets_over_the_leaves_below_their_node(prepared):
    doc = json.loads((prepared / "hierarchy.json").read_text())
    assert len(doc["partial_images"]) == 6
    data = load_node_data(prepared, "parent")
    assert data.fine_leaves == ["angular/box", "angular/tri", "round/circle", "round/plus"]
    assert data.target_sets == [[0.0, 0.0, 1.0, 1.0]]  # the leaves below 'round'
    node_of = {im["file"]: im["node"] for im in doc["partial_images"]}
    leaf_of = {im["file"]: im["leaf"] for im in doc["images"]}
    for split in ("train", "val", "test"):
        for (path, child), y in zip(data.splits[split], data.targets[split]):
            if path.name in node_of:
                assert y == -1 and data.classes[child] == "round"
            else:
                assert data.fine_leaves[y] == leaf_of[path.name]
    assert data.targets["train"].dtype == np.int64 and (data.targets["train"] < 0).any()
    # nodes without partial labels below them have no sets; --no-fine-labels trains children as before
    assert load_node_data(prepared, "round").target_sets is None
    plain = load_node_data(prepared, "parent", fine_labels=False)
    assert plain.fine_leaves is None and plain.target_sets is None and (plain.targets["train"] >= 0).all()


def test_a_node_with_partial_labels_below_it_trains_its_leaf_outputs(prepared, tmp_path):
    cfg = TrainConfig().override({"backbone": "efficientnet-lite0", "image_size": 64, "epochs": 2, "views": 0,
                                  "precision": "fp32",
                                  "calibrate": False})
    summary = train_node(cfg, "parent", prepared, tmp_path / "models", cache_dir=tmp_path / "cache", progress=False)
    assert np.isfinite(summary["best_val_loss"])
    ck = torch.load(tmp_path / "models" / "parent" / "model.pth", weights_only=True)
    head = ck["config"]["head"]
    assert head["n_fine"] == 4 and head["fine_classes"] == ["angular/box", "angular/tri", "round/circle", "round/plus"]
    assert ck["state_dict"]["head"]["group"].shape == (4, 2)
    log = (tmp_path / "models" / "parent" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and "nan" not in log[1]


def test_models_hierarchy_carries_the_display_names_of_a_catalogue(prepared, tmp_path):
    from hiernet.training import load_prepared, write_models_hierarchy

    _, doc = load_prepared(prepared)
    for name in ("folder", "shop"):
        (tmp_path / name).mkdir()
    write_models_hierarchy(tmp_path / "folder", doc)  # a tree from folders: no display map
    assert "display" not in json.loads((tmp_path / "folder" / "hierarchy.json").read_text())
    shop = {**doc, "display": {"round": "Round & co", "round/plus": "Plus / Cross"}}
    write_models_hierarchy(tmp_path / "shop", shop)
    out = json.loads((tmp_path / "shop" / "hierarchy.json").read_text())
    assert out["display"] == {"round": "Round & co", "round/plus": "Plus / Cross"}


def _head_mean(models: Path, ds: str) -> np.ndarray:
    return torch.load(models / ds / "model.pth", weights_only=True)["state_dict"]["head"]["mean"].numpy()


def test_heads_standardise_with_the_pinned_statistics_of_the_whole_tree(prepared, tmp_path):
    # a small node's own statistics are noisy (3-fold CV on the catalogue: -2 points of leaf accuracy);
    # every head standardises with the tree's, pinned in the models folder so added images change no head
    from hiernet.features import TREE_STATS

    cfg = TrainConfig().override({"backbone": "efficientnet-lite0", "image_size": 64, "epochs": 1, "views": 0,
                                  "precision": "fp32", "calibrate": False})
    models, cache = tmp_path / "models", tmp_path / "cache"
    train_node(cfg, "round", prepared, models, cache_dir=cache, progress=False)
    pin = json.loads((models / TREE_STATS).read_text())["stats"]
    (entry,) = pin.values()
    doc = json.loads((prepared / "hierarchy.json").read_text())
    assert entry["n_images"] == sum(im["split"] == "train" for im in doc["images"])  # the tree's, not round's
    assert np.allclose(_head_mean(models, "round"), entry["mean"], atol=1e-6)
    # the node's own statistics (--standardize node) are another thing
    own = tmp_path / "own"
    train_node(cfg.override({"standardize": "node"}), "round", prepared, own, cache_dir=cache, progress=False)
    assert not np.allclose(_head_mean(own, "round"), entry["mean"], atol=1e-3)
    assert not (own / TREE_STATS).exists()
    # the next node reads the pin (here: doctored), whatever the images now are ...
    entry["mean"] = [0.25] * len(entry["mean"])
    (models / TREE_STATS).write_text(json.dumps({"version": 1, "stats": pin}))
    train_node(cfg, "angular", prepared, models, cache_dir=cache, progress=False)
    assert np.allclose(_head_mean(models, "angular"), 0.25)
    # ... and --force recomputes them and pins the new ones
    train_node(cfg, "angular", prepared, models, cache_dir=cache, progress=False, recalibrate=True)
    fresh = _head_mean(models, "angular")
    assert np.allclose(fresh, _head_mean(models, "round"), atol=1e-6)
    (entry,) = json.loads((models / TREE_STATS).read_text())["stats"].values()
    assert np.allclose(entry["mean"], fresh, atol=1e-6)


def test_a_tuned_classifier_is_the_flat_head_as_it_is(prepared, tmp_path, monkeypatch):
    """--flat-classifier: the flat head computes the tuned classifier's logits on the raw features (its
    standardiser folded in), only the temperature is fitted; a classifier of other leaves or of other
    backbone weights, or for another node, is refused in one line."""
    from hiernet.artifacts import read_checkpoint
    from hiernet.backbones import create_backbone
    from hiernet.models import build_head
    from hiernet.safeio import UserError
    from hiernet.tailtune import save_classifier

    classes = json.loads((prepared / "hierarchy.json").read_text())["flat"]["classes"]
    fingerprint = create_backbone("efficientnet-lite0", image_size=64).weights_fingerprint
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(len(classes), 1280, generator=gen) * 0.05, torch.randn(len(classes), generator=gen)
    clf = tmp_path / "tuned.classifier.pth"
    save_classifier(clf, weight, bias, classes, "efficientnet-lite0", 64, fingerprint)
    cfg = TrainConfig().override({"backbone": "efficientnet-lite0", "image_size": 64, "views": 1, "precision": "fp32",
                                  "hidden": 0, "flat_classifier": str(clf)})
    models, cache = tmp_path / "models", tmp_path / "cache"
    import hiernet.training as training

    seen, real_adjust = {}, training.adjust_for_prior

    def spy(head, train_labels, val_x, val_y, val_mirror=None):
        seen.update(val_x=val_x, val_mirror=val_mirror)
        return real_adjust(head, train_labels, val_x, val_y, val_mirror)

    monkeypatch.setattr(training, "adjust_for_prior", spy)
    summary = train_node(cfg, "flat", prepared, models, cache_dir=cache, progress=False)
    assert summary["epochs_run"] == 0 and summary["calibration"] is not None
    # tau is chosen on the validation images as prediction decides them: with their mirror views (tta)
    assert cfg.tta and seen["val_mirror"] is not None and seen["val_mirror"].shape == seen["val_x"].shape
    assert not np.allclose(seen["val_mirror"], seen["val_x"])
    ck = read_checkpoint(models / "flat" / "model.pth")
    assert ck["config"]["head"]["hidden"] == 0 and ck["config"]["train"]["flat_classifier"] == str(clf)
    head = build_head(ck["config"]["head"])
    head.load_state_dict(ck["state_dict"]["head"])
    head.eval()
    assert not torch.allclose(head.std, torch.ones_like(head.std))  # a real standardiser, folded in
    x = torch.rand(5, 1280) * 3
    counts = np.bincount(load_node_data(prepared, "flat").targets["train"], minlength=len(classes))
    tau = summary["prior_tau"]  # chosen on the validation split (adjust_for_prior, tested below)
    shift = torch.as_tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(head(x) * head.temperature, x @ weight.T + bias - shift, atol=1e-3)
    assert "the tuned classifier" in (models / "flat" / "performance.txt").read_text()
    for bad, message in (((list(reversed(classes)), fingerprint), "other leaves"),
                         ((classes, "0123456789abcdef"), "other backbone weights")):
        save_classifier(tmp_path / "bad.pth", weight, bias, bad[0], "efficientnet-lite0", 64, bad[1])
        with pytest.raises(UserError, match=message):
            train_node(cfg.override({"flat_classifier": str(tmp_path / "bad.pth")}), "flat", prepared, tmp_path / "m2",
                       cache_dir=cache, progress=False)
    with pytest.raises(UserError, match="-d flat, not -d round"):
        train_node(cfg, "round", prepared, tmp_path / "m3", cache_dir=cache, progress=False)
    assert not (tmp_path / "m2" / "flat").exists() and not (tmp_path / "m3" / "round").exists()


def test_the_prior_tau_is_the_most_accurate_and_the_smallest_among_equals():
    from hiernet.training import PRIOR_TAUS, choose_prior_tau

    assert choose_prior_tau(lambda tau: 0.7 if 0.5 <= tau <= 0.7 else 0.6) == 0.5
    assert choose_prior_tau(lambda tau: 0.8) == 0.0  # nothing gained: no adjustment
    assert choose_prior_tau(lambda tau: tau) == PRIOR_TAUS[-1]


def test_the_tuned_classifier_is_adjusted_for_the_prior_as_the_validation_split_chooses():
    """Post-hoc logit adjustment: bias - tau * log(prior), tau with the best validation accuracy, the smallest
    among equals (so a classifier the adjustment does not help is left as it is)."""
    from hiernet.models import Head
    from hiernet.training import PRIOR_TAUS, adjust_for_prior

    labels = np.array([0] * 90 + [1] * 10)  # class 1 is rare
    log_prior = np.log(np.array([0.9, 0.1]))

    def head():
        h = Head(1, 2)
        h.load_linear(torch.tensor([[1.0], [-1.0]]), torch.as_tensor(log_prior, dtype=torch.float32))
        return h

    # class 1 below x = -(1 - tau) * 1.10: unadjusted -1.10, tau 0.5 -0.55, tau 0.75 -0.27, tau 1 0
    h = head()  # the rare class's validation images at -0.1 and -0.2: only tau 1 gets them
    assert adjust_for_prior(h, labels, np.array([[-0.1], [-0.2], [2.0]], np.float32), np.array([1, 1, 0])) == 1.0
    assert torch.allclose(h.net[-1].bias, torch.zeros(2), atol=1e-6)  # bias - 1 * log prior
    h = head()  # -0.6: tau 0.5 is the smallest that gets it
    assert adjust_for_prior(h, labels, np.array([[-0.6], [2.0]], np.float32), np.array([1, 0])) == 0.5 in PRIOR_TAUS
    h = head()  # -1.0: a small adjustment, tau 0.1 (threshold -0.99), gets it; a coarser grid would overshoot
    assert adjust_for_prior(h, labels, np.array([[-1.0], [-0.3], [2.0]], np.float32), np.array([1, 0, 0])) == 0.1
    # with the mirror views, as prediction decides: a mirror far on class 0's side outvotes any adjustment
    val, mirror = np.array([[-1.0], [2.0]], np.float32), np.array([[3.0], [2.0]], np.float32)
    assert adjust_for_prior(head(), labels, val, np.array([1, 0])) == 0.1
    assert adjust_for_prior(head(), labels, val, np.array([1, 0]), mirror) == 0.0
    # ... and a mirror that agrees with the rare class lets a smaller adjustment do (x -0.6 alone needs 0.5)
    assert adjust_for_prior(head(), labels, np.array([[-0.6], [2.0]], np.float32), np.array([1, 0]),
                            np.array([[-2.0], [2.0]], np.float32)) == 0.0
    h = head()  # nothing to gain: left as it is
    assert adjust_for_prior(h, labels, np.array([[2.0], [-3.0]], np.float32), np.array([0, 1])) == 0.0
    assert torch.allclose(h.net[-1].bias, torch.as_tensor(log_prior, dtype=torch.float32))
    assert adjust_for_prior(head(), labels, None, None) == 0.0
