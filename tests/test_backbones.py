"""Backbone registry: names, offline Lite weights, --weights files, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from hiernet import backbones
from hiernet.safeio import UserError


def test_registry_lists_lite_first_and_rejects_unknown_names():
    names = backbones.list_backbones()
    assert names[:3] == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
    assert "efficientnet-b4" in names and "efficientnet-b7" in names
    with pytest.raises(UserError) as exc:
        backbones.get_spec("resnet50")
    assert "efficientnet-lite0" in str(exc.value) and "efficientnet-b7" in str(exc.value)


def test_lite0_loads_offline_and_gives_pooled_features():
    m = backbones.create_backbone("efficientnet-lite0", image_size=64)
    assert m.image_size == 64 and m.spec.feature_dim == 1280
    with torch.no_grad():
        f = m(torch.rand(2, 3, 64, 64))
    assert f.shape == (2, 1280)
    # same weights → same fingerprint; no weights → "random"
    assert m.weights_fingerprint == backbones.create_backbone("efficientnet-lite0", image_size=64).weights_fingerprint
    assert backbones.create_backbone("efficientnet-lite0", pretrained=False, image_size=64).weights_fingerprint == "random"


def _activations(m):
    import collections

    return collections.Counter(type(x).__name__ for x in m.modules() if type(x).__name__ in
                               ("ReLU6", "MemoryEfficientSwish", "Swish", "SiLU"))


def test_export_mode_makes_b_traceable_and_keeps_lite_relu6():
    """B-family trunks swap their custom-autograd Swish for a traceable one; Lite trunks keep ReLU6."""
    m = backbones.create_backbone("efficientnet-lite0+efficientnet-b0", pretrained=False, image_size=64).eval()
    before = _activations(m)
    assert before["ReLU6"] > 0 and before["MemoryEfficientSwish"] > 0
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        m.set_export_mode()
        after = _activations(m)
        out = m(x)
    assert after["ReLU6"] == before["ReLU6"]  # Lite's activation untouched (set_swish would replace it)
    assert after["MemoryEfficientSwish"] == 0  # its custom autograd Function cannot be exported
    assert after["Swish"] + after["SiLU"] == before["MemoryEfficientSwish"]
    assert torch.allclose(ref, out, atol=1e-5)  # same function, only a traceable implementation


def test_b0_without_network_says_what_to_do(monkeypatch):
    import torch.hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as exc:
        backbones.create_backbone("efficientnet-b0", image_size=64)
    assert "--weights FILE" in str(exc.value) and "efficientnet-lite0" in str(exc.value)


def test_b0_from_a_weights_file(tmp_path):
    from efficientnet_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-b0")
    path = tmp_path / "b0.pth"
    torch.save(net.state_dict(), path)
    m = backbones.create_backbone("efficientnet-b0", weights=path, image_size=64)
    assert m.weights_fingerprint != "random"
    with torch.no_grad():
        assert m(torch.rand(1, 3, 64, 64)).shape == (1, 1280)


def test_weights_file_that_carries_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(UserError) as exc:
        backbones.create_backbone("efficientnet-lite0", weights=path, image_size=64)
    assert "refused" in str(exc.value)
    assert not marker.exists()


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError) as exc:
        backbones.create_backbone("efficientnet-lite0", weights=path, image_size=64)
    assert "do not fit" in str(exc.value)


def test_composite_backbone_concatenates_its_members_on_one_input():
    both = backbones.create_backbone("efficientnet-lite1+efficientnet-lite0", image_size=64)
    lite1 = backbones.create_backbone("efficientnet-lite1", image_size=64)
    lite0 = backbones.create_backbone("efficientnet-lite0", image_size=64)
    assert both.spec.family == "composite" and both.spec.feature_dim == 2560 and both.spec.offline
    assert [p.name for p in both.spec.members()] == ["efficientnet-lite1", "efficientnet-lite0"]
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        f, f1, f0 = both(x), lite1(x), lite0(x)
    assert f.shape == (3, 2560)
    assert torch.allclose(f[:, :1280], f1, atol=1e-6) and torch.allclose(f[:, 1280:], f0, atol=1e-6)
    # the order of members matters, and so do their weights
    other = backbones.create_backbone("efficientnet-lite0+efficientnet-lite1", image_size=64)
    assert other.weights_fingerprint != both.weights_fingerprint
    assert both.weights_fingerprint not in (lite1.weights_fingerprint, lite0.weights_fingerprint)
    # a fine-tuned composite stores and restores every trunk
    sd = both.net.state_dict()
    assert any(k.startswith("0.") for k in sd) and any(k.startswith("1.") for k in sd)
    fresh = backbones.create_backbone("efficientnet-lite1+efficientnet-lite0", pretrained=False, image_size=64)
    assert fresh.weights_fingerprint == "random"
    fresh.net.load_state_dict(sd)
    with torch.no_grad():
        assert torch.allclose(fresh(x), f, atol=1e-6)


def test_composite_backbone_rejects_bad_names_and_weights(tmp_path):
    with pytest.raises(UserError, match="unknown backbone 'lite9'.*efficientnet-lite0"):
        backbones.get_spec("efficientnet-lite0+lite9")
    with pytest.raises(UserError, match="same network twice"):
        backbones.get_spec("efficientnet-lite0+efficientnet-lite0")
    path = tmp_path / "w.pth"  # one network's weights are not a composite's
    torch.save(backbones.create_backbone("efficientnet-lite0", image_size=64).net.state_dict(), path)
    with pytest.raises(UserError, match="belongs to no member"):
        backbones.create_backbone("efficientnet-lite0+efficientnet-lite1", weights=path, image_size=64)
    both = backbones.create_backbone("efficientnet-lite0+efficientnet-lite1", image_size=64).net.state_dict()
    torch.save({k: v for k, v in both.items() if k.startswith("0.")}, path)  # the second member missing
    with pytest.raises(UserError, match="no tensors of efficientnet-lite1 .member 1"):
        backbones.create_backbone("efficientnet-lite0+efficientnet-lite1", weights=path, image_size=64)
    torch.save({**both, "2.x": torch.zeros(1)}, path)  # a third member in a two-network composite
    with pytest.raises(UserError, match="'2.x' belongs to no member"):
        backbones.create_backbone("efficientnet-lite0+efficientnet-lite1", weights=path, image_size=64)


def test_a_composite_loads_its_own_weights_file_member_by_member(tmp_path):
    """--weights with a composite: the composite's net.state_dict() (a tuned or fine-tuned one) restores every member."""
    name = "efficientnet-lite1+efficientnet-lite0"
    both = backbones.create_backbone(name, image_size=64)
    sd = {k: v.clone() for k, v in both.net.state_dict().items()}
    sd["1._conv_head.weight"] += 0.05 * torch.randn_like(sd["1._conv_head.weight"])  # the second member changed
    torch.save(sd, tmp_path / "both.pth")
    loaded = backbones.create_backbone(name, weights=tmp_path / "both.pth", image_size=64)
    assert loaded.weights_fingerprint not in (both.weights_fingerprint, "random")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f, g = both(x), loaded(x)
    assert torch.allclose(f[:, :1280], g[:, :1280], atol=1e-6)  # the first member as it was
    assert not torch.allclose(f[:, 1280:], g[:, 1280:], atol=1e-3)  # the second one's changed weights loaded
    assert backbones.create_backbone(name, weights=tmp_path / "both.pth", image_size=64).weights_fingerprint \
        == loaded.weights_fingerprint


