"""Torch modules: the backbone wrapper (:class:`FeatureExtractor`), node heads, and a head with its own
trainable backbone."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FeatureExtractor(nn.Module):
    """Normalise, run one EfficientNet trunk (or several, for a composite), global-average-pool, concatenate.

    Input ``(N, 3, S, S)`` float in ``[0, 1]``; output ``(N, D)`` with ``D = spec.feature_dim``.
    ``net`` is the trunk, or an ``nn.ModuleList`` of trunks for a composite backbone (its ``state_dict``
    is what a fine-tuned checkpoint stores).
    """

    def __init__(self, trunks: list, spec, image_size: int):
        super().__init__()
        nets = [t.net for t in trunks]
        self.net = nets[0] if len(nets) == 1 else nn.ModuleList(nets)
        self._pools = [t.pool for t in trunks]
        self._export_hooks = [t.export_mode for t in trunks]
        self.spec = spec
        self.image_size = image_size
        for i, part in enumerate(spec.members()):
            self.register_buffer(f"mean{i}", torch.tensor(part.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(part.std).view(1, 3, 1, 1), persistent=False)

    def trunks(self) -> list:
        """The EfficientNet trunks, in the order of ``spec.members()``."""
        return list(self.net) if isinstance(self.net, nn.ModuleList) else [self.net]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [
            pool(net, (x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}"))
            for i, (pool, net) in enumerate(zip(self._pools, self.trunks()))
        ]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)

    def set_export_mode(self) -> None:
        """Make every trunk traceable for ONNX export (each backbone's own ``export_mode`` hook)."""
        for hook, net in zip(self._export_hooks, self.trunks()):
            if hook is not None:
                hook(net)


def _no_autocast(device_type: str):
    """A context that turns autocast off when it is on for ``device_type`` (else a no-op, so ONNX export
    and plain float32 runs see no autocast node)."""
    import contextlib

    try:
        on = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        on = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


class Head(nn.Module):
    """Standardise features, then a linear layer or a one-hidden-layer MLP.

    Input ``(N, D)`` features; output ``(N, C)`` logits. ``mean``/``std`` are fitted on the training
    features (see :meth:`fit_standardizer`) and saved with the weights.

    With ``group`` (a ``(K, C)`` 0/1 matrix) the network has ``K`` fine outputs, one per leaf below the
    node, and is trained on leaf labels; :attr:`aggregate` (on after training) then makes ``forward``
    return ``log P(child) = log(softmax(z) @ group)``, shape ``(N, C)``, so a softmax of the output gives
    the children's probabilities exactly as for an ordinary head.

    ``temperature`` (a scalar buffer, 1 while training) divides the logits; :meth:`fit_temperature` sets
    it on validation data after training so that the probabilities are calibrated (temperature scaling,
    Guo et al., 2017). It never changes which class is most likely.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 0, dropout: float = 0.0,
                 group: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.register_buffer("temperature", torch.ones(()))
        n_out = n_classes if group is None else int(group.shape[0])
        if group is not None:
            if group.shape[1] != n_classes:
                raise ValueError(f"group has {group.shape[1]} columns for {n_classes} classes")
            self.register_buffer("group", group.float())
        else:
            self.group = None
        self.aggregate = True
        if hidden > 0:
            self.net = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out)
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_out))

    #: ``std`` is floored at this fraction of the median feature std: a feature (nearly) constant on a small
    #: node's training images would otherwise be divided by ~0 and blow up on unseen images.
    STD_FLOOR = 0.1

    @torch.no_grad()
    def fit_standardizer(self, feats: torch.Tensor, stats: tuple | None = None) -> None:
        """Set ``mean``/``std`` from training features of shape ``(N, D)``, or to given ``stats``
        (``(mean (D,), std (D,))``, e.g. the whole tree's); the std is floored (see :attr:`STD_FLOOR`)."""
        if stats is None:
            mean, std = feats.mean(0), feats.std(0)
        else:
            mean, std = (torch.as_tensor(np.asarray(a), dtype=self.mean.dtype) for a in stats)
            if mean.shape != self.mean.shape or std.shape != self.std.shape:
                raise ValueError(f"standardisation statistics of shape {tuple(mean.shape)}, expected {tuple(self.mean.shape)}")
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(max(1e-6, self.STD_FLOOR * float(std.median()))))

    @torch.no_grad()
    def init_prior_bias(self, labels, tau: float = 0.0) -> None:
        """Start the output layer's bias at ``(1 - tau) * log(class prior)`` of the training targets ``(N,)``
        (a class without samples counts as one), so an untrained head predicts the prior rather than random
        classes; with logit adjustment ``tau`` the adjusted logits start there. A small node makes few
        optimiser steps and would otherwise keep a nearly random bias."""
        last = self.net[-1]
        labels = np.asarray(labels, dtype=np.int64)
        labels = labels[labels >= 0]  # set targets (partial labels, negative) do not enter the prior
        counts = np.maximum(np.bincount(labels, minlength=last.out_features), 1.0)
        last.bias.copy_(torch.as_tensor((1.0 - tau) * np.log(counts / counts.sum()), dtype=last.bias.dtype))

    @torch.no_grad()
    def load_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Make a linear head (``hidden`` 0, no ``group``) compute ``weight @ x + bias`` on raw features.

        ``weight`` ``(C, D)`` and ``bias`` ``(C,)`` act on unstandardised features (a classifier trained
        elsewhere); the fitted standardiser is folded in: ``W' = W * std``, ``b' = b + W @ mean``.
        """
        last = self.net[-1]
        if len(self.net) != 2 or self.group is not None:
            raise ValueError("load_linear needs a linear head (hidden 0) without fine outputs")
        weight, bias = weight.to(last.weight), bias.to(last.bias)
        if weight.shape != last.weight.shape or bias.shape != last.bias.shape:
            raise ValueError(f"a classifier of shape {tuple(weight.shape)} for a head of shape {tuple(last.weight.shape)}")
        last.weight.copy_(weight * self.std)
        last.bias.copy_(bias + weight @ self.mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 even under autocast: fp16 softmax sums underflow to 0 in log(... @ group) (-inf logits)
        with _no_autocast(x.device.type):
            z = self.net((x.float() - self.mean) / self.std) / self.temperature
            if self.group is not None and self.aggregate:
                return self._children_logp(z)
            return z

    @torch.no_grad()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def _children_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log P(child) from logits ``(N, K)``: fine outputs summed per child when there is a ``group``."""
        if self.group is not None:
            return torch.log((torch.softmax(z, dim=1) @ self.group).clamp_min(1e-12))
        return torch.log_softmax(z, dim=1)

    def fit_temperature(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Set ``temperature`` to minimise the negative log-likelihood of ``y`` on ``x``.

        Parameters
        ----------
        x : torch.Tensor, shape (N, D)
            Validation features (never the training ones: there the head is over-confident by design).
        y : torch.Tensor of int, shape (N,)
            Child (class) indices, as the aggregated output is scored.

        Returns
        -------
        dict
            ``temperature``, ``nll_before``/``nll_after`` and ``ece_before``/``ece_after`` on ``x``.
        """
        from .metrics import expected_calibration_error

        was_training = self.training
        self.eval()
        z = self._logits(x).float()
        y = y.long()

        def stats(t: float) -> tuple[float, float]:
            with torch.no_grad():
                lp = self._children_logp(z / t)
                conf, pred = lp.exp().max(1)
                return (float(torch.nn.functional.nll_loss(lp, y)),
                        expected_calibration_error(conf.numpy(), (pred == y).numpy()))

        log_t = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.nll_loss(self._children_logp(z / log_t.clamp(-3, 3).exp()), y)
            loss.backward()
            return loss

        before = stats(1.0)
        if len(y) >= 2:
            opt.step(closure)
        t = float(log_t.detach().clamp(-3, 3).exp())
        after = stats(t)
        if not after[0] <= before[0]:  # never make it worse than leaving it alone
            t, after = 1.0, before
        self.temperature.fill_(t)
        self.train(was_training)
        return {"temperature": t, "nll_before": before[0], "nll_after": after[0], "ece_before": before[1], "ece_after": after[1]}


class NodeNet(nn.Module):
    """A backbone (``(N,3,S,S)`` in ``[0,1]`` → ``(N,D)``) followed by a :class:`Head` → ``(N, C)``."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_head(cfg: dict) -> Head:
    """A :class:`Head` from its saved config ``{"in_dim", "n_classes", "hidden", "dropout"[, "n_fine"]}``.

    With ``n_fine`` the ``group`` buffer is created with its shape; its values come from the state_dict.
    """
    n_fine = cfg.get("n_fine")
    group = torch.zeros(int(n_fine), int(cfg["n_classes"])) if n_fine else None
    return Head(int(cfg["in_dim"]), int(cfg["n_classes"]), int(cfg.get("hidden", 0)), float(cfg.get("dropout", 0.0)), group)
