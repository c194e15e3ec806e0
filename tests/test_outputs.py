"""The output-writer table: every format prints the same fields of the same record."""

from __future__ import annotations

import csv
import io
import json

import pytest

from hiernet.outputs import FIELDS, WRITERS, OutputContext, open_writer, render
from hiernet.predictor import Prediction

CONTEXT = OutputContext({"": {0: "bottoms", 1: "tops"}, "tops": {0: "shirt", 1: "tee"}}, min_confidence=0.5)


def predictions() -> list[Prediction]:
    full = Prediction("a.jpg", ["tops", "tee"], ["tops", "tops/tee"], [0.9, 0.7123456789], 0.9 * 0.7123456789,
                      [[("tops", 0.9), ("bottoms", 0.1)], [("tee", 0.7123456789), ("shirt", 0.2876543211)]])
    stopped = Prediction("b.jpg", ["tops"], ["tops"], [0.6], 0.6, [[("tops", 0.6), ("bottoms", 0.4)]], complete=False,
                         candidates=[("tee", 0.55), ("shirt", 0.45)])
    nothing = Prediction("c d,é.jpg", confidence=1.0, complete=False,  # stopped above the top level
                         candidates=[("tops", 0.52), ("bottoms", 0.48)])
    bad = Prediction("broken.jpg", complete=False, error="cannot identify image file")
    return [full, stopped, nothing, bad]


def parse(fmt: str, text: str) -> list[dict]:
    """Read a format back into one dict per image, with the FIELDS it printed."""
    if fmt == "json":
        return json.loads(text)
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    rows = list(csv.DictReader(io.StringIO(text)))
    out = []
    for r in rows:
        topk = [[{"label": t.rsplit(":", 1)[0], "prob": float(t.rsplit(":", 1)[1])} for t in level.split(";")]
                for level in r["topk"].split(" | ")] if r["topk"] else None
        d = {"path": r["path"], "labels": r["labels"].split("/") if r["labels"] else [],
             "probs": [float(p) for p in r["probs"].split(";")] if r["probs"] else [],
             "confidence": float(r["confidence"]), "node": r["node"], "complete": bool(int(r["complete"]))}
        d.update({k: v for k, v in (("topk", topk), ("error", r["error"])) if v})
        out.append(d)
    return out


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_every_machine_format_carries_every_field_of_the_record(fmt):
    preds = predictions()
    records = [p.record() for p in preds]
    got = parse(fmt, render(fmt, records, CONTEXT))
    assert len(got) == len(records)
    for want, have in zip(records, got):
        assert set(have) == set(want) <= set(FIELDS)
        assert have["path"] == want["path"] and have["labels"] == want["labels"] and have["node"] == want["node"]
        assert have["complete"] == want["complete"] and have.get("error") == want.get("error")
        assert have["probs"] == pytest.approx(want["probs"], abs=1e-6)
        assert have["confidence"] == pytest.approx(want["confidence"], abs=1e-6)
        for lw, lh in zip(want.get("topk", []), have.get("topk", [])):
            assert [t["label"] for t in lh] == [t["label"] for t in lw]
            assert [t["prob"] for t in lh] == pytest.approx([t["prob"] for t in lw], abs=1e-6)
    assert got[0]["node"] == "tops/tee" and got[1]["node"] == "tops" and got[3]["node"] == ""


def test_csv_header_is_the_field_list():
    text = render("csv", [p.record() for p in predictions()])
    assert next(csv.reader(io.StringIO(text))) == list(FIELDS)


@pytest.mark.parametrize("n", [0, 1, 4])
def test_json_written_record_by_record_equals_one_dump(n):
    records = [p.record() for p in predictions()][:n]
    want = [p.record() for p in predictions()][:n]
    for r in want:  # what Prediction.to_dict printed: probabilities rounded to 6 digits
        r["probs"] = [round(p, 6) for p in r["probs"]]
        r["confidence"] = round(r["confidence"], 6)
        for level in r.get("topk", []):
            for t in level:
                t["prob"] = round(t["prob"], 6)
    assert render("json", records) == json.dumps(want, indent=2, ensure_ascii=False) + "\n"
    assert render("jsonl", records).count("\n") == n


def test_text_keeps_the_original_layout():
    text = render("text", [p.record() for p in predictions()], CONTEXT)
    assert text == (
        "== a.jpg\n"
        "Encoder: {0: 'bottoms', 1: 'tops'}\n"
        "Parent class prediction:  tops  (p=0.9000)\n"
        "  top-k: tops 0.9000, bottoms 0.1000\n"
        "Encoder: {0: 'shirt', 1: 'tee'}\n"
        "Final Prediction:  tee  (p=0.7123)\n"
        "  top-k: tee 0.7123, shirt 0.2877\n"
        "Path: tops > tee  (confidence 0.6411)\n"
        "== b.jpg\n"
        "Parent class prediction:  tops  (p=0.6000)\n"
        "  top-k: tops 0.6000, bottoms 0.4000\n"
        "Stopped at:  tops  (the next level would fall below --min-confidence 0.5)\n"
        "  candidates: tee 0.5500, shirt 0.4500\n"
        "Path: tops  (confidence 0.6000)\n"
        "== c d,é.jpg\n"
        "Stopped at:  root  (the next level would fall below --min-confidence 0.5)\n"
        "  candidates: tops 0.5200, bottoms 0.4800\n"
        "Path: root  (confidence 1.0000)\n"
        "== broken.jpg\n"
        "error: cannot read image: cannot identify image file\n"
        "== summary: 4 images\n"
        "top level: tops 2\n"
        "stopped early: 2, unreadable: 1\n"
    )


