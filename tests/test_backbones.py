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


def test_lite_export_mode_keeps_relu6():
    m = backbones.create_backbone("efficientnet-lite0", image_size=64)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = m(x)
        m.set_export_mode()
        after = m(x)
    assert torch.allclose(before, after)


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
