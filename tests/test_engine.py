"""The training loop: modes, early stopping with best weights, class weights, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hiernet.engine import FitConfig, class_weights, fit


def _blobs(n=60, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g) + (y[:, None] * 3.0)
    return TensorDataset(x, y), y.numpy()


class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.lin(x)


def test_fit_learns_and_uses_train_and_eval_modes(tmp_path):
    train, y = _blobs()
    val, _ = _blobs(seed=1)
    m = ModeRecorder()
    res = fit(m, train, val, y, 2, FitConfig(epochs=20, batch_size=16, lr=0.1, patience=30), "cpu", tmp_path, "h", progress=False)
    assert True in m.modes and False in m.modes  # model.train() for batches, model.eval() for validation
    assert len(res.history) == 20 and res.history[-1]["val_acc"] > 0.9
    assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(res.history[0])
    assert (tmp_path / "log.csv").read_text().splitlines()[0].startswith("epoch,")


def test_early_stopping_restores_best_weights(tmp_path):
    train, y = _blobs()
    # validation labels are flipped: validation loss gets worse as training improves
    xv, yv = _blobs(seed=1)[0].tensors
    val = TensorDataset(xv, 1 - yv)
    m = nn.Linear(4, 2)
    res = fit(m, train, val, y, 2, FitConfig(epochs=30, batch_size=16, lr=0.05, patience=3), "cpu", tmp_path, "h", progress=False)
    assert len(res.history) < 30
    best = min(res.history, key=lambda r: r["val_loss"])
    assert res.best_epoch == best["epoch"]
    with torch.no_grad():
        loss = nn.functional.cross_entropy(m(xv), 1 - yv, weight=class_weights(y, 2, 0.5)).item()
    assert abs(loss - best["val_loss"]) < 1e-3


def test_class_weights_balance_counts():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert np.allclose(w.numpy(), [4 / 9, 4 / 3, 0.0])
    assert np.allclose(class_weights(np.array([0, 0, 0, 1]), 3, 0.5).numpy(), [(4 / 9) ** 0.5, (4 / 3) ** 0.5, 0.0])
    assert np.allclose(class_weights(np.array([0, 0, 0, 1]), 2, 0.0).numpy(), [1.0, 1.0])


class _StopAt(TensorDataset):
    """A training set that interrupts ``fit`` when epoch ``stop`` starts (like Ctrl-C between epochs)."""

    def __init__(self, base, stop=None):
        super().__init__(*base.tensors)
        self.stop = stop

    def set_epoch(self, epoch):
        if epoch == self.stop:
            raise KeyboardInterrupt


def _same(a, b, path="", skip=("seconds",)):
    """Recursively compare two checkpoints (tensors exactly up to 1e-6; timings skipped)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in skip:
                _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, z) in enumerate(zip(a, b)):
            _same(x, z, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), path
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), path
    else:
        assert a == b, path


def test_resume_mid_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    train, y = _blobs()
    val, _ = _blobs(seed=1)
    # mini-batches (shuffled), warm-up + cosine, a patience that can trigger: every piece of state matters
    cfg = FitConfig(epochs=6, batch_size=16, lr=0.05, patience=10, warmup_epochs=2)
    torch.manual_seed(123)
    straight = nn.Linear(4, 2)
    ref = fit(straight, _StopAt(train), val, y, 2, cfg, "cpu", tmp_path / "a", "h", progress=False)
    assert len(ref.history) == 6

    torch.manual_seed(123)
    first = nn.Linear(4, 2)
    with pytest.raises(KeyboardInterrupt):  # interrupted when epoch 4 starts: 3 epochs are in the checkpoint
        fit(first, _StopAt(train, stop=3), val, y, 2, cfg, "cpu", tmp_path / "b", "h", progress=False)
    torch.manual_seed(456)
    resumed = nn.Linear(4, 2)  # other initial weights: only the checkpoint can make them equal
    res = fit(resumed, _StopAt(train), val, y, 2, cfg, "cpu", tmp_path / "b", "h", progress=False)
    assert len(res.history) == 6
    for r, s in zip(res.history, ref.history):  # learning rate (scheduler), losses: the same epoch by epoch
        assert {k: v for k, v in r.items() if k != "seconds"} == {k: v for k, v in s.items() if k != "seconds"}
    assert res.best_epoch == ref.best_epoch
    for k, v in straight.state_dict().items():  # the kept (best) weights equal the uninterrupted run's
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k
    # the last checkpoints agree entirely: weights, optimizer moments, scheduler step, best state, history
    _same(torch.load(tmp_path / "a" / "last.pth", weights_only=True),
          torch.load(tmp_path / "b" / "last.pth", weights_only=True))


