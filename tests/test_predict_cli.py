"""predict.py as a user runs it: inputs (paths, lists, CSV), streaming outputs, -o, --resume, sharding.

Uses the session's tiny trained models (``pipeline`` in conftest.py).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, run

PREDICT = str(REPO / "src" / "predict.py")


def predict(pipeline, *args, check=True, env=None):
    return run([sys.executable, PREDICT, "--models-dir", str(pipeline["models"]), *map(str, args)], cwd="/",
               check=check, env=env)


def images(pipeline, n=None):
    return [str(p) for p in sorted(pipeline["data"].rglob("*.jpg"))][:n]


def jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_missing_and_repeated_paths_positional_inputs_and_the_closing_line(pipeline, tmp_path):
    imgs = images(pipeline, 3)
    out = tmp_path / "out.jsonl"
    missing = str(tmp_path / "gone.jpg")
    proc = predict(pipeline, imgs[0], missing, "-p", imgs[1], imgs[0], imgs[2], "-o", out)  # no --format: from .jsonl
    rows = jsonl(out)
    assert [r["path"] for r in rows] == [imgs[0], missing, imgs[1], imgs[2]]  # input order, the repeat once
    assert rows[1]["error"] == "file not found" and all("error" not in r for r in rows[::2])
    assert f"wrote 4 predictions to {out}" in proc.stderr and "1 of 4 inputs could not be read" in proc.stderr


def test_a_missing_file_alone_fails_with_one_clear_line(pipeline, tmp_path):
    proc = predict(pipeline, tmp_path / "gone.jpg", check=False)
    assert proc.returncode == 1 and "pass image files" not in proc.stderr and "Traceback" not in proc.stderr
    assert "none of the 1 inputs could be read" in proc.stderr and "file not found" in proc.stderr


def test_output_onto_a_folder_is_refused_before_models_load(pipeline, tmp_path):
    proc = run([sys.executable, PREDICT, "--models-dir", str(tmp_path / "no-models"), images(pipeline, 1)[0],
                "--format", "csv", "-o", str(tmp_path)], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"-o {tmp_path} is a folder" in proc.stderr  # not the missing models: refused first


def test_format_from_the_extension_and_dash_is_stdout(pipeline, tmp_path):
    imgs = images(pipeline, 2)
    predict(pipeline, *imgs, "-o", tmp_path / "out.json")
    assert [r["path"] for r in json.loads((tmp_path / "out.json").read_text())] == imgs
    proc = predict(pipeline, *imgs, "--format", "csv", "-o", "-")
    assert [r["path"] for r in csv.DictReader(io.StringIO(proc.stdout))] == imgs and "wrote" not in proc.stderr


def test_text_on_a_folder_prints_encoders_once_and_a_summary(pipeline):
    out = predict(pipeline, pipeline["data"] / "apparel").stdout
    assert out.count("Encoder: {0: 'accessories', 1: 'apparel'}") == 1
    assert out.count("== ") == 21 + 1 and "== summary: 21 images" in out
    assert "unreadable: 0" in out and "top level:" in out


def test_list_file_and_catalogue_csv_carry_ids(pipeline, tmp_path):
    imgs = images(pipeline, 4)
    lst = tmp_path / "sub" / "list.txt"
    lst.parent.mkdir()
    (lst.parent / "local.jpg").write_bytes(open(imgs[3], "rb").read())
    lst.write_text(f"# photos\n{imgs[0]}\n\n{imgs[1]}\nlocal.jpg\n")  # relative: from the list's folder
    rows = jsonl(predict(pipeline, "-p", lst, "-o", tmp_path / "l.jsonl") and tmp_path / "l.jsonl")
    assert [r["path"] for r in rows] == [imgs[0], imgs[1], str(lst.parent / "local.jpg")]
    assert "error" not in rows[2]
    cat = tmp_path / "cat.csv"
    cat.write_text("sku,photo\n" + "".join(f"A{i},{p}\n" for i, p in enumerate(imgs[:3])) + "A9,missing.jpg\n")
    predict(pipeline, "--csv", cat, "--image-column", "photo", "--id-column", "sku", "-o", tmp_path / "c.csv")
    rows = list(csv.DictReader(open(tmp_path / "c.csv", encoding="utf-8")))
    assert [r["id"] for r in rows] == ["A0", "A1", "A2", "A9"] and rows[3]["error"] == "file not found"
    assert list(rows[0])[0] == "id"
    bad = predict(pipeline, "--csv", cat, "--image-column", "image", check=False)
    assert bad.returncode == 2 and "sku, photo" in bad.stderr


def test_shards_split_the_inputs_by_index_modulo_n(pipeline, tmp_path):
    folder = pipeline["data"] / "apparel"
    all_rows = jsonl(predict(pipeline, folder, "-o", tmp_path / "all.jsonl") and tmp_path / "all.jsonl")
    parts = [jsonl(predict(pipeline, folder, "--shard", f"{k}/3", "-o", tmp_path / f"{k}.jsonl") and tmp_path / f"{k}.jsonl")
             for k in range(3)]
    for k, part in enumerate(parts):
        assert [r["path"] for r in part] == [r["path"] for r in all_rows[k::3]]
    bad = predict(pipeline, folder, "--shard", "3/3", check=False)
    assert bad.returncode == 2 and "0 to 2" in bad.stderr


def test_resume_completes_a_torn_file_with_every_input_once(pipeline, tmp_path):
    folder = pipeline["data"]
    for fmt in ("jsonl", "csv"):
        full, out = tmp_path / f"full.{fmt}", tmp_path / f"out.{fmt}"
        predict(pipeline, folder, "-o", full)
        data = full.read_bytes()
        cut = data.index(b"\n", len(data) // 2) + 25  # half a file, ending in half a line
        out.write_bytes(data[:cut])
        proc = predict(pipeline, folder, "-o", out, "--resume")
        assert out.read_bytes() == data, fmt  # the torn line cut, the rest appended once, in order
        assert "already there" in proc.stderr
        assert "nothing to do" in predict(pipeline, folder, "-o", out, "--resume").stderr
    refused = predict(pipeline, folder, "-o", tmp_path / "x.json", "--resume", check=False)
    assert refused.returncode == 2 and "jsonl or csv" in refused.stderr


def test_resume_after_kill_9_at_a_random_moment(pipeline, tmp_path):
    out = tmp_path / "out.jsonl"
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(images(pipeline)) + "\n")
    cmd = [sys.executable, PREDICT, "--models-dir", str(pipeline["models"]), "-p", str(lst), "-o", str(out),
           "--resume", "--batch-size", "2", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and (not out.exists() or out.stat().st_size < 600):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True)
    assert [r["path"] for r in jsonl(out)] == images(pipeline)  # every input exactly once, in order


def test_progress_bar_on_request_and_none_when_quiet(pipeline):
    folder = pipeline["data"] / "accessories"
    n = len(list(folder.rglob("*.jpg")))
    shown = predict(pipeline, folder, "--format", "csv", "--progress").stderr
    assert n > 1 and "img/s" in shown and f"{n}/{n}" in shown
    assert "img" not in predict(pipeline, folder, "--format", "csv", "--progress", "-q").stderr


def test_stale_export_says_once_why_it_is_slower_and_what_to_run(pipeline, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(pipeline["models"], models)
    with open(models / "apparel" / "model.pth", "ab") as fh:
        fh.write(b"\0")
    proc = run([sys.executable, PREDICT, "--models-dir", str(models), images(pipeline, 1)[0]], check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "slower" in lines[0] and f"src/export.py --models-dir {models}" in lines[0]


def test_verbose_lists_the_bundle_and_help_is_plain_text(pipeline):
    err = predict(pipeline, images(pipeline, 1)[0], "-v").stderr
    assert "runtime: onnx" in err and "hierarchy source:" in err and str(pipeline["data"]) in err
    assert "node root" in err and "efficientnet-lite0" in err
    help_text = run([sys.executable, PREDICT, "--help"]).stdout
    assert "::" not in help_text and "``" not in help_text and "--resume" in help_text


def test_predict_iter_reads_inputs_lazily_and_yields_in_order(pipeline):
    from hiernet.predictor import HierarchicalPredictor, MirrorPolicy

    imgs = images(pipeline, 10)
    pred = HierarchicalPredictor.load(pipeline["models"], runtime="onnx").with_options(mirror=MirrorPolicy(1.0))
    consumed = []
    endless = (consumed.append(p) or p for p in itertools.cycle(imgs))  # never ends: only lazy reading works
    got = list(itertools.islice(pred.predict_iter(endless, batch_size=4, max_lag=2), 30))
    assert [p.path for p in got] == (imgs * 3)[:30]
    assert len(consumed) <= 30 + 3 * 4  # at most a few batches read ahead
    want = pred.predict_arrays([x for _, x, _ in next(pred.prepared_batches(imgs[:4], 4))], imgs[:4])
    assert [p.node_ids for p in got[:4]] == [p.node_ids for p in want]


def test_gather_in_order_interleaves_the_ranks_back_into_input_order():
    from hiernet.batchpredict import gather_in_order, take_rank

    world, n, bs = 3, 23, 4
    box, barrier, out = {}, threading.Barrier(world), {}

    def all_gather(obj):
        rank = obj[0]
        barrier.wait()
        box[rank] = obj
        barrier.wait()
        got = [box[r] for r in range(world)]
        barrier.wait()
        return got

    def rank_main(r):
        local = ({"i": i} for i in take_rank(iter(range(n)), r, world))
        out[r] = [rec["i"] for batch in gather_in_order(local, bs, r, world, all_gather) for rec in batch]

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out[0] == list(range(n)) and out[1] == out[0]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_one_merged_output_in_input_order(pipeline, tmp_path):
    folder = pipeline["data"]
    missing = tmp_path / "gone.jpg"
    predict(pipeline, folder, missing, "-o", tmp_path / "one.jsonl", "--batch-size", "4")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", PREDICT,
                "--models-dir", str(pipeline["models"]), str(folder), str(missing), "-o", str(tmp_path / "two.jsonl"),
                "--batch-size", "4"], env=env)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    n = len(list(folder.rglob("*.jpg"))) + 1  # every image of the tree and the missing one
    assert proc.stderr.count(f"wrote {n} predictions") == 1  # rank 0 alone writes and reports


# ------------------------------------------------------------------------------ display names
SHOP_DISPLAY = {"apparel": "Apparel & Co", "apparel/upper": "Upper / Tops", "accessories/box": "Boxes, small"}


def shop_models(pipeline, folder):
    """The session's models with the display names a catalogue CSV's hierarchy.json would carry."""
    models = folder / "shop-models"
    shutil.copytree(pipeline["models"], models)
    doc = json.loads((models / "hierarchy.json").read_text())
    doc["display"] = SHOP_DISPLAY
    (models / "hierarchy.json").write_text(json.dumps(doc))
    return models


def expected_display(record):
    parts = record["node"].split("/")
    return [SHOP_DISPLAY.get("/".join(parts[:k + 1]), label) for k, label in enumerate(record["labels"])]


def test_records_show_display_names_when_the_models_tree_has_them(pipeline, tmp_path):
    models = shop_models(pipeline, tmp_path)
    folder = pipeline["data"]
    plain = jsonl(predict(pipeline, folder, "-o", tmp_path / "plain.jsonl") and tmp_path / "plain.jsonl")
    assert all("display" not in r for r in plain)  # a tree from folders: records as before
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    shop = [*map(str, sorted(folder.rglob("*.jpg"))), str(tmp_path / "broken.jpg")]
    run_shop = [sys.executable, PREDICT, "--models-dir", str(models), *shop]
    run([*run_shop, "-o", str(tmp_path / "shop.jsonl")], cwd="/", check=False)
    rows = jsonl(tmp_path / "shop.jsonl")
    same = {r["path"]: (r["labels"], r["node"], r["complete"], list(r)) for r in plain}
    assert {r["path"]: (r["labels"], r["node"], r["complete"], [k for k in r if k != "display"])
            for r in rows[:-1]} == same  # the other fields unchanged
    assert all(r["display"] == expected_display(r) for r in rows[:-1])
    assert any("Apparel & Co" in r["display"] for r in rows) and any("Boxes, small" in r["display"] for r in rows)
    assert rows[-1]["display"] == [] and rows[-1]["error"]
    run([*run_shop, "-o", str(tmp_path / "shop.csv")], cwd="/", check=False)
    table = list(csv.DictReader(open(tmp_path / "shop.csv", encoding="utf-8")))
    assert list(table[0])[-1] == "display"
    assert [r["display"] for r in table[:-1]] == [" > ".join(expected_display(r)) for r in rows[:-1]]
    # --resume into a csv with the display column completes it
    data = (tmp_path / "shop.csv").read_bytes()
    (tmp_path / "torn.csv").write_bytes(data[:data.index(b"\n", len(data) // 2) + 9])
    run([*run_shop, "-o", str(tmp_path / "torn.csv"), "--resume"], cwd="/", check=False)
    assert (tmp_path / "torn.csv").read_bytes() == data
    text = run([*run_shop[:-1], "--format", "text"], cwd="/").stdout
    assert "Display: Apparel & Co > Upper / Tops > " in text


def test_flat_and_combined_decisions_name_the_leaf_their_distribution_favours(pipeline):
    import dataclasses

    from hiernet.evaluation import combined_leaves
    from hiernet.predictor import HierarchicalPredictor, MirrorPolicy
    from hiernet.safeio import UserError

    imgs = images(pipeline, 12)
    base = HierarchicalPredictor.load(pipeline["models"], runtime="onnx", with_flat=True)
    base = base.with_options(mirror=MirrorPolicy(0.0))
    flat = base.with_options(decision="flat").predict_paths(imgs)
    for p in flat:
        assert p.node == p.flat_leaf and p.complete
        assert p.confidence == pytest.approx(p.flat_prob, rel=1e-5)  # the path's shares multiply to the leaf's
    # combined: flat probability x LCPN path probability, as evaluate.py scores it
    inputs = [x for _, x, _ in next(base.prepared_batches(imgs, len(imgs)))]
    flat_key = "\0flat"  # the flat model scored beside the nodes, as one more node
    view = type(base)(dataclasses.replace(base.bundle, nodes={**base.nodes, flat_key: base.flat}), base.options)
    every = list(range(len(imgs)))
    classifiers = base.hier.classifier_nodes()
    _, s = view.predict_and_score(inputs, imgs, {**{nid: every for nid in classifiers}, flat_key: every})
    want = combined_leaves(base.hier, {nid: s[nid] for nid in classifiers}, s[flat_key], base.flat.class_nodes)
    got = base.with_options(decision="combined").predict_arrays(inputs, imgs)
    assert [p.node for p in got] == want
    lcpn = base.predict_arrays(inputs, imgs)
    assert [p.node for p in lcpn] != [p.node for p in flat] or [p.probs for p in lcpn] != [p.probs for p in flat]
    with pytest.raises(UserError, match="flat model"):
        HierarchicalPredictor.load(pipeline["models"], runtime="onnx").with_options(decision="flat")
    with pytest.raises(UserError, match="unknown decision"):
        base.with_options(decision="vote")


def test_decision_flag_reaches_the_records(pipeline, tmp_path):
    out = tmp_path / "p.jsonl"
    predict(pipeline, *images(pipeline, 6), "--decision", "flat", "-o", out, "-q")
    recs = jsonl(out)
    from hiernet.predictor import HierarchicalPredictor

    want = HierarchicalPredictor.load(pipeline["models"], decision="flat").predict_paths(images(pipeline, 6))
    assert [r["node"] for r in recs] == [p.flat_leaf for p in want]
    assert [r["confidence"] for r in recs] == pytest.approx([p.flat_prob for p in want], rel=1e-4)
    assert len(recs) == 6 and all(r["complete"] and r["node"] for r in recs)
    assert all(r["confidence"] == pytest.approx(__import__("math").prod(r["probs"])) for r in recs)
    bad = predict(pipeline, images(pipeline, 1)[0], "--decision", "vote", check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
