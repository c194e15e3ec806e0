"""Node classifiers: a head on pooled features, optionally with its own trainable backbone."""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """Standardise features, then a linear layer or a one-hidden-layer MLP.

    Input ``(N, D)`` features; output ``(N, C)`` logits. ``mean``/``std`` are fitted on the training
    features (see :meth:`fit_standardizer`) and saved with the weights.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden > 0:
            self.net = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))

    @torch.no_grad()
    def fit_standardizer(self, feats: torch.Tensor) -> None:
        """Set ``mean``/``std`` from training features of shape ``(N, D)``."""
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class NodeNet(nn.Module):
    """A backbone (``(N,3,S,S)`` in ``[0,1]`` → ``(N,D)``) followed by a :class:`Head` → ``(N, C)``."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_head(cfg: dict) -> Head:
    """A :class:`Head` from its saved config ``{"in_dim", "n_classes", "hidden", "dropout"}``."""
    return Head(int(cfg["in_dim"]), int(cfg["n_classes"]), int(cfg.get("hidden", 0)), float(cfg.get("dropout", 0.0)))
