#!/usr/bin/env python3
"""What the frozen backbone costs a long-tailed catalogue: the last blocks of EfficientNet-Lite0 tuned on
cached intermediate feature maps, against the same backbone frozen, by k-fold cross-validation on train+val.

Fine-tuning the whole backbone is a GPU job; tuning only its last blocks is not. Every image's feature map
after block ``--tune-from`` (Lite0 @ 224 px: 7 × 7 × 192 after block 15 of 16) is computed once by
onnxruntime for the eval view, its mirror and ``--views`` augmented views, and kept (float16) under
``--work``; each fold then trains the blocks from ``--tune-from`` on, the 1 × 1 head convolution and a linear
classifier over all leaves on those maps (one random view per image per epoch, random horizontal flips of
the map), and predicts with the eval view and its mirror averaged. Rows, on the same views and folds:

* **peer: flat LR** — ``bench/tail.py``'s logistic regression on the frozen pooled features (eval view);
* **frozen** — the suite's flat head (``train.py``'s recipe, MLP ``--hidden``) on the frozen pooled features;
* **tuned** — blocks ``--tune-from``… tuned as above.

The test split is never read; scores (leaf accuracy, macro F1, tail recall) as ``bench/tail.py``'s.

With a ``+`` composite (``--backbone efficientnet-lite1+efficientnet-lite0 --image-size 280 --suite-heads``,
the default recipe's backbone) the last block of every member is tuned on its own maps and the suite's heads
are trained on the members' pooled features concatenated (:func:`cross_validate_composite`). One backbone
with ``--held-out-prior --suite-heads`` is scored the same way, as a composite of one member: what
``train_lcpn.sh --tune-backbone`` trains, the prior adjustment's tau included.

``--node NODE --base LOGITS`` measures a second network for the hardest node only: one backbone tuned on that
node's images, re-deciding among its leaves for the base whose out-of-fold logits a run above saved
(:func:`cross_validate_node`).

Example::

    python3 bench/tail_tuning.py --data-dir /tmp/fp/split --work /tmp/tt --out bench/results/tail-tuning-catalogue.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from hiernet.engine import logit_adjustment  # noqa: E402
from hiernet.training import PRIOR_TAUS, choose_prior_tau  # noqa: E402
from hiernet.tailtune import level_groups, mirror_probs, pooled, tune_tail as tune, tuned_logits, tuned_probs  # noqa: E402  (src/tune_backbone.py's tuning)

log = logging.getLogger("tail_tuning")
BACKBONE = "efficientnet-lite0"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO / "split_datasets", help="prepared datasets")
    p.add_argument("--work", type=Path, help="folder for the cached feature maps (outside the repo; needed but with --rescore)")
    p.add_argument("--backbone", default=BACKBONE, help="one EfficientNet(-Lite) of the registry (default: Lite0), or a '+' composite such as the default recipe's efficientnet-lite1+efficientnet-lite0 (the last block of each member tuned; needs --suite-heads)")
    p.add_argument("--image-size", type=int, help="input side (default: the backbone's own; Lite0: 224)")
    p.add_argument("--tune-from", type=int, nargs="+",
                   help="first tuned block (Lite0 has 16, Lite1 21; default: the last); several values: one tuned row each")
    p.add_argument("--views", type=int, default=2, help="augmented views per image besides the eval view and its mirror")
    p.add_argument("--epochs", type=int, default=12, help="epochs of tuning")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of the tuned blocks (the classifier: 10 x)")
    p.add_argument("--level-loss", type=float, default=0.0, metavar="W",
                   help="add W x the loss of the true path's nodes at the levels above the leaves to the tuning's "
                        "(a hierarchy-aware loss; default 0: leaves only)")
    p.add_argument("--share-levels", action="store_true",
                   help="the tuned classifier borrows strength from the tree: each leaf's weights are its own plus "
                        "its ancestors' (trained on all their leaves' gradients), folded into one linear layer after")
    p.add_argument("--share-decay", type=float, metavar="WD",
                   help="with --share-levels: the weight decay of each leaf's own part alone (default: the rest's "
                        "1e-4); a large one pulls every leaf toward what its ancestors share")
    p.add_argument("--repeat-threshold", type=float, default=0.0, metavar="T",
                   help="repeat-factor sampling in the tuning: an image of a class with a fraction f < T of the "
                        "training images comes sqrt(T / f) times per epoch, each time another view (default 0: off)")
    p.add_argument("--rare-views", type=int, default=0, metavar="K",
                   help="K more augmented views (another seed) of every image of a leaf with at most --tail-max images, "
                        "cached like the others; the tuning draws such an image's view among all its views (default 0)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden units of the frozen row's suite head (0 = linear)")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds over train+val")
    p.add_argument("--max-folds", type=int, help="hold out only the first N folds (scored on their images)")
    p.add_argument("--no-peers", action="store_true", help="skip the logistic-regression peer")
    p.add_argument("--suite-heads", action="store_true",
                   help="also train the suite's heads (flat, LCPN, combined) on each tuned backbone's pooled features "
                        "(all views), as train.py would on a backbone tuned first")
    p.add_argument("--held-out-prior", action="store_true",
                   help="score one backbone as a '+' composite is scored (needs --suite-heads): tuned on each training "
                        "fold less a held-out ninth, where the prior adjustment's tau is chosen, with the tuned "
                        "classifier's rows as they are and adjusted (what --tune-backbone trains)")
    p.add_argument("--tail-max", type=int, default=100, help="a leaf with at most this many images is a tail leaf")
    p.add_argument("--seed", type=int, default=0, help="fold, view and training seed")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, help="markdown report (and a .json twin)")
    p.add_argument("--rescore", type=Path, metavar="LOGITS",
                   help="score the tuned classifier's rows again from the out-of-fold logits a composite run saved "
                        "(REPORT.logits.npz; name the rows with the same --backbone), tuning nothing")
    p.add_argument("--node", metavar="NODE",
                   help="tune --backbone at --image-size on the images of this parent node's leaves only (e.g. "
                        "Apparel/Topwear) and let it re-decide among them for the model of --base: a second network "
                        "for the hardest node only (same folds and held-out parts as --base)")
    p.add_argument("--base", type=Path, metavar="LOGITS",
                   help="with --node: the out-of-fold logits a --held-out-prior or composite run saved "
                        "(REPORT.logits.npz) on the same --data-dir and --seed; its prior-adjusted decision is the base")
    p.add_argument("--node-from", type=Path, metavar="LOGITS",
                   help="with --node and --base: re-decide the node's leaves by another such run's tuned classifier "
                        "(e.g. one at a higher resolution), restricted to them, instead of tuning a network: seconds")
    return p


# ----------------------------------------------------------------------------------- the cut network
def backbone_parts(image_size: int, tune_from: int, pretrained: bool = True, backbone: str = BACKBONE):
    """``backbone`` (default Lite0) cut before block ``tune_from``: ``(trunk, tail)`` of
    :func:`hiernet.tailtune.split_backbone`.

    ``trunk``: images ``(N, 3, S, S)`` in ``[0, 1]`` → maps ``(N, C, h, w)``; ``tail``: maps → pooled
    features ``(N, 1280)``, exactly :class:`hiernet.models.FeatureExtractor`'s output when composed.
    """
    from hiernet.backbones import create_backbone
    from hiernet.safeio import UserError
    from hiernet.tailtune import split_backbone

    fx = create_backbone(backbone, pretrained=pretrained, image_size=image_size)
    n = len(fx.trunks()[0]._blocks)
    if not 0 <= tune_from < n:
        raise SystemExit(f"--tune-from must be 0-{n - 1}, got {tune_from}")
    try:
        return split_backbone(fx, n - tune_from)
    except UserError as exc:  # pragma: no cover - checked above
        raise SystemExit(str(exc)) from None


def extract_maps(paths: list, image_size: int, tune_from: int, n_aug: int, seed: int, work: Path,
                 backbone: str = BACKBONE):
    """Feature maps after block ``tune_from`` of every image, computed once into ``work``.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        float16 maps ``(N, 2 + n_aug, C, h, w)`` (view 0 the eval view, 1 its mirror, then augmented
        views seeded by ``seed`` and the image's index) and a bool mask ``(N,)`` of images that decoded.
    """
    from concurrent.futures import ThreadPoolExecutor

    from hiernet.data import aug_views, eval_views
    from hiernet.images import load_rgb
    from hiernet.runtime import OrtRunner, export_onnx
    from hiernet.safeio import write_json_atomic

    key = {"backbone": backbone, "size": image_size, "from": tune_from, "aug": n_aug, "seed": seed,
           "paths": [str(p) for p in paths]}
    name = f"maps-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}"
    npy, meta = work / f"{name}.npy", work / f"{name}.json"
    if npy.exists() and meta.exists():
        return np.load(npy, mmap_mode="r"), np.array(json.loads(meta.read_text())["ok"], bool)
    work.mkdir(parents=True, exist_ok=True)
    trunk, _ = backbone_parts(image_size, tune_from, backbone=backbone)
    onnx = export_onnx(trunk, np.zeros((1, 3, image_size, image_size), np.float32), work / f"{name}.onnx")
    run = OrtRunner(onnx)
    n_views = 2 + n_aug

    def views(i: int):
        try:
            img = load_rgb(paths[i])
        except Exception as exc:  # an unreadable image is left out of the folds, as bench/tail.py does
            log.warning("skipping %s: %s", paths[i], exc)
            return None
        v = eval_views(img, image_size, "crop")
        return v if not n_aug else np.concatenate([v, aug_views(img, image_size, n_aug, seed * 1_000_003 + i)])

    ok = np.ones(len(paths), bool)
    tmp = work / f"{name}.tmp.npy"
    maps = None
    t0 = time.time()
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(paths), 16):
            idx = list(range(start, min(start + 16, len(paths))))
            got = list(pool.map(views, idx))
            for i, v in zip(idx, got):
                ok[i] = v is not None
            good = [v for v in got if v is not None]
            if not good:
                continue
            out = run(np.concatenate(good))
            if maps is None:
                maps = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(paths), n_views) + out.shape[1:])
            rows = [i for i, v in zip(idx, got) if v is not None]
            maps[rows] = out.reshape((len(rows), n_views) + out.shape[1:]).astype(np.float16)
            if start % 1600 == 0:
                log.info("maps: %d/%d images, %.0f s", start + len(idx), len(paths), time.time() - t0)
    if maps is None:
        raise SystemExit("no image could be read")
    maps.flush()
    del maps
    tmp.replace(npy)
    write_json_atomic(meta, {"key": {k: v for k, v in key.items() if k != "paths"}, "ok": ok.tolist()})
    return np.load(npy, mmap_mode="r"), ok


def cross_validate(maps, leaves: np.ndarray, leaf_ids: list, image_size: int, tune_from: list, epochs: int,
                   hidden: int, folds: int, seed: int, max_folds: int | None, peers: bool, pretrained: bool = True,
                   lr: float = 3e-4, hier=None, backbone: str = BACKBONE, tune_kw: dict | None = None,
                   rare: tuple | None = None):
    """Out-of-fold leaf predictions ``{row: (N,)}`` (None beyond ``max_folds``) and seconds per row.

    ``maps``: one ``(N, V, C, h, w)`` array per ``tune_from`` value, the same images and views. With
    ``hier``, the frozen backbone and each tuned one also get the suite's heads with the LCPN and combined
    decisions (``bench/tail.py``'s ``suite_lcpn``, trained on the pooled features of every view), and each
    tuned backbone the suite's flat head too: train.py's heads on a backbone tuned first. ``tune_kw``: more
    keywords of the tuning (:func:`hiernet.tailtune.tune_tail`), e.g. its level loss. ``rare``: more views of
    some images (:func:`rare_maps`: one extra array per ``maps`` entry, and each image's row), drawn by the tuning.
    """
    from sklearn.model_selection import StratifiedKFold
    import tail as tail_bench

    names = np.array(leaf_ids, dtype=object)
    y = np.array([leaf_ids.index(leaf) for leaf in leaves])
    head_name = f"suite flat head (MLP {hidden})" if hidden else "suite flat head (linear)"
    # row name -> (backbone: "frozen" or an index in tune_from / maps, what is trained on it)
    short = backbone.replace("efficientnet-", "").capitalize()  # "Lite0"
    _, frozen_tail = backbone_parts(image_size, tune_from[0], pretrained, backbone)  # built once: rows and features
    n_blocks = frozen_tail.cut + len(frozen_tail.blocks)
    rows = {tail_bench.PEERS[0]: ("frozen", "lr")} if peers else {}
    rows[f"frozen {short}, {head_name}"] = ("frozen", "flat")
    if hier is not None:
        rows.update({f"frozen {short}, suite heads ({d})": ("frozen", d) for d in ("lcpn", "combined")})
    for i, k in enumerate(tune_from):
        rows[f"{short} tuned from block {k} of {n_blocks}, linear classifier"] = (i, "tuned")
        if hier is not None:
            rows.update({f"{short} tuned from block {k} of {n_blocks}, then suite heads ({d})": (i, d)
                         for d in ("flat", "lcpn", "combined")})
    preds = {n: np.empty(len(leaves), dtype=object) for n in rows}
    # the frozen backbone's pooled features (N, V, 1280), all views: the same in every fold, computed once
    t0 = time.time()
    frozen = pooled(frozen_tail, maps[0], list(range(maps[0].shape[1])))
    seconds = {n: (time.time() - t0 if bb == "frozen" else 0.0) for n, (bb, _) in rows.items()}
    for fold, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y)):
        if max_folds is not None and fold >= max_folds:
            break
        for bb in ["frozen", *range(len(tune_from))]:
            t0 = time.time()
            if bb == "frozen":
                views_tr, ev_te = frozen[tr], frozen[te, :2]
            else:
                _, t = backbone_parts(image_size, tune_from[bb], pretrained, backbone)
                t, cls = tune(t, maps[bb][tr], y[tr], len(leaf_ids), epochs, seed + fold, lr, **(tune_kw or {}),
                              **_extra(rare, bb, tr))
                tuned = names[tuned_probs(t, cls, maps[bb][te]).argmax(1)]
                if hier is not None:
                    views_tr, ev_te = pooled(t, maps[bb][tr], list(range(maps[bb].shape[1]))), pooled(t, maps[bb][te], [0, 1])
            tail_bench._TRAINED.clear()  # heads trained on another backbone's features must not be reused

            def decide(what: str) -> np.ndarray:
                if what == "tuned":
                    return tuned
                if what == "lr":
                    return tail_bench.flat_lr(views_tr[:, 0], leaves[tr], ev_te[:, 0])
                if what == "flat" and bb == "frozen":
                    import ablation

                    head = ablation.train_head(views_tr, y[tr], len(leaf_ids), hidden, seed + fold, 0.0)
                    return names[ablation.probs(head, ev_te, True).argmax(1)]
                return tail_bench.suite_lcpn(hier, views_tr, leaves[tr], ev_te, {"decision": what}, seed + fold, hidden)

            _score_rows(rows, bb, decide, fold, te, leaves, preds, seconds, time.time() - t0)
    return preds, seconds


def _score_rows(rows: dict, bb, decide, fold: int, te: np.ndarray, leaves: np.ndarray, preds: dict, seconds: dict,
                tuning: float) -> None:
    """Every row of ``rows`` (``{name: (backbone, what)}``) whose backbone is ``bb``: its predictions for the
    held-out images ``te`` (``decide(what)``, ``(len(te),)`` leaf ids) into ``preds[name]``, its seconds
    (``tuning``, this backbone's share, plus its own) into ``seconds[name]``, and a log line with its
    accuracy."""
    for name, (row_bb, what) in rows.items():
        if row_bb != bb:
            continue
        t1 = time.time()
        pred = decide(what)
        spent = tuning + time.time() - t1
        preds[name][te] = pred
        seconds[name] += spent
        log.info("fold %d: %s %.0f s, accuracy %.4f", fold, name, spent, np.mean(pred == leaves[te]))


def cross_validate_composite(member_maps: list, leaves: np.ndarray, leaf_ids: list, image_size: int, members: list,
                             epochs: int, folds: int, seed: int, max_folds: int | None, hier, hidden: int = 1024,
                             pretrained: bool = True, lr: float = 3e-4, tune_kw: dict | None = None,
                             rare: tuple | None = None):
    """A ``+`` composite (the suite's default recipe), frozen vs every member's last block tuned.

    ``member_maps``: one ``(N, V, C_m, h, w)`` array per member of ``members`` (the maps before its last
    block, the same images and views). Each fold tunes every member's last block on its own maps
    (:func:`hiernet.tailtune.tune_tail`, a linear classifier over the leaves) on the training fold less a
    seeded held-out part (``bench/tail.py``'s ``AUTO_VAL_FRACTION``: the validation split tune_backbone.py
    never tunes on), then trains the suite's heads (flat, LCPN, combined; ``bench/tail.py``'s
    ``suite_lcpn``) on the members' pooled features of the whole training fold concatenated, as train.py
    would on a composite whose members were tuned first; the frozen rows train the same heads on the frozen
    members' features. The ``linear classifiers`` row averages the members' tuned classifiers'
    probabilities; the ``tuned classifier`` rows average their logits (one linear layer: train.py's flat
    head with ``--flat-classifier``, its temperature left at 1), alone and times the LCPN heads' path
    probabilities (the combined decision), as they are and adjusted for the class prior with the ``tau``
    the held-out part chooses (:func:`hiernet.training.choose_prior_tau`, as train.py chooses on the
    validation split), with each ``tau`` of :data:`FIXED_TAUS` (what each would do) and with the ``tau`` the held-out part's other criteria choose (:func:`prior_taus`). Returns
    out-of-fold predictions ``{row: (N,)}``, seconds per row, the ``tau`` each criterion chose in each fold
    (``[{criterion: tau}]``) and the tuned classifier's out-of-fold logits (what :func:`save_logits` writes).
    ``tune_kw``, ``rare`` (one extra array per member): as :func:`cross_validate`'s.
    """
    import tail as tail_bench

    names = np.array(leaf_ids, dtype=object)
    y = np.array([leaf_ids.index(leaf) for leaf in leaves])
    short = _short(members)  # "Lite1+Lite0"
    cuts = [_last_block(m, image_size) for m in members]
    frozen_tails = [backbone_parts(image_size, cut, pretrained, m)[1] for m, cut in zip(members, cuts)]
    decisions = ("flat", "lcpn", "combined")
    rows = {f"frozen {short}, suite heads ({d})": ("frozen", d) for d in decisions}
    tuned = _tuned_prefix(short)
    if len(members) > 1:  # one member: the same decision as the tuned classifier's row
        rows[f"{tuned}, linear classifiers averaged"] = ("tuned", "linear")
    rows.update({f"{tuned}, then suite heads ({d})": ("tuned", d) for d in decisions})
    rows.update({name: ("tuned", what) for name, what in classifier_row_names(short, combined=True).items()})
    by_leaf = [leaf_ids.index(leaf) for leaf in hier.leaves()]  # the classifier's columns in hier.leaves() order
    preds = {n: np.empty(len(leaves), dtype=object) for n in rows}
    taus = []
    oof = {"z": np.full((len(leaves), 2, len(leaf_ids)), np.nan, np.float32), "y": y, "leaf_ids": leaf_ids, "folds": [],
           "fold": np.full(len(leaves), -1)}
    t0 = time.time()
    frozen = np.concatenate([pooled(t, maps, list(range(maps.shape[1]))) for t, maps in zip(frozen_tails, member_maps)], -1)
    seconds = {n: (time.time() - t0 if bb == "frozen" else 0.0) for n, (bb, _) in rows.items()}
    for fold, tr, te, fit, hold in fold_parts(y, folds, seed, max_folds):
        for bb in ("frozen", "tuned"):
            t0 = time.time()
            if bb == "frozen":
                views_tr, ev_te = frozen[tr], frozen[te, :2]
            else:
                logits, hold_logits, feats_tr, feats_te = [], [], [], []
                for j, (m, cut, maps) in enumerate(zip(members, cuts, member_maps)):
                    _, t = backbone_parts(image_size, cut, pretrained, m)
                    t, cls = tune(t, maps[fit], y[fit], len(leaf_ids), epochs, seed + fold, lr, **(tune_kw or {}),
                                  **_extra(rare, j, fit))
                    logits.append(tuned_logits(t, cls, maps[te]))  # (n, 2, C): eval view and mirror
                    hold_logits.append(tuned_logits(t, cls, maps[hold]))
                    feats_tr.append(pooled(t, maps[tr], list(range(maps.shape[1]))))
                    feats_te.append(pooled(t, maps[te], [0, 1]))
                linear = names[np.mean([mirror_probs(z) for z in logits], 0).argmax(1)]
                z_te, z_hold = np.mean(logits, 0), np.mean(hold_logits, 0)  # the tuned classifier's logits
                log_prior = logit_adjustment(y[fit], len(leaf_ids), 1.0).numpy()
                clf, by_criterion = classifier_decisions(z_te, z_hold, y[hold], log_prior, len(leaf_ids))
                taus.append(by_criterion)
                log.info("fold %d: the held-out part (%d images) chooses tau %s", fold, len(hold), by_criterion)
                oof["z"][te], oof["fold"][te] = z_te, fold
                oof["folds"].append({"fit": fit, "hold": hold, "z_hold": z_hold, "log_prior": log_prior})
                views_tr, ev_te = np.concatenate(feats_tr, -1), np.concatenate(feats_te, -1)
            tail_bench._TRAINED.clear()  # heads trained on the other features must not be reused

            def decide(what: str) -> np.ndarray:
                if what == "linear":
                    return linear
                if bb == "tuned" and what in clf:  # the tuned classifier, as it is or adjusted for the prior
                    return names[clf[what].argmax(1)]
                if what in ("clf-combined", "clf-prior-combined"):
                    flat_p = clf[what.removesuffix("-combined")][:, by_leaf]
                    return tail_bench.suite_lcpn(hier, views_tr, leaves[tr], ev_te,
                                                {"decision": "combined", "flat_probs": flat_p}, seed + fold, hidden)
                return tail_bench.suite_lcpn(hier, views_tr, leaves[tr], ev_te, {"decision": what}, seed + fold, hidden)

            _score_rows(rows, bb, decide, fold, te, leaves, preds, seconds, time.time() - t0)
    return preds, seconds, taus, oof


def rare_maps(paths: list, leaves: np.ndarray, support: dict, tail_max: int, n_aug: int, image_size: int,
              cuts: list, backbones: list, seed: int, work: Path) -> tuple[list, np.ndarray] | None:
    """``--rare-views``: ``n_aug`` more augmented views of every image of a leaf with at most ``tail_max``
    images (``support``: images per leaf), cached in ``work`` by :func:`extract_maps` with another seed than
    the main maps' (``seed + 1``), for each cut ``cuts[i]`` of ``backbones[i]``.

    Returns
    -------
    (list, numpy.ndarray) or None
        One float16 array ``(M, n_aug, C, h, w)`` per cut (the augmented views only) and ``rows`` ``(N,)``:
        each image's row in them, -1 for the others; None when ``n_aug`` is 0 or no leaf is that rare.
    """
    rare = np.flatnonzero(np.isin(leaves, [leaf for leaf, n in support.items() if n <= tail_max]))
    if not n_aug or not len(rare):
        return None
    extra, ok = [], np.ones(len(rare), bool)
    for cut, backbone in zip(cuts, backbones):
        m, m_ok = extract_maps([paths[i] for i in rare], image_size, cut, n_aug, seed + 1, work, backbone)
        extra.append(m[:, 2:])
        ok &= m_ok
    rows = np.full(len(leaves), -1)
    rows[rare[ok]] = np.flatnonzero(ok)
    log.info("--rare-views: %d more views of %d images of %d leaves", n_aug, int(ok.sum()),
             len(set(leaves[rare])))
    return extra, rows


def _extra(rare: tuple | None, i: int, idx: np.ndarray) -> dict:
    """The tuning's ``extra`` keyword (:func:`hiernet.tailtune.tune_tail`) for maps entry ``i`` and the images ``idx``."""
    return {} if rare is None else {"extra": (rare[0][i], rare[1][idx])}


#: The adjustments the composite CV scores fixed, beside the ``tau`` the held-out part chooses of
#: :data:`hiernet.training.PRIOR_TAUS`.
FIXED_TAUS = (0.25, 0.5, 0.75, 1.0)


def classifier_row_names(short: str, combined: bool, name: str | None = None) -> dict:
    """``{row name: decision}`` of the tuned classifier's rows (``short``: the members, e.g. "Lite1+Lite0"), the
    decisions :func:`classifier_decisions` returns; with ``combined`` also those times the LCPN heads. ``name``:
    what the rows call the classifier instead of the last-block tuning's (then without "the flat head" notes)."""
    tuned = name or f"{_tuned_prefix(short)}, tuned classifier"
    adjusted = f"{tuned} adjusted for the prior"
    flat, flat_clf = ("", "") if name else (f" ({'logits averaged: ' if '+' in short else ''}the flat head)",
                                            " (the flat head of --flat-classifier)")
    rows = {f"{tuned}{flat}": "clf"}
    if combined:
        rows[f"{tuned} x suite LCPN heads (combined)"] = "clf-combined"
    rows[f"{adjusted}{flat_clf}"] = "clf-prior"
    if combined:
        rows[f"{adjusted} x suite LCPN heads (combined)"] = "clf-prior-combined"
    rows.update({f"{adjusted}, tau fixed at {tau:g}": ("clf-tau", tau) for tau in FIXED_TAUS})
    rows.update({f"{adjusted}, tau chosen by held-out {label}": ("clf-tau-by", c)
                 for c, label in TAU_CRITERIA.items() if c != "accuracy"})
    return rows


def classifier_decisions(z_te: np.ndarray, z_hold: np.ndarray, y_hold: np.ndarray, log_prior: np.ndarray,
                         n_classes: int) -> tuple[dict, dict]:
    """The tuned classifier's probabilities ``(n, C)`` on a fold's test images from its logits ``z_te``
    ``(n, 2, C)`` (eval view and mirror): as it is (``"clf"``), adjusted for the prior with the ``tau`` the
    held-out part chooses as train.py does (``"clf-prior"``), with each of :data:`FIXED_TAUS`
    (``("clf-tau", tau)``) and with the ``tau`` each other criterion chooses (``("clf-tau-by", criterion)``);
    and ``{criterion: tau}`` (:func:`prior_taus`)."""
    by = prior_taus(z_hold, y_hold, log_prior, n_classes)
    out = {"clf": mirror_probs(z_te), "clf-prior": mirror_probs(z_te - by["accuracy"] * log_prior)}
    out.update({("clf-tau", t): mirror_probs(z_te - t * log_prior) for t in FIXED_TAUS})
    out.update({("clf-tau-by", c): mirror_probs(z_te - by[c] * log_prior) for c in TAU_CRITERIA if c != "accuracy"})
    return out, by


def rescore(path: Path, short: str, name: str | None = None) -> tuple[dict, list, np.ndarray]:
    """The tuned classifier's rows (named as :func:`classifier_row_names` with ``name`` names them) from the
    out-of-fold logits :func:`save_logits` wrote, under the current
    :data:`hiernet.training.PRIOR_TAUS` and criteria, without tuning again (the tuning is seeded: a rerun
    gives the same logits). Returns ``{row: (N,) predicted leaves}`` (``None`` for images no fold held
    out), the ``{criterion: tau}`` of each fold and the leaves ``(N,)``."""
    data = read_logits(path)
    names = data["leaf_ids"].astype(object)
    y, z, fold = data["y"], data["z"], data["fold"]
    rows = classifier_row_names(short, False, name)
    preds = {row: np.full(len(y), None, dtype=object) for row in rows}
    taus = []
    for k in range(int(fold.max()) + 1):
        te = fold == k
        clf, by = classifier_decisions(z[te], data[f"z_hold_{k}"], y[data[f"hold_{k}"]], data[f"log_prior_{k}"], len(names))
        taus.append(by)
        for row, what in rows.items():
            preds[row][te] = names[clf[what].argmax(1)]
    return preds, taus, names[y]


#: How the held-out part may choose the prior adjustment's ``tau`` (:func:`prior_taus`): ``accuracy`` is
#: train.py's rule (:func:`hiernet.training.choose_prior_tau`).
TAU_CRITERIA = {"accuracy": "leaf accuracy", "macro-f1": "macro F1",
                "macro-f1-bounded": "macro F1 among the taus within 0.5 point of its best leaf accuracy",
                "accuracy-eval-view": "leaf accuracy of the eval view alone (train.py before it mirror-averaged)"}


def prior_taus(z_hold: np.ndarray, y_hold: np.ndarray, log_prior: np.ndarray, n_classes: int,
               bound: float = 0.005) -> dict:
    """The ``tau`` of :data:`PRIOR_TAUS` each criterion of :data:`TAU_CRITERIA` chooses on a held-out part,
    the smallest among equals (:func:`choose_prior_tau`).

    Parameters
    ----------
    z_hold : numpy.ndarray, shape (H, 2, C)
        The tuned classifier's logits of the held-out images (eval view and mirror).
    y_hold : numpy.ndarray, shape (H,)
        Their class indices.
    log_prior : numpy.ndarray, shape (C,)
        ``log`` of the training classes' frequencies (what ``tau`` scales and subtracts).
    bound : float
        ``macro-f1-bounded`` considers only the taus whose leaf accuracy is at most this below the best one.
    """
    from sklearn.metrics import f1_score

    from hiernet.routing import softmax

    pred = {t: mirror_probs(z_hold - t * log_prior).argmax(1) for t in PRIOR_TAUS}
    acc = {t: float(np.mean(p == y_hold)) for t, p in pred.items()}
    acc_eval = {t: float(np.mean(softmax(z_hold[:, 0] - t * log_prior).argmax(1) == y_hold)) for t in PRIOR_TAUS}
    f1 = {t: float(f1_score(y_hold, p, labels=range(n_classes), average="macro", zero_division=0)) for t, p in pred.items()}
    best = max(acc.values())
    return {"accuracy": choose_prior_tau(acc.get), "macro-f1": choose_prior_tau(f1.get),
            "macro-f1-bounded": choose_prior_tau(lambda t: f1[t] if acc[t] >= best - bound - 1e-9 else -math.inf),
            "accuracy-eval-view": choose_prior_tau(acc_eval.get)}


def save_logits(path: Path, oof: dict) -> None:
    """The tuned classifier's out-of-fold logits (``z``: ``(N, 2, C)``, eval view and mirror; ``y``: ``(N,)``
    class indices of ``leaf_ids``; ``fold``: ``(N,)`` the fold that held each image out) and, per fold ``k``, its held-out part's logits (``hold_k``, ``z_hold_k``)
    and the log prior of what the tuning saw (``log_prior_k``), to try other ways of choosing ``tau`` without
    tuning again. Written to a temporary file, then renamed."""
    arrays = {"z": oof["z"], "y": oof["y"], "fold": oof["fold"], "leaf_ids": np.array(oof["leaf_ids"], dtype=str)}
    for k, f in enumerate(oof["folds"]):
        arrays.update({f"hold_{k}": f["hold"], f"z_hold_{k}": f["z_hold"], f"log_prior_{k}": f["log_prior"]})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def read_logits(path: Path) -> dict:
    """What :func:`save_logits` wrote, as ``{name: array}`` (plain arrays only: ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def fold_parts(y: np.ndarray, folds: int, seed: int, max_folds: int | None = None):
    """The folds of the composite and ``--held-out-prior`` runs (and ``bench/finetune_cv.py``'s): per fold of a
    seeded stratified k-fold over the class indices ``y`` ``(N,)``, ``(fold, tr, te, fit, hold)``, the training
    fold ``tr`` split by :func:`held_out` into the part tuned on and the held-out part; only the first
    ``max_folds`` folds when given."""
    from sklearn.model_selection import StratifiedKFold

    for fold, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y)):
        if max_folds is not None and fold >= max_folds:
            return
        yield (fold, tr, te, *held_out(tr, seed + fold))


def held_out(tr: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A training fold's indices ``tr`` split, seeded, into the part the tuning sees and a held-out
    ``AUTO_VAL_FRACTION`` (the validation share of prepare_dataset.py's split), both sorted."""
    import tail as tail_bench

    fit, hold = tail_bench.validation_part(len(tr), seed)
    return np.sort(tr[fit]), np.sort(tr[hold])


def _last_block(backbone: str, image_size: int) -> int:
    """The index of ``backbone``'s last MBConv block (Lite0: 15, Lite1: 20)."""
    from hiernet.backbones import create_backbone

    return len(create_backbone(backbone, pretrained=False, image_size=image_size).trunks()[0]._blocks) - 1


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    import tail as tail_bench

    if args.rescore:
        return main_rescore(args)
    if (args.node is None) != (args.base is None):
        raise SystemExit("--node and --base go together: the node whose leaves a second network re-decides, and the "
                         "out-of-fold logits (REPORT.logits.npz of a --held-out-prior run) it re-decides for")
    if args.node_from:
        if not args.node:
            raise SystemExit("--node-from goes with --node and --base")
        return main_node(args, None, *tail_bench.trainval_images(args.data_dir)[:2])
    if args.work is None:
        raise SystemExit("--work is needed: a folder for the cached feature maps, outside the repository")
    if args.work.resolve().is_relative_to(REPO):
        raise SystemExit(f"--work must be outside the repository ({REPO})")
    torch.set_num_threads(args.threads)
    paths, leaves, hier = tail_bench.trainval_images(args.data_dir)
    from hiernet.backbones import get_spec
    from hiernet.safeio import UserError

    try:
        spec = get_spec(args.backbone)
    except UserError as exc:
        raise SystemExit(str(exc)) from None
    args.image_size = args.image_size or spec.image_size
    if args.node:
        return main_node(args, spec, paths, leaves)
    if spec.parts or args.held_out_prior:
        return main_composite(args, [part.name for part in spec.parts] or [args.backbone], paths, leaves, hier)
    args.tune_from = args.tune_from or [_last_block(args.backbone, args.image_size)]
    maps, leaves, support, tail, rare = _maps_and_leaves(args, paths, leaves, args.tune_from,
                                                         [args.backbone] * len(args.tune_from))
    leaf_ids = sorted(set(leaves))
    preds, seconds = cross_validate(maps, leaves, leaf_ids, args.image_size, args.tune_from, args.epochs, args.hidden,
                                    args.folds, args.seed, args.max_folds, not args.no_peers, lr=args.lr,
                                    hier=hier if args.suite_heads else None, backbone=args.backbone,
                                    tune_kw=tune_keywords(args, hier, leaf_ids), rare=rare)
    rows = tail_bench.score_rows(preds, seconds, leaves, tail)
    if args.out:
        header = (f"# Tuning the last blocks: {args.folds}-fold CV on train+val of {args.data_dir} ({len(leaves)} images, "
                  f"{len(support)} leaves; test split unused"
                  f"{f'; only the first {args.max_folds} fold(s) held out' if args.max_folds else ''}); {args.backbone} @ "
                  f"{args.image_size} px, eval view + mirror + {args.views} augmented views; flat decisions over the leaves; "
                  f"{args.epochs} epochs of tuning{_level_note(args)}")
        _write_report(args.out, rows, tail, support, header)
    return 0


def _maps_and_leaves(args, paths: list, leaves: np.ndarray, cuts: list, backbones: list) -> tuple:
    """The cached maps after block ``cuts[i]`` of ``backbones[i]`` (:func:`extract_maps`) of the images that
    decoded for every one, their leaves, images per leaf and tail leaves (``bench/tail.py``'s
    ``support_and_tail``) and ``--rare-views``' extra maps (:func:`rare_maps`, None without)."""
    import tail as tail_bench

    maps, ok = [], np.ones(len(paths), bool)
    for cut, backbone in zip(cuts, backbones):
        m, m_ok = extract_maps(paths, args.image_size, cut, args.views, args.seed, args.work, backbone)
        maps.append(m)
        ok &= m_ok
    keep = np.flatnonzero(ok)
    maps = [m if len(keep) == len(paths) else m[keep] for m in maps]
    leaves = leaves[keep]
    support, tail = tail_bench.support_and_tail(leaves, args.tail_max, args.folds)
    rare = rare_maps([paths[i] for i in keep], leaves, support, args.tail_max, args.rare_views, args.image_size,
                     cuts, backbones, args.seed, args.work)
    return maps, leaves, support, tail, rare


def tune_keywords(args, hier, leaf_ids: list) -> dict:
    """The tuning's keywords the flags set: ``--level-loss`` (:func:`hiernet.tailtune.level_groups` of ``hier``),
    ``--share-levels``, ``--repeat-threshold``."""
    kw = {"repeat_threshold": args.repeat_threshold} if args.repeat_threshold else {}
    if args.level_loss or args.share_levels:
        kw.update(levels=level_groups(hier, leaf_ids), level_weight=args.level_loss, share_levels=args.share_levels,
                  share_decay=args.share_decay)
    return kw


def main_composite(args, members: list, paths: list, leaves: np.ndarray, hier) -> int:
    """``--backbone A+B`` (or one backbone with ``--held-out-prior``): every member's maps before its last block,
    then :func:`cross_validate_composite`."""
    import tail as tail_bench

    what = "a '+' composite" if len(members) > 1 else "--held-out-prior"
    if args.tune_from:
        raise SystemExit(f"{what} tunes the last block of each member; drop --tune-from")
    if not args.suite_heads:
        raise SystemExit(f"{what} is scored with the suite's heads; add --suite-heads")
    maps, leaves, support, tail, rare = _maps_and_leaves(args, paths, leaves,
                                                         [_last_block(m, args.image_size) for m in members], members)
    leaf_ids = sorted(set(leaves))
    preds, seconds, taus, oof = cross_validate_composite(maps, leaves, leaf_ids, args.image_size, members, args.epochs,
                                                         args.folds, args.seed, args.max_folds, hier, args.hidden, lr=args.lr,
                                                         tune_kw=tune_keywords(args, hier, leaf_ids), rare=rare)
    rows = tail_bench.score_rows(preds, seconds, leaves, tail)
    if args.out:
        save_logits(args.out.with_suffix(".logits.npz"), oof)
        header = (f"# Tuning the last block of each member of {args.backbone} @ {args.image_size} px: {args.folds}-fold CV "
                  f"on train+val of {args.data_dir} ({len(leaves)} images, {len(support)} leaves; test split unused"
                  f"{f'; only the first {args.max_folds} fold(s) held out' if args.max_folds else ''}); eval view + mirror "
                  f"+ {args.views} augmented views; {args.epochs} epochs of tuning per member{_level_note(args)}, on the training fold "
                  f"less a held-out ninth, where the prior adjustment's tau was chosen, fold by fold (leaf accuracy is "
                  f"train.py's rule) {_criteria_header(taus)}")
        _write_report(args.out, rows, tail, support, header)
    return 0


def main_rescore(args) -> int:
    """``--rescore LOGITS``: :func:`rescore`, reported as a run would (``--out``) or printed."""
    import tail as tail_bench
    from hiernet.backbones import get_spec
    from hiernet.safeio import UserError

    try:
        spec = get_spec(args.backbone)
        preds, taus, leaves = rescore(args.rescore, _short([part.name for part in spec.members()]))
    except (UserError, OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"cannot rescore {args.rescore}: {exc} (give the .logits.npz a composite run of "
                         "bench/tail_tuning.py wrote beside its report)") from None
    support, tail = tail_bench.support_and_tail(leaves, args.tail_max, len(taus))
    rows = tail_bench.score_rows(preds, {name: 0.0 for name in preds}, leaves, tail)
    if args.out:
        header = (f"# The tuned classifier's rows of {args.backbone}, scored again from the out-of-fold logits "
                  f"{args.rescore} ({len(leaves)} images, {len(support)} leaves; nothing tuned: seconds 0); tau of "
                  f"{PRIOR_TAUS} chosen on each fold's held-out part, fold by fold (leaf accuracy is train.py's rule) "
                  f"{_criteria_header(taus)}")
        _write_report(args.out, rows, tail, support, header)
    return 0


# ----------------------------------------------------------------------------------- one node's own network
def node_columns(leaf_ids: list, node: str) -> np.ndarray:
    """Indices ``(k,)`` into ``leaf_ids`` of the leaves under ``node`` (a parent's path, e.g. "Apparel/Topwear") in
    the tree the leaf paths make (:meth:`hiernet.hierarchy.Hierarchy.from_leaf_paths`); a node above fewer than
    two leaves is refused, naming the parents that qualify."""
    from hiernet.hierarchy import ROOT_ID, Hierarchy

    hier, node = Hierarchy.from_leaf_paths(leaf_ids), node.rstrip("/")
    under = hier.subtree_leaves(node) if node in hier.nodes and node != ROOT_ID else []
    if len(under) < 2:
        parents = sorted(n for n in hier.internal_nodes() if n != ROOT_ID and len(hier.subtree_leaves(n)) >= 2)
        raise SystemExit(f"--node {node!r} is not a parent of two or more leaves; pick one of: {', '.join(parents)}")
    return np.array([leaf_ids.index(leaf) for leaf in under], dtype=int)


def with_node_model(p_base: np.ndarray, p_node: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``p_base`` ``(n, C)`` with the probability it gives the leaves ``cols`` ``(k,)`` shared among them as
    ``p_node`` ``(n, k)`` (a distribution over those leaves) says: the node's own network re-decides among its
    leaves, the base decides whether the image belongs to the node. Rows still sum to one."""
    out = np.array(p_base, dtype=np.float64)
    out[:, cols] = out[:, cols].sum(1, keepdims=True) * p_node
    return out


def load_base(path: Path, leaf_ids: list, leaves: np.ndarray) -> dict:
    """The out-of-fold logits :func:`save_logits` wrote (``--base``), checked to be of the same images in the
    same order (their leaves) and the same leaves; anything else is refused in one line."""
    try:
        base = read_logits(path)
        same = list(base["leaf_ids"]) == list(leaf_ids) and np.array_equal(np.asarray(leaf_ids, dtype=object)[base["y"]], leaves)
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise SystemExit(f"cannot read --base {path}: {exc} (give the .logits.npz a --held-out-prior or composite "
                         "run of bench/tail_tuning.py wrote beside its report)") from None
    if not same:
        raise SystemExit(f"--base {path} holds other images or leaves than {len(leaves)} images of --data-dir; "
                         "give the logits of a run on the same --data-dir")
    return base


def cross_validate_node(maps, base: dict, cols: np.ndarray, image_size: int, backbone: str, epochs: int, seed: int,
                        lr: float = 3e-4, pretrained: bool = True, tune_kw: dict | None = None):
    """A second network for one node: in each fold of ``base`` (:func:`load_base`), ``backbone``'s last block
    and a linear classifier over the node's leaves ``cols`` tuned on the node's images of the part of the
    training fold the base was tuned on, its prior adjustment's ``tau`` chosen on the node's images of the
    base's held-out part (train.py's rule); then, on every test image, the base's prior-adjusted decision
    with the node's leaves re-decided by it (:func:`with_node_model`).

    ``maps``: ``(N, V, C, h, w)`` of ``backbone`` before its last block, the base's images. Returns
    ``{row: (N,) predicted leaves}`` (``None`` for images no fold held out), seconds per row, each fold's
    ``tau`` and the node network's out-of-fold logits ``(N, 2, k)`` (eval view and mirror; NaN where unscored).
    """
    names = np.asarray(base["leaf_ids"]).astype(object)
    y, fold, n_classes = base["y"], base["fold"], len(names)
    local = np.full(n_classes, -1)
    local[cols] = np.arange(len(cols))
    in_node = local[y] >= 0
    cut = _last_block(backbone, image_size)
    short = f"{_short([backbone])} @ {image_size} px"
    base_row, node_row = "base: tuned classifier adjusted for the prior", f"base, the node's leaves re-decided by {short} tuned on its images"
    rows = {base_row: "base", f"{node_row}, adjusted for the prior": "prior", f"{node_row}, not adjusted": "plain"}
    preds = {name: np.full(len(y), None, dtype=object) for name in rows}
    seconds = dict.fromkeys(rows, 0.0)
    z_node, taus = np.full((len(y), 2, len(cols)), np.nan, np.float32), []
    for k in range(int(fold.max()) + 1):
        t0 = time.time()
        te, hold = np.flatnonzero(fold == k), base[f"hold_{k}"]
        fit = np.setdiff1d(np.flatnonzero(fold != k), hold)  # images of folds not held out (-1) train too
        fit_n, hold_n = fit[in_node[fit]], hold[in_node[hold]]
        _, t = backbone_parts(image_size, cut, pretrained, backbone)
        t, cls = tune(t, maps[fit_n], local[y[fit_n]], len(cols), epochs, seed + k, lr, **(tune_kw or {}))
        z_te, z_hold = tuned_logits(t, cls, maps[te]), tuned_logits(t, cls, maps[hold_n])
        log_prior = logit_adjustment(local[y[fit_n]], len(cols), 1.0).numpy()
        tau = prior_taus(z_hold, local[y[hold_n]], log_prior, len(cols))["accuracy"]
        base_p = adjusted_probs(base, k)
        node_p = {"prior": mirror_probs(z_te - tau * log_prior), "plain": mirror_probs(z_te)}
        for name, what in rows.items():
            p = base_p if what == "base" else with_node_model(base_p, node_p[what], cols)
            preds[name][te] = names[p.argmax(1)]
            seconds[name] += 0.0 if what == "base" else time.time() - t0
        z_node[te] = z_te
        taus.append(tau)
        mine = in_node[te]
        log.info("fold %d: tau %g; on the node's %d test images base %.4f, re-decided %.4f (leaf accuracy)", k, tau,
                 mine.sum(), np.mean(preds[base_row][te][mine] == names[y[te][mine]]),
                 np.mean(preds[f"{node_row}, adjusted for the prior"][te][mine] == names[y[te][mine]]))
    return preds, seconds, taus, z_node


def adjusted_probs(oof: dict, k: int) -> np.ndarray:
    """The prior-adjusted probabilities ``(n, C)`` of the saved tuned classifier ``oof`` (:func:`load_base`) on
    fold ``k``'s images, ``tau`` chosen on that fold's held-out part (train.py's rule; ``"clf-prior"`` of
    :func:`classifier_decisions`)."""
    te = oof["fold"] == k
    return classifier_decisions(oof["z"][te], oof[f"z_hold_{k}"], oof["y"][oof[f"hold_{k}"]], oof[f"log_prior_{k}"],
                                len(oof["leaf_ids"]))[0]["clf-prior"]


def redecide_from(base: dict, other: dict, cols: np.ndarray, name: str) -> dict:
    """``--node-from``: the base's prior-adjusted decision as it is, and with the node's leaves ``cols`` re-decided
    by ``other``'s (another saved run on the same images and folds) prior-adjusted classifier, its probabilities
    restricted to those leaves. Returns ``{row: (N,) predicted leaves}`` (``None`` where no fold held out)."""
    names = np.asarray(base["leaf_ids"]).astype(object)
    if not np.array_equal(base["fold"], other["fold"]):
        raise SystemExit("--node-from holds other folds than --base; give two runs with the same --seed and --folds")
    base_row = "base: tuned classifier adjusted for the prior"
    row = f"base, the node's leaves re-decided by {name}'s tuned classifier adjusted for the prior"
    preds = {r: np.full(len(base["y"]), None, dtype=object) for r in (base_row, row)}
    for k in range(int(base["fold"].max()) + 1):
        te = base["fold"] == k
        p_base, p_other = adjusted_probs(base, k), adjusted_probs(other, k)
        cond = p_other[:, cols] / p_other[:, cols].sum(1, keepdims=True)
        preds[base_row][te] = names[p_base.argmax(1)]
        preds[row][te] = names[with_node_model(p_base, cond, cols).argmax(1)]
    return preds


def main_node(args, spec, paths: list, leaves: np.ndarray) -> int:
    """``--node NODE --base LOGITS``: the node and the base checked first, then the maps of one backbone and
    :func:`cross_validate_node`; with ``--node-from`` no maps and nothing tuned (:func:`redecide_from`)."""
    import tail as tail_bench

    leaf_ids = sorted(set(leaves))
    cols = node_columns(leaf_ids, args.node)
    base = load_base(args.base, leaf_ids, leaves)
    if args.node_from:
        preds = redecide_from(base, load_base(args.node_from, leaf_ids, leaves), cols, args.node_from.name)
        support, tail = tail_bench.support_and_tail(leaves, args.tail_max, args.folds)
        rows = tail_bench.score_rows(preds, dict.fromkeys(preds, 0.0), leaves, tail)
        if args.out:
            _write_report(args.out, rows, tail, support,
                          f"# {args.node}'s leaves ({len(cols)}) re-decided for the base {args.base} by the tuned classifier "
                          f"of {args.node_from}, nothing tuned ({len(leaves)} images, {len(support)} leaves; the runs' "
                          f"folds; test split unused)")
        return 0
    if spec.parts:
        raise SystemExit("--node tunes one backbone for the node; give one --backbone, not a '+' composite")
    if args.level_loss or args.share_levels or args.rare_views:
        raise SystemExit("--node tunes a classifier over one node's leaves: drop --level-loss, --share-levels and --rare-views")
    maps, kept, support, tail, _ = _maps_and_leaves(args, paths, leaves, [_last_block(args.backbone, args.image_size)],
                                                    [args.backbone])
    if len(kept) != len(leaves):
        raise SystemExit(f"{len(leaves) - len(kept)} image(s) of --data-dir did not decode for {args.backbone}; the base "
                         "was scored on every image: fix or remove them, then run both again")
    preds, seconds, taus, z_node = cross_validate_node(maps[0], base, cols, args.image_size, args.backbone, args.epochs,
                                                       args.seed, args.lr, tune_kw=tune_keywords(args, None, leaf_ids))
    rows = tail_bench.score_rows(preds, seconds, leaves, tail)
    if args.out:
        tmp = args.out.with_name(args.out.stem + ".node-logits.tmp.npz")
        np.savez_compressed(tmp, z=z_node, cols=cols, leaf_ids=np.array(leaf_ids, dtype=str))
        tmp.replace(args.out.with_name(args.out.stem + ".node-logits.npz"))
        header = (f"# A second network for {args.node} only ({len(cols)} leaves): {args.backbone} @ {args.image_size} px, "
                  f"its last block tuned on the node's images (eval view + mirror + {args.views} augmented views, "
                  f"{args.epochs} epochs), re-deciding among the node's leaves for the base {args.base} "
                  f"({len(leaves)} images, {len(support)} leaves; the base's folds and held-out parts; test split "
                  f"unused); the node network's tau, chosen on its images of each held-out part: "
                  f"{', '.join(f'{t:g}' for t in taus)}")
        _write_report(args.out, rows, tail, support, header)
    return 0


def _write_report(out: Path, rows: dict, tail: list, support: dict, header: str) -> None:
    """``bench/tail.py``'s report (and its .json twin) with this run's command line."""
    import tail as tail_bench

    tail_bench.write_report(out, rows, tail, support, header, f"python3 bench/tail_tuning.py {shlex.join(sys.argv[1:])}")


def _level_note(args) -> str:
    note = f", leaf loss + {args.level_loss:g} x the levels' loss" if args.level_loss else ""
    note += ", the classifier sharing its ancestors' weights (--share-levels)" if args.share_levels else ""
    note += f", weight decay {args.share_decay:g} on each leaf's own part" if args.share_levels and args.share_decay is not None else ""
    note += (f", {args.rare_views} more augmented views of each image of a leaf with at most {args.tail_max} images"
             if args.rare_views else "")
    return note + (f", repeat-factor sampling (threshold {args.repeat_threshold:g})" if args.repeat_threshold else "")


def _criteria_header(taus: list) -> str:
    """The tau each criterion of :data:`TAU_CRITERIA` chose, fold by fold: "by leaf accuracy: 0, 0.1, 0.3; ..."."""
    return "; ".join(f"by {label}: {', '.join(f'{t[c]:g}' for t in taus)}" for c, label in TAU_CRITERIA.items())


def _tuned_prefix(short: str) -> str:
    """How the tuned rows of a composite ``short`` begin: "Lite1+Lite0, each tuned from its last block"; one
    member's, "Lite0, tuned from its last block"."""
    return f"{short}, {'each ' if '+' in short else ''}tuned from its last block"


def _short(members: list) -> str:
    """"Lite1+Lite0" of [efficientnet-lite1, efficientnet-lite0]: how the composite's rows name its members."""
    return "+".join(m.replace("efficientnet-", "").capitalize() for m in members)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