@pytest.mark.parametrize("name", [  # the big ones take minutes to initialise on a CPU: slow
    n if backbones.get_spec(n).image_size <= 240 else pytest.param(n, marks=pytest.mark.slow)
    for n in backbones.list_backbones()])
def test_every_registered_backbone_builds_pools_and_exports(name):
    spec = backbones.get_spec(name)
    m = backbones.create_backbone(name, pretrained=False, image_size=64)  # random weights: no download
    assert m.weights_fingerprint == "random" and m.image_size == 64 and spec.image_size >= 224
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f = m(x)
        m.set_export_mode()  # the traceable variant computes the same features
        assert torch.allclose(m(x), f, atol=1e-5)
    assert f.shape == (2, spec.feature_dim)


def test_a_new_backbone_is_one_registered_function(monkeypatch):
    from torch import nn

    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    calls = []

    @backbones.register_backbone("tiny-test", image_size=32, feature_dim=5)
    def tiny(pretrained, weights, size):
        torch.manual_seed(0)
        return backbones.Trunk(nn.Conv2d(3, 5, 3), False, lambda net, x: net(x).amax(dim=(2, 3)),
                               lambda net: calls.append("export"))

    assert "tiny-test" in backbones.list_backbones()
    m = backbones.create_backbone("tiny-test")
    assert m.image_size == 32 and m(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    both = backbones.create_backbone("tiny-test+efficientnet-lite0", pretrained=False)
    assert both.spec.feature_dim == 5 + 1280 and both(torch.rand(1, 3, 32, 32)).shape == (1, 1285)
    both.set_export_mode()
    assert calls == ["export"]
    sd = both.net.state_dict()
    assert "0.weight" in sd and any(k.startswith("1.") for k in sd)  # state_dict keys: the trunks' own
