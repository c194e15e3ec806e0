"""Tuning a backbone's last blocks on cached trunk maps (hiernet.tailtune, src/tune_backbone.py)."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TWO_LEVEL, make_tree, noise_images, pattern_maps, run
from hiernet.backbones import create_backbone, load_state_dict_file, state_fingerprint
from hiernet.safeio import UserError
from hiernet import tailtune


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet-lite0", image_size=64)


@pytest.mark.parametrize("blocks", [1, 5])
def test_trunk_then_tail_is_the_backbone(lite0, blocks):
    trunk, tail = tailtune.split_backbone(lite0, blocks)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        maps = trunk(x)
        assert maps.shape[1] == (192 if blocks == 1 else 112)  # block 15 of 16 takes 192 channels, block 11 112
        assert torch.allclose(tail(maps), lite0(x), atol=1e-4)
    assert tail.cut == 16 - blocks and len(tail.blocks) == blocks


def test_split_refuses_a_composite_and_a_cut_outside_the_network(lite0):
    with pytest.raises(UserError, match="one backbone at a time"):
        tailtune.split_backbone(create_backbone("efficientnet-lite1+efficientnet-lite0", image_size=64), 1)
    for bad in (0, 17):
        with pytest.raises(UserError, match="--tune-blocks must be 1-16"):
            tailtune.split_backbone(lite0, bad)


def test_tuned_state_dict_loads_as_the_backbone_with_the_tuned_tail(lite0, tmp_path):
    before = state_fingerprint(lite0.trunks()[0].state_dict())
    trunk, tail = tailtune.split_backbone(lite0, 2)
    with torch.no_grad():  # a "tuned" tail: every tail tensor moved
        for p in tail.parameters():
            p.add_(0.01 * torch.randn_like(p))
        tail.bn1.running_mean.add_(0.1)
    sd = tailtune.tuned_state_dict(lite0, tail)
    assert state_fingerprint(lite0.trunks()[0].state_dict()) == before  # the backbone itself is unchanged
    torch.save(sd, tmp_path / "tuned.pth")
    tuned = create_backbone("efficientnet-lite0", weights=tmp_path / "tuned.pth", image_size=64)
    assert tuned.weights_fingerprint not in (before, lite0.weights_fingerprint)
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(tuned(x), tail(trunk(x)), atol=1e-4)
        assert not torch.allclose(tuned(x), lite0(x), atol=1e-3)
        # the trunk's tensors are the ImageNet ones
        assert torch.allclose(tailtune.split_backbone(tuned, 2)[0](x), trunk(x), atol=1e-5)


def test_trunk_maps_are_the_trunks_views_cached_once(lite0, tmp_path, monkeypatch):
    from hiernet.data import eval_views
    from hiernet.images import load_rgb

    paths = noise_images(tmp_path)
    trunk, _ = tailtune.split_backbone(lite0, 1)
    maps, ok = tailtune.trunk_maps(paths, lite0, 1, "crop", 1, 0, tmp_path / "cache", progress=False)
    assert maps.shape == (4, 3, 192, 2, 2) and maps.dtype == np.float32
    assert ok.tolist() == [True, False, True, True]
    with torch.inference_mode():
        want = trunk(torch.from_numpy(eval_views(load_rgb(paths[2]), 64, "crop"))).numpy()
    np.testing.assert_allclose(maps[2, :2], want, atol=1e-3, rtol=1e-3)  # onnxruntime = the torch trunk
    assert not np.allclose(maps[2, 0], maps[2, 1], atol=1e-2)  # the mirror, and an augmented view
    assert not np.allclose(maps[2, 0], maps[2, 2], atol=1e-2)
    monkeypatch.setattr("hiernet.runtime.OrtRunner", lambda *a, **k: pytest.fail("recomputed"))
    again, ok2 = tailtune.trunk_maps(paths, lite0, 1, "crop", 1, 0, tmp_path / "cache", progress=False)
    assert np.array_equal(again[ok2], maps[ok]) and ok2.tolist() == ok.tolist()
    # another cut is another cache entry
    monkeypatch.undo()
    other, _ = tailtune.trunk_maps(paths, lite0, 5, "crop", 1, 0, tmp_path / "cache", progress=False)
    assert other.shape == (4, 3, 112, 4, 4)


def test_tune_tail_learns_what_the_frozen_tail_does_not_see():
    # maps whose class shows only in a channel pattern; tuning must move the tail's weights and learn it
    maps, y = pattern_maps()
    n = len(y)
    _, tail = tailtune.split_backbone(create_backbone("efficientnet-lite0", pretrained=False, image_size=64), 1)
    before = [p.detach().clone() for p in tail.parameters()]
    tr, te = np.arange(n) < 45, np.arange(n) >= 45
    t, cls = tailtune.tune_tail(tail, maps[tr], y[tr], 3, epochs=15, seed=0, lr=3e-3)
    assert all(not torch.equal(a, b) for a, b in zip(before, t.parameters()))
    probs = tailtune.tuned_probs(t, cls, maps[te])
    assert probs.shape == (15, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.mean(probs.argmax(1) == y[te]) >= 0.8
    assert tailtune.pooled(t, maps[te], [0, 1, 2]).shape == (15, 3, 1280)


def test_level_groups_are_each_leafs_ancestor_at_every_level_above_the_leaves():
    from hiernet.hierarchy import Hierarchy

    leaf_ids = ["a/x/1", "a/x/2", "a/y", "b"]
    hier = Hierarchy.from_leaf_paths(leaf_ids)
    groups = tailtune.level_groups(hier, leaf_ids)
    assert [g.tolist() for g in groups] == [[0, 0, 0, 1], [0, 0, 1, 2]]  # top level: a a a b; then a/x a/x a/y b
    # a two-level tree with one top-level node has no level above the leaves worth a loss
    assert tailtune.level_groups(Hierarchy.from_leaf_paths(["a/x", "a/y"]), ["a/x", "a/y"]) == []


def test_the_level_loss_is_the_true_ancestors_negative_log_probability():
    groups = [np.array([0, 0, 1]), np.array([0, 1, 2])]  # the second level: every leaf its own node
    logp = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]]), 1)
    y = torch.tensor([1, 2])
    p = logp.exp()
    want = -(torch.log(p[0, 0] + p[0, 1]) + torch.log(p[1, 2])) / 2 - (logp[0, 1] + logp[1, 2]) / 2
    assert torch.allclose(tailtune.level_nll(logp, groups, y), want, atol=1e-6)


def test_tuning_with_the_level_loss_puts_more_probability_on_the_true_parent():
    # leaves 0 and 1 share a parent: the level loss must raise the parent's probability of their images
    maps, y = pattern_maps()
    groups = [np.array([0, 0, 1])]
    _, tail = tailtune.split_backbone(create_backbone("efficientnet-lite0", pretrained=False, image_size=64), 1)

    def parent_nll(**kw):
        t, cls = tailtune.tune_tail(copy.deepcopy(tail), maps, y, 3, epochs=2, seed=0, lr=1e-3, **kw)
        logp = torch.log(torch.from_numpy(tailtune.tuned_probs(t, cls, maps)))
        return float(tailtune.level_nll(logp, groups, torch.as_tensor(y)))

    plain, leveled = parent_nll(), parent_nll(levels=groups, level_weight=5.0)
    assert leveled < plain
    assert parent_nll(levels=groups, level_weight=0.0) == plain  # weight 0: the leaf loss alone


def test_the_shared_classifier_adds_each_ancestors_part_and_folds_into_one_linear_layer():
    groups = [np.array([0, 0, 1]), np.array([0, 0, 1])]  # leaves 0 and 1 siblings at two levels
    clf = tailtune.shared_classifier(4, 3, groups)
    assert all(float(m.weight.abs().sum()) == 0 for m in clf.shared)  # the ancestors' parts start at zero
    x = torch.randn(5, 4)
    loss = torch.nn.functional.cross_entropy(clf(x), torch.tensor([0, 0, 0, 0, 0]))
    loss.backward()
    # an ancestor's part gets the sum of its leaves' gradients: leaves 0 and 1 share group 0
    want = clf.leaf.weight.grad[0] + clf.leaf.weight.grad[1]
    assert torch.allclose(clf.shared[0].weight.grad[0], want, atol=1e-6)
    assert torch.allclose(clf.shared[1].weight.grad[1], clf.leaf.weight.grad[2], atol=1e-6)
    with torch.no_grad():
        for i, m in enumerate(clf.shared):
            m.weight.normal_()
            m.bias.fill_(i + 1.0)
        folded = clf.collapsed()
        assert isinstance(folded, torch.nn.Linear)
        assert torch.allclose(folded(x), clf(x), atol=1e-5)
        parts = clf.shared[0](x) + clf.shared[1](x)  # (5, 2): group 0 and group 1
        assert torch.allclose(clf(x)[:, 0] - clf.leaf(x)[:, 0], parts[:, 0], atol=1e-5)


def test_tuning_with_shared_levels_returns_one_linear_layer_and_differs_from_the_plain_one():
    maps, y = pattern_maps()
    groups = [np.array([0, 0, 1])]
    _, tail = tailtune.split_backbone(create_backbone("efficientnet-lite0", pretrained=False, image_size=64), 1)
    runs = {}
    for share in (False, True):
        t, cls = tailtune.tune_tail(copy.deepcopy(tail), maps, y, 3, epochs=2, seed=0, lr=1e-3, levels=groups,
                                    share_levels=share)
        assert isinstance(cls[1], torch.nn.Linear) and cls[1].weight.shape == (3, 1280)
        runs[share] = tailtune.tuned_probs(t, cls, maps)
    assert not np.allclose(runs[False], runs[True])
    assert np.allclose(runs[True].sum(1), 1, atol=1e-5)


def test_a_large_share_decay_pulls_sibling_leaves_toward_their_shared_weights():
    # leaves 0 and 1 share an ancestor; decaying only each leaf's own part must bring their rows together
    maps, y = pattern_maps()
    groups = [np.array([0, 0, 1])]
    _, tail = tailtune.split_backbone(create_backbone("efficientnet-lite0", pretrained=False, image_size=64), 1)

    def sibling_gap(**kw):
        _, cls = tailtune.tune_tail(copy.deepcopy(tail), maps, y, 3, epochs=10, seed=0, lr=1e-3, levels=groups,
                                    share_levels=True, **kw)
        w = cls[1].weight.detach()
        return float((w[0] - w[1]).norm() / (w[0] - w[2]).norm())

    assert sibling_gap(share_decay=50.0) < 0.75 * sibling_gap()


def test_repeat_factors_repeat_only_the_classes_rarer_than_the_threshold():
    y = np.array([0] * 90 + [1] * 9 + [2])
    r = tailtune.repeat_factors(y, 4, 0.1)  # class 3 has no image: no factor, no error
    assert r.shape == (100,) and np.allclose(r[:90], 1.0)
    assert np.allclose(r[90:99], np.sqrt(0.1 / 0.09)) and np.isclose(r[99], np.sqrt(10))


class _Recorder:
    """Maps that record which images and views tuning reads."""

    def __init__(self, maps):
        self.maps, self.shape, self.reads = maps, maps.shape, []

    def __getitem__(self, key):
        self.reads.append((np.array(key[0]), np.array(key[1])))
        return self.maps[key]


def test_repeat_factor_sampling_shows_rare_images_more_often_in_other_views():
    maps, y = pattern_maps()
    keep = np.flatnonzero((y != 2) | (np.arange(len(y)) < 12))  # 20 + 20 images of classes 0 and 1, 4 of class 2
    maps, y = maps[keep], y[keep]
    _, tail = tailtune.split_backbone(create_backbone("efficientnet-lite0", pretrained=False, image_size=64), 1)
    epochs = 4

    def reads(**kw):
        rec = _Recorder(maps)
        tailtune.tune_tail(copy.deepcopy(tail), rec, y, 3, epochs=epochs, seed=0, lr=1e-3, batch=16, **kw)
        ids = np.concatenate([i for i, _ in rec.reads])
        views = np.concatenate([v for _, v in rec.reads])
        return np.bincount(ids, minlength=len(y)), ids, views

    plain, _, _ = reads()
    assert (plain == epochs).all()  # without it: every image once per epoch
    factor = tailtune.repeat_factors(y, 3, 0.4)[y == 2][0]  # sqrt(0.4 / (4/44)) = 2.1; classes 0, 1 (20/44): 1
    counts, ids, views = reads(repeat_threshold=0.4)
    assert (counts[y != 2] == epochs).all()
    rare = counts[y == 2]
    assert (rare >= np.floor(factor) * epochs).all() and (rare <= np.ceil(factor) * epochs).all() and rare.sum() > 8 * epochs
    assert all(len(set(views[ids == i])) > 1 for i in np.flatnonzero(y == 2))  # a repeat is another view


def test_read_views_takes_views_past_the_cached_ones_from_the_extra_maps():
    maps = np.arange(4 * 2 * 3, dtype=np.float16).reshape(4, 2, 3, 1, 1)  # 4 images, 2 views
    extra_maps = -np.arange(1, 2 * 3 * 3 + 1, dtype=np.float16).reshape(2, 3, 3, 1, 1)  # 2 rows, 3 views
    rows = np.array([-1, 1, -1, 0])
    b, v = np.array([0, 1, 1, 3, 3]), np.array([1, 0, 4, 2, 3])
    x = tailtune._read_views(maps, b, v, (extra_maps, rows))
    want = np.stack([maps[0, 1], maps[1, 0], extra_maps[1, 2], extra_maps[0, 0], extra_maps[0, 1]])
    assert x.dtype == np.float32 and np.array_equal(x, want)
    assert np.array_equal(tailtune._read_views(maps, b[:2], v[:2], None), maps[b[:2], v[:2]])


def test_extra_views_are_drawn_for_the_images_that_have_them_and_no_others():
    maps, y = pattern_maps()
    _, tail = tailtune.split_backbone(create_backbone("efficientnet-lite0", pretrained=False, image_size=64), 1)
    rare = np.flatnonzero(y == 2)[:4]
    rows = np.full(len(y), -1)
    rows[rare] = np.arange(len(rare))
    own, extra = _Recorder(maps), _Recorder(np.repeat(maps[rare], 2, axis=1))  # 3 own views, 6 extra each
    epochs = 12
    tailtune.tune_tail(copy.deepcopy(tail), own, y, 3, epochs=epochs, seed=0, lr=1e-3, batch=16,
                       extra=(extra, rows))
    own_ids = np.concatenate([i for i, _ in own.reads])
    extra_rows, extra_views = (np.concatenate([r[k] for r in extra.reads]) for k in (0, 1))
    # every image once per epoch, from its own views or (the four with rows) from the extra ones
    seen = np.bincount(own_ids, minlength=len(y)) + np.bincount(rare[extra_rows], minlength=len(y))
    assert (seen == epochs).all()
    assert set(extra_rows) == set(range(len(rare)))  # only the images with a row, each of them
    assert extra_views.min() >= 0 and extra_views.max() < 6 and len(set(extra_views)) > 3
    assert len(extra_rows) > epochs * len(rare) / 3  # 6 of a rare image's 9 views are extra ones
    with pytest.raises(ValueError, match="extra rows"):
        tailtune.tune_tail(copy.deepcopy(tail), maps, y, 3, epochs=1, seed=0, extra=(maps[:2], rows))


def test_the_averaged_classifier_averages_the_members_logits():
    gen = torch.Generator().manual_seed(0)
    members = [(torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)),
               (torch.randn(3, 2, generator=gen), torch.randn(3, generator=gen))]
    weight, bias = tailtune.averaged_classifier(members)
    f1, f2 = torch.randn(4, 5, generator=gen), torch.randn(4, 2, generator=gen)
    expected = ((f1 @ members[0][0].T + members[0][1]) + (f2 @ members[1][0].T + members[1][1])) / 2
    assert weight.shape == (3, 7) and torch.allclose(torch.cat([f1, f2], 1) @ weight.T + bias, expected, atol=1e-5)
    one = tailtune.averaged_classifier(members[:1])
    assert torch.equal(one[0], members[0][0]) and torch.equal(one[1], members[0][1])


def test_a_classifier_file_loads_safely_or_is_refused_in_one_line(tmp_path):
    path = tmp_path / "t.classifier.pth"
    tailtune.save_classifier(path, torch.ones(2, 3), torch.zeros(2), ["a", "b"], "efficientnet-lite0", 64, "abc")
    doc = tailtune.load_classifier(path)
    assert doc["classes"] == ["a", "b"] and doc["weights_fingerprint"] == "abc" and doc["image_size"] == 64
    torch.save({**doc, "classes": ["a"]}, tmp_path / "short.pth")
    torch.save({"weight": torch.ones(2, 3)}, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a file torch wrote")

    class Code:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"format": tailtune.CLASSIFIER_FORMAT, "x": Code()}, tmp_path / "code.pth")
    for name, message in (("short.pth", "do not fit together"), ("other.pth", "not a classifier file"),
                          ("junk.pth", "not a classifier file"), ("code.pth", "not a classifier file"),
                          ("missing.pth", "not found")):
        with pytest.raises(UserError, match=message):
            tailtune.load_classifier(tmp_path / name)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("tailtune")
    data = make_tree(base / "data", TWO_LEVEL, per_leaf=8)
    run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(data), "-o", str(base / "split"), "-q"], cwd="/")
    return base


def test_tune_backbone_cli_writes_weights_that_train_py_uses(prepared):
    out = prepared / "out" / "lite0.pth"
    cache = prepared / "cache"
    proc = run([sys.executable, str(REPO / "src" / "tune_backbone.py"), "--data-dir", prepared / "split", "--image-size", 64,
                "--epochs", 2, "--views", 1, "--cache-dir", cache, "-o", out, "-q"], cwd="/")
    assert f"-> {out}" in proc.stdout and "--weights" in proc.stdout
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["backbone"] == "efficientnet-lite0" and summary["image_size"] == 64 and summary["tune"]["blocks"] == 1
    assert summary["train_images"] > 0 and 0 <= summary["val_accuracy"] <= 1 and summary["classes"] == 4
    assert 0 <= summary["val_accuracy_classifier"] <= 1 and f"-> {tailtune.classifier_path(out)}" in proc.stdout
    sd = load_state_dict_file(out)
    tuned = state_fingerprint(sd)
    clf = tailtune.load_classifier(tailtune.classifier_path(out))  # the flat head of train.py --flat-classifier
    assert tailtune.classifier_path(out).name == "lite0.classifier.pth" and f"--flat-classifier {tailtune.classifier_path(out)}" in proc.stdout
    doc = json.loads((prepared / "split" / "hierarchy.json").read_text())
    assert clf["classes"] == doc["flat"]["classes"] and clf["weight"].shape == (4, 1280) and clf["bias"].shape == (4,)
    assert clf["weights_fingerprint"] == tuned == create_backbone("efficientnet-lite0", weights=out, image_size=64).weights_fingerprint
    imagenet = create_backbone("efficientnet-lite0", image_size=64).trunks()[0].state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], imagenet[k])}
    assert changed and all(k.startswith(("_blocks.15.", "_conv_head.", "_bn1.")) for k in changed)
    # a rerun with the same training images and settings keeps the file; other settings or --force tune again
    cmd = [sys.executable, str(REPO / "src" / "tune_backbone.py"), "--data-dir", prepared / "split", "--image-size", 64,
           "--views", 1, "--cache-dir", cache, "-o", out, "-q"]
    stamp = out.stat().st_mtime_ns
    again = run([*cmd, "--epochs", 2], cwd="/")
    assert "kept" in again.stdout and out.stat().st_mtime_ns == stamp
    forced = run([*cmd, "--epochs", 2, "--force", "--no-hint"], cwd="/")
    assert out.stat().st_mtime_ns != stamp and "-> " in forced.stdout and "next:" not in forced.stdout
    stamp = out.stat().st_mtime_ns
    assert "kept" not in run([*cmd, "--epochs", 1], cwd="/").stdout and out.stat().st_mtime_ns != stamp
    run([*cmd, "--epochs", 2], cwd="/")  # back to the first settings (tuned again: the file held --epochs 1's)
    assert state_fingerprint(load_state_dict_file(out)) == tuned  # the same weights: tuning is deterministic
    out.write_bytes(b"damaged")  # a file that no longer holds what its summary says is tuned again
    assert "kept" not in run([*cmd, "--epochs", 2], cwd="/").stdout
    tailtune.classifier_path(out).unlink()  # so is one without its classifier
    assert "kept" not in run([*cmd, "--epochs", 2], cwd="/").stdout and tailtune.classifier_path(out).is_file()
    models = prepared / "models"
    run([sys.executable, str(REPO / "src" / "train.py"), "-d", "parent", "--data-dir", prepared / "split", "--output-dir",
         models, "--cache-dir", cache, "--backbone", "efficientnet-lite0", "--image-size", 64, "--weights", out,
         "--epochs", 2, "--views", 1, "--precision", "fp32", "-q"], cwd="/")
    ck = torch.load(models / "parent" / "model.pth", map_location="cpu", weights_only=True)
    assert ck["config"]["backbone"]["weights_file"] == str(out)
    assert ck["config"]["backbone"]["weights_fingerprint"] == tuned  # features of the tuned backbone
    # the torch runtime finds the weights where training did, else beside the node folders (a moved models
    # folder); nowhere: one line
    from hiernet.artifacts import ArtifactError, build_torch_model, load_node

    art = load_node(models / "parent")
    assert build_torch_model(art)[0].weights_fingerprint == tuned
    moved = out.with_name("elsewhere.pth")
    out.rename(moved)
    try:
        with pytest.raises(ArtifactError, match="are missing; put the file back"):
            build_torch_model(art)
        (models / out.name).write_bytes(moved.read_bytes())
        assert build_torch_model(art)[0].weights_fingerprint == tuned
    finally:
        moved.rename(out)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--tune-blocks", "0"], "--tune-blocks must be at least 1"),
    (["--tune-blocks", "40"], "--tune-blocks must be 1-16"),
    (["--backbone", "resnet"], "resnet"),
])
def test_tune_backbone_cli_refuses_bad_input_in_one_line(prepared, argv, message):
    proc = run([sys.executable, str(REPO / "src" / "tune_backbone.py"), "--data-dir", prepared / "split",
                "--image-size", 64, "--cache-dir", prepared / "cache", "-o", prepared / "bad.pth", *argv], cwd="/", check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (prepared / "bad.pth").exists()


def test_tune_backbone_cli_tunes_every_member_of_a_composite(prepared):
    """The default recipe's composite: the last block of each member tuned; one weights file (the composite's
    net.state_dict()) that train.py loads; without --image-size, the size train.py uses with it (280)."""
    name = "efficientnet-lite1+efficientnet-lite0"
    out, cache = prepared / "out" / "both.pth", prepared / "cache"
    cmd = [sys.executable, str(REPO / "src" / "tune_backbone.py"), "--data-dir", prepared / "split", "--backbone", name,
           "--views", 1, "--cache-dir", cache, "-o", out, "-q"]
    run([*cmd, "--image-size", 64, "--epochs", 2], cwd="/")
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["backbone"] == name and summary["image_size"] == 64 and 0 <= summary["val_accuracy"] <= 1
    sd = load_state_dict_file(out)
    imagenet = create_backbone(name, image_size=64).net.state_dict()
    assert set(sd) == set(imagenet)
    changed = {k for k in sd if not torch.equal(sd[k], imagenet[k])}
    tails = ("0._blocks.20.", "0._conv_head.", "0._bn1.", "1._blocks.15.", "1._conv_head.", "1._bn1.")
    assert all(k.startswith(tails) for k in changed)
    assert any(k.startswith("0._blocks.20.") for k in changed) and any(k.startswith("1._blocks.15.") for k in changed)
    tuned = create_backbone(name, weights=out, image_size=64)
    assert summary["weights_fingerprint"] == state_fingerprint(sd)
    clf = tailtune.load_classifier(tailtune.classifier_path(out))  # the members' classifiers, one linear layer
    assert clf["weight"].shape == (4, 1280 + 1280) and clf["weights_fingerprint"] == tuned.weights_fingerprint
    assert 0 <= summary["val_accuracy_classifier"] <= 1
    models = prepared / "models-both"
    run([sys.executable, str(REPO / "src" / "train.py"), "-d", "parent", "--data-dir", prepared / "split", "--output-dir",
         models, "--cache-dir", cache, "--backbone", name, "--image-size", 64, "--weights", out, "--epochs", 2,
         "--views", 1, "--precision", "fp32", "-q"], cwd="/")
    ck = torch.load(models / "parent" / "model.pth", map_location="cpu", weights_only=True)
    assert ck["config"]["backbone"]["weights_fingerprint"] == tuned.weights_fingerprint  # the tuned composite's features
    run([*cmd, "-o", prepared / "out" / "both280.pth", "--epochs", 1, "--views", 0], cwd="/")
    assert json.loads((prepared / "out" / "both280.json").read_text())["image_size"] == 280


def test_train_lcpn_tune_backbone_refuses_its_own_flags(prepared):
    proc = run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--data-dir", prepared / "split", "--output-dir",
                prepared / "m2", "--tune-backbone", "efficientnet-lite0", "--backbone", "efficientnet-lite1"], cwd="/",
               check=False)
    assert proc.returncode == 2 and "sets --backbone and --weights itself; drop --backbone" in proc.stderr
    assert not (prepared / "m2" / "tuned_backbone.pth").exists()


def test_tune_backbone_cli_needs_a_prepared_tree(tmp_path):
    proc = run([sys.executable, str(REPO / "src" / "tune_backbone.py"), "--data-dir", tmp_path / "nothing"], cwd="/",
               check=False)
    assert proc.returncode != 0 and "prepare_dataset.py" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_lcpn_tunes_the_recipes_composite_and_predicts_with_it(prepared):
    """train_lcpn.sh --tune-backbone A+B: both members tuned, every node trained on the tuned composite,
    the flat head is the members' tuned classifiers averaged, exported, and predict.py (onnx and torch
    runtimes, every decision) runs the tuned composite."""
    import os

    from hiernet.artifacts import read_checkpoint
    from hiernet.predictor import HierarchicalPredictor

    name = "efficientnet-lite1+efficientnet-lite0"
    models = prepared / "models-recipe"
    env = dict(os.environ, PYTHON=sys.executable)
    run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--data-dir", prepared / "split", "--output-dir", models,
         "--tune-backbone", name, "--image-size", 64, "--epochs", 2, "--views", 1, "--cache-dir", prepared / "cache", "-q"],
        cwd="/", env=env)
    tuned = create_backbone(name, weights=models / "tuned_backbone.pth", image_size=64)
    assert tuned.weights_fingerprint != create_backbone(name, image_size=64).weights_fingerprint
    ck = torch.load(models / "parent" / "model.pth", map_location="cpu", weights_only=True)
    assert ck["config"]["backbone"]["name"] == name and ck["config"]["backbone"]["weights_fingerprint"] == tuned.weights_fingerprint
    imgs = [str(p) for p in sorted((prepared / "data").rglob("*.jpg"))[:4]]
    onnx_ = HierarchicalPredictor.load(models, runtime="onnx", precision="fp32").predict_paths(imgs)
    torch_ = HierarchicalPredictor.load(models, runtime="torch", precision="auto").predict_paths(imgs)
    for a, b in zip(onnx_, torch_):  # the export carries the tuned composite; the torch runtime loads its file
        assert a.complete and a.node_ids == b.node_ids and np.max(np.abs(np.array(a.probs) - np.array(b.probs))) < 1e-4
    flat = read_checkpoint(models / "flat" / "model.pth")
    clf = tailtune.load_classifier(models / "tuned_backbone.classifier.pth")
    assert flat["config"]["train"]["flat_classifier"] == str(models / "tuned_backbone.classifier.pth")
    assert flat["config"]["head"]["hidden"] == 0 and json.loads((models / "flat" / "metrics.json").read_text())["epochs_run"] == 0
    head = flat["state_dict"]["head"]  # the classifier with the standardiser folded in
    assert torch.allclose(head["net.1.weight"], clf["weight"] * head["std"], atol=1e-5)
    for decision in ("flat", "combined"):
        preds = HierarchicalPredictor.load(models, runtime="onnx", precision="fp32", decision=decision).predict_paths(imgs)
        assert all(p.complete for p in preds)
    # TRAIN_FLAT_HEAD=1 trains the flat head on the tuned features instead (the tuning itself is kept)
    out = run(["bash", str(REPO / "src" / "train_lcpn.sh"), "--data-dir", prepared / "split", "--output-dir", models,
               "--tune-backbone", name, "--image-size", 64, "--epochs", 2, "--views", 1, "--cache-dir", prepared / "cache",
               "-q"], cwd="/", env=dict(env, TRAIN_FLAT_HEAD="1", NO_EXPORT="1")).stdout
    assert "kept" in out and read_checkpoint(models / "flat" / "model.pth")["config"]["train"]["flat_classifier"] is None


@pytest.mark.parametrize("node, extra, message", [
    ("flat", [], "not found; write it with: python3 src/tune_backbone.py"),
    ("parent", [], "use it with -d flat, not -d parent"),
    ("flat", ["--hidden", "64"], "--flat-classifier is a linear head; drop --hidden 64"),
])
def test_train_py_flat_classifier_refuses_in_one_line(prepared, node, extra, message):
    models = prepared / "models-refused"
    proc = run([sys.executable, str(REPO / "src" / "train.py"), "-d", node, "--data-dir", prepared / "split",
                "--output-dir", models, "--cache-dir", prepared / "cache", "--backbone", "efficientnet-lite0",
                "--image-size", 64, "--flat-classifier", prepared / "missing.classifier.pth", *extra], cwd="/", check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (models / node).exists()