def test_checkpoint_of_other_settings_or_a_finished_run(tmp_path):
    train, y = _blobs()
    val, _ = _blobs(seed=1)
    cfg = FitConfig(epochs=3, batch_size=16, lr=0.05, patience=10)
    first_model = nn.Linear(4, 2)
    first = fit(first_model, train, val, y, 2, cfg, "cpu", tmp_path, "same", progress=False)
    resumed_model = nn.Linear(4, 2)
    res = fit(resumed_model, train, val, y, 2, cfg, "cpu", tmp_path, "same", progress=False)
    # nothing left to do: all 3 epochs and the best weights came from the checkpoint
    assert res.history == first.history and res.best_epoch == first.best_epoch
    assert torch.equal(resumed_model.weight, first_model.weight)
    other_model = nn.Linear(4, 2)
    fit(other_model, train, val, y, 2, cfg, "cpu", tmp_path, "other-settings", progress=False)
    assert not torch.equal(other_model.weight, first_model.weight)  # other settings: trained afresh


class Interrupting(TensorDataset):
    """A training set whose run is "killed" when epoch ``stop_at`` (0-based) begins."""

    stop_at = None

    def set_epoch(self, epoch):
        if epoch == self.stop_at:
            raise KeyboardInterrupt


def interrupted_epoch2_seconds(work):
    import csv

    return float(list(csv.DictReader(open(work / "log.csv")))[1]["seconds"])


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path):
    import pytest

    train, y = _blobs()
    train = Interrupting(*train.tensors)
    val, _ = _blobs(seed=1)
    cfg = FitConfig(epochs=4, batch_size=16, lr=0.05, patience=10)
    torch.manual_seed(1)
    start = nn.Linear(4, 2).state_dict()
    whole_model, part, again = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2)
    for m in (whole_model, part, again):
        m.load_state_dict(start)
    whole = fit(whole_model, train, val, y, 2, cfg, "cpu", tmp_path / "a", "h", progress=False)
    train.stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        fit(part, train, val, y, 2, cfg, "cpu", tmp_path / "b", "h", progress=False)
    train.stop_at = None
    seconds = interrupted_epoch2_seconds(tmp_path / "b")
    res = fit(again, train, val, y, 2, cfg, "cpu", tmp_path / "b", "h", progress=False)
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    # epochs 1-2 come from the checkpoint (seconds included), the same as the uninterrupted run's;
    # later epochs reshuffle from the loader's seed, so they are close, not identical
    assert [r["val_loss"] for r in res.history[:2]] == [r["val_loss"] for r in whole.history[:2]]
    assert res.history[1]["seconds"] == seconds


def test_early_stopping_keeps_the_best_and_counts_bad_epochs():
    from hiernet.engine import EarlyStopping

    m = nn.Linear(2, 2)
    stop = EarlyStopping(2, {k: v.clone() for k, v in m.state_dict().items()})
    assert stop.step(1.0, 1, m) and stop.best_epoch == 1
    with torch.no_grad():
        m.weight.add_(1.0)
    assert not stop.step(1.0, 2, m) and not stop.stopped  # not better: weights of epoch 1 kept
    assert not torch.equal(stop.best_state["weight"], m.weight)
    assert stop.step(0.5, 3, m) and stop.bad_epochs == 0
    assert not stop.step(0.6, 4, m) and not stop.step(0.7, 5, m) and stop.stopped and stop.best_epoch == 3


def test_head_with_leaf_group_returns_child_log_probabilities():
    from hiernet.models import Head, build_head

    group = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    head = Head(4, 2, hidden=8, group=group).eval()
    x = torch.randn(5, 4)
    head.aggregate = False
    fine = torch.softmax(head(x), 1)
    assert fine.shape == (5, 3)
    head.aggregate = True
    child = torch.softmax(head(x), 1)
    assert torch.allclose(child[:, 0], fine[:, 0], atol=1e-6) and torch.allclose(child[:, 1], fine[:, 1] + fine[:, 2], atol=1e-6)
    rebuilt = build_head({"in_dim": 4, "n_classes": 2, "hidden": 8, "n_fine": 3})
    rebuilt.load_state_dict(head.state_dict())
    assert torch.allclose(rebuilt.eval()(x), head(x))


