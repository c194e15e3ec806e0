"""torchrun: two CPU processes (gloo) train one node with DDP; rank 0 alone writes the artifacts."""

from __future__ import annotations

import os
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
    assert [n for n in names if not n.startswith(".")] == ["hierarchy.json", "parent"]  # written once
    assert not [n for n in names if ".tmp-" in n or ".old-" in n or n.endswith(".work")]  # no leftovers
    ck = torch.load(models / "parent" / "model.pth", weights_only=True)
    assert ck["config"]["node"]["classes"] == ["angular", "round"]
    assert ("backbone" in ck["state_dict"]) == ("finetune" in mode_args)
    from hiernet.artifacts import build_torch_model, load_node

    backbone, head, own = build_torch_model(load_node(models / "parent"))
    with torch.no_grad():
        assert head(backbone(torch.rand(2, 3, 64, 64))).shape == (2, 2)
