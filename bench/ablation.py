#!/usr/bin/env python3
"""What each step of the default recipe buys, measured by k-fold cross-validation on train+val only.

The test split is never read. For each fold, the LCPN heads (root and every parent with two or more
children) and the flat head are trained exactly as ``train.py`` trains them (same Head, loss, optimiser,
early stopping on an inner validation split), on cached features, and the chained leaf accuracy is
measured on the held-out fold.

Example::

    python3 bench/ablation.py --data-dir split_datasets --folds 3 --out bench/results/ablation.md
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

VARIANTS = {
    # name: (backbone, image size, aug views, MLP hidden units (0 = linear), mirror TTA, class-weight power)
    "lite0 224, linear head, class weights^0.5": ("efficientnet-lite0", 224, 0, 0, False, 0.5),
    "lite1 240, linear head, class weights^0.5": ("efficientnet-lite1", 240, 0, 0, False, 0.5),
    "lite1 280, linear head, class weights^0.5": ("efficientnet-lite1", 280, 0, 0, False, 0.5),
    "lite1 280, MLP head, class weights^0.5": ("efficientnet-lite1", 280, 0, 1024, False, 0.5),
    "lite1 280, MLP + 4 aug views, class weights^0.5": ("efficientnet-lite1", 280, 4, 1024, False, 0.5),
    "lite1 280, MLP + 4 aug views + mirror TTA, class weights^0.5": ("efficientnet-lite1", 280, 4, 1024, True, 0.5),
    "same, fully balanced class weights": ("efficientnet-lite1", 280, 4, 1024, True, 1.0),
    "lite1 280, MLP + 4 aug views + mirror TTA, unweighted": ("efficientnet-lite1", 280, 4, 1024, True, 0.0),
    "lite1+lite0 280 (features concatenated), MLP + 4 aug views + mirror TTA, unweighted (the default recipe)":
        ("efficientnet-lite1+efficientnet-lite0", 280, 4, 1024, True, 0.0),
    "lite1+lite2 280 (features concatenated), MLP + 4 aug views + mirror TTA, unweighted":
        ("efficientnet-lite1+efficientnet-lite2", 280, 4, 1024, True, 0.0),
    "lite2 260, MLP + 4 aug views + mirror TTA, class weights^0.5": ("efficientnet-lite2", 260, 4, 1024, True, 0.5),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO / "split_datasets", help="prepared datasets")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "hiernet", help="feature cache")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds over train+val")
    p.add_argument("--variants", nargs="*", help="subset of variant names (default: all)")
    p.add_argument("--seed", type=int, default=0, help="fold and training seed")
    p.add_argument("--out", type=Path, help="markdown report (and a .json twin)")
    return p


def features(paths, backbone_name, size, views, cache_dir):
    from hiernet.backbones import create_backbone
    from hiernet.features import cached_features

    bb = create_backbone(backbone_name, image_size=size)
    ev, ok = cached_features(paths, bb, "crop", "cpu", cache_dir, "eval", 0, 0, True)
    aug = None
    if views:
        aug, ok2 = cached_features(paths, bb, "crop", "cpu", cache_dir, "aug", views, 0, True)
        ok &= ok2
    return ev, aug, ok


def tree_stats(x_views):
    """The tree's standardisation statistics as train.py computes them (``--standardize tree``): mean and
    std ``(D,)`` over the eval view and mirror (views 0 and 1 of ``x_views`` ``(N, V, D)``) of every image."""
    from hiernet.features import feature_stats

    return feature_stats(x_views[:, :2])


def train_head(x_views, y, n_classes, hidden, seed, class_weight_power, group=None, changes=None, stats=None):
    """Train a head with train.py's steps (frozen mode) and an inner 10% validation split for early stopping.

    ``x_views`` ``(N, V, D)``, ``y`` ``(N,)``; ``changes``: more train.py flag values (e.g. ``{"logit_adjust": 1.0}``).
    With ``group`` (``(K leaves, C children)``, :meth:`Hierarchy.fine_label_matrix`, as train.py's
    ``--fine-labels``), ``y`` holds leaf indices and the returned head outputs log P(child). ``stats``: the
    tree's :func:`tree_stats` (the training images of the whole tree, not only ``x_views``), used when the
    recipe standardises by the tree (the default); ``None``: ``x_views``' own.
    """
    import tempfile

    from hiernet.config import PRESETS
    from hiernet.training import feature_sets, fit_head, make_head

    cfg = PRESETS["cpu"].override({"hidden": hidden, "class_weights": class_weight_power, "seed": seed, **(changes or {})})
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    n_val = max(1, len(y) // 10)
    va, tr = idx[:n_val], idx[n_val:]
    head = make_head(cfg.head, x_views.shape[-1], n_classes, group)
    stats = (stats if stats is not None else tree_stats(x_views)) if cfg.head.standardize == "tree" else None
    train_set, val_set, train_y = feature_sets(head, x_views[tr], y[tr], x_views[va, 0], y[va], stats)
    with tempfile.TemporaryDirectory() as work:
        fit_head(head, head, train_set, val_set, train_y, cfg.fit, "cpu", Path(work), "ablation", progress=False)
    return head.eval()


def probs(head, ev, tta):
    import torch

    with torch.no_grad():
        p = torch.softmax(head(torch.from_numpy(ev[:, 0])), 1).numpy()
        if tta:
            p = (p + torch.softmax(head(torch.from_numpy(ev[:, 1])), 1).numpy()) / 2
    return p


def train_lcpn(hier, x_views, leaves, hidden, seed, class_weight_power, fine_labels=True, changes=None):
    """``{node id: head}`` for every parent with two or more children, trained on the images below it.

    ``x_views`` ``(N, V, D)``, ``leaves`` ``(N,)`` leaf ids; ``changes`` as :func:`train_head`.
    """
    heads, stats = {}, tree_stats(x_views)
    for nid in hier.classifier_nodes():
        children = hier.nodes[nid].children
        lab = np.array([hier.child_towards(nid, leaf) for leaf in leaves], dtype=object)
        m = np.array([c is not None for c in lab])
        fine = hier.fine_label_matrix(nid) if fine_labels else None  # as train.py --fine-labels
        group = None if fine is None else fine[1]
        if fine is not None:
            y = np.array([fine[0].index(leaf) for leaf in leaves[m]])
        else:
            y = np.array([children.index(c) for c in lab[m]])
        heads[nid] = train_head(x_views[m], y, len(children), hidden, seed, class_weight_power, group, changes, stats)
    return heads


def route(hier, heads, ev, tta):
    """Leaf ids ``(N,)`` of images with eval features ``ev`` ``(N, 2, D)``, routed level by level by ``heads``
    (``{node id: head}``) with the suite's own :func:`hiernet.routing.route`, as predict.py walks."""
    from hiernet.routing import route as walk

    routes = walk(hier, lambda nid, idx: probs(heads[nid], ev[idx], tta), len(ev))
    return np.array([r.node for r in routes], dtype=object)


