"""``report.html``: one self-contained page to see the mistakes (no external request, thumbnails inline).

What it shows, from the ``results.json`` document of :func:`hiernet.evaluation.evaluate` (its
``images`` records: path, true leaf, predicted path, confidence):

* the tree, with each classifier node's accuracy and support and each leaf's recall and support;
* node by node, the hierarchy's decision against the flat baseline's (``nodes_vs_flat``);
* the leaf confusion matrix as a heat-coloured table;
* for each confused pair (true leaf → predicted path), a gallery of the misclassified photos, pairs by
  count, photos by confidence (the most confident mistakes first);
* the least-confident correct predictions (what to relabel or collect next).

Every name is escaped; thumbnails are small JPEGs embedded as ``data:`` URIs. The page is bounded
(:class:`HtmlLimits`) and says so where it leaves photos out.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .hierarchy import ROOT_ID, Hierarchy
from .report import ALPHA, dataset_text, shown

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
table.cm td{min-width:2.2em;text-align:center}
ul.tree{list-style:none;padding-left:1.2em}ul.tree li{margin:2px 0}
.acc{font-weight:600}.muted{color:#777}
.gallery{display:flex;flex-wrap:wrap;gap:8px;margin:.4em 0 1em}
figure.photo{margin:0;width:140px;font-size:11px;word-wrap:break-word}
figure.photo img{display:block;max-width:96px;max-height:96px;border:1px solid #ccc}
.win{color:#1a7f37}.lose{color:#c62828}
"""


@dataclass(frozen=True)
class HtmlLimits:
    """Bounds of the page: ``pairs`` confused pairs, ``per_pair`` photos each, ``unsure`` correct photos,
    thumbnails at most ``thumb`` pixels on their longer side."""

    pairs: int = 30
    per_pair: int = 12
    unsure: int = 24
    thumb: int = 96


def thumbnail_uri(path: str, size: int = 96) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of ``path`` (longer side ``size``), ``None`` if unreadable."""
    from .images import ImageDecodeError, load_rgb

    try:
        img = load_rgb(path)
    except (ImageDecodeError, OSError):
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _n(count: int, word: str) -> str:
    """``1 image``, ``3 images``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _path_text(hier: Hierarchy, ids, display: dict | None = None) -> str:
    """Node ids → ``name / name`` in display names where the tree has them (``(stopped at the top)`` for an
    empty path)."""
    display = display or {}
    return (" / ".join(display.get(i, hier.nodes[i].name) if i in hier.nodes else str(i) for i in ids)
            or "(stopped at the top)")


# ------------------------------------------------------------------------------------- sections
def _tree(hier: Hierarchy, res: dict) -> list[str]:
    """Nested lists: classifier nodes with accuracy and support, leaves with recall and support."""
    by_node = {nd["node"]: (ds, nd) for ds, nd in res.get("nodes", {}).items()}
    per_leaf = res.get("per_leaf", {})

    def item(nid: str) -> list[str]:
        node = hier.nodes[nid]
        name = "root" if nid == ROOT_ID else res.get("display", {}).get(nid, node.name)
        if not node.children:
            s = per_leaf.get(nid, {})
            text = (f"{_e(name)} <span class='muted'>leaf: recall <span class='acc'>{_f(s.get('recall'))}</span>, "
                    f"{_n(s.get('support', 0), 'image')}</span>")
        else:
            ds, nd = by_node.get("root" if nid == ROOT_ID else nid, (None, None))
            text = f"<b>{_e(name)}</b>"
            if nd is not None:
                text += (f" <span class='muted'>classifier <code>{_e(ds)}</code>: accuracy "
                         f"<span class='acc'>{_f(nd['local_accuracy'])}</span> on {_n(nd['n_true'], 'image')}, routed "
                         f"{_f(nd['routed_accuracy'])} on {nd['n_routed']}</span>")
            elif len(node.children) == 1:
                text += " <span class='muted'>(one child: no model)</span>"
        kids = [line for c in node.children for line in item(c)]
        return [f"<li>{text}"] + (["<ul class='tree'>", *kids, "</ul>"] if kids else []) + ["</li>"]

    return ["<h2>The tree</h2>",
            "<p class='muted'>Node accuracy: the node's classifier on every test image of its classes, as predict.py "
            "routes them (mirror averaging only where a node is unsure); routed: on those the chain sent it.</p>",
            "<ul class='tree'>", *item(ROOT_ID), "</ul>"]


