"""The benchmark helpers (bench/): machine description, tables, reports, stage timing, argument checks.

Fast: no model is trained (Lite0 is built at 64 px where a script's own model code is checked); the scripts are
otherwise only started for their early refusals.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def common():
    return _load("common")


@pytest.fixture(scope="module")
def run_benchmark():
    return _load("run_benchmark")


def test_machine_info_has_the_reported_fields(common):
    info = common.machine_info()
    for key in ("cpu_model", "usable_cores", "ram_gib", "torch", "onnxruntime", "date", "python"):
        assert key in info
    assert isinstance(info["usable_cores"], int) and info["usable_cores"] >= 1
    assert info["cpu_model"]
    md = common.machine_markdown(info)
    for label in ("CPU", "usable cores", "RAM (GiB)", "torch", "onnxruntime", "date"):
        assert label in md


def test_cpu_simd_names_the_int8_instructions_of_the_cpu(common):
    avx2_only = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert common.cpu_simd(avx2_only) == "avx2 fma"
    vnni = "flags\t\t: fpu avx2 fma avx512f avx512bw avx512_vnni avx512vl\n"
    assert common.cpu_simd(vnni) == "avx2 fma avx512f avx512bw avx512_vnni"
    assert common.cpu_simd("Features\t: fp asimd asimddp i8mm\n") == "asimd asimddp i8mm"
    assert common.cpu_simd("model name\t: avx512_vnni in a name is not a flag\n") == "none found"
    assert "vector / int8 instructions" in common.machine_markdown({**common.machine_info(), "cpu_simd": "avx2 fma"})


def test_md_table_and_fmt(common):
    t = common.md_table(["a", "b|c"], [("x", 0.12345), ("y", None), ("z", 3)])
    lines = t.splitlines()
    assert lines[0] == "| a | b\\|c |"
    assert lines[1] == "|---|---|"
    assert lines[2] == "| x | 0.123 |"
    assert lines[3] == "| y | n/a |"
    assert lines[4] == "| z | 3 |"
    assert common.fmt(0.256, 3, pct=True) == "25.6 %"
    assert common.fmt(float("nan")) == "n/a"


def test_write_report_writes_markdown_and_json_twin(common, tmp_path):
    md, js = common.write_report("# hi", {"x": 1, "p": Path("/a")}, tmp_path / "sub" / "r.md")
    assert md.read_text() == "# hi\n"
    assert json.loads(js.read_text()) == {"x": 1, "p": "/a"}
    with pytest.raises(common.BenchError):
        common.write_report("# hi", {}, tmp_path / "r.json")


def test_run_timed_reports_exit_code_lines_and_memory(common, tmp_path):
    code = ("import sys; print('one'); print('two'); "
            "sys.stderr.write('epoch 1/5:  40%|####      | 2/5 [00:01<00:01]\\rbad\\n'); sys.exit(3)")
    run = common.run_timed([sys.executable, "-c", code], log_dir=tmp_path, name="t")
    assert run.returncode == 3
    assert [line for _, line in run.stdout_lines] == ["one", "two"]
    assert run.stderr_tail() == "bad"
    assert run.wall_s > 0 and run.max_rss_mib > 1
    assert (tmp_path / "t.stdout.log").read_text() == "one\ntwo\n"


def test_node_times_from_train_lcpn_output(run_benchmark):
    lines = [(2.0, "== training node 'parent'"), (3.0, "epoch 1 ..."), (10.0, "== training node 'tops'"),
             (15.0, "== training node 'flat'"), (18.0, "== trained 3 model(s) in 16 s"),
             (18.0, "== exporting ONNX for fast CPU prediction")]
    nodes, setup, export = run_benchmark.node_times(lines, end=21.0)
    assert nodes == [("parent", 8.0), ("tops", 5.0), ("flat", 3.0)]
    assert setup == 2.0 and export == 3.0


def test_render_pipeline_report_has_every_figure(run_benchmark, common):
    rep = {
        "dataset_name": "clothing", "command": "python bench/run_benchmark.py", "cwd": "/x",
        "settings": {"dataset": "/d", "work": "/w", "seed": 1337, "train_seed": 0, "train_args": [],
                     "cache": "/w/cache", "cache_kept": False},
        "machine": common.machine_info(),
        "stages": {"prepare": {"status": "ok", "wall_s": 1.0, "max_rss_mib": 40.0},
                   "train": {"status": "ok", "wall_s": 100.0, "max_rss_mib": 1000.0},
                   "evaluate": {"status": "ok", "wall_s": 5.0, "max_rss_mib": 400.0},
                   "predict": {"status": "ok", "wall_s": 2.0, "max_rss_mib": 300.0}},
        "total_wall_s": 108.0, "peak_rss_mib": 1000.0,
        "predict": {"images": 80, "errors": 0, "wall_s": 2.0, "images_per_s": 40.0},
        "train_detail": {"nodes": [("parent", 50.0)], "setup_s": 1.0, "export_s": 4.0},
        "accuracy": {"n_images": 80, "leaf_accuracy": 0.9, "level_accuracy": [0.95, 0.9], "hierarchical_f1": 0.93,
                     "flat_leaf_accuracy": 0.88, "difference": 0.02, "ci95": [-0.01, 0.05], "p_value": 0.3},
    }
    md = run_benchmark.render(rep)
    for text in ("leaf accuracy (end-to-end) | 0.9000", "level 2 accuracy | 0.9000", "hierarchical F1 | 0.9300",
                 "flat baseline leaf accuracy | 0.8800", "+2.00 (95% CI -1.00 to +5.00)", "40.0 images/s",
                 "| train | ok | 100.0 | 1000 |", "| parent | 50.0 |", "## Machine", "python bench/run_benchmark.py"):
        assert text in md, text


def test_run_benchmark_refuses_missing_dataset_and_work_in_repo(tmp_path):
    script = str(BENCH / "run_benchmark.py")
    r = subprocess.run([sys.executable, script, "-p", str(tmp_path / "missing")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "data").mkdir()
    r = subprocess.run([sys.executable, script, "-p", str(tmp_path / "data"), "--work", str(REPO / "bench" / "w")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "inside the repository" in r.stderr
    assert not (REPO / "bench" / "w").exists()


def test_prepare_work_cleans_only_its_own_folder(run_benchmark, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="not made by run_benchmark"):
        run_benchmark.prepare_work(foreign)
    assert (foreign / "keep.txt").exists()
    ours = run_benchmark.prepare_work(tmp_path / "ours")
    (ours / "models").mkdir()
    (ours / "models" / "m").write_text("old")
    (ours / "other.txt").write_text("not ours to delete")
    assert run_benchmark.prepare_work(ours) == ours
    assert not (ours / "models").exists() and (ours / "other.txt").exists()


def test_sample_images_is_every_kth_sorted_strict_or_all_when_fewer(common, tmp_path):
    from PIL import Image

    for i in range(10):
        Image.new("RGB", (8, 8)).save(tmp_path / f"img_{i:02d}.png")
    paths, total = common.sample_images(tmp_path, 3)
    assert total == 10
    assert [Path(p).name for p in paths] == ["img_00.png", "img_03.png", "img_06.png"]
    with pytest.raises(common.BenchError, match="fewer than --n 11; lower --n"):
        common.sample_images(tmp_path, 11)
    paths, total = common.sample_images(tmp_path, 11, strict=False)  # backbone_speed: all of them
    assert total == 10 and [Path(p).name for p in paths] == [f"img_{i:02d}.png" for i in range(10)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.BenchError, match="no images under .*; pass -p DIR"):
        common.sample_images(tmp_path / "empty", 3, flag="-p")
    assert common.every_kth(list(range(7)), 3) == [0, 2, 4] and common.every_kth([1, 2], 5) == [1, 2]


def test_run_cli_turns_a_bench_or_user_error_into_one_line_and_exit_2(common, capsys, monkeypatch):
    import argparse

    from hiernet.safeio import UserError

    monkeypatch.setattr(sys, "argv", ["bench.py"])
    parser = lambda: argparse.ArgumentParser()  # noqa: E731
    for exc in (common.BenchError("no models in X; pass --models-dir"), UserError("bad photo Y; remove it")):
        def main(args, exc=exc):
            raise exc

        with pytest.raises(SystemExit) as stop:
            common.run_cli(main, parser)
        assert stop.value.code == 2 and capsys.readouterr().err == f"error: {exc}\n"
    def interrupted(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        common.run_cli(interrupted, parser)
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(SystemExit) as stop:
        common.run_cli(lambda args: 0, parser)
    assert stop.value.code == 0


def test_interleaved_passes_reverse_the_order_every_other_pass(common):
    calls = []
    times = common.interleaved_passes([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times] == [3, 3] and all(s >= 0 for t in times for s in t)


@pytest.fixture(scope="module")
def tail():
    return _load("tail")


def test_tail_scores_by_hand(tail):
    y_true = np.array(["a", "a", "b", "c"], dtype=object)
    y_pred = np.array(["a", "b", "b", "b"], dtype=object)
    s = tail.scores(y_true, y_pred, ["a", "c"])
    assert s["leaf_accuracy"] == 0.5
    assert s["recall"] == {"a": 0.5, "b": 1.0, "c": 0.0} and s["tail_recall"] == 0.25
    assert abs(s["macro_f1"] - (2 / 3 + 0.5 + 0.0) / 3) < 1e-9  # F1 a: P 1, R .5; b: P 1/3, R 1; c: 0


def test_tail_support_and_rows_score_only_the_held_out_folds(tail):
    leaves = np.array(["a"] * 5 + ["b"] * 2 + ["c"] * 3, dtype=object)
    support, tails = tail.support_and_tail(leaves, tail_max=3, folds=3)
    assert support == {"a": 5, "b": 2, "c": 3} and tails == ["c"]  # b has fewer images than folds
    pred = np.array(["a"] * 5 + [None, None] + ["a", "c", "c"], dtype=object)  # b's fold not held out
    rows = tail.score_rows({"m": pred}, {"m": 1.25}, leaves, tails)
    assert rows["m"]["n_scored"] == 8 and rows["m"]["leaf_accuracy"] == 7 / 8 and rows["m"]["seconds"] == 1.2
    assert rows["m"]["tail_recall"] == 2 / 3


def test_tail_bench_runs_both_peers_and_the_suite_on_tiny_features(tail, monkeypatch):
    from hiernet.hierarchy import Hierarchy

    # leaves at depths 2 and 3: a two-class root trained on leaves, a mixed parent, a plain parent
    leaf_ids = ["a/x", "a/y", "b/u/p", "b/u/q", "b/v"]
    hier = Hierarchy.from_leaf_paths(leaf_ids)
    assert [list(r) for r in tail.level_labels(hier, np.array(["a/x", "b/u/q"], dtype=object))] == \
        [["a", "a/x", ""], ["b", "b/u", "b/u/q"]]
    rng = np.random.default_rng(0)
    leaves = np.array([leaf for leaf in leaf_ids for _ in range(10)], dtype=object)
    centres = {leaf: rng.normal(0, 4, 6) for leaf in leaf_ids}
    base = np.stack([centres[leaf] + rng.normal(0, 0.5, 6) for leaf in leaves]).astype(np.float32)
    ev = np.stack([base, base + rng.normal(0, 0.1, base.shape).astype(np.float32)], axis=1)
    monkeypatch.setitem(tail.VARIANTS, "tiny suite", {"logit_adjust": 1.0, "hidden": 16, "epochs": 40, "lr": 0.03, "patience": 40})
    todo = tail.methods(["tiny suite"], no_peers=False)
    assert list(todo) == [*tail.PEERS, "tiny suite"]
    preds, seconds = tail.cross_validate(hier, ev, ev, leaves, todo, folds=2, seed=0)
    for name, pred in preds.items():
        assert set(pred) <= set(leaf_ids)
        assert tail.scores(leaves, pred, [])["leaf_accuracy"] > 0.9, name
    rows = {n: {**tail.scores(leaves, p, ["b/v"]), "seconds": seconds[n]} for n, p in preds.items()}
    md = tail.markdown(rows, ["b/v"], {leaf: 10 for leaf in leaf_ids}, "# t", "python3 bench/tail.py")
    assert "| peer: flat LR |" in md and "| b/v (10) |" in md


def test_tail_suite_decisions_flat_and_combined(tail, monkeypatch):
    from hiernet.hierarchy import Hierarchy

    leaf_ids = ["a/x", "a/y", "b/u/p", "b/u/q", "b/v"]
    hier = Hierarchy.from_leaf_paths(leaf_ids)
    rng = np.random.default_rng(1)
    leaves = np.array([leaf for leaf in leaf_ids for _ in range(10)], dtype=object)
    centres = {leaf: rng.normal(0, 4, 6) for leaf in leaf_ids}
    base = np.stack([centres[leaf] + rng.normal(0, 0.5, 6) for leaf in leaves]).astype(np.float32)
    ev = np.stack([base, base], axis=1)
    tiny = {"hidden": 0, "epochs": 40, "lr": 0.03, "patience": 40}
    for decision in ("flat", "combined"):
        monkeypatch.setitem(tail.VARIANTS, decision, {**tiny, "decision": decision})
    monkeypatch.setitem(tail.VARIANTS, "bad", {**tiny, "decision": "nope"})
    import ablation

    calls = []
    real = ablation.train_lcpn
    monkeypatch.setattr(ablation, "train_lcpn", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setitem(tail.VARIANTS, "lcpn", {**tiny})
    tail._TRAINED.clear()
    preds, _ = tail.cross_validate(hier, ev, ev, leaves, tail.methods(["flat", "combined", "lcpn"], no_peers=True),
                                   folds=2, seed=0)
    for name, pred in preds.items():
        assert tail.scores(leaves, pred, [])["leaf_accuracy"] > 0.9, name
    # one recipe, three decisions: the LCPN heads and the flat head are trained once per fold
    assert len(calls) == 2 and sorted(k[0] for k in tail._TRAINED) == ["flat", "flat", "lcpn", "lcpn"]
    with pytest.raises(ValueError, match="decision"):
        tail.cross_validate(hier, ev, ev, leaves, tail.methods(["bad"], no_peers=True), folds=2, seed=0)
    # a flat model trained elsewhere (the tuned classifier): its probabilities replace the flat head's
    tail._TRAINED.clear()
    sure = np.zeros((len(leaves), len(leaf_ids)), np.float32)
    sure[:, hier.leaves().index("b/v")] = 1.0  # certain of one leaf whatever the image
    flat = tail.suite_lcpn(hier, ev, leaves, ev, {**tiny, "decision": "flat", "flat_probs": sure}, 0, 0)
    assert set(flat) == {"b/v"} and not any(k[0] == "flat" for k in tail._TRAINED)
    combined = tail.suite_lcpn(hier, ev, leaves, ev, {**tiny, "decision": "combined", "flat_probs": sure}, 0, 0)
    assert set(combined) == {"b/v"}  # flat x path: a zero flat probability rules every other leaf out
    even = np.full_like(sure, 1 / len(leaf_ids))  # an indifferent flat model leaves the choice to the LCPN path
    assert np.mean(tail.suite_lcpn(hier, ev, leaves, ev, {**tiny, "decision": "combined", "flat_probs": even}, 0, 0)
                   == leaves) > 0.9


def test_tail_auto_decision_chooses_on_a_validation_part_and_predicts_with_the_whole_folds_heads(tail, monkeypatch):
    import hiernet.exporting
    from hiernet.hierarchy import Hierarchy

    leaf_ids = ["a/x", "a/y", "b/u/p", "b/u/q", "b/v"]
    hier = Hierarchy.from_leaf_paths(leaf_ids)
    rng = np.random.default_rng(2)
    leaves = np.array([leaf for leaf in leaf_ids for _ in range(12)], dtype=object)
    centres = {leaf: rng.normal(0, 1.5, 6) for leaf in leaf_ids}  # overlapping: the decisions can differ
    base = np.stack([centres[leaf] + rng.normal(0, 1.0, 6) for leaf in leaves]).astype(np.float32)
    ev = np.stack([base, base], axis=1)
    tiny = {"hidden": 0, "epochs": 30, "lr": 0.03, "patience": 30}
    for decision in ("lcpn", "flat", "combined", "auto"):
        monkeypatch.setitem(tail.VARIANTS, decision, {**tiny, "decision": decision})
    seen, real = [], hiernet.exporting.choose_decision

    def forced(acc, n, precision):  # the real rule's inputs, then "flat" whatever they say
        seen.append((dict(acc), n, real(acc, n, precision)["chosen"]))
        return {**real(acc, n, precision), "chosen": "flat"}

    monkeypatch.setattr(hiernet.exporting, "choose_decision", forced)
    tail._TRAINED.clear()
    tail.AUTO_CHOICES.clear()
    preds, _ = tail.cross_validate(hier, ev, ev, leaves, tail.methods(["flat", "auto"], no_peers=True), folds=2, seed=0)
    assert tail.AUTO_CHOICES == ["flat", "flat"]  # the choice is what the auto row predicts with ...
    assert (preds["auto"] == preds["flat"]).all()  # ... with the heads of the whole fold
    n_fit = 30 - round(30 / 9)
    assert len(seen) == 2 and all(set(acc) == {"lcpn", "flat", "combined"} and n == round(30 / 9) for acc, n, _ in seen)
    # the held-out part trained its own heads (fold size n_fit), beside the whole fold's
    assert {k[-1] for k in tail._TRAINED} == {30, n_fit}
    from sklearn.model_selection import StratifiedKFold

    for fold, (tr, _) in enumerate(StratifiedKFold(2, shuffle=True, random_state=0).split(ev[:, 0], leaves)):
        order = np.random.default_rng(fold).permutation(len(tr))  # seed + fold, seed 0
        val, fit = tr[order[:round(30 / 9)]], tr[order[round(30 / 9):]]
        for decision, acc in seen[fold][0].items():  # each decision scored on the held-out part (reused heads)
            got = tail.suite_lcpn(hier, ev[fit], leaves[fit], ev[val], {**tiny, "decision": decision}, fold, 1024)
            assert acc == np.mean(got == leaves[val]), decision
    monkeypatch.setattr(hiernet.exporting, "choose_decision", real)
    tail.AUTO_CHOICES.clear()
    preds, _ = tail.cross_validate(hier, ev, ev, leaves, tail.methods(["auto"] + [c for c in ("lcpn", "flat", "combined")],
                                                                        no_peers=True), folds=2, seed=0)
    assert tail.AUTO_CHOICES == [c for _, _, c in seen]  # the real rule on the same validation accuracies
    for fold, (tr, te) in enumerate(__import__("sklearn.model_selection", fromlist=["x"]).StratifiedKFold(
            2, shuffle=True, random_state=0).split(ev[:, 0], leaves)):
        assert (preds["auto"][te] == preds[tail.AUTO_CHOICES[fold]][te]).all()
    md = tail.markdown({"auto": {**tail.scores(leaves, preds["auto"], []), "seconds": 1.0,
                                 "auto_choices": list(tail.AUTO_CHOICES)}}, [], {}, "# t", "cmd")
    assert f"auto: chose {tail.AUTO_CHOICES[0]} (fold 1), {tail.AUTO_CHOICES[1]} (fold 2)" in md


def test_tail_max_folds_predicts_only_the_first_folds(tail):
    from hiernet.hierarchy import Hierarchy

    hier = Hierarchy.from_leaf_paths(["a/x", "a/y", "b"])
    leaves = np.array(["a/x", "a/y", "b"] * 6, dtype=object)
    x = np.stack([np.eye(3)[["a/x", "a/y", "b"].index(leaf)] for leaf in leaves]).astype(np.float32)
    ev = np.stack([x, x], axis=1)
    todo = {"lr": lambda h, v, l, e, s: tail.flat_lr(v[:, 0], l, e[:, 0])}
    preds, _ = tail.cross_validate(hier, ev, ev, leaves, todo, folds=3, seed=0, max_folds=1)
    done = np.array([p is not None for p in preds["lr"]])
    assert done.sum() == 6 and (preds["lr"][done] == leaves[done]).all()
    preds, _ = tail.cross_validate(hier, ev, ev, leaves, todo, folds=3, seed=0)
    assert (preds["lr"] == leaves).all()


def test_precision_bench_subsets_keep_k_images_per_class(tmp_path):
    precision = _load("precision")
    src = tmp_path / "tree"
    for leaf, n in (("a/x", 5), ("a/y", 2), ("b/z", 4)):
        (src / leaf).mkdir(parents=True)
        for i in range(n):
            (src / leaf / f"{i}.jpg").write_bytes(b"x")
    out = precision.subset_tree(src, tmp_path / "sub", 3)
    assert {str(p.relative_to(out)) for p in out.rglob("*.jpg")} == {
        "a/x/0.jpg", "a/x/1.jpg", "a/x/2.jpg", "a/y/0.jpg", "a/y/1.jpg", "b/z/0.jpg", "b/z/1.jpg", "b/z/2.jpg"}
    assert all(p.is_symlink() for p in out.rglob("*.jpg"))
    csv_in = tmp_path / "cat" / "styles.csv"
    csv_in.parent.mkdir()
    rows = ["id,top,leaf,image"] + [f"{i},A,{'x' if i % 3 else 'y'},images/{i}.jpg" for i in range(10)]
    csv_in.write_text("\n".join(rows) + "\n", encoding="utf-8")
    sub = precision.subset_csv(csv_in, tmp_path / "sub.csv", "top,leaf", "image", 2)
    import csv

    kept = list(csv.DictReader(open(sub, encoding="utf-8")))
    assert [r["id"] for r in kept] == ["0", "1", "2", "3"]  # two of y (0, 3), two of x (1, 2)
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).parent == csv_in.parent / "images" for r in kept)


@pytest.fixture(scope="module")
def tuning():
    return _load("tail_tuning")


@pytest.mark.parametrize("tune_from", [11, 15])
def test_tail_tuning_trunk_then_tail_is_the_suites_lite0_features(tuning, tune_from):
    import torch

    from hiernet.backbones import create_backbone

    trunk, tail = tuning.backbone_parts(64, tune_from)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        maps = trunk(x)
        assert maps.shape[1] == (112 if tune_from == 11 else 192)
        assert torch.allclose(tail(maps), create_backbone("efficientnet-lite0", image_size=64)(x), atol=1e-4)


def test_tail_tuning_maps_are_cached_once_and_an_unreadable_image_is_left_out(tuning, tmp_path, monkeypatch):
    from conftest import noise_images

    paths = noise_images(tmp_path)
    maps, ok = tuning.extract_maps(paths, 64, 15, 1, 0, tmp_path / "work")
    assert maps.shape == (4, 3, 192, 2, 2) and maps.dtype == np.float16
    assert ok.tolist() == [True, False, True, True]
    # the eval view is what the suite's trunk computes on the image's eval input
    import torch

    from hiernet.data import eval_views
    from hiernet.images import load_rgb

    trunk, _ = tuning.backbone_parts(64, 15)
    with torch.inference_mode():
        want = trunk(torch.from_numpy(eval_views(load_rgb(paths[2]), 64, "crop"))).numpy()
    np.testing.assert_allclose(maps[2, :2].astype(np.float32), want, atol=0.05, rtol=0.01)
    assert not np.allclose(maps[2, 0], maps[2, 1], atol=0.05)  # the mirror is another view
    monkeypatch.setattr("hiernet.runtime.export_onnx", lambda *a, **k: pytest.fail("recomputed"))
    again, ok2 = tuning.extract_maps(paths, 64, 15, 1, 0, tmp_path / "work")
    assert np.array_equal(np.asarray(again), np.asarray(maps)) and ok2.tolist() == ok.tolist()


def test_tail_tuning_tunes_the_tail_and_cross_validates_every_row(tuning, monkeypatch):
    from conftest import pattern_maps

    # the tuning itself (hiernet.tailtune.tune_tail) is tested in test_tailtune.py; here, the folds and rows
    leaf_ids = ["a/x", "a/y", "b"]
    maps, y = pattern_maps(dtype=np.float16)  # float16, as extract_maps keeps them
    n = len(y)
    leaves = np.array(leaf_ids, dtype=object)[y]
    preds, seconds = tuning.cross_validate([maps], leaves, leaf_ids, 64, [15], epochs=15, hidden=0, folds=2, seed=0,
                                           max_folds=None, peers=True, pretrained=False, lr=3e-3)
    tuned = "Lite0 tuned from block 15 of 16, linear classifier"
    assert list(preds) == ["peer: flat LR", "frozen Lite0, suite flat head (linear)", tuned] and set(seconds) == set(preds)
    for name, pred in preds.items():
        assert all(p in leaf_ids for p in pred), name  # every image predicted by the fold that held it out
    assert np.mean(preds[tuned] == leaves) >= 0.8
    one, _ = tuning.cross_validate([maps], leaves, leaf_ids, 64, [15], epochs=1, hidden=0, folds=2, seed=0,
                                   max_folds=1, peers=False, pretrained=False)
    assert sum(p is None for p in one[tuned]) == n // 2  # only the first fold held out
    # with the tree: the suite's heads on the frozen features and on the tuned backbone's, every decision
    from hiernet.hierarchy import Hierarchy

    import tail as tail_bench

    hier = Hierarchy.from_leaf_paths(leaf_ids)
    seen, real = [], tail_bench.suite_lcpn

    def spy(h, views_tr, leaves_tr, ev_te, changes, seed, hidden):
        seen.append((changes["decision"], views_tr, ev_te))
        return real(h, views_tr, leaves_tr, ev_te, changes, seed, hidden)

    monkeypatch.setattr(tail_bench, "suite_lcpn", spy)
    both, sec = tuning.cross_validate([maps], leaves, leaf_ids, 64, [15], epochs=15, hidden=0, folds=2, seed=0,
                                      max_folds=None, peers=False, pretrained=False, lr=3e-3, hier=hier)
    heads = [f"Lite0 tuned from block 15 of 16, then suite heads ({d})" for d in ("flat", "lcpn", "combined")]
    assert list(both) == ["frozen Lite0, suite flat head (linear)", "frozen Lite0, suite heads (lcpn)",
                          "frozen Lite0, suite heads (combined)", tuned, *heads] and set(sec) == set(both)
    for name in heads:  # heads trained on the tuned backbone's features of every view learn the classes
        assert all(p in leaf_ids for p in both[name]) and np.mean(both[name] == leaves) >= 0.8, name
    assert np.array_equal(both[tuned], preds[tuned])  # the same tuning as without the tree
    # per fold: the frozen rows' lcpn + combined calls, then the tuned rows' flat + lcpn + combined
    assert [d for d, _, _ in seen] == ["lcpn", "combined", "flat", "lcpn", "combined"] * 2
    for fold in range(2):
        calls = seen[5 * fold:5 * fold + 5]
        assert all(v.shape == (30, 3, 1280) and e.shape == (30, 2, 1280) for _, v, e in calls)
        frozen_views, tuned_views = calls[0][1], calls[2][1]
        assert all(np.array_equal(v, frozen_views) for _, v, _ in calls[:2])
        assert all(np.array_equal(v, tuned_views) for _, v, _ in calls[2:])
        # the tuned rows' heads see the tuned backbone's features of every view, not the frozen ones
        assert not np.allclose(tuned_views, frozen_views, atol=1e-2)


def test_tail_tuning_level_loss_and_repeat_sampling_reach_the_tuning(tuning, monkeypatch, tmp_path):
    from conftest import pattern_maps
    from hiernet.hierarchy import Hierarchy

    leaf_ids = ["a/x", "a/y", "b"]
    hier = Hierarchy.from_leaf_paths(leaf_ids)
    parse = tuning.get_args_parser().parse_args
    assert tuning.tune_keywords(parse(["--work", str(tmp_path)]), hier, leaf_ids) == {}
    kw = tuning.tune_keywords(parse(["--work", str(tmp_path), "--level-loss", "0.5"]), hier, leaf_ids)
    assert kw["level_weight"] == 0.5 and [g.tolist() for g in kw["levels"]] == [[0, 0, 1]]
    assert tuning.tune_keywords(parse(["--work", str(tmp_path), "--repeat-threshold", "0.1"]), hier, leaf_ids) == \
        {"repeat_threshold": 0.1}
    seen, real = [], tuning.tune

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)

    monkeypatch.setattr(tuning, "tune", spy)
    maps, y = pattern_maps(n=30, dtype=np.float16)
    leaves = np.array(leaf_ids, dtype=object)[y]
    tuning.cross_validate([maps], leaves, leaf_ids, 64, [15], epochs=1, hidden=0, folds=2, seed=0, max_folds=1,
                          peers=False, pretrained=False, tune_kw=kw)
    assert len(seen) == 1 and seen[0]["level_weight"] == 0.5 and seen[0]["levels"] is kw["levels"]
    other = pattern_maps(n=30, channels=192)[0][:, :, ::-1].copy()
    tuning.cross_validate_composite([maps, other], leaves, leaf_ids, 64, ["efficientnet-lite1", "efficientnet-lite0"],
                                    epochs=1, folds=2, seed=0, max_folds=1, hier=hier, hidden=0, pretrained=False,
                                    tune_kw=kw)
    assert len(seen) == 3 and all(k["level_weight"] == 0.5 and k["levels"] is kw["levels"] for k in seen[1:])


def test_tail_tuning_rare_views_are_more_views_of_the_rare_leaves_images_only(tuning, tmp_path, monkeypatch):
    from conftest import noise_images, pattern_maps

    paths = noise_images(tmp_path)  # the second one does not decode
    leaves = np.array(["a", "b", "b", "b"], dtype=object)
    support = {"a": 200, "b": 40}
    assert tuning.rare_maps(paths, leaves, support, 100, 0, 64, [15], ["efficientnet-lite0"], 0, tmp_path / "w") is None
    assert tuning.rare_maps(paths, leaves, support, 30, 3, 64, [15], ["efficientnet-lite0"], 0, tmp_path / "w") is None
    extra, rows = tuning.rare_maps(paths, leaves, support, 100, 3, 64, [15], ["efficientnet-lite0"], 0, tmp_path / "w")
    assert len(extra) == 1 and extra[0].shape == (3, 3, 192, 2, 2)  # leaf b's 3 images, 3 augmented views each
    assert rows.tolist() == [-1, -1, 1, 2]  # leaf a is not rare; image 1 did not decode
    main, _ = tuning.extract_maps(paths, 64, 15, 3, 0, tmp_path / "w")
    assert not np.allclose(extra[0][rows[2]], main[2, 2:], atol=0.05)  # other augmented views than the main maps'
    # the folds hand each tuning its images' rows
    seen, real = [], tuning.tune
    monkeypatch.setattr(tuning, "tune", lambda *a, **k: seen.append(k) or real(*a, **k))
    leaf_ids = ["a/x", "a/y", "b"]
    maps, y = pattern_maps(n=30, dtype=np.float16)
    leaves = np.array(leaf_ids, dtype=object)[y]
    rows = np.where(y == 2, np.arange(30) // 3, -1)
    rare = ([maps[y == 2][:, 1:]], rows)
    tuning.cross_validate([maps], leaves, leaf_ids, 64, [15], epochs=1, hidden=0, folds=2, seed=0, max_folds=1,
                          peers=False, pretrained=False, rare=rare)
    (k,) = seen
    from sklearn.model_selection import StratifiedKFold

    tr, _ = next(StratifiedKFold(2, shuffle=True, random_state=0).split(y, y))
    assert k["extra"][0] is rare[0][0] and np.array_equal(k["extra"][1], rows[tr])
    from hiernet.hierarchy import Hierarchy

    tuning.cross_validate_composite([maps, maps], leaves, leaf_ids, 64, ["efficientnet-lite1", "efficientnet-lite0"],
                                    epochs=1, folds=2, seed=0, max_folds=1, hier=Hierarchy.from_leaf_paths(leaf_ids),
                                    hidden=0, pretrained=False, rare=([rare[0][0], rare[0][0][:, :1]], rows))
    fit, _ = tuning.held_out(tr, 0)
    assert [k["extra"][0].shape[1] for k in seen[1:]] == [2, 1]  # each member its own extra maps
    assert all(np.array_equal(k["extra"][1], rows[fit]) for k in seen[1:])


@pytest.mark.slow
def test_precision_bench_tunes_the_backbone_first_and_trains_on_it(tmp_path):
    """bench/precision.py --tune-backbone: a tune stage (timed into training), then train_lcpn.sh on the
    tuned weights, evaluate and predict: one row with every figure."""
    import torch

    from conftest import FAST, TWO_LEVEL, make_tree, run

    precision = _load("precision")
    data = make_tree(tmp_path / "data", TWO_LEVEL, per_leaf=8)
    run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", data, "-o", tmp_path / "split", "-q"], cwd="/")
    fast = [a for a in FAST if a not in ("--backbone", "efficientnet-lite0", "--image-size", "64")]
    row = precision.run_precision(tmp_path, "fp32", fast, tune=("efficientnet-lite0", 64), with_flat=True)
    assert "error" not in row, row.get("error")
    assert 0 < row["tune_s"] < row["train_s"] and 0 <= row["leaf_accuracy"] <= 1 and row["predict_images"] > 0
    tuned = tmp_path / "fp32" / "models" / "tuned_backbone.pth"
    ck = torch.load(tmp_path / "fp32" / "models" / "parent" / "model.pth", map_location="cpu", weights_only=True)
    assert ck["config"]["backbone"]["weights_file"] == str(tuned) and ck["config"]["backbone"]["image_size"] == 64
    flat = torch.load(tmp_path / "fp32" / "models" / "flat" / "model.pth", map_location="cpu", weights_only=True)
    assert flat["config"]["train"]["flat_classifier"] == str(tuned.with_name("tuned_backbone.classifier.pth"))
    # --with-flat: every decision's test scores and the one auto chose on the validation split
    d = row["decisions"]
    assert set(d) == {"lcpn", "flat", "combined", "auto", "auto_validation"} and d["lcpn"]["leaf_accuracy"] == row["leaf_accuracy"]
    assert d["auto"] in ("lcpn", "flat", "combined") and set(d["auto_validation"]) == {"lcpn", "flat", "combined"}
    assert all(0 <= d[k]["leaf_accuracy"] <= 1 and 0 <= d[k]["macro_f1"] <= 1 for k in ("lcpn", "flat", "combined"))
    md = precision.render({"command": "c", "created": "t", "limit": None, "machine": precision.machine_info(),
                           "tune": ["efficientnet-lite0", 64], "datasets": {"d": [row]}, "prepare_s": {"d": 1.0}})
    assert "tuning took" in md and f"`--decision auto` chose **{d['auto']}**" in md and f"| {d['auto']} (auto) |" in md


def test_precision_bench_decision_scores_read_every_decision_of_the_results():
    precision = _load("precision")
    res = {"leaf_accuracy": 0.9, "macro_f1": 0.8, "flat": {"leaf_accuracy": 0.91, "macro_f1": 0.82},
           "combined": {"leaf_accuracy": 0.92, "macro_f1": 0.83},
           "auto_decision": {"chosen": "combined", "leaf_accuracy": {"lcpn": 0.5, "combined": 0.6, "flat": 0.55}}}
    d = precision.decision_scores(res)
    assert d["combined"] == {"leaf_accuracy": 0.92, "macro_f1": 0.83} and d["auto"] == "combined"
    assert d["auto_validation"]["combined"] == 0.6 and d["lcpn"] == {"leaf_accuracy": 0.9, "macro_f1": 0.8}
    lines = "\n".join(precision.decision_lines([{"precision": "int8", "decisions": d}]))
    assert "| combined (auto) | 92.00 % | 0.830 |" in lines and "| lcpn | 90.00 % | 0.800 |" in lines
    assert "combined 60.00 %" in lines
    no_flat = precision.decision_scores({"leaf_accuracy": 0.9, "macro_f1": 0.8})  # trained without the flat model
    assert set(no_flat) == {"lcpn", "auto", "auto_validation"} and no_flat["auto"] == "lcpn"
    assert precision.decision_lines([{"precision": "fp32"}]) == []


def test_tail_tuning_tunes_another_backbone_and_names_its_rows(tuning):
    import torch

    from conftest import pattern_maps

    trunk, tail = tuning.backbone_parts(64, 20, pretrained=False, backbone="efficientnet-lite1")
    with torch.inference_mode():
        channels = trunk(torch.rand(1, 3, 64, 64)).shape[1]
    assert len(tail.blocks) == 1 and len(trunk.net._blocks) == 21  # Lite1: the last of 21 blocks
    maps, y = pattern_maps(channels=channels)
    leaf_ids = ["a", "b", "c"]
    preds, _ = tuning.cross_validate([maps], np.array(leaf_ids, dtype=object)[y], leaf_ids, 64, [20], epochs=1,
                                     hidden=0, folds=2, seed=0, max_folds=1, peers=False, pretrained=False,
                                     backbone="efficientnet-lite1")
    assert list(preds) == ["frozen Lite1, suite flat head (linear)", "Lite1 tuned from block 20 of 21, linear classifier"]


def test_tail_tuning_composite_tunes_every_member_and_trains_the_heads_on_both(tuning, monkeypatch, tmp_path):
    """--backbone A+B: each member's last block tuned on its own maps; the suite's heads see the members'
    features concatenated (2 x 1280), tuned ones in the tuned rows, frozen ones in the frozen rows."""
    from conftest import pattern_maps
    from hiernet.hierarchy import Hierarchy

    import tail as tail_bench

    leaf_ids = ["a/x", "a/y", "b"]
    maps, y = pattern_maps(dtype=np.float16)
    other = pattern_maps(channels=192)[0][:, :, ::-1].copy()  # the second member: other maps, same images
    leaves = np.array(leaf_ids, dtype=object)[y]
    hier = Hierarchy.from_leaf_paths(leaf_ids)
    members = ["efficientnet-lite1", "efficientnet-lite0"]
    tuned_members, seen, real_tune, real_heads = [], [], tuning.tune, tail_bench.suite_lcpn

    def spy_tune(tail, m, *a, **k):
        tuned_members.append(m.shape)
        return real_tune(tail, m, *a, **k)

    seen_changes = []

    def spy_heads(h, views_tr, leaves_tr, ev_te, changes, seed, hidden):
        seen.append((changes["decision"], views_tr, ev_te))
        seen_changes.append(changes)
        return real_heads(h, views_tr, leaves_tr, ev_te, changes, seed, hidden)

    monkeypatch.setattr(tuning, "tune", spy_tune)
    monkeypatch.setattr(tail_bench, "suite_lcpn", spy_heads)
    preds, seconds, taus, oof = tuning.cross_validate_composite([maps, other], leaves, leaf_ids, 64, members, epochs=15,
                                                                folds=2, seed=0, max_folds=None, hier=hier, hidden=0,
                                                                pretrained=False, lr=3e-3)
    short = "Lite1+Lite0"
    tuned_rows = [f"{short}, each tuned from its last block, then suite heads ({d})" for d in ("flat", "lcpn", "combined")]
    adjusted = f"{short}, each tuned from its last block, tuned classifier adjusted for the prior"
    clf_rows = [f"{short}, each tuned from its last block, tuned classifier (logits averaged: the flat head)",
                f"{short}, each tuned from its last block, tuned classifier x suite LCPN heads (combined)",
                f"{adjusted} (the flat head of --flat-classifier)", f"{adjusted} x suite LCPN heads (combined)",
                *(f"{adjusted}, tau fixed at {t}" for t in ("0.25", "0.5", "0.75", "1")),
                f"{adjusted}, tau chosen by held-out macro F1",
                f"{adjusted}, tau chosen by held-out macro F1 among the taus within 0.5 point of its best leaf accuracy",
                f"{adjusted}, tau chosen by held-out leaf accuracy of the eval view alone (train.py before it mirror-averaged)"]
    assert list(preds) == [*(f"frozen {short}, suite heads ({d})" for d in ("flat", "lcpn", "combined")),
                           f"{short}, each tuned from its last block, linear classifiers averaged", *tuned_rows, *clf_rows]
    assert set(seconds) == set(preds)
    # two members in each of two folds, each tuned on its training fold (30 images) less the held-out ninth
    assert tuned_members == [(27,) + maps.shape[1:], (27,) + other.shape[1:]] * 2
    from hiernet.training import PRIOR_TAUS

    assert len(taus) == 2 and all(set(t) == set(tuning.TAU_CRITERIA) and set(t.values()) <= set(PRIOR_TAUS) for t in taus)
    # every image's out-of-fold logits, from the fold that held it out; the tuned classifier decides by them
    assert oof["z"].shape == (60, 2, 3) and np.isfinite(oof["z"]).all() and sorted(set(oof["fold"])) == [0, 1]
    assert np.array_equal(np.array(leaf_ids, dtype=object)[tuning.mirror_probs(oof["z"]).argmax(1)], preds[clf_rows[0]])
    assert [len(f["hold"]) for f in oof["folds"]] == [3, 3] and all(f["z_hold"].shape == (3, 2, 3) for f in oof["folds"])
    assert not set(oof["folds"][0]["hold"]) & set(np.flatnonzero(oof["fold"] == 0))  # held out of the training fold
    # --rescore: the tuned classifier's rows again from the saved logits, nothing tuned, the same decisions
    tuning.save_logits(tmp_path / "r.logits.npz", oof)
    again, again_taus, again_leaves = tuning.rescore(tmp_path / "r.logits.npz", short)
    assert list(again) == [n for n in clf_rows if "LCPN" not in n] and again_taus == taus
    assert np.array_equal(again_leaves, leaves)
    assert all(np.array_equal(again[name], preds[name]) for name in again)
    # balanced classes: every adjustment is the same shift of all logits, so it changes no decision
    assert all(np.array_equal(preds[clf_rows[0]], preds[name]) for name in clf_rows[2:3] + clf_rows[4:])
    for name in preds:
        assert all(p in leaf_ids for p in preds[name]), name
    for name in tuned_rows[::2] + clf_rows:  # the tuned members' features (and classifiers) learn the classes
        assert np.mean(preds[name] == leaves) >= 0.8, name
    decisions = [d for d, _, _ in seen]
    assert decisions == (["flat", "lcpn", "combined"] * 2 + ["combined"] * 2) * 2
    given = [c for c in seen_changes if "flat_probs" in c]  # the combined rows with the tuned classifier as flat model
    assert len(given) == 4 and all(c["flat_probs"].shape == (30, 3) for c in given)
    assert all(np.allclose(c["flat_probs"].sum(1), 1, atol=1e-5) for c in given)
    seen = [s for s, c in zip(seen, seen_changes) if "flat_probs" not in c]
    for fold in range(2):
        calls = seen[6 * fold:6 * fold + 6]
        assert all(v.shape == (30, 3, 2560) and e.shape == (30, 2, 2560) for _, v, e in calls)
        frozen_views, tuned_views = calls[0][1], calls[3][1]
        assert not np.allclose(tuned_views, frozen_views, atol=1e-2)
        # each half is one member's: the halves differ (other maps, other network)
        assert not np.allclose(tuned_views[..., :1280], tuned_views[..., 1280:], atol=1e-2)


def test_tail_tuning_holds_out_a_ninth_of_each_training_fold_for_the_prior(tuning):
    """What the tuning sees and the held-out part the prior adjustment's tau is chosen on: disjoint, together
    the training fold, the held-out part its validation share, seeded."""
    tr = np.arange(0, 200, 2)
    fit, hold = tuning.held_out(tr, 3)
    assert len(hold) == 11 and len(fit) == 89 and not set(fit) & set(hold)
    assert np.array_equal(np.sort(np.concatenate([fit, hold])), tr)
    assert np.array_equal(fit, np.sort(fit)) and np.array_equal(hold, np.sort(hold))
    assert np.array_equal(tuning.held_out(tr, 3)[1], hold) and not np.array_equal(tuning.held_out(tr, 4)[1], hold)


def test_tail_tuning_prior_taus_by_accuracy_by_macro_f1_and_by_macro_f1_within_a_bound(tuning):
    """A rare class the plain classifier never predicts: the adjustment that lets it be predicted costs a
    frequent image, so leaf accuracy keeps tau 0 while macro F1 takes it; the bound decides."""
    log_prior = np.log(np.array([0.9, 0.1]))
    # logits favour class 0 by a margin m: an adjustment by tau flips an image when tau * log(9) > m
    margins = np.array([0.5, 0.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.2, 0.2, 0.2])
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # the two rare images, then frequent ones
    z = np.stack([margins, np.zeros_like(margins)], 1)[:, None].repeat(2, 1)  # (12, 2, 2): view and mirror alike
    # tau 0.1 flips the margins of 0.2 (3 frequent images: accuracy 10/12 -> 7/12); tau 0.3 those of 0.5 too
    # (the 2 rare images: 9/12, macro F1 0.45 -> 0.70); no tau <= 1 flips a margin of 3
    got = tuning.prior_taus(z, y, log_prior, 2)
    assert got["accuracy"] == 0.0 and got["macro-f1"] == 0.3
    assert got["macro-f1-bounded"] == 0.0  # 9/12 is 8 points below the best accuracy
    assert tuning.prior_taus(z, y, log_prior, 2, bound=0.1)["macro-f1-bounded"] == 0.3
    assert got["accuracy-eval-view"] == 0.0  # view and mirror alike: the eval view decides as both do
    # no frequent image near the boundary, the rare images' mirrors far on class 0's side: the eval view alone
    # would take tau 0.3 (12/12), the mirror-averaged decisions cannot get the rare images at any tau (10/12)
    z2 = z[:9].copy()
    z2[:2, 1, 0] = 5.0
    got2 = tuning.prior_taus(z2, y[:9], log_prior, 2)
    assert got2["accuracy-eval-view"] == 0.3 and got2["accuracy"] == 0.0


def test_tail_tuning_saves_the_out_of_fold_logits(tuning, tmp_path):
    oof = {"z": np.arange(12, dtype=np.float32).reshape(3, 2, 2), "y": np.array([0, 1, 1]), "fold": np.array([0, 1, 0]),
           "leaf_ids": ["a", "b"], "folds": [{"fit": np.array([1]), "hold": np.array([2]), "z_hold": np.ones((1, 2, 2)),
                                              "log_prior": np.array([-1.0, -0.5])}]}
    path = tmp_path / "r.logits.npz"
    path.write_bytes(b"an earlier run")
    tuning.save_logits(path, oof)
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["fold", "hold_0", "leaf_ids", "log_prior_0", "y", "z", "z_hold_0"]
        assert np.array_equal(f["z"], oof["z"]) and list(f["leaf_ids"]) == ["a", "b"] and f["hold_0"].tolist() == [2]
    assert [p.name for p in tmp_path.iterdir()] == ["r.logits.npz"]  # no temporary file left


def test_tail_tuning_rescore_scores_the_saved_logits_or_says_what_to_give(tuning, tmp_path):
    """--rescore on two folds of imbalanced logits: each fold adjusted by the tau its own held-out part
    chooses, every row scored, the report written; a file that is not such logits is refused in one line."""
    y = np.array([0] * 16 + [1] * 4)  # 4 rare images (16-19)
    margins = np.full(20, 3.0)  # class 0 ahead by this margin: the frequent images are right, unless ...
    margins[16:], margins[0] = 0.5, 0.2  # ... the rare ones (tau 0.3 flips them) and image 0 (tau 0.1 flips it)
    z = np.stack([margins, np.zeros(20)], 1)[:, None].repeat(2, 1).astype(np.float32)  # (20, 2, 2)
    log_prior = np.log(np.array([0.9, 0.1]))
    # fold 0 tests the even images, its held-out part a rare odd one (tau 0.3 gets it); fold 1 the odd images,
    # its held-out part image 0 (any tau loses it: 0)
    oof = {"z": z, "y": y, "fold": np.arange(20) % 2, "leaf_ids": ["a/x", "b/y"],
           "folds": [{"hold": np.array([17]), "z_hold": z[[17]], "log_prior": log_prior},
                     {"hold": np.array([0]), "z_hold": z[[0]], "log_prior": log_prior}]}
    tuning.save_logits(tmp_path / "r.logits.npz", oof)
    preds, taus, leaves = tuning.rescore(tmp_path / "r.logits.npz", "Lite1+Lite0")
    assert [t["accuracy"] for t in taus] == [0.3, 0.0]
    flat = preds["Lite1+Lite0, each tuned from its last block, tuned classifier adjusted for the prior (the flat head of --flat-classifier)"]
    assert [i for i, p in enumerate(flat) if p == "b/y"] == [0, 16, 18]  # fold 0's images adjusted, fold 1's not
    assert list(leaves) == ["a/x"] * 16 + ["b/y"] * 4
    tuning.save_logits(tmp_path / "r.logits.npz", oof)
    out = tmp_path / "r.md"
    argv = ["--rescore", str(tmp_path / "r.logits.npz"), "--backbone", "efficientnet-lite1+efficientnet-lite0",
            "--out", str(out)]
    assert tuning.main(tuning.get_args_parser().parse_args(argv)) == 0
    report = out.read_text()
    assert "Lite1+Lite0, each tuned from its last block, tuned classifier adjusted for the prior, tau fixed at 1 |" in report
    assert "20 images, 2 leaves" in report and "x suite LCPN" not in report
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(SystemExit, match=r"cannot rescore .*bad.npz.*give the .logits.npz"):
        tuning.main(tuning.get_args_parser().parse_args(["--rescore", str(tmp_path / "bad.npz")]))
    with pytest.raises(SystemExit, match="--work is needed"):
        tuning.main(tuning.get_args_parser().parse_args(["--data-dir", str(tmp_path)]))


def test_tail_tuning_composite_needs_the_suite_heads(tuning, tmp_path):
    args = tuning.get_args_parser().parse_args(["--work", str(tmp_path / "w"), "--backbone",
                                                "efficientnet-lite1+efficientnet-lite0", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--suite-heads"):
        tuning.main_composite(args, ["efficientnet-lite1", "efficientnet-lite0"], [], np.array([]), None)


def test_tail_tuning_held_out_prior_scores_one_backbone_as_a_composite_of_one(tuning, tmp_path, monkeypatch):
    """--held-out-prior routes a single backbone through main_composite with itself as the only member (and its
    own refusal names the flag); without the flag a single backbone takes the plain cross-validation."""
    import tail as tail_bench

    monkeypatch.setattr(tail_bench, "trainval_images", lambda d: ([], np.array([]), None))
    seen = []
    monkeypatch.setattr(tuning, "main_composite", lambda args, members, *rest: seen.append(members) or 0)
    base = ["--work", str(tmp_path / "w"), "--data-dir", str(tmp_path), "--backbone", "efficientnet-lite0"]
    assert tuning.main(tuning.get_args_parser().parse_args(base + ["--held-out-prior", "--suite-heads"])) == 0
    assert seen == [["efficientnet-lite0"]]
    monkeypatch.setattr(tuning, "extract_maps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("plain path")))
    with pytest.raises(RuntimeError, match="plain path"):
        tuning.main(tuning.get_args_parser().parse_args(base + ["--suite-heads"]))
    assert seen == [["efficientnet-lite0"]]
    monkeypatch.undo()
    # a composite of one names its rows as one network's, without the averaged classifiers' row (the same decision)
    from conftest import pattern_maps
    from hiernet.hierarchy import Hierarchy

    maps, y = pattern_maps(n=30, dtype=np.float16)
    leaf_ids = ["a/x", "a/y", "b"]
    preds, *_ = tuning.cross_validate_composite([maps], np.array(leaf_ids, dtype=object)[y], leaf_ids, 64,
                                                ["efficientnet-lite0"], epochs=1, folds=2, seed=0, max_folds=1,
                                                hier=Hierarchy.from_leaf_paths(leaf_ids), hidden=0, pretrained=False)
    tuned = [name for name in preds if not name.startswith("frozen")]
    assert tuned[:4] == [f"Lite0, tuned from its last block, then suite heads ({d})" for d in ("flat", "lcpn", "combined")] + \
        ["Lite0, tuned from its last block, tuned classifier (the flat head)"]
    assert list(tuning.classifier_row_names("Lite0", combined=False)) == [n for n in tuned[3:] if "(combined)" not in n]
    assert not any("classifiers averaged" in name or "logits averaged" in name or "each tuned" in name for name in preds)
    args = tuning.get_args_parser().parse_args(base + ["--held-out-prior"])
    with pytest.raises(SystemExit, match="--held-out-prior is scored with the suite's heads; add --suite-heads"):
        tuning.main_composite(args, ["efficientnet-lite0"], [], np.array([]), None)



def _node_base(y: np.ndarray, leaf_ids: list, fold: np.ndarray, tmp_path: Path) -> Path:
    """Out-of-fold logits of a base that knows the parents but not a/x from a/y: it puts a/x a little ahead of
    a/y on every image of node a (and of b on b's), two folds, a held-out pair of node images per fold."""
    z = np.full((len(y), 2, 3), -4.0, np.float32)
    in_a = y < 2
    z[in_a, :, 0], z[in_a, :, 1] = 2.2, 2.0
    z[~in_a, :, 2] = 3.0
    holds = [np.array([i for i in np.flatnonzero(fold != k) if y[i] < 2][:4]) for k in (0, 1)]
    oof = {"z": z, "y": y, "fold": fold, "leaf_ids": leaf_ids,
           "folds": [{"hold": h, "z_hold": z[h], "log_prior": np.log(np.full(3, 1 / 3))} for h in holds]}
    import importlib.util

    spec = importlib.util.spec_from_file_location("tt_save", REPO / "bench" / "tail_tuning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.save_logits(tmp_path / "base.logits.npz", oof)
    return tmp_path / "base.logits.npz"


def test_tail_tuning_node_network_redecides_the_nodes_leaves_for_the_base(tuning, tmp_path, monkeypatch):
    """--node a --base B: the node's network is tuned on the node's images of the part of each training fold
    the base was tuned on (never the held-out part, never other nodes' images) with labels local to the node,
    and re-decides among a/x and a/y, which the base cannot tell apart; b's images stay the base's."""
    from conftest import pattern_maps

    leaf_ids = ["a/x", "a/y", "b"]
    maps, y = pattern_maps(dtype=np.float16)
    leaves = np.array(leaf_ids, dtype=object)[y]
    fold = np.arange(len(y)) % 2
    base = tuning.load_base(_node_base(y, leaf_ids, fold, tmp_path), leaf_ids, leaves)
    cols = tuning.node_columns(leaf_ids, "a")
    assert cols.tolist() == [0, 1]
    seen, real = [], tuning.tune
    monkeypatch.setattr(tuning, "tune", lambda t, m, labels, k, *a, **kw: seen.append((m.shape[0], labels, k)) or
                        real(t, m, labels, k, *a, **kw))
    chosen, real_taus = [], tuning.prior_taus
    monkeypatch.setattr(tuning, "prior_taus", lambda z, labels, lp, k, **kw: chosen.append((z.shape, labels.tolist(), k))
                        or real_taus(z, labels, lp, k, **kw))
    preds, seconds, taus, z_node = tuning.cross_validate_node(maps, base, cols, 64, "efficientnet-lite0", epochs=15,
                                                              seed=0, lr=3e-3, pretrained=False)
    base_row, prior_row, plain_row = preds
    assert base_row == "base: tuned classifier adjusted for the prior" and set(seconds) == set(preds)
    assert "Lite0 @ 64 px" in prior_row and "not adjusted" in plain_row
    # training fold of 30 images, 20 of node a, 4 of them held out: 16, labelled 0/1 within the node
    assert [(n, k) for n, _, k in seen] == [(16, 2), (16, 2)] and all(set(labels) == {0, 1} for _, labels, _ in seen)
    assert np.all(preds[base_row][y < 2] == "a/x") and np.all(preds[base_row][y == 2] == "b")
    # each fold's tau is chosen on the base's held-out node images (4), labelled within the node; the base's own
    # tau on its whole held-out part (3 leaves)
    hold_labels = [y[base[f"hold_{k}"]].tolist() for k in (0, 1)]
    assert [c for c in chosen if c[2] == 2] == [((4, 2, 2), h, 2) for h in hold_labels]
    assert [c[:2] for c in chosen if c[2] == 3] == [((4, 2, 3), h) for h in hold_labels]
    for row in (prior_row, plain_row):
        assert np.all(preds[row][y == 2] == "b"), row  # the base decides that an image is not of the node
        assert np.mean(preds[row] == leaves) >= 0.9, row  # a/y found
    assert len(taus) == 2 and z_node.shape == (60, 2, 2) and np.isfinite(z_node).all()
    # one fold held out: the other fold's images unscored
    base["fold"] = np.where(fold == 1, -1, 0)
    one, *_ = tuning.cross_validate_node(maps, base, cols, 64, "efficientnet-lite0", epochs=1, seed=0, pretrained=False)
    assert all((p is None) == (f == 1) for p, f in zip(one[prior_row], fold))


def test_tail_tuning_with_node_model_shares_the_nodes_probability_as_the_node_network_says(tuning):
    p_base = np.array([[0.5, 0.1, 0.4], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    p_node = np.array([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    got = tuning.with_node_model(p_base, p_node, np.array([0, 1]))
    np.testing.assert_allclose(got, [[0.12, 0.48, 0.4], [0.18, 0.02, 0.8], [0.3, 0.3, 0.4]])
    assert got.argmax(1).tolist() == [1, 2, 2]  # the node's mass 0.6 beats b's 0.4, yet split it loses to it
    np.testing.assert_allclose(p_base[0], [0.5, 0.1, 0.4])  # the base's probabilities are not changed



def test_tail_tuning_node_from_redecides_the_nodes_leaves_by_another_runs_classifier(tuning, tmp_path):
    """--node-from: no tuning; the other run's classifier, restricted to the node's leaves, re-decides them. It
    tells a/x from a/y but calls every b image a/x: the base keeps those b (it decides what is of the node)."""
    leaf_ids = ["a/x", "a/y", "b"]
    y = np.arange(30) % 3
    fold = np.arange(30) % 2
    leaves = np.array(leaf_ids, dtype=object)[y]
    base = tuning.load_base(_node_base(y, leaf_ids, fold, tmp_path), leaf_ids, leaves)
    other = {k: v.copy() for k, v in base.items()}
    z = np.full((30, 2, 3), -4.0, np.float32)
    z[np.arange(30), :, np.where(y == 2, 0, y)] = 3.0  # right on node a's images, a/x on b's
    other["z"] = z
    for k in (0, 1):
        other[f"z_hold_{k}"] = z[base[f"hold_{k}"]]
    preds = tuning.redecide_from(base, other, np.array([0, 1]), "o.logits.npz")
    base_row, row = preds
    assert row == "base, the node's leaves re-decided by o.logits.npz's tuned classifier adjusted for the prior"
    assert np.all(preds[base_row][y < 2] == "a/x") and np.all(preds[base_row][y == 2] == "b")
    assert np.array_equal(preds[row], leaves)
    other["fold"] = 1 - fold
    with pytest.raises(SystemExit, match="other folds than --base"):
        tuning.redecide_from(base, other, np.array([0, 1]), "o")
    with pytest.raises(SystemExit, match="--node-from goes with --node and --base"):
        tuning.main(tuning.get_args_parser().parse_args(["--node-from", "o.npz"]))

def test_tail_tuning_node_refusals_name_what_to_give(tuning, tmp_path, monkeypatch):
    leaf_ids = ["a/x", "a/y", "b", "c/d/e", "c/d/f", "c/g"]
    with pytest.raises(SystemExit, match=r"--node 'b' is not a parent of two or more leaves; pick one of: a, c, c/d$"):
        tuning.node_columns(leaf_ids, "b")
    assert tuning.node_columns(leaf_ids, "c").tolist() == [3, 4, 5] and tuning.node_columns(leaf_ids, "c/d/").tolist() == [3, 4]
    y = np.arange(6) % 3
    path = _node_base(y, ["a/x", "a/y", "b"], np.arange(6) % 2, tmp_path)
    leaves = np.array(["a/x", "a/y", "b"], dtype=object)[y]
    with pytest.raises(SystemExit, match="holds other images or leaves than 5 images"):
        tuning.load_base(path, ["a/x", "a/y", "b"], leaves[:5])
    with pytest.raises(SystemExit, match="holds other images or leaves"):
        tuning.load_base(path, ["a/x", "a/y", "b"], leaves[::-1])
    (tmp_path / "bad.npz").write_bytes(b"no")
    with pytest.raises(SystemExit, match=r"cannot read --base .*bad.npz.*give the .logits.npz"):
        tuning.load_base(tmp_path / "bad.npz", ["a/x", "a/y", "b"], leaves)
    base = ["--work", str(tmp_path / "w"), "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--node and --base go together"):
        tuning.main(tuning.get_args_parser().parse_args(base + ["--node", "a"]))
    from hiernet.backbones import get_spec

    args = tuning.get_args_parser().parse_args(base + ["--node", "a", "--base", str(path)])
    with pytest.raises(SystemExit, match="give one --backbone, not a '\\+' composite"):
        tuning.main_node(args, get_spec("efficientnet-lite1+efficientnet-lite0"), [], leaves)
    args.rare_views = 3
    with pytest.raises(SystemExit, match="drop --level-loss, --share-levels and --rare-views"):
        tuning.main_node(args, get_spec("efficientnet-lite0"), [], leaves)
    # the node and the base are checked before any map is computed; an image that no longer decodes is refused
    args.rare_views = 0
    monkeypatch.setattr(tuning, "_maps_and_leaves", lambda *a: pytest.fail("maps computed"))
    args.node = "b"
    with pytest.raises(SystemExit, match="--node 'b' is not a parent"):
        tuning.main_node(args, get_spec("efficientnet-lite0"), [], leaves)
    args.node, args.base = "a", tmp_path / "bad.npz"
    with pytest.raises(SystemExit, match="cannot read --base"):
        tuning.main_node(args, get_spec("efficientnet-lite0"), [], leaves)
    args.base = path
    monkeypatch.setattr(tuning, "_maps_and_leaves", lambda *a: ([None], leaves[1:], {}, [], None))
    with pytest.raises(SystemExit, match="1 image\\(s\\) of --data-dir did not decode"):
        tuning.main_node(args, get_spec("efficientnet-lite0"), [], leaves)

def test_backbone_speed_times_each_input_side_and_refuses_unknown_precisions(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    bs = _load("backbone_speed")
    out = tmp_path / "speed.md"
    args = bs.get_args_parser().parse_args(["--backbone", "efficientnet-lite0", "--sizes", "64", "96", "--precisions",
                                            "fp32", "-p", str(photos), "--n", "4", "--batch-size", "2",
                                            "--repeats", "1", "--out", str(out)])
    assert bs.main(args) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert [(r["size"], r["precision"], r["onnx_input_side"]) for r in rep["rows"]] == [(64, "fp32", 64), (96, "fp32", 96)]
    assert all(r["feature_dim"] == 1280 and r["images_per_s"] > 0 for r in rep["rows"])
    assert rep["n"] == 4
    md = out.read_text()
    assert "| 96 px | fp32 |" in md and "2.25×" in md  # (96 / 64)² pixels

    args.precisions = "fp16"
    from hiernet.safeio import UserError

    with pytest.raises(UserError, match="--precisions: unknown fp16"):
        bs.main(args)
    # from the command line: one line (bench/common.py's run_cli), exit code 2, nothing written
    out.unlink()
    r = subprocess.run([sys.executable, str(REPO / "bench" / "backbone_speed.py"), "--precisions", "fp16", "-p",
                        str(photos), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --precisions: unknown fp16; use fp32, int8 or both"
    assert not out.exists()


def test_backbone_speed_interleaves_the_passes_and_keeps_each_models_best():
    import time

    bs = _load("backbone_speed")
    calls = []

    def runner(k, delay):
        def run(x):
            calls.append(k)
            time.sleep(delay * len(x))
        return run

    batches = [[np.zeros((2, 1))] * 3, [np.zeros((4, 1))]]  # 6 and 4 images
    rates = bs.interleaved_rates([runner(0, 0.002), runner(1, 0.01)], batches, repeats=2)
    assert calls == [0, 1] + [0, 0, 0, 1] + [1, 0, 0, 0]  # warm-ups, then the order reversed every other pass
    assert 6 / (6 * 0.002) * 0.5 < rates[0] <= 6 / (6 * 0.002)
    assert 4 / (4 * 0.01) * 0.5 < rates[1] <= 4 / (4 * 0.01)


# ----------------------------------------------------------------------------------- bench/finetune_cv.py
@pytest.fixture(scope="module")
def finetune():
    return _load("finetune_cv")


def _finetune_args(finetune, tmp_path: Path, *extra):
    return finetune.get_args_parser().parse_args(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.md"),
                                                  "--image-size", "64", "--epochs", "1", "--batch-size", "8",
                                                  "--folds", "2", *extra])


def test_finetune_cv_view_logits_are_the_eval_view_and_its_mirror(finetune, tmp_path):
    """Column 0: the network on each image's centre crop; column 1: on the same crop flipped left-right."""
    import torch

    from conftest import draw_image
    from hiernet.images import load_rgb, resize_for_model, to_array

    paths = [draw_image(tmp_path / f"{i}.jpg", shape, i, 80) for i, shape in enumerate(["triangle", "ellipse", "cross"])]

    class LeftMinusRight(torch.nn.Module):  # (B, 3, S, S) -> (B, 2): not mirror-symmetric
        def forward(self, x):
            half = x.shape[-1] // 2
            return torch.stack([x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))], 1)

    z = finetune.view_logits(LeftMinusRight(), [(p, 0) for p in paths], 64, 2, 0, "cpu", False)
    assert z.shape == (3, 2, 2) and z.dtype == np.float32
    for p, zi in zip(paths, z):
        x = torch.from_numpy(to_array(resize_for_model(load_rgb(p), 64, "crop")))[None]
        np.testing.assert_allclose(zi[0], LeftMinusRight()(x)[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(zi[1], LeftMinusRight()(x.flip(-1))[0].numpy(), atol=1e-6)
        assert not np.allclose(zi[0], zi[1])


def test_finetune_cv_scores_each_image_by_the_fold_that_held_it_out_and_resumes(finetune, tmp_path, monkeypatch):
    """tail_tuning.py's folds and held-out parts; the network trained on the fit part only, stopped on the
    held-out part; every image scored once; a rerun reads the finished folds, another setting trains again."""
    from conftest import make_tree

    tuning = _load("tail_tuning")
    root = make_tree(tmp_path / "data", {"a": {"x": "ellipse", "y": "cross"}, "b": "rectangle"}, per_leaf=8, size=64)
    paths = sorted(root.rglob("*.jpg"))
    leaves = np.array([p.parent.relative_to(root).as_posix() for p in paths], dtype=object)
    args = _finetune_args(finetune, tmp_path)
    args.image_size, args.workers = 64, 0
    import hiernet.engine

    seen, real = [], hiernet.engine.fit
    monkeypatch.setattr(hiernet.engine, "fit", lambda model, train_set, val_set, *a, **k:
                        seen.append((train_set, val_set)) or real(model, train_set, val_set, *a, **k))
    oof, seconds = finetune.cross_validate(args, paths, leaves, "cpu", pretrained=False)
    y = np.array([sorted(set(leaves)).index(leaf) for leaf in leaves])
    assert oof["leaf_ids"] == ["a/x", "a/y", "b"] and np.array_equal(oof["y"], y) and seconds > 0
    parts = list(tuning.fold_parts(y, 2, 0))
    assert len(seen) == len(oof["folds"]) == 2
    for (k, tr, te, fit, hold), (train_set, val_set), f in zip(parts, seen, oof["folds"]):
        assert [p for p, _ in train_set.items] == [paths[i] for i in fit] and train_set.train  # augmented
        assert [p for p, _ in val_set.items] == [paths[i] for i in hold] and not val_set.train
        assert [c for _, c in train_set.items] == y[fit].tolist() and np.array_equal(f["hold"], hold)
        assert not set(fit) & set(te) and not set(fit) & set(hold)
        assert (oof["fold"][te] == k).all() and f["z_hold"].shape == (len(hold), 2, 3)
        counts = np.bincount(y[fit], minlength=3)
        np.testing.assert_allclose(f["log_prior"], np.log(counts / counts.sum()), atol=1e-5)
        run_dir = tmp_path / "work" / f"fold{k}-{finetune.run_key(args, paths, y)}"
        assert (run_dir / "log.csv").is_file() and not (run_dir / "last.pth").exists()
    assert np.isfinite(oof["z"]).all() and oof["z"].shape == (24, 2, 3)
    monkeypatch.setattr(finetune, "finetune_fold", lambda *a, **k: pytest.fail("trained again"))
    again, _ = finetune.cross_validate(args, paths, leaves, "cpu", pretrained=False)
    assert np.array_equal(again["z"], oof["z"])
    args.lr = 1e-2  # another recipe: nothing of the first run is reused
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        finetune.cross_validate(args, paths, leaves, "cpu", pretrained=False)


def test_finetune_cv_writes_a_report_and_logits_tail_tuning_reads(finetune, tmp_path):
    """The whole script on a prepared split: the report's rows, its .json twin, and the out-of-fold logits that
    tail_tuning.py --rescore scores the same."""
    from conftest import make_tree, run

    root = make_tree(tmp_path / "data", {"a": {"x": "ellipse", "y": "cross"}, "b": "rectangle"}, per_leaf=9, size=64)
    run([sys.executable, str(REPO / "prepare_dataset.py"), "-p", str(root), "-o", str(tmp_path / "split"), "-q"])
    args = _finetune_args(finetune, tmp_path, "--data-dir", str(tmp_path / "split"), "--device", "cpu")
    assert finetune.main(args) == 0
    report = (tmp_path / "r.md").read_text()
    assert "| Lite0 @ 64 px fine-tuned whole |" in report and "| Lite0 @ 64 px fine-tuned whole adjusted for the prior |" in report
    assert "2-fold CV" in report and "3 leaves" in report and "flat head" not in report
    doc = json.loads((tmp_path / "r.json").read_text())
    n_trainval = sum(1 for split in ("train", "val") for _ in (tmp_path / "split" / "flat" / split).glob("*/*"))
    ft_row = doc["rows"]["Lite0 @ 64 px fine-tuned whole adjusted for the prior"]
    assert ft_row["n_scored"] == n_trainval and doc["command"].startswith("python3 bench/finetune_cv.py")
    tuning = _load("tail_tuning")
    preds, _, leaves = tuning.rescore(tmp_path / "r.logits.npz", "Lite0")  # not the test split's images
    assert len(leaves) == n_trainval and all(p is not None for p in next(iter(preds.values())))
    same = preds["Lite0, tuned from its last block, tuned classifier adjusted for the prior (the flat head of --flat-classifier)"]
    again = _load("tail").scores(leaves, same, doc["tail"])
    assert again["leaf_accuracy"] == pytest.approx(ft_row["leaf_accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "efficientnet-lite1+efficientnet-lite0"], "one backbone is fine-tuned here, not a '\\+' composite"),
    (["--backbone", "nope"], "nope"),
    (["--data-dir", "/nonexistent"], "no prepared datasets in /nonexistent"),
])
def test_finetune_cv_refuses_in_one_line(finetune, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        finetune.main(_finetune_args(finetune, tmp_path, *argv))
    args = finetune.get_args_parser().parse_args(["--work", str(REPO / "w"), "--out", str(tmp_path / "r.md")])
    with pytest.raises(SystemExit, match="--work must be outside the repository"):
        finetune.main(args)
    assert not (REPO / "w").exists()
