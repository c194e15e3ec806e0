"""torchrun: two CPU processes (gloo) train one node with DDP; rank 0 alone writes the artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TWO_LEVEL, make_tree


@pytest.mark.slow  # two training processes per case: minutes on 2 cores
@pytest.mark.parametrize("mode_args", [
    ["--mode", "finetune", "--epochs", "2", "--batch-size", "4"],
    ["--mode", "frozen", "--epochs", "3", "--views", "1"],
], ids=["finetune", "frozen"])
def test_torchrun_two_processes_gloo(tmp_path, mode_args):
    data = make_tree(tmp_path / "data", TWO_LEVEL, per_leaf=6)
    split, models = tmp_path / "split", tmp_path / "models"
    subprocess.run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(data), "-o", str(split), "-q"], check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "src" / "train.py"), "-d", "parent", "--data-dir", str(split), "--output-dir", str(models),
         "--cache-dir", str(tmp_path / "cache"), "--backbone", "efficientnet-lite0", "--image-size", "64",
         "--device", "cpu", "-q", *mode_args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("node 'parent': test accuracy") == 1  # rank 0 alone reports
    names = sorted(p.name for p in models.iterdir())
    # written once; frozen features on a CPU are int8 by default, pinned by int8.json, and the heads
    # standardise with the tree's statistics, pinned by tree_stats.json
    frozen = "frozen" in mode_args
    assert [n for n in names if not n.startswith(".")] == (["hierarchy.json"] + ["int8.json"] * frozen + ["parent"]
                                                            + ["tree_stats.json"] * frozen)
    assert not [n for n in names if ".tmp-" in n or ".old-" in n or n.endswith(".work")]  # no leftovers
    ck = torch.load(models / "parent" / "model.pth", weights_only=True)
    assert ck["config"]["node"]["classes"] == ["angular", "round"]
    assert ("backbone" in ck["state_dict"]) == ("finetune" in mode_args)
    assert ck["config"]["backbone"]["precision"] == ("int8" if frozen else "fp32")
    from hiernet.artifacts import build_torch_model, load_node

    backbone, head, own = build_torch_model(load_node(models / "parent"))
    with torch.no_grad():
        assert head(backbone(torch.rand(2, 3, 64, 64))).shape == (2, 2)


RANK_SCRIPT = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from torch import nn
from torch.utils.data import TensorDataset
from hiernet import distributed as du
from hiernet.engine import FitConfig, fit
from hiernet.safeio import UserError

import os
du.init_from_env("cpu")
r, tmp = du.rank(), Path(sys.argv[2])
(tmp / f"pid{r}").write_text(str(os.getpid()))
out = {"world": du.world_size()}


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.train_calls, self.first_rand = 0, None

    def forward(self, x):
        if self.training:
            self.train_calls += 1
            if self.first_rand is None:
                self.first_rand = torch.rand(1).item()  # what a dropout mask would draw
        return self.lin(x)


g = torch.Generator().manual_seed(0)
y = torch.arange(36) % 2
x = torch.randn(36, 4, generator=g) + y[:, None] * 3.0
yv = torch.arange(30) % 2
xv = torch.randn(30, 4, generator=g) + yv[:, None] * 3.0
if r == 1:
    yv = 1 - yv  # this rank's validation data disagrees with the others' (as BatchNorm statistics can)
train, val = TensorDataset(x, y), TensorDataset(xv, yv)

# 1 + 2: divergent validation, 36 samples over 3 ranks with batches of 16
m = Recorder()
res = fit(m, train, val, y.numpy(), 2, FitConfig(epochs=40, batch_size=16, lr=0.05, patience=2), "cpu", tmp / "a", "ha",
          progress=False)
out.update(epochs=len(res.history), best=res.best_epoch, train_calls=m.train_calls, first_rand=m.first_rand)

# resume: only rank 0 sees the checkpoint (other hosts' work folders are their own)
work = tmp / ("b" if r == 0 else f"b-rank{r}")
cfg = FitConfig(epochs=2, batch_size=16, lr=0.05, patience=100)
fit(Recorder(), train, None, y.numpy(), 2, cfg, "cpu", work, "hb", progress=False)
again = fit(Recorder(), train, None, y.numpy(), 2, FitConfig(epochs=4, batch_size=16, lr=0.05, patience=100), "cpu", work,
            "hb", progress=False)
out["resumed"] = again.history

# shared storage: a folder of one's own is not shared; one folder for all is
try:
    du.check_shared_storage([tmp / f"out-{r}"])
    out["own_folder"] = "accepted"
except UserError as exc:
    out["own_folder"] = str(exc)
du.check_shared_storage([tmp / "shared"])

# rank 0 first (a download into a shared cache), then the others
import time
with du.rank0_first():
    out["entered"] = time.time()
    if r == 0:
        time.sleep(0.5)
        out["left"] = time.time()
(tmp / f"rank{r}.json").write_text(json.dumps(out))
du.cleanup()
"""


@pytest.mark.slow
def test_three_processes_take_the_same_decisions(tmp_path):
    """Under torchrun (3 Gloo processes): every rank stops at the same epoch although their validation data
    disagree, each makes a step per epoch on a node smaller than 3 batches, dropout draws differ per rank,
    a checkpoint only rank 0 can see is resumed on all, folders that are not shared are refused, and rank 0
    runs a download block before the others."""
    import json

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                             str(script), str(REPO / "src"), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # ranks that disagree wait for each other forever: stop them all
        for pid_file in tmp_path.glob("pid*"):  # torchrun's workers live in sessions of their own
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the ranks hung (they took different decisions)")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert {o["world"] for o in ranks} == {3}
    assert len({(o["epochs"], o["best"]) for o in ranks}) == 1 and ranks[0]["epochs"] < 40  # one decision
    assert all(o["train_calls"] == o["epochs"] for o in ranks)  # 12 samples per rank: one batch, not none
    assert len({o["first_rand"] for o in ranks}) == 3  # seed + rank: different dropout masks
    assert [row["epoch"] for row in ranks[1]["resumed"]] == [1, 2, 3, 4]
    assert ranks[1]["resumed"][:2] == ranks[0]["resumed"][:2]  # epochs 1-2 came from rank 0's checkpoint
    for o in ranks:
        assert "is not shared storage" in o["own_folder"] and "rank 1" in o["own_folder"]
    assert ranks[1]["entered"] >= ranks[0]["left"] and ranks[2]["entered"] >= ranks[0]["left"]


def test_restart_clears_the_checkpoint_only_inside_the_node_lock(tmp_path):
    """`--restart` while another process trains the node must not delete that run's checkpoint."""
    from hiernet.safeio import LockHeld
    from hiernet.training import node_lock

    sys.path.insert(0, str(REPO / "src"))
    import train

    models = tmp_path / "models"
    ckpt = models / ".parent.work" / "last.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"running")
    args = train.get_args_parser().parse_args(["-d", "parent", "--restart", "--output-dir", str(models),
                                               "--data-dir", str(tmp_path / "split"), "--device", "cpu", "-q"])
    with node_lock(models, "parent"):  # another training of 'parent' is running
        with pytest.raises(LockHeld):
            train.main(args)
    assert ckpt.read_bytes() == b"running"