def _nodes_vs_flat(res: dict) -> list[str]:
    rows = res.get("nodes_vs_flat")
    if not rows:
        return []
    out = ["<h2>Does the hierarchy pay, node by node?</h2>",
           "<p class='muted'>Each node's classifier against the flat model's leaf mapped to that node's child, on the "
           "test images of the node's subtree; McNemar's exact p on the images only one got right.</p>",
           "<table><tr><th class='l'>node</th><th>images</th><th>LCPN</th><th>flat</th><th>only LCPN right</th>"
           "<th>only flat right</th><th>p</th><th class='l'>better</th></tr>"]
    for ds, r in rows.items():
        cls = {"lcpn": "win", "flat": "lose"}.get(r["winner"], "")
        better = {"lcpn": "LCPN", "flat": "flat", "tie": "tie"}.get(r["winner"], "n/a")
        if r["winner"] in ("lcpn", "flat") and (r["p_value"] or 0) >= ALPHA:
            better += " (not significant)"
        out.append(f"<tr><td class='l'>{_e(dataset_text(res, ds, r['node']))}</td><td>{r['n']}</td><td>{_f(r['lcpn_accuracy'])}</td>"
                   f"<td>{_f(r['flat_accuracy'])}</td><td>{r['lcpn_only']}</td><td>{r['flat_only']}</td>"
                   f"<td>{_f(r['p_value'])}</td><td class='l {cls}'>{better}</td></tr>")
    return out + ["</table>", f"<p>{_e(res.get('verdict', ''))}</p>"]


def _confusion(res: dict) -> list[str]:
    """The leaf confusion matrix, cells coloured by their share of the row (green diagonal, red elsewhere)."""
    conf = res.get("confusion") or {}
    rows, cols, counts = conf.get("rows", []), conf.get("columns", []), conf.get("counts", [])
    out = ["<h2>Leaf confusion matrix</h2>", "<p class='muted'>Rows: true leaf; columns: predicted leaf.</p>",
           "<table class='cm'><tr><th class='l'>true \\ predicted</th>"
           + "".join(f"<th>{_e(shown(res, c))}</th>" for c in cols) + "</tr>"]
    for r, row in zip(rows, counts):
        total = sum(row) or 1
        cells = []
        for c, v in zip(cols, row):
            share = v / total
            rgb = "26,127,55" if c == r else "198,40,40"
            style = f" style='background:rgba({rgb},{0.12 + 0.78 * share:.2f})'" if v else ""
            cells.append(f"<td{style} title='{_e(shown(res, r))} → {_e(shown(res, c))}: {v}'>{v if v else ''}</td>")
        out.append(f"<tr><th class='l'>{_e(shown(res, r))}</th>{''.join(cells)}</tr>")
    return out + ["</table>"]


def _figure(hier: Hierarchy, im: dict, size: int, display: dict | None = None) -> str:
    uri = thumbnail_uri(im["path"], size)
    img = (f"<img src='{uri}' alt='{_e(Path(im['path']).name)}'>" if uri
           else "<span class='muted'>(unreadable now)</span>")
    return (f"<figure class='photo' data-path='{_e(im['path'])}'>{img}<figcaption>"
            f"true: {_e(_path_text(hier, hier.path(im['true']), display))}<br>"
            f"predicted: {_e(_path_text(hier, im['pred'], display))}"
            f"<br>confidence {_f(im['confidence'])}<br><span class='muted'>{_e(Path(im['path']).name)}</span>"
            "</figcaption></figure>")


