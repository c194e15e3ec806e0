"""Presenting evaluation results: the printed summary, ``results.md`` and the figures.

Everything here reads the ``results.json`` document built by :func:`hiernet.evaluation.assemble_results`
(the chained predictor's :func:`hiernet.metrics.score` at the top level, the flat baseline's under
``flat``); a new metric of :func:`~hiernet.metrics.score` is shown by adding its line here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .hierarchy import ROOT_DATASET, Hierarchy, display_path
from .safeio import UserError

#: Significance level of the verdict.
ALPHA = 0.05
#: The files :func:`write_outputs` writes into the output folder.
OUTPUT_FILES = ("results.json", "results.md", "report.html", "graph.png", "matrix.png")


def _p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _min_p(k: int) -> float:
    """The smallest two-sided exact McNemar p-value ``k`` discordant pairs can give (all one way)."""
    return min(1.0, 2 * 0.5 ** k) if k else 1.0


def verdict(comparison: dict, alpha: float = ALPHA) -> str:
    """The verdict on the paired comparison (``metrics.paired_comparison`` of LCPN vs flat), said once.

    McNemar's exact test decides; the paired-bootstrap interval is reported as the size of the
    difference, and when it disagrees with the test (it excludes 0 while the test does not reject, or
    the reverse) the text says so and why (few images, few disagreements).
    """
    d, p, (lo, hi) = comparison["difference"], comparison["p_value"], comparison["ci95"]
    n = comparison.get("n") or 0
    if d is None or not n:
        return "No images to compare the hierarchy with the flat baseline."
    a, b = int(comparison.get("a_only", 0)), int(comparison.get("b_only", 0))
    k = a + b
    significant = p < alpha
    if significant:
        head = f"The hierarchy is {'better' if d > 0 else 'worse'} than the flat baseline"
    else:
        head = "No significant difference between the hierarchy and the flat baseline"
    text = (f"{head} at p<{alpha:g} (McNemar p = {_p_text(p)}, the exact test that decides, on the {k} of {n} images "
            f"only one model got right: {a} LCPN, {b} flat). Leaf accuracy LCPN - flat: {d * 100:+.1f} points, "
            f"95% paired-bootstrap interval {lo * 100:+.1f} to {hi * 100:+.1f}.")
    if lo is None or hi is None:
        return text
    excludes_zero = lo > 0 or hi < 0
    if excludes_zero and not significant:
        why = (f"with only {k} disagreement{'s' if k != 1 else ''} no split of them could reach p<{alpha:g}"
               if _min_p(k) >= alpha else f"{k} disagreements are too few for the interval to be reliable")
        text += (f" The interval excludes 0 but the test does not reject: on {n} images the bootstrap interval is "
                 f"too narrow, and {why}; collect more test images before trusting the difference.")
    elif significant and not excludes_zero:
        text += (" The test rejects but the interval touches 0: the difference is borderline; "
                 "collect more test images before trusting it.")
    return text


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def shown(res: dict, nid: str) -> str:
    """Node ``nid`` as results.md and report.html show it to people: its path in ``res["display"]`` (a
    catalogue's original category names, :func:`hiernet.hierarchy.display_path`), else its id."""
    display = res.get("display")
    return display_path(nid, display) if display and nid not in ("", "root") else nid


def dataset_text(res: dict, ds: str, nid: str) -> str:
    """A classifier's dataset name, followed by its node's display path when the tree has display names."""
    if not res.get("display"):
        return ds
    return f"{ds} ({'top level' if nid in ('', 'root') else shown(res, nid)})"


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
        fl = res["flat"]
        lines.append(f"flat baseline: leaf accuracy {_f(fl['leaf_accuracy'])}, macro F1 {_f(fl['macro_f1'])}, "
                     f"hierarchical F1 {_f(fl['hierarchical_f1'])}")
        lines.append(res["verdict"])
        per_node = [f"{ds} {_f(r['lcpn_accuracy'], 3)} vs {_f(r['flat_accuracy'], 3)}"
                    for ds, r in res.get("nodes_vs_flat", {}).items() if r["n"]]
        if per_node:
            lines.append("each node's decision, LCPN vs flat: " + ", ".join(per_node)
                         + " (node accuracies as predict routes images, mirror only where unsure; each node's "
                         "performance.txt mirror-averages every image)")
    if "combined" in res:
        cb, vs = res["combined"], res["combined"]["vs_lcpn"]
        lines.append(f"combined decision (flat leaf probability x LCPN path probability; predict.py --decision "
                     f"combined): leaf accuracy {_f(cb['leaf_accuracy'])}, macro F1 {_f(cb['macro_f1'])}; "
                     f"vs LCPN {vs['a_only']} only combined right, {vs['b_only']} only LCPN right, "
                     f"McNemar p = {_f(vs['p_value'], 3)}")
    auto = res.get("auto_decision")
    if auto:
        lines.append(f"predict.py --decision auto (its default) uses {auto['chosen']}: {auto_reason(auto)}")
    return lines


def auto_reason(auto: dict) -> str:
    """Why ``--decision auto`` uses ``auto["chosen"]`` (``results.json``'s ``auto_decision``), one phrase."""
    if "n_images" in auto:
        return f"the most accurate decision on {auto['n_images']} validation images when export.py ran"
    return "no current export recorded a choice"


def _md_headline(res: dict) -> list[str]:
    """Intro and the headline table of ``results.md``: LCPN, then flat and the combined decision if present."""
    cols = [("LCPN (chained)", res)] + [(name, res[key]) for key, name in
                                        (("flat", "flat baseline"), ("combined", "combined (--decision combined)")) if key in res]
    L = [
        "# Evaluation of the hierarchical classifier",
        "",
        f"{res['n_images']} images evaluated ({res.get('n_unreadable', 0)} unreadable, left out) from "
        f"{res.get('source', 'the test set')}; models: `{res.get('models_dir', '')}`"
        + (f" (fingerprint `{res['models_fingerprint']}`)" if res.get("models_fingerprint") else "")
        + f"; runtime: {res.get('runtime', '?')}"
        + (f"; `--min-confidence {res['min_confidence']}`" if res.get("min_confidence") else "") + ".",
        "",
        "## Headline numbers",
        "",
        "| metric |" + "".join(f" {name} |" for name, _ in cols),
        "|---|" + "---|" * len(cols),
    ]

    def row(name, key, fmt=_f):
        L.append(f"| {name} |" + "".join(f" {fmt(d.get(key))} |" for _, d in cols))

    row("leaf accuracy", "leaf_accuracy")
    L.append("| top-1 error |" + "".join(f" {_f(None if d.get('leaf_accuracy') is None else 1 - d['leaf_accuracy'])} |"
                                         for _, d in cols))
    row("macro F1 (leaves)", "macro_f1")
    row("hierarchical precision", "hierarchical_precision")
    row("hierarchical recall", "hierarchical_recall")
    row("hierarchical F1", "hierarchical_f1")
    row("mistake severity (edges to common ancestor)", "mistake_severity", fmt=lambda v: _f(v, 2))
    if res.get("confidence_ece") is not None:
        L.append(f"| mean confidence / its calibration error (ECE) | {_f(res['mean_confidence'])} / "
                 f"{_f(res['confidence_ece'])} |" + " |" * (len(cols) - 1))
    L += [
        "",
        "Leaf accuracy counts an image only when every level is right and the walk reaches the true leaf. "
        "Mistake severity is the mean number of edges from the true leaf up to its lowest common ancestor "
        "with the prediction, over mistakes (1 = a sibling).",
    ]
    auto = res.get("auto_decision")
    if auto:
        L += ["", f"`predict.py` (default `--decision auto`) decides with **{auto['chosen']}**: {auto_reason(auto)}."]
    if "combined" in res:
        vs = res["combined"]["vs_lcpn"]
        L += ["", "Combined: per image, the leaf maximising the flat model's probability times the LCPN path "
                  "probability (the product of the node probabilities along the path); predict.py returns it with "
                  f"--decision combined (default: the LCPN path). Against LCPN: {vs['a_only']} images only the combined decision got right, "
                  f"{vs['b_only']} only LCPN, McNemar p = {_f(vs['p_value'], 3)}."]
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


#: What the node accuracies of evaluate.py are, beside each node's ``performance.txt`` (issue: two numbers).
NODE_ACCURACY_NOTE = (
    "Node accuracies here are as `predict.py` routes images: mirror averaging only where a node is unsure "
    "(`--tta-below`, default 0.6). Each node's `performance.txt` (written by training) averages every test image "
    "with its mirror image, so on the same images the two can differ by an image or two.")


def _md_nodes(res: dict) -> list[str]:
    """The per-node table of ``results.md``."""
    L = ["", "## Per node", "",
         "Local: the node's classifier on every test image of its classes. "
         "Routed: on those the chain actually sent it (all earlier levels right). " + NODE_ACCURACY_NOTE, "",
         "| node | classifies | local accuracy (as predict routes it, selective mirror) | images "
         "| routed accuracy | images routed |",
         "|---|---|---|---|---|---|"]
    for ds, nd in res["nodes"].items():
        where = ("top level" if ds == ROOT_DATASET else f"below {shown(res, nd['node'])}" if res.get("display")
                 else f"below `{nd['node']}`")
        L.append(f"| {_md(ds)} | {_md(where)} | {_f(nd['local_accuracy'])} | {nd['n_true']} | {_f(nd['routed_accuracy'])} | "
                 f"{nd['n_routed']} |")
    return L


def _md_nodes_vs_flat(res: dict) -> list[str]:
    """Per node, the node's own decision vs the flat model's (``nodes_vs_flat``); empty without flat."""
    rows = res.get("nodes_vs_flat")
    if not rows:
        return []
    L = ["", "## Does the hierarchy pay, node by node?", "",
         "On the test images of each node's subtree: the node's classifier (LCPN) against the flat model's leaf "
         "mapped to the child of that node it lies under (wrong when the flat leaf is outside the subtree). "
         "McNemar's exact p on the images only one got right.", "",
         "| node | images | LCPN | flat | LCPN - flat | only LCPN right | only flat right | McNemar p | better |",
         "|---|---|---|---|---|---|---|---|---|"]
    for ds, r in rows.items():
        better = {"lcpn": "LCPN", "flat": "flat", "tie": "tie"}.get(r["winner"], "n/a")
        if r["p_value"] is not None and r["winner"] in ("lcpn", "flat") and r["p_value"] >= ALPHA:
            better += " (not significant)"
        L.append(f"| {_md(dataset_text(res, ds, r['node']))} | {r['n']} | {_f(r['lcpn_accuracy'])} | {_f(r['flat_accuracy'])} | "
                 f"{_f(r['difference'])} | {r['lcpn_only']} | {r['flat_only']} | {_f(r['p_value'], 3)} | {better} |")
    return L


def _md_comparison(res: dict) -> list[str]:
    """The hierarchy-vs-flat section of ``results.md`` (empty without a flat baseline): the verdict, once."""
    if "flat" not in res:
        return []
    return ["", "## Hierarchy vs flat baseline", "", f"**Verdict:** {res['verdict']}"]


def _md_leaves(res: dict) -> list[str]:
    """The per-leaf table and the figure links of ``results.md``."""
    L = ["", "## Per leaf", "", "| leaf | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for leaf, s in res["per_leaf"].items():
        L.append(f"| {_md(shown(res, leaf))} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} | {s['support']} |")
    return L + ["", "## Figures", "", "![graph](graph.png)", "", "![matrix](matrix.png)", ""]


def render_markdown(res: dict) -> str:
    """The ``results.md`` report: headline numbers, per level, per node, flat comparison, figures."""
    sections = (_md_headline, _md_levels, _md_nodes, _md_comparison, _md_nodes_vs_flat, _md_leaves)
    return "\n".join(line for section in sections for line in section(res))


def _accuracy_bars(res: dict) -> tuple[list[str], list[float], list[int]]:
    """Labels, values and highlighted bar indices of ``graph.png``: node-local, then end-to-end."""
    labels, values = [], []
    for ds, nd in res["nodes"].items():
        if nd["local_accuracy"] is None:
            continue
        what = f"{ds}: top level" if ds == ROOT_DATASET else ds
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
    tops = [hier.path(leaf)[0] for leaf in rows]  # top-level parent of each leaf
    groups = [shown(res, t) if res.get("display") else hier.nodes[t].name for t in tops]
    plots.confusion(np.array(conf["counts"], dtype=float).reshape(len(rows), len(conf["columns"])),
                    [shown(res, r) for r in rows], out_dir / "matrix.png",
                    f"Leaf confusion, end-to-end (n={res['n_images']}, leaf accuracy {_f(res['leaf_accuracy'], 3)})",
                    groups=groups, columns=[shown(res, c) for c in conf["columns"]])


def write_outputs(hier: Hierarchy, res: dict, out_dir: str | Path) -> list[Path]:
    """Write :data:`OUTPUT_FILES` into ``out_dir``, each atomically; returns their paths."""
    from .htmlreport import render_html
    from .safeio import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder", arg="out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_figures(hier, res, out_dir)
    write_text_atomic(out_dir / "results.md", render_markdown(res))
    write_text_atomic(out_dir / "report.html", render_html(hier, res))
    write_json_atomic(out_dir / "results.json", res)  # last: its presence means the set is complete
    return [out_dir / f for f in OUTPUT_FILES]
