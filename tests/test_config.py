"""TrainConfig: presets, flags over a preset, and the round trip through model.pth."""

from __future__ import annotations

import dataclasses

import pytest

from hiernet.config import FLAG_FIELDS, PRESETS, AugmentConfig, TrainConfig, preset_with_flags
from hiernet.safeio import UserError


def test_the_cpu_preset_is_the_default_and_both_presets_round_trip():
    assert PRESETS["cpu"] == TrainConfig()
    original = PRESETS["original"]
    assert original.mode == "finetune" and original.fit.class_weight_power == 0.5 and original.head.hidden == 0
    for cfg in PRESETS.values():
        d = cfg.to_dict()
        assert isinstance(d["fit"], dict) and isinstance(d["augment"]["scale"], list)  # plain JSON data
        assert TrainConfig.from_dict(d) == cfg


def test_from_dict_ignores_unknown_keys_and_fills_missing_ones():
    d = PRESETS["original"].to_dict()
    d["split_seed"] = 1337
    d["fit"]["future_option"] = 1
    del d["head"]["dropout"], d["views"]
    cfg = TrainConfig.from_dict(d)
    assert cfg.backbone == "efficientnet-b4" and cfg.fit.epochs == 25
    assert cfg.head.dropout == TrainConfig().head.dropout and cfg.views == TrainConfig().views
    with pytest.raises(UserError, match="cannot be read.*retrain"):
        TrainConfig.from_dict({"fit": {"epochs": 3}, "head": "not a dict"})
    with pytest.raises(UserError, match="must be a dict"):
        TrainConfig.from_dict(["x"])


def test_from_dict_reads_the_flat_train_dict_of_older_checkpoints():
    old = {"backbone": "efficientnet-lite0", "image_size": 64, "mode": "frozen", "resize": "pad", "views": 1,
           "hidden": 16, "dropout": 0.1, "epochs": 4, "batch_size": 8, "lr": 0.01, "weight_decay": 0.0,
           "patience": 2, "label_smoothing": 0.0, "tta": False, "class_weights": 0.5, "fine_labels": False,
           "calibrate": False, "onnx": True, "preset": "cpu", "seed": 3, "split_seed": 1337}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.head.hidden, cfg.head.dropout, cfg.head.fine_labels) == (16, 0.1, False)
    assert (cfg.fit.epochs, cfg.fit.batch_size, cfg.fit.class_weight_power, cfg.fit.seed) == (4, 8, 0.5, 3)
    assert (cfg.resize, cfg.views, cfg.tta, cfg.calibrate) == ("pad", 1, False, False)


def test_the_fast_preset_is_the_cpu_recipe_on_lite0_at_its_own_size():
    # what README's speed table measured as `train_lcpn.sh --backbone efficientnet-lite0`
    fast = preset_with_flags("fast", {})
    assert fast == dataclasses.replace(preset_with_flags("cpu", {"backbone": "efficientnet-lite0"}), preset="fast")
    assert fast.backbone == "efficientnet-lite0" and fast.image_size is None
    assert preset_with_flags("fast", {"backbone": "efficientnet-lite1"}).image_size is None
    assert TrainConfig.from_dict(fast.to_dict()) == fast


def test_flags_override_the_preset_and_unset_flags_keep_it():
    cfg = preset_with_flags("original", {"epochs": 3, "lr": None, "hidden": 8, "class_weights": 0.0})
    assert cfg.fit.epochs == 3 and cfg.fit.lr == PRESETS["original"].fit.lr and cfg.head.hidden == 8
    assert cfg.fit.class_weight_power == 0.0 and cfg.backbone == "efficientnet-b4"
    # another backbone takes its own size unless --image-size says otherwise
    assert preset_with_flags("cpu", {"backbone": "efficientnet-lite0"}).image_size is None
    assert preset_with_flags("cpu", {"backbone": "efficientnet-lite0", "image_size": 64}).image_size == 64
    assert preset_with_flags("cpu", {"backbone": PRESETS["cpu"].backbone}).image_size == PRESETS["cpu"].image_size
    # every flag name reaches a field
    given = dict(zip((k for k in FLAG_FIELDS if k != "flat_classifier"), range(100, 200)))
    every = preset_with_flags("cpu", given)
    flat = {**dataclasses.asdict(every), **{f"{p}.{k}": v for p in ("head", "fit") for k, v in
                                            dataclasses.asdict(getattr(every, p)).items()}}
    assert all(flat[FLAG_FIELDS[k]] == value for k, value in given.items())