def _galleries(hier: Hierarchy, res: dict, lim: HtmlLimits) -> list[str]:
    """Confused pairs by count, photos by confidence (highest first); then the least-confident correct."""
    images, display = res.get("images"), res.get("display")
    if images is None:
        return ["<h2>Mistakes</h2><p>No per-image records in these results.</p>"]
    pairs: dict = defaultdict(list)
    correct = []
    for im in images:
        if im["pred"] and im["pred"][-1] == im["true"]:
            correct.append(im)
        else:
            pairs[(im["true"], tuple(im["pred"]))].append(im)
    order = sorted(pairs.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    out = [f"<h2>Mistakes by confused pair</h2><p>{sum(len(v) for v in pairs.values())} misclassified images in "
           f"{len(pairs)} pairs (true leaf → predicted path); pairs by count, photos by confidence, most confident "
           f"first. Shown: at most {lim.pairs} pairs and {lim.per_pair} photos per pair.</p>"]
    for (true, pred), ims in order[: lim.pairs]:
        ims = sorted(ims, key=lambda im: -im["confidence"])
        more = f" ({len(ims) - lim.per_pair} more not shown)" if len(ims) > lim.per_pair else ""
        out += [f"<h3 class='pair'>{_e(_path_text(hier, hier.path(true), display))} → "
                f"{_e(_path_text(hier, pred, display))}: {_n(len(ims), 'image')}{more}</h3>", "<div class='gallery'>",
                *(_figure(hier, im, lim.thumb, display) for im in ims[: lim.per_pair]), "</div>"]
    if len(order) > lim.pairs:
        out.append(f"<p class='muted'>{len(order) - lim.pairs} more pairs not shown.</p>")
    unsure = sorted(correct, key=lambda im: im["confidence"])[: lim.unsure]
    out += [f"<h2>Least-confident correct predictions</h2><p>The {len(unsure)} right predictions with the lowest "
            f"confidence (of {len(correct)} right): what to relabel or collect more of next.</p>",
            "<div class='gallery' id='unsure'>", *(_figure(hier, im, lim.thumb, display) for im in unsure), "</div>"]
    return out


def _headline(res: dict) -> list[str]:
    cols = [("LCPN", res)] + [(name, res[key]) for key, name in (("flat", "flat"), ("combined", "combined (--decision combined)"))
                              if key in res]
    rows = [("leaf accuracy (end to end)", "leaf_accuracy"), ("macro F1 over leaves", "macro_f1"),
            ("hierarchical F1", "hierarchical_f1")]
    out = [f"<p>{res.get('n_images', 0)} images from {_e(res.get('source', 'the test set'))}; models "
           f"<code>{_e(res.get('models_dir', ''))}</code> (fingerprint {_e(res.get('models_fingerprint', '?'))}); "
           f"runtime {_e(res.get('runtime', '?'))}.</p>",
           "<table><tr><th class='l'>metric</th>" + "".join(f"<th>{_e(c)}</th>" for c, _ in cols) + "</tr>"]
    for name, key in rows:
        out.append(f"<tr><td class='l'>{name}</td>" + "".join(f"<td>{_f(d.get(key))}</td>" for _, d in cols) + "</tr>")
    return out + ["</table>"]


def render_html(hier: Hierarchy, res: dict, limits: HtmlLimits | None = None) -> str:
    """The whole ``report.html`` page (a string; no external resource)."""
    lim = limits or HtmlLimits()
    body = [*_headline(res), *_tree(hier, res), *_nodes_vs_flat(res), *_confusion(res), *_galleries(hier, res, lim)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>Evaluation report</title><style>{_CSS}</style></head><body>"
            f"<h1>Evaluation report: where the hierarchy goes wrong</h1>\n" + "\n".join(body) + "\n</body></html>\n")