def run_variant(hier, doc, paths, leaves, spec, folds, seed, cache_dir, fine_labels=True):
    from sklearn.model_selection import StratifiedKFold

    backbone, size, views, hidden, tta, cw = spec
    ev, aug, ok = features(paths, backbone, size, views, cache_dir)
    allv = ev if aug is None else np.concatenate([ev, aug], axis=1)
    leaves = np.asarray(leaves)
    accs, flat_accs, path_accs = [], [], []
    for fold, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(paths, leaves)):
        tr, te = tr[ok[tr]], te[ok[te]]
        heads = train_lcpn(hier, allv[tr], leaves[tr], hidden, seed + fold, cw, fine_labels)
        current = route(hier, heads, ev[te], tta)
        accs.append(float(np.mean(current == leaves[te])))
        # path decoding: every head on every image, the leaf with the largest product of probabilities
        node_p = {nid: probs(heads[nid], ev[te], tta) for nid in heads}
        all_leaves = hier.leaves()
        score = np.ones((len(te), len(all_leaves)))
        for j, leaf in enumerate(all_leaves):
            for nid in [""] + hier.path(leaf)[:-1]:
                if nid in node_p:
                    score[:, j] *= node_p[nid][:, hier.nodes[nid].children.index(hier.child_towards(nid, leaf))]
        path_accs.append(float(np.mean(np.array(all_leaves, dtype=object)[score.argmax(1)] == leaves[te])))
        flat_classes = hier.leaves()
        fh = train_head(allv[tr], np.array([flat_classes.index(l) for l in leaves[tr]]), len(flat_classes), hidden, seed + fold, cw)
        flat_accs.append(float(np.mean(np.array(flat_classes)[probs(fh, ev[te], tta).argmax(1)] == leaves[te])))
    return {"lcpn_leaf_accuracy": float(np.mean(accs)), "lcpn_folds": accs,
            "lcpn_path_decoding": float(np.mean(path_accs)),
            "flat_leaf_accuracy": float(np.mean(flat_accs)), "flat_folds": flat_accs, "n_images": int(ok.sum())}


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from hiernet.hierarchy import load_hierarchy_json

    hier, doc = load_hierarchy_json(args.data_dir / "hierarchy.json")
    folder_to_leaf = dict(zip(doc["flat"]["classes"], doc["flat"]["class_nodes"]))
    paths, leaves = [], []
    for split in ("train", "val"):  # never the test split
        for folder, leaf in folder_to_leaf.items():
            for p in sorted((args.data_dir / "flat" / split / folder).iterdir()):
                paths.append(p)
                leaves.append(leaf)
    rows = {}
    for name, spec in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        t0 = time.time()
        rows[name] = run_variant(hier, doc, paths, leaves, spec, args.folds, args.seed, args.cache_dir)
        rows[name]["seconds"] = round(time.time() - t0, 1)
        r = rows[name]
        print(f"{name}: LCPN {r['lcpn_leaf_accuracy']:.4f} (path decoding {r['lcpn_path_decoding']:.4f})  flat {r['flat_leaf_accuracy']:.4f}  ({r['seconds']} s)", flush=True)
    if args.out:
        lines = [f"# Ablation: {args.folds}-fold CV on train+val of {args.data_dir} ({len(paths)} images; test split unused)", "",
                 "| recipe | LCPN leaf accuracy | (path decoding) | flat leaf accuracy |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['lcpn_leaf_accuracy']:.4f} | {v['lcpn_path_decoding']:.4f} | {v['flat_leaf_accuracy']:.4f} |"
                  for k, v in rows.items()]
        lines += ["", f"Command: `python3 bench/ablation.py {shlex.join(sys.argv[1:])}`"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