def test_logit_adjustment_is_tau_times_log_prior():
    from hiernet.engine import logit_adjustment

    labels = np.array([0, 0, 0, 1])  # class 2 has no sample: counted once
    assert np.allclose(logit_adjustment(labels, 3, 0.5).numpy(), 0.5 * np.log([3 / 5, 1 / 5, 1 / 5]))
    assert np.allclose(logit_adjustment(labels, 3, 0.0).numpy(), 0.0)


def test_logit_adjusted_loss_shifts_logits_exactly_and_tau_1_is_the_balanced_softmax():
    from hiernet.engine import LogitAdjustedLoss, logit_adjustment

    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    labels = np.array([0, 0, 0, 1])  # counts 3 and 1
    shift = logit_adjustment(labels, 2, 0.7)
    got = LogitAdjustedLoss(nn.CrossEntropyLoss(), shift)(z, y)
    assert torch.allclose(got, nn.functional.cross_entropy(z + 0.7 * torch.log(torch.tensor([0.75, 0.25])), y))
    # balanced softmax (Ren et al.): -log(n_y e^z_y / sum_j n_j e^z_j), by hand
    e = np.e
    by_hand = -(np.log(3 * e / (3 * e + 1)) + np.log(e ** 2 / (3 + e ** 2))) / 2
    bal = LogitAdjustedLoss(nn.CrossEntropyLoss(), logit_adjustment(labels, 2, 1.0))(z, y)
    assert abs(bal.item() - by_hand) < 1e-6


def test_fit_trains_on_adjusted_logits_so_the_raw_ones_favour_the_rare_class(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 90 + [1] * 10)
    x = torch.randn(100, 1, generator=g) + y[:, None] * 1.0  # overlapping classes, 9:1
    train = TensorDataset(x, y)
    grid = torch.linspace(-3, 4, 200)[:, None]
    rare_share = {}
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        m = nn.Linear(1, 2)
        cfg = FitConfig(epochs=40, batch_size=20, lr=0.1, patience=100, label_smoothing=0.0, logit_adjust=tau)
        fit(m, train, None, y.numpy(), 2, cfg, "cpu", tmp_path / str(tau), "h", progress=False)
        with torch.no_grad():
            rare_share[tau] = float((m(grid).argmax(1) == 1).float().mean())
    # plain CE puts the boundary far into the rare class; the balanced one near the midpoint 0.5
    assert rare_share[1.0] > rare_share[0.0] + 0.1


def test_class_aware_sampling_draws_classes_equally_often():
    from hiernet.engine import _loaders

    labels = np.array([0] * 90 + [1] * 10)
    ds = TensorDataset(torch.zeros(100, 1), torch.from_numpy(labels))
    drawn = {}
    for power in (0.0, 1.0):
        loader = _loaders(ds, None, FitConfig(batch_size=10, sample_power=power, seed=1), "cpu", labels)[0]
        ys = torch.cat([torch.cat([b[1] for b in loader]) for _ in range(20)])
        drawn[power] = float((ys == 1).float().mean())
    assert abs(drawn[0.0] - 0.1) < 1e-6  # plain shuffling: every sample once per epoch
    assert 0.4 < drawn[1.0] < 0.6


