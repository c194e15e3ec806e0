"""Node heads: standardiser, fine-label aggregation, temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiernet.models import Head, build_head


def _overconfident_head(scale: float, n_classes: int = 4, dim: int = 8, group=None) -> tuple[Head, torch.Tensor, torch.Tensor]:
    """A linear head whose logits are ``scale`` × the true log-odds of labels drawn from them."""
    g = torch.Generator().manual_seed(0)
    n_out = n_classes if group is None else group.shape[0]
    head = Head(dim, n_classes, hidden=0, group=group).eval()
    w = torch.randn(n_out, dim, generator=g)
    with torch.no_grad():
        head.net[1].weight.copy_(w * scale)
        head.net[1].bias.zero_()
    x = torch.randn(4000, dim, generator=g)
    true_p = torch.softmax(x @ w.T, dim=1)
    fine = torch.multinomial(true_p, 1, generator=g).squeeze(1)
    y = fine if group is None else group[fine].argmax(1)
    return head, x, y


def test_temperature_undoes_overconfidence_without_changing_the_argmax():
    head, x, y = _overconfident_head(scale=4.0)
    with torch.no_grad():
        before = head(x).argmax(1)
    stats = head.fit_temperature(x, y)
    assert 3.0 < stats["temperature"] < 5.3  # the logits were 4x too sharp
    assert stats["nll_after"] < stats["nll_before"] and stats["ece_after"] < stats["ece_before"]
    assert float(head.temperature) == stats["temperature"]
    with torch.no_grad():
        assert torch.equal(head(x).argmax(1), before)
    # the temperature travels with the weights
    clone = build_head({"in_dim": 8, "n_classes": 4, "hidden": 0, "dropout": 0.0})
    clone.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.allclose(clone(x), head(x))


def test_temperature_of_a_fine_label_head_is_fitted_on_its_children():
    group = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # 4 leaves under 2 children
    head, x, y = _overconfident_head(scale=3.0, n_classes=2, group=group)
    stats = head.fit_temperature(x, y)
    assert stats["temperature"] > 1.5 and stats["nll_after"] < stats["nll_before"]
    with torch.no_grad():
        p = torch.softmax(head(x), dim=1)
    assert p.shape == (4000, 2) and torch.allclose(p.sum(1), torch.ones(4000), atol=1e-5)


def test_a_calibrated_head_keeps_temperature_one():
    head, x, y = _overconfident_head(scale=1.0)
    stats = head.fit_temperature(x, y)
    assert 0.85 < stats["temperature"] < 1.15
    assert stats["nll_after"] <= stats["nll_before"]


def test_temperature_never_makes_things_worse_on_tiny_data():
    head, x, y = _overconfident_head(scale=1.0)
    stats = head.fit_temperature(x[:1], y[:1])  # one example: nothing to fit
    assert stats["temperature"] == 1.0 and np.isclose(stats["nll_after"], stats["nll_before"])


def test_head_runs_in_float32_under_autocast():
    """AMP must not run the head's matmul in half precision (fp16 sums of tiny softmax values reach 0 → -inf)."""
    group = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    head, x, _ = _overconfident_head(40.0, n_classes=2, group=group)
    x = x[:64]
    plain = head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(x.to(torch.bfloat16))
    assert mixed.dtype == torch.float32
    assert torch.isfinite(mixed).all()
    assert torch.allclose(mixed, head(x.to(torch.bfloat16).float()), atol=1e-5)
    assert torch.allclose(mixed.argmax(1), plain.argmax(1))


def test_standardizer_floors_the_std_of_features_constant_on_the_training_images():
    # a small node's images can leave a feature (nearly) constant; dividing by ~0 made unseen images'
    # standardised values explode (1e5) and a random weight on them decided the class
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 16, generator=g)
    x[:, 3] = 0.25
    head = Head(16, 2)
    head.fit_standardizer(x)
    assert float(head.std[3]) >= Head.STD_FLOOR * float(x.std(0).median()) - 1e-7
    assert torch.allclose(head.std[:3], x.std(0)[:3])  # ordinary features keep their own std
    unseen = torch.rand(20, 16, generator=g)
    z = (unseen - head.mean) / head.std
    assert float(z.abs().max()) < 100


def test_standardizer_takes_given_statistics_floored():
    # --standardize tree: a head standardises with the whole tree's statistics, not its node's images'
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 8, generator=g)
    mean, std = np.full(8, 0.5, np.float32), np.linspace(0.0, 2.0, 8).astype(np.float32)
    head = Head(8, 2)
    head.fit_standardizer(x, (mean, std))
    floor = Head.STD_FLOOR * float(torch.from_numpy(std).median())  # torch's median: the lower middle value
    assert torch.allclose(head.mean, torch.full((8,), 0.5))
    assert torch.allclose(head.std[1:], torch.from_numpy(std[1:]).clamp_min(floor))
    assert float(head.std[0]) == pytest.approx(floor)  # a zero std is floored too
    with pytest.raises(ValueError, match="shape"):
        head.fit_standardizer(x, (mean[:4], std[:4]))


def test_prior_bias_makes_an_untrained_head_predict_the_prior():
    for group in (None, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])):
        head = Head(8, 2, hidden=16, group=group)
        labels = np.array([0] * 90 + [1] * 9 + [2] * 1) if group is not None else np.array([0] * 3 + [1] * 97)
        head.init_prior_bias(labels)
        k = head.net[-1].out_features
        prior = np.bincount(labels, minlength=k) / len(labels)
        assert np.allclose(head.net[-1].bias.detach().numpy(), np.log(prior), atol=1e-6)
        head.init_prior_bias(labels, tau=1.0)  # balanced softmax: the adjusted logits start at the prior
        assert np.allclose(head.net[-1].bias.detach().numpy(), 0.0)
    head = Head(4, 3)
    head.init_prior_bias(np.array([0, 0, 1]))  # a class without samples counts as one
    assert np.isfinite(head.net[-1].bias.detach().numpy()).all()
    head.init_prior_bias(np.array([0, 0, 0, 1, -1, -1, -2]))  # set targets (partial labels) leave the prior alone
    assert np.allclose(head.net[-1].bias.detach().numpy(), np.log(np.array([3, 1, 1]) / 5), atol=1e-6)


def test_fit_head_starts_a_small_imbalanced_node_at_its_prior(tmp_path):
    # 1 image of a class against 100: with a random bias and the few steps a small node makes, the head
    # used to predict the rare class for a third of unseen images (catalogue: Footwear/Sandal)
    from hiernet.config import FitConfig
    from hiernet.training import feature_sets, fit_head

    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(101, 1, 64)).astype(np.float32)
    y = np.array([0] + [1] * 100)
    shares = {}
    for prior_bias in (True, False):
        torch.manual_seed(1)
        head = Head(64, 2)
        train_set, val_set, ty = feature_sets(head, x, y, x[:5, 0], y[:5])
        cfg = FitConfig(epochs=3, lr=1e-3, patience=10, label_smoothing=0.0, prior_bias=prior_bias)
        fit_head(head, head, train_set, None, ty, cfg, "cpu", tmp_path / str(prior_bias), "t", progress=False)
        with torch.no_grad():
            shares[prior_bias] = float((head.eval()(torch.from_numpy(rng.normal(size=(500, 64)).astype(np.float32))).argmax(1) == 0).float().mean())
    assert shares[True] < 0.05 < shares[False]
