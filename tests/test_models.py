"""Node heads: standardiser, fine-label aggregation, temperature scaling."""

from __future__ import annotations

import numpy as np
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