def test_train_batching_gives_every_rank_a_step():
    from hiernet.engine import train_batching

    # 100 samples over 4 ranks: 25 each; a batch of 32 with drop_last would give no step at all
    batch, drop = train_batching(100, 4, 32)
    assert (batch, drop) == (25, False)
    for n, w, b in [(100, 4, 32), (100, 1, 32), (36, 3, 16), (65, 2, 32), (7, 8, 32), (33, 1, 32), (1000, 2, 32)]:
        batch, drop = train_batching(n, w, b)
        per_rank = -(-n // w)
        steps = per_rank // batch if drop else -(-per_rank // batch)
        assert steps >= 1 and batch <= b
        assert drop or per_rank % batch != 1 or batch == 1  # never a lone sample in a BatchNorm batch
    assert train_batching(100, 1, 32) == (32, True)  # > 2 full batches: the ragged one is dropped


class _InputRecorder(nn.Module):
    """Records the per-sample sums of the inputs it sees in train mode, per call."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, 2)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.flatten(1).sum(1).detach())
        return self.lin(x.flatten(1))


def test_augmented_views_change_between_epochs_with_worker_processes(tmp_path):
    """Persistent DataLoader workers hold their own dataset copy: the epoch must reach them via the sampler."""
    from PIL import Image

    from hiernet.training import ImageDataset

    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
        items.append((p, i % 2))
    train = ImageDataset(items, 16, "crop", True, seed=0)
    model = _InputRecorder(3 * 16 * 16)
    cfg = FitConfig(epochs=2, batch_size=8, lr=0.01, patience=10, workers=2)
    fit(model, train, None, np.array([y for _, y in items]), 2, cfg, "cpu", tmp_path / "w", "h", progress=False)
    assert len(model.seen) == 2  # one batch per epoch
    epoch1, epoch2 = (torch.sort(s).values for s in model.seen)
    assert not torch.allclose(epoch1, epoch2)  # other crops / flips / jitter in epoch 2


def _resume_parts(lr=0.05, scaler_enabled=False):
    from hiernet.engine import EarlyStopping

    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    return model, opt, sched, scaler, EarlyStopping(3, copy_state(model))


def copy_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write_checkpoint(path, scaler_enabled=False):
    from hiernet.engine import save_resume_checkpoint

    model, opt, sched, scaler, stopper = _resume_parts(scaler_enabled=scaler_enabled)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    save_resume_checkpoint(path, "h", 4, model, opt, sched, scaler, stopper, [{"epoch": i} for i in range(1, 6)])
    return model


def test_a_checkpoint_that_does_not_fit_is_applied_not_at_all(tmp_path):
    from hiernet.engine import restore_resume_checkpoint

    _write_checkpoint(tmp_path / "last.pth")
    ck = torch.load(tmp_path / "last.pth", weights_only=True)
    ck["optimizer"]["param_groups"] = []  # the optimiser part no longer fits (after the model part)
    torch.save(ck, tmp_path / "last.pth")
    model, opt, sched, scaler, stopper = _resume_parts()
    before = copy_state(model)
    history, start = restore_resume_checkpoint(tmp_path / "last.pth", "h", model, opt, sched, scaler, stopper)
    assert (history, start) == ([], 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not half-applied
    assert sched.last_epoch == 0 and stopper.best_epoch == -1


def test_a_checkpoint_without_amp_resumes_with_a_fresh_loss_scale(tmp_path):
    """A CPU run (scaler disabled) continued where AMP is on: everything but the loss scale is resumed."""
    from hiernet.engine import restore_resume_checkpoint

    saved = _write_checkpoint(tmp_path / "last.pth", scaler_enabled=False)
    model, opt, sched, scaler, stopper = _resume_parts(scaler_enabled=True)
    history, start = restore_resume_checkpoint(tmp_path / "last.pth", "h", model, opt, sched, scaler, stopper)
    assert start == 5 and len(history) == 5
    assert torch.equal(model.weight, saved.weight) and sched.last_epoch == 1
    assert scaler.is_enabled() and scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def test_resume_needs_the_same_number_of_processes(tmp_path, monkeypatch):
    """The schedule is laid out per process: a checkpoint of a 1-process run is not resumed on 2."""
    from hiernet import distributed as dist_utils

    train, y = _blobs()
    cfg = FitConfig(epochs=2, batch_size=16, lr=0.05, patience=10)
    first = fit(nn.Linear(4, 2), train, None, y, 2, cfg, "cpu", tmp_path, "same", progress=False)
    again = fit(nn.Linear(4, 2), train, None, y, 2, cfg, "cpu", tmp_path, "same", progress=False)
    def rows(res):
        return [(r["epoch"], r["train_loss"], r["seconds"]) for r in res.history]

    assert rows(again) == rows(first)  # same world size: resumed (seconds included)
    monkeypatch.setattr(dist_utils, "world_size", lambda: 2)
    model = nn.Linear(4, 2)
    fresh = model.weight.detach().clone()
    res = fit(model, train, None, y, 2, FitConfig(epochs=2, batch_size=16, lr=0.0, patience=10), "cpu", tmp_path,
              "same", progress=False)
    assert torch.equal(model.weight, fresh) and len(res.history) == 2  # trained afresh (lr 0), not resumed


# ------------------------------------------------------------------------------ set targets (partial labels)
def test_set_target_loss_is_minus_log_of_the_set_probability_by_hand():
    from hiernet.engine import SetTargetLoss

    z = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 2.0]])
    y = torch.tensor([0, -1])  # class 0; the set {0, 1} (row 0 of sets)
    got = SetTargetLoss([[1, 1, 0]])(z, y).item()
    e = np.exp
    first = np.log(e(1) + e(2) + e(0)) - 1.0
    second = np.log(e(0.5) + e(0) + e(2)) - np.log(e(0.5) + e(0))  # logsumexp(z) - logsumexp(z[set])
    assert abs(got - (first + second) / 2) < 1e-6
    assert abs(got - 1.36994) < 1e-5  # (1.40761 + 1.33228) / 2


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shifted", [False, True])
def test_set_target_loss_is_cross_entropy_for_class_targets(weighted, smoothing, shifted):
    from hiernet.engine import SetTargetLoss

    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(7, 4, generator=g), torch.tensor([0, 1, 2, 3, 1, 1, 0])
    w = torch.tensor([0.5, 1.0, 2.0, 0.3]) if weighted else None
    shift = torch.randn(4, generator=g) if shifted else None
    got = SetTargetLoss([[1, 1, 0, 0]], w, w, smoothing, shift)(z, y)
    want = nn.CrossEntropyLoss(weight=w, label_smoothing=smoothing)(z if shift is None else z + shift, y)
    assert torch.allclose(got, want, atol=1e-6)


def test_set_targets_count_towards_their_classes_for_weights_priors_and_sampling():
    from hiernet.engine import logit_adjustment, sample_weights, target_distribution

    labels = np.array([0, 0, 1, 2, -1, -1, 3])  # two set targets {0, 1}: class 0 has 2 samples, class 1 one
    sets = [[1, 1, 0, 0]]
    dist = target_distribution(labels, sets, 4)
    assert np.allclose(dist[4], [2 / 3, 1 / 3, 0, 0]) and np.allclose(dist[:4], np.eye(4))
    counts = np.array([2 + 4 / 3, 1 + 2 / 3, 1, 1])  # 7 samples
    assert np.allclose(class_weights(labels, 4, 1.0, sets).numpy(), 7 / (4 * counts))
    assert np.allclose(logit_adjustment(labels, 4, 1.0, sets).numpy(), np.log(counts / 7))
    w = sample_weights(labels, 1.0, sets)
    assert np.allclose(w, [0.3, 0.3, 0.6, 1, 0.4, 0.4, 1])  # a set: 2/3 * 1/count_0 + 1/3 * 1/count_1
    # a set none of whose classes has a class target is spread evenly
    assert np.allclose(target_distribution(np.array([0, -1]), [[0, 1, 1]], 3)[3], [0, 0.5, 0.5])
    # without sets, the same numbers as before
    assert np.allclose(sample_weights(np.array([0, 0, 1]), 1.0), [0.5, 0.5, 1.0])


def test_evaluate_scores_a_prediction_in_the_set_as_right():
    from hiernet.engine import _criteria, evaluate

    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 2.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, -1, -1])  # wrong; the set {0, 1} but predicted 2; the set and predicted 1
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=2)
    _, val_criterion = _criteria(np.array([0, 1, 2, -1]), 3, FitConfig(label_smoothing=0.1), "cpu", [[1, 1, 0]])
    loss, acc = evaluate(lin, loader, val_criterion, "cpu", amp=False)
    want = torch.stack([nn.functional.cross_entropy(x[:1], y[:1]),
                        torch.logsumexp(x[1], 0) - torch.logsumexp(x[1, :2], 0),
                        torch.logsumexp(x[2], 0) - torch.logsumexp(x[2, :2], 0)]).mean()
    assert abs(loss - want.item()) < 1e-6 and abs(acc - 1 / 3) < 1e-9


@pytest.mark.parametrize("recipe", [{}, {"class_weight_power": 0.5}, {"logit_adjust": 1.0}, {"sample_power": 1.0}])
def test_fit_learns_from_set_targets(tmp_path, recipe):
    """Blob A is class 0; blob B holds classes 1 and 2, mostly labelled only as the set {1, 2}: the model
    learns to put blob B in the set (val accuracy counts the set as right), with every long-tail option."""
    g = torch.Generator().manual_seed(0)
    n = 90
    side = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) + side[:, None] * 6.0
    y = torch.where(side == 0, 0, -1)
    y[1], y[3] = 1, 2  # a few class targets in blob B
    cfg = FitConfig(epochs=15, batch_size=16, lr=0.1, patience=30, **recipe)
    torch.manual_seed(0)
    m = nn.Linear(2, 3)
    res = fit(m, TensorDataset(x, y), TensorDataset(x, y), y.numpy(), 3, cfg, "cpu", tmp_path, "h", progress=False,
              target_sets=[[0, 1, 1]])
    assert all(np.isfinite(r["val_loss"]) and np.isfinite(r["train_loss"]) for r in res.history)
    assert res.history[-1]["val_acc"] > 0.95
    with torch.no_grad():
        pred = m(x).argmax(1)
    assert ((pred == 0) == (side == 0)).float().mean() > 0.95