def test_a_flat_classifier_is_a_linear_head():
    """--flat-classifier makes the head linear (what a tuned classifier is); with an MLP asked for: one line."""
    cfg = preset_with_flags("cpu", {"flat_classifier": "/m/tuned.classifier.pth"})
    assert cfg.flat_classifier == "/m/tuned.classifier.pth" and cfg.head.hidden == 0
    assert preset_with_flags("cpu", {"flat_classifier": "/x", "hidden": 0}).head.hidden == 0
    assert PRESETS["cpu"].flat_classifier is None and preset_with_flags("cpu", {}).head.hidden == PRESETS["cpu"].head.hidden
    with pytest.raises(UserError, match="drop --hidden 64"):
        preset_with_flags("cpu", {"flat_classifier": "/x", "hidden": 64})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_train_py_builds_the_config_from_preset_and_flags():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "src"))
    import train

    args = train.get_args_parser().parse_args(["-d", "parent", "--epochs", "3", "--no-amp", "--no-onnx",
                                               "--class-weights", "0.5", "--no-tta", "--seed", "7"])
    cfg = train.build_config(args)
    assert cfg == PRESETS["cpu"].override({"epochs": 3, "amp": False, "onnx": False, "class_weights": 0.5,
                                           "tta": False, "seed": 7})
    args = train.get_args_parser().parse_args(["-d", "parent", "--preset", "original", "--hidden", "5"])
    assert train.build_config(args) == PRESETS["original"].override({"hidden": 5})


def test_augment_settings_keep_their_feature_cache_key():
    # the key of cached augmented views: changing it silently recomputes every user's cache
    assert AugmentConfig().key() == ('{"brightness": 0.2, "contrast": 0.2, "flip": 0.5, "ratio": [0.75, 1.333], '
                                     '"saturation": 0.2, "scale": [0.55, 1.0]}')
    rebuilt = TrainConfig.from_dict(TrainConfig().to_dict()).augment
    assert rebuilt.key() == AugmentConfig().key()


def test_a_node_artifact_gives_back_its_train_config(tmp_path):
    from hiernet.artifacts import NodeArtifact

    cfg = PRESETS["cpu"].override({"epochs": 2, "hidden": 7})
    art = NodeArtifact(tmp_path, {"config": {"train": {**cfg.to_dict(), "split_seed": 1}}})
    assert art.train_config() == cfg
    assert NodeArtifact(tmp_path, {"config": {}}).train_config() == TrainConfig()


def test_long_tail_options_come_from_train_py_flags_and_round_trip():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "src"))
    import train

    args = train.get_args_parser().parse_args(["-d", "parent", "--logit-adjust", "0.75", "--class-sampling", "0.5"])
    cfg = train.build_config(args)
    assert (cfg.fit.logit_adjust, cfg.fit.sample_power) == (0.75, 0.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # a model.pth written before these options existed reads back with them off
    old = cfg.to_dict()
    del old["fit"]["logit_adjust"], old["fit"]["sample_power"]
    assert (TrainConfig.from_dict(old).fit.logit_adjust, TrainConfig.from_dict(old).fit.sample_power) == (0.0, 0.0)
    unset = train.build_config(train.get_args_parser().parse_args(["-d", "parent"]))
    assert (unset.fit.logit_adjust, unset.fit.sample_power) == (PRESETS["cpu"].fit.logit_adjust, PRESETS["cpu"].fit.sample_power)


def test_prior_bias_flag_and_old_configs():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "src"))
    import train

    assert PRESETS["cpu"].fit.prior_bias is False  # opt-in until it is shown not to lose on the clothing photos
    on = train.build_config(train.get_args_parser().parse_args(["-d", "parent", "--prior-bias"]))
    assert on.fit.prior_bias is True and TrainConfig.from_dict(on.to_dict()) == on
    assert train.build_config(train.get_args_parser().parse_args(["-d", "parent"])).fit.prior_bias is False
    old = on.to_dict()
    del old["fit"]["prior_bias"]  # a model.pth written before the option existed reads back with it off
    assert TrainConfig.from_dict(old).fit.prior_bias is False