def test_text_prints_the_single_image_layout_of_the_readme_without_a_summary():
    text = render("text", [predictions()[0].record()], CONTEXT)
    assert text.count("Encoder:") == 2 and "summary" not in text
    assert text.splitlines()[-1] == "Path: tops > tee  (confidence 0.6411)"


def test_a_stop_names_where_it_stopped_with_the_candidates_it_could_not_decide():
    stopped, nothing = (p.record() for p in predictions()[1:3])
    assert nothing["node"] == "root" and nothing["labels"] == [] and nothing["confidence"] == 1.0
    assert nothing["topk"] == [[{"label": "tops", "prob": 0.52}, {"label": "bottoms", "prob": 0.48}]]
    assert stopped["node"] == "tops" and len(stopped["topk"]) == 2  # its level, then the undecided one
    assert [t["label"] for t in stopped["topk"][1]] == ["tee", "shirt"]
    row = next(csv.DictReader(io.StringIO(render("csv", [nothing]))))
    assert row["node"] == "root" and row["topk"] == "tops:0.520000;bottoms:0.480000"


def test_route_stopping_at_the_top_keeps_the_candidates_of_that_level():
    import numpy as np

    from hiernet.hierarchy import Hierarchy
    from hiernet.routing import route

    hier = Hierarchy.from_leaf_paths(["tops/tee", "tops/shirt", "bottoms/skirt", "bottoms/jeans"])
    root = hier.nodes[""].children
    half = np.full((2, 2), 0.5)
    probs = {"": np.array([[0.55, 0.45], [0.9, 0.1]]), root[0]: half, root[1]: half}
    a, b = route(hier, probs, 2, topk=1, min_confidence=0.6)
    assert not a.complete and a.node_ids == [] and a.confidence == 1.0
    assert [c for c, _ in a.candidates] == [root[0], root[1]] and a.candidates[0][1] == 0.55
    assert b.node_ids == [root[0]] and not b.complete and len(b.candidates) == 2


def test_encoders_are_printed_once_per_output():
    recs = [predictions()[0].record()] * 3
    assert render("text", recs, CONTEXT).count("Encoder:") == 2


def test_writers_write_each_record_at_once():
    for fmt in WRITERS:
        buf = io.StringIO()
        w = open_writer(fmt, buf, CONTEXT)
        sizes = []
        for r in [p.record() for p in predictions()]:
            w.write(r)
            sizes.append(len(buf.getvalue()))
        w.close()
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), fmt  # each write adds output
        assert "broken.jpg" in buf.getvalue()


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="json"):
        open_writer("xml", io.StringIO())


# ------------------------------------------------------------------------------ display names (catalogue trees)
def shown_predictions() -> list[Prediction]:
    """Records of a tree with display names: ``display`` is the path in the catalogue's original names."""
    full = Prediction("a.jpg", ["tops", "T-Shirts__Tops"], ["tops", "tops/T-Shirts__Tops"], [0.9, 0.8], 0.72,
                      [[("tops", 0.9)], [("T-Shirts__Tops", 0.8)]], display=["Tops & co", "T-Shirts / Tops"])
    bad = Prediction("broken.jpg", complete=False, error="cannot identify image file", display=[])
    return [full, bad]


def test_display_names_are_one_more_field_that_leaves_the_others_unchanged():
    with_display, plain = shown_predictions(), predictions()
    rec = with_display[0].record()
    assert rec["display"] == ["Tops & co", "T-Shirts / Tops"] and rec["labels"] == ["tops", "T-Shirts__Tops"]
    assert list(rec) == ["path", "labels", "display", "probs", "confidence", "node", "complete", "topk"]
    assert with_display[1].record()["display"] == []
    assert all("display" not in p.record() for p in plain)  # trees from folders: no display field


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_formats_print_the_display_names(fmt):
    records = [p.record() for p in shown_predictions()]
    got = parse(fmt, render(fmt, records, OutputContext(with_display=True)))
    assert [r["display"] for r in got] == [["Tops & co", "T-Shirts / Tops"], []]
    assert [r["labels"] for r in got] == [["tops", "T-Shirts__Tops"], []]


def test_csv_has_a_last_display_column_only_when_the_tree_has_display_names():
    context = OutputContext(with_id=True, with_display=True)
    assert context.fields == ("id",) + FIELDS + ("display",)
    rows = list(csv.reader(io.StringIO(render("csv", [p.record() for p in shown_predictions()], context))))
    assert rows[0] == ["id", *FIELDS, "display"]
    assert rows[1][-1] == "Tops & co > T-Shirts / Tops" and rows[1][2] == "tops/T-Shirts__Tops"
    assert rows[2][-1] == ""
    assert OutputContext().fields == FIELDS


def test_text_adds_a_display_line_after_the_path():
    text = render("text", [p.record() for p in shown_predictions()], OutputContext(with_display=True))
    lines = text.splitlines()
    at = lines.index("Path: tops > T-Shirts__Tops  (confidence 0.7200)")
    assert lines[at + 1] == "Display: Tops & co > T-Shirts / Tops"
    assert "Display:" not in render("text", [p.record() for p in predictions()], CONTEXT)
