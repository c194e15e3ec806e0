"""Presenting evaluation results: the printed summary, ``results.md`` and the figures.

Everything here reads the ``results.json`` document built by :func:`hiernet.evaluation.assemble_results`
(the chained predictor's :func:`hiernet.metrics.score` at the top level, the flat baseline's under
``flat``); a new metric of :func:`~hiernet.metrics.score` is shown by adding its line here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .hierarchy import ROOT_ID, Hierarchy
from .safeio import UserError

#: Significance level of the verdict.
ALPHA = 0.05
#: The files :func:`write_outputs` writes into the output folder.
OUTPUT_FILES = ("results.json", "results.md", "graph.png", "matrix.png")


def verdict(comparison: dict, alpha: float = ALPHA) -> str:
    """One sentence on the paired comparison (``metrics.paired_comparison`` of LCPN vs flat)."""
    d, p, (lo, hi) = comparison["difference"], comparison["p_value"], comparison["ci95"]
    if d is None or not comparison.get("n"):
        return "No images to compare the hierarchy with the flat baseline."
    p_text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    detail = (f"leaf accuracy {d * 100:+.1f} points (95% CI {lo * 100:+.1f} to {hi * 100:+.1f}), "
              f"McNemar p = {p_text}")
    if p < alpha and d > 0:
        return f"The hierarchy is better than the flat baseline at p<{alpha:g}: {detail}."
    if p < alpha and d < 0:
        return f"The hierarchy is worse than the flat baseline at p<{alpha:g}: {detail}."
    return f"No significant difference between the hierarchy and the flat baseline at p<{alpha:g}: {detail}."



def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def summary_lines(res: dict) -> list[str]:
    """The short text summary evaluate.py prints."""
    lines = [
        f"evaluated {res['n_images']} images ({res.get('n_unreadable', 0)} unreadable) "
        f"with the {res.get('runtime', '?')} runtime ({res.get('precision', 'fp32')} backbone): {res.get('source', '')}",
        f"leaf accuracy (end-to-end): {_f(res['leaf_accuracy'])}   top-1 error {_f(res['leaf_error'])}, "
        + (f"mean mistake severity {_f(res['mistake_severity'], 2)} edges" if res["mistake_severity"] is not None
           else "mistake severity n/a (no prediction left the true path)"),
        "level accuracy: " + ", ".join(f"level {k} {_f(v)}" for k, v in enumerate(res["level_accuracy"], 1)),
        "mistakes first made at: " + ", ".join(f"level {k} {_pct(v)}" for k, v in enumerate(res["error_attribution"], 1))
        + f" (of {res['n_mistakes']})",
        f"hierarchical F1: {_f(res['hierarchical_f1'])} (precision {_f(res['hierarchical_precision'])}, "
        f"recall {_f(res['hierarchical_recall'])}); macro F1 over leaves {_f(res['macro_f1'])}",
    ]
    if res.get("n_stopped"):
        lines.append(f"{res['n_stopped']} predictions stopped above a leaf (--min-confidence)")
    if "flat" in res:
        fl, c = res["flat"], res["comparison"]
        lines.append(f"flat baseline: leaf accuracy {_f(fl['leaf_accuracy'])}, macro F1 {_f(fl['macro_f1'])}, "
                     f"hierarchical F1 {_f(fl['hierarchical_f1'])}")
        lines.append(f"LCPN - flat: {_f(c['difference'])} (95% CI {_f(c['ci95'][0])} to {_f(c['ci95'][1])}), "
                     f"McNemar p = {_f(c['p_value'])} ({c['a_only']} only LCPN right, {c['b_only']} only flat right)")
        lines.append(res["verdict"])
    return lines


def _md_headline(res: dict) -> list[str]:
    """Intro and the headline table of ``results.md``."""
    has_flat = "flat" in res
    fl = res.get("flat", {})
    L = [
        "# Evaluation of the hierarchical classifier",
        "",
        f"{res['n_images']} images evaluated ({res.get('n_unreadable', 0)} unreadable, left out) from "
        f"{res.get('source', 'the test set')}; models: `{res.get('models_dir', '')}`; runtime: {res.get('runtime', '?')}"
        + (f"; `--min-confidence {res['min_confidence']}`" if res.get("min_confidence") else "") + ".",
        "",
        "## Headline numbers",
        "",
        "| metric | LCPN (chained) |" + (" flat baseline |" if has_flat else ""),
        "|---|---|" + ("---|" if has_flat else ""),
    ]

    def row(name, a, b=None, fmt=_f):
        L.append(f"| {name} | {fmt(a)} |" + (f" {fmt(b)} |" if has_flat else ""))

    row("leaf accuracy", res["leaf_accuracy"], fl.get("leaf_accuracy"))
    row("top-1 error", res["leaf_error"], None if not has_flat or fl.get("leaf_accuracy") is None else 1 - fl["leaf_accuracy"])
    row("macro F1 (leaves)", res["macro_f1"], fl.get("macro_f1"))
    row("hierarchical precision", res["hierarchical_precision"], fl.get("hierarchical_precision"))
    row("hierarchical recall", res["hierarchical_recall"], fl.get("hierarchical_recall"))
    row("hierarchical F1", res["hierarchical_f1"], fl.get("hierarchical_f1"))
    row("mistake severity (edges to common ancestor)", res["mistake_severity"], fl.get("mistake_severity"),
        fmt=lambda v: _f(v, 2))
    if res.get("confidence_ece") is not None:
        L.append(f"| mean confidence / its calibration error (ECE) | {_f(res['mean_confidence'])} / "
                 f"{_f(res['confidence_ece'])} |" + (" |" if has_flat else ""))
    L += [
        "",
        "Leaf accuracy counts an image only when every level is right and the walk reaches the true leaf. "
        "Mistake severity is the mean number of edges from the true leaf up to its lowest common ancestor "
        "with the prediction, over mistakes (1 = a sibling).",
    ]
    if res.get("n_stopped"):
        L += ["", f"{res['n_stopped']} predictions stopped above a leaf; they count as wrong for leaf accuracy "
                  "and get partial credit in the hierarchical scores."]
    return L


def _md_levels(res: dict) -> list[str]:
    """The per-level table of ``results.md``."""
    has_flat = "flat" in res
    fl = res.get("flat", {})
    L = ["", "## Per level", "", "| level | images | LCPN accuracy |" + (" flat accuracy |" if has_flat else "")
         + " share of mistakes first made here |",
         "|---|---|---|" + ("---|" if has_flat else "") + "---|"]
    for k, (acc, sup) in enumerate(zip(res["level_accuracy"], res["level_support"])):
        share = res["error_attribution"][k] if k < len(res["error_attribution"]) else None
        flat_acc = fl.get("level_accuracy", [None] * (k + 1))[k] if has_flat else None
        L.append(f"| {k + 1} | {sup} | {_f(acc)} |" + (f" {_f(flat_acc)} |" if has_flat else "")
                 + f" {_pct(share)} ({res['error_counts'][k]}) |")
    return L


def _md_nodes(res: dict) -> list[str]:
    """The per-node table of ``results.md``."""
    L = ["", "## Per node", "",
         "Local: the node's classifier on every test image of its classes. "
         "Routed: on those the chain actually sent it (all earlier levels right).", "",
         "| node | classifies | local accuracy | images | routed accuracy | images routed |",
         "|---|---|---|---|---|---|"]
    for ds, nd in res["nodes"].items():
        where = "top level" if nd["node"] == ROOT_ID else f"below `{nd['node']}`"
        L.append(f"| {_md(ds)} | {_md(where)} | {_f(nd['local_accuracy'])} | {nd['n_true']} | {_f(nd['routed_accuracy'])} | "
                 f"{nd['n_routed']} |")
    return L


def _md_comparison(res: dict) -> list[str]:
    """The hierarchy-vs-flat paragraph of ``results.md`` (empty without a flat baseline)."""
    if "flat" not in res:
        return []
    c = res["comparison"]
    return ["", "## Hierarchy vs flat baseline", "",
            f"Paired on the same {c['n']} images: difference in leaf accuracy (LCPN - flat) **{_f(c['difference'])}**, "
            f"95% paired-bootstrap interval [{_f(c['ci95'][0])}, {_f(c['ci95'][1])}]; "
            f"{c['a_only']} images only the hierarchy got right, {c['b_only']} only the flat model; "
            f"exact McNemar p = {_f(c['p_value'])}.", "", f"**Verdict:** {res['verdict']}"]


def _md_leaves(res: dict) -> list[str]:
    """The per-leaf table and the figure links of ``results.md``."""
    L = ["", "## Per leaf", "", "| leaf | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for leaf, s in res["per_leaf"].items():
        L.append(f"| {_md(leaf)} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} | {s['support']} |")
    return L + ["", "## Figures", "", "![graph](graph.png)", "", "![matrix](matrix.png)", ""]


def render_markdown(res: dict) -> str:
    """The ``results.md`` report: headline numbers, per level, per node, flat comparison, figures."""
    sections = (_md_headline, _md_levels, _md_nodes, _md_comparison, _md_leaves)
    return "\n".join(line for section in sections for line in section(res))


def _accuracy_bars(res: dict) -> tuple[list[str], list[float], list[int]]:
    """Labels, values and highlighted bar indices of ``graph.png``: node-local, then end-to-end."""
    labels, values = [], []
    for ds, nd in res["nodes"].items():
        if nd["local_accuracy"] is None:
            continue
        what = f"{ds}: top level" if nd["node"] == ROOT_ID else ds
        labels.append(f"{what}  (local, n={nd['n_true']})")
        values.append(nd["local_accuracy"])
    highlight = []
    end_to_end = [(f"level {k} (end-to-end)", v) for k, v in enumerate(res["level_accuracy"], 1)]
    end_to_end.append(("leaf accuracy (end-to-end)", res["leaf_accuracy"]))
    if "flat" in res:
        end_to_end.append(("flat baseline: leaf accuracy", res["flat"]["leaf_accuracy"]))
    for name, v in end_to_end:
        if v is not None:
            highlight.append(len(labels))
            labels.append(name)
            values.append(v)
    return labels, values, highlight


def write_figures(hier: Hierarchy, res: dict, out_dir: str | Path) -> None:
    """``graph.png`` (node-local vs end-to-end accuracies) and ``matrix.png`` (leaf confusion by parent)."""
    from . import plots

    out_dir = Path(out_dir)
    labels, values, highlight = _accuracy_bars(res)
    plots.accuracy_bars(labels, values, out_dir / "graph.png",
                        f"Node-local vs end-to-end accuracy ({res['n_images']} test images)", highlight=highlight,
                        legend=("node-local classifier", "end-to-end"))
    conf = res["confusion"]
    rows = conf["rows"]
    groups = [hier.nodes[hier.path(leaf)[0]].name for leaf in rows]  # top-level parent of each leaf
    plots.confusion(np.array(conf["counts"], dtype=float).reshape(len(rows), len(conf["columns"])), rows,
                    out_dir / "matrix.png",
                    f"Leaf confusion, end-to-end (n={res['n_images']}, leaf accuracy {_f(res['leaf_accuracy'], 3)})",
                    groups=groups, columns=conf["columns"])


def write_outputs(hier: Hierarchy, res: dict, out_dir: str | Path) -> list[Path]:
    """Write :data:`OUTPUT_FILES` into ``out_dir``, each atomically; returns their paths."""
    from .safeio import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder", arg="out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_figures(hier, res, out_dir)
    write_text_atomic(out_dir / "results.md", render_markdown(res))
    write_json_atomic(out_dir / "results.json", res)  # last: its presence means the set is complete
    return [out_dir / f for f in OUTPUT_FILES]
