#!/usr/bin/env python3
"""Long-tailed catalogues: the suite's tail options against two peers, by k-fold cross-validation on train+val.

The test split is never read. Every image of train+val is predicted once, by the fold that held it out
(out-of-fold predictions), and scored on the leaves: accuracy, macro F1 over the leaves, and the recall
of each tail leaf (at most ``--tail-max`` images). Side by side on the same frozen features:

* **peer: flat LR** — scikit-learn ``LogisticRegression`` over all leaves on the standardised features of
  one view per image (what a user would try first);
* **peer: HiClass LCPN + LR** — HiClass ``LocalClassifierPerParentNode`` with the same logistic regression;
* **suite** — the LCPN heads trained as ``train.py`` trains them (:mod:`bench.ablation` helpers), for the
  current default and each candidate of :data:`VARIANTS` (train.py flag values on top of the default).

Example::

    python3 bench/tail.py --data-dir /tmp/fp/split --cache-dir /tmp/fp/cache --out bench/results/ablation-catalogue.md
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
sys.path.insert(0, str(REPO / "bench"))

#: Suite candidates: name -> train.py flag values (FLAG_FIELDS names) on top of the ``cpu`` preset.
VARIANTS = {
    "suite: default (plain CE)": {},
    # each head standardised by its own node's training views (before: the default until heads used the tree's)
    "suite: node standardiser": {"standardize": "node"},
    "suite: node standardiser, flat head": {"standardize": "node", "decision": "flat"},
    "suite: node standardiser, combined decision": {"standardize": "node", "decision": "combined"},
    "suite: class weights ^0.5": {"class_weights": 0.5},
    "suite: class weights ^1 (balanced)": {"class_weights": 1.0},
    "suite: logit adjustment tau 0.5": {"logit_adjust": 0.5},
    "suite: logit adjustment tau 1 (balanced softmax)": {"logit_adjust": 1.0},
    "suite: class-aware sampling ^0.5": {"sample_power": 0.5},
    "suite: class-aware sampling ^1": {"sample_power": 1.0},
    "suite: no label smoothing": {"label_smoothing": 0.0},
    "suite: no label smoothing + class-aware sampling ^0.5": {"label_smoothing": 0.0, "sample_power": 0.5},
    "suite: no label smoothing, patience 30": {"label_smoothing": 0.0, "patience": 30},
    "suite: no label smoothing, no dropout, patience 30": {"label_smoothing": 0.0, "dropout": 0.0, "patience": 30},
    "suite: same + class-aware sampling ^0.5": {"label_smoothing": 0.0, "dropout": 0.0, "patience": 30, "sample_power": 0.5},
    "suite: no label smoothing, no dropout, 150 epochs without early stop":
        {"label_smoothing": 0.0, "dropout": 0.0, "epochs": 150, "patience": 150},
    # the output bias starting at the log prior of the node's training classes (--prior-bias)
    "suite: prior bias": {"prior_bias": True},
    "suite: prior bias, flat head": {"prior_bias": True, "decision": "flat"},
    "suite: prior bias, combined decision": {"prior_bias": True, "decision": "combined"},
    # "decision": how the suite's heads name a leaf: "lcpn" (level by level, what predict.py returns; the
    # default), "flat" (the flat head over all leaves alone) or "combined" (evaluate.py's combined decision:
    # the leaf maximising flat probability × LCPN path probability)
    "suite: flat head": {"decision": "flat"},
    "suite: combined decision (flat × LCPN path)": {"decision": "combined"},
    # what predict.py --decision auto does: the decision most accurate on a validation part of the training
    # fold (heads trained without it, as train.py trains without the validation split), then that decision
    # of the heads trained on the whole fold (the rows above), so the rows differ only in the choice
    "suite: auto decision (chosen on a validation part)": {"decision": "auto"},
    "suite: no label smoothing, no dropout": {"label_smoothing": 0.0, "dropout": 0.0},
    "suite: no label smoothing, no dropout, flat head": {"label_smoothing": 0.0, "dropout": 0.0, "decision": "flat"},
    "suite: no label smoothing, no dropout, combined decision":
        {"label_smoothing": 0.0, "dropout": 0.0, "decision": "combined"},
}
PEERS = ("peer: flat LR", "peer: HiClass LCPN + LR")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO / "split_datasets", help="prepared datasets")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "hiernet", help="feature cache")
    p.add_argument("--backbone", default="efficientnet-lite1+efficientnet-lite0", help="backbone (train.py's default)")
    p.add_argument("--image-size", type=int, default=280)
    p.add_argument("--hidden", type=int, default=1024, help="hidden units of the suite's heads (the recipe's 1024; 0 = linear)")
    p.add_argument("--views", type=int, default=0, help="cached augmented views per image for the suite (default recipe: 4)")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds over train+val")
    p.add_argument("--variants", nargs="*", help="suite variant names (default: all; the flag alone: none, peers only)")
    p.add_argument("--max-folds", type=int, help="hold out only the first N folds (a cheaper estimate; scored on their images)")
    p.add_argument("--no-peers", action="store_true", help="skip the two peers")
    p.add_argument("--tail-max", type=int, default=100, help="a leaf with at most this many images is a tail leaf")
    p.add_argument("--seed", type=int, default=0, help="fold and training seed")
    p.add_argument("--out", type=Path, help="markdown report (and a .json twin)")
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="train nothing: write --out from the .json twins of earlier runs (rows in the given order)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    return p


def trainval_images(data_dir: Path):
    """Paths and leaf ids ``(N,)`` of the train and val splits (never test), the tree and its document."""
    from hiernet.hierarchy import load_hierarchy_json

    hier, doc = load_hierarchy_json(data_dir / "hierarchy.json")
    paths, leaves = [], []
    for split in ("train", "val"):
        for folder, leaf in zip(doc["flat"]["classes"], doc["flat"]["class_nodes"]):
            for p in sorted((data_dir / "flat" / split / folder).iterdir()):
                paths.append(p)
                leaves.append(leaf)
    return paths, np.array(leaves, dtype=object), hier


def flat_lr(x_tr: np.ndarray, leaves_tr: np.ndarray, x_te: np.ndarray) -> np.ndarray:
    """Peer 1: standardise, then one multinomial logistic regression over all leaves. ``(N, D)`` → ``(M,)`` leaves."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return model.fit(x_tr, leaves_tr).predict(x_te)


def level_labels(hier, leaves: np.ndarray) -> np.ndarray:
    """``(N, depth)`` node ids along each leaf's path, padded with "" for shallower leaves (HiClass's format)."""
    depth = max(len(hier.path(leaf)) for leaf in hier.leaves())
    return np.array([hier.path(leaf) + [""] * (depth - len(hier.path(leaf))) for leaf in leaves], dtype=object)


def hiclass_lcpn(hier, x_tr: np.ndarray, leaves_tr: np.ndarray, x_te: np.ndarray) -> np.ndarray:
    """Peer 2: HiClass ``LocalClassifierPerParentNode`` with a logistic regression per parent, on standardised features."""
    from hiclass import LocalClassifierPerParentNode
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_tr)
    model = LocalClassifierPerParentNode(local_classifier=LogisticRegression(max_iter=1000), n_jobs=1)
    model.fit(scaler.transform(x_tr), level_labels(hier, leaves_tr))
    pred = np.asarray(model.predict(scaler.transform(x_te)), dtype=object)
    return np.array([next(c for c in row[::-1] if c) for row in pred], dtype=object)


#: The decisions the auto variant chose, one per fold, in order (reported beside its row).
AUTO_CHOICES: list = []
#: Share of a training fold the auto variant holds out to choose on: the validation share of train + val
#: under prepare_dataset.py's default split (0.8 / 0.1 / 0.1).
AUTO_VAL_FRACTION = 1 / 9

#: Trained heads of this process, keyed by (training changes, seed, hidden, fold size): the lcpn, flat and
#: combined decisions of one recipe share them instead of training the same heads three times.
_TRAINED: dict = {}


def _trained(kind: str, changes: dict, seed: int, hidden: int, n_train: int, train):
    key = (kind, tuple(sorted(changes.items())), seed, hidden, n_train)
    if key not in _TRAINED:
        _TRAINED[key] = train()
    return _TRAINED[key]


def suite_lcpn(hier, views_tr: np.ndarray, leaves_tr: np.ndarray, ev_te: np.ndarray, changes: dict, seed: int,
               hidden: int = 1024) -> np.ndarray:
    """The suite: LCPN heads (and the flat head) as train.py trains them (with ``changes``), with mirror
    averaging; ``changes["decision"]`` (see :data:`VARIANTS`) picks how they name the leaf. Variants that
    differ only in their decision reuse one training per fold (:func:`_trained`). ``changes["flat_probs"]``
    ``(M, L)`` (columns: ``hier.leaves()``) replaces the flat head's probabilities on ``ev_te``'s ``M`` images."""
    import ablation

    changes = dict(changes)
    decision = changes.pop("decision", "lcpn")
    given_flat = changes.pop("flat_probs", None)  # (M, L) over hier.leaves(): a flat model trained elsewhere
    if decision == "auto":
        decision = choose_on_validation(hier, views_tr, leaves_tr, changes, seed, hidden)
        AUTO_CHOICES.append(decision)
    if decision not in ("lcpn", "flat", "combined"):
        raise ValueError(f"unknown decision {decision!r}")
    if decision in ("flat", "combined"):
        flat_leaves = hier.leaves()
        if given_flat is not None:
            flat_p = np.asarray(given_flat)
        else:
            flat = _trained("flat", changes, seed, hidden, len(leaves_tr), lambda: ablation.train_head(
                views_tr, np.array([flat_leaves.index(leaf) for leaf in leaves_tr]), len(flat_leaves), hidden, seed,
                0.0, None, changes))
            flat_p = ablation.probs(flat, ev_te, True)
        if decision == "flat":
            return np.array(flat_leaves, dtype=object)[flat_p.argmax(1)]
    heads = _trained("lcpn", changes, seed, hidden, len(leaves_tr),
                     lambda: ablation.train_lcpn(hier, views_tr, leaves_tr, hidden, seed, 0.0, True, changes))
    if decision == "lcpn":
        return ablation.route(hier, heads, ev_te, True)
    from hiernet.evaluation import combined_leaves

    node_p = {nid: ablation.probs(head, ev_te, True) for nid, head in heads.items()}
    return np.array(combined_leaves(hier, node_p, flat_p, flat_leaves), dtype=object)


def validation_part(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``0..n-1`` of a training fold split, seeded, into the part trained on and a held-out
    :data:`AUTO_VAL_FRACTION` (at least one), in the seeded order: ``(fit, val)``."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(AUTO_VAL_FRACTION * n)))
    return order[n_val:], order[:n_val]


def choose_on_validation(hier, views_tr: np.ndarray, leaves_tr: np.ndarray, changes: dict, seed: int,
                         hidden: int) -> str:
    """``--decision auto`` inside a training fold: heads trained on all but a seeded
    :data:`AUTO_VAL_FRACTION` of ``views_tr`` ``(N, V, D)``, each decision scored on the rest (eval view +
    mirror, as export.py's validation pass), the choice of :func:`hiernet.exporting.choose_decision`."""
    from hiernet.exporting import choose_decision

    fit, val = validation_part(len(leaves_tr), seed)
    acc = {}
    for decision in ("lcpn", "flat", "combined"):
        pred = suite_lcpn(hier, views_tr[fit], leaves_tr[fit], views_tr[val][:, :2], {**changes, "decision": decision},
                          seed, hidden)
        acc[decision] = float(np.mean(pred == leaves_tr[val]))
    chosen = choose_decision(acc, len(val), "fp32")["chosen"]
    logging.getLogger("tail").info("auto: validation leaf accuracy %s -> %s",
                                   ", ".join(f"{k} {v:.4f}" for k, v in acc.items()), chosen)
    return chosen


def scores(y_true: np.ndarray, y_pred: np.ndarray, tail: list) -> dict:
    """Leaf accuracy, macro F1 over the leaves in ``y_true``, recall per leaf and mean recall over ``tail``."""
    from sklearn.metrics import f1_score, recall_score

    labels = sorted(set(y_true))
    rec = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    recall = {str(k): float(r) for k, r in zip(labels, rec)}
    return {"leaf_accuracy": float(np.mean(y_true == y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "tail_recall": float(np.mean([recall[t] for t in tail])) if tail else float("nan"), "recall": recall}


def support_and_tail(leaves: np.ndarray, tail_max: int, folds: int) -> tuple[dict, list]:
    """Images per leaf of ``leaves`` ``(N,)`` and the tail leaves (at most ``tail_max`` images, at least one
    per fold), rarest first."""
    support = {str(k): int(v) for k, v in zip(*np.unique(leaves, return_counts=True))}
    return support, sorted((t for t, n in support.items() if folds <= n <= tail_max), key=lambda t: support[t])


def score_rows(preds: dict, seconds: dict, leaves: np.ndarray, tail: list) -> dict:
    """One report row per method: :func:`scores` of its out-of-fold predictions (images of folds not held
    out, ``None``, left out), its seconds and how many images were scored; each printed in one line."""
    done = np.array([p is not None for p in next(iter(preds.values()))]) if preds else np.ones(len(leaves), bool)
    rows = {}
    for name, pred in preds.items():
        rows[name] = {**scores(leaves[done], pred[done], tail), "seconds": round(seconds[name], 1), "n_scored": int(done.sum())}
        print(f"{name}: leaf {rows[name]['leaf_accuracy']:.4f}  macro F1 {rows[name]['macro_f1']:.4f}  "
              f"tail recall {rows[name]['tail_recall']:.4f}", flush=True)
    return rows


def methods(names: list, no_peers: bool, hidden: int = 1024) -> dict:
    """``{name: predict(hier, views_tr, leaves_tr, ev_te, seed)}`` for the peers and the chosen suite variants."""
    out = {}
    if not no_peers:
        out[PEERS[0]] = lambda h, v, l, e, s: flat_lr(v[:, 0], l, e[:, 0])
        out[PEERS[1]] = lambda h, v, l, e, s: hiclass_lcpn(h, v[:, 0], l, e[:, 0])
    for name in names:
        out[name] = lambda h, v, l, e, s, ch=VARIANTS[name]: suite_lcpn(h, v, l, e, ch, s, hidden)
    return out


def cross_validate(hier, ev: np.ndarray, views: np.ndarray, leaves: np.ndarray, todo: dict, folds: int, seed: int,
                   max_folds: int | None = None):
    """Out-of-fold leaf predictions ``{method: (N,)}`` (None for images of folds beyond ``max_folds``) and
    training seconds per method.

    ``ev`` ``(N, 2, D)``: eval view and mirror; ``views`` ``(N, V, D)``: every training view (``ev`` first).
    """
    from sklearn.model_selection import StratifiedKFold

    preds = {name: np.empty(len(leaves), dtype=object) for name in todo}
    seconds = dict.fromkeys(todo, 0.0)
    for fold, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(ev[:, 0], leaves)):
        if max_folds is not None and fold >= max_folds:
            break
        for name, predict in todo.items():
            t0 = time.time()
            preds[name][te] = predict(hier, views[tr], leaves[tr], ev[te], seed + fold)
            seconds[name] += time.time() - t0
            logging.getLogger("tail").info("fold %d: %s %.1f s", fold, name, time.time() - t0)
    return preds, seconds


def markdown(rows: dict, tail: list, support: dict, header: str, command: str) -> str:
    lines = [header, "", "| method | leaf accuracy | macro F1 (leaves) | mean recall of tail leaves | seconds (all folds) |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['leaf_accuracy']:.4f} | {v['macro_f1']:.4f} | "
              f"{'–' if v['tail_recall'] != v['tail_recall'] else format(v['tail_recall'], '.4f')} | {v['seconds']:.0f} |"
              for k, v in rows.items()]
    names = list(rows)
    lines += [f"\n{k}: chose {', '.join(f'{c} (fold {i + 1})' for i, c in enumerate(v['auto_choices']))}"
              for k, v in rows.items() if v.get("auto_choices")]
    if not tail:
        lines += ["", "(no tail leaf: every leaf has more images than --tail-max)"]
        return "\n".join(lines + ["", f"Command: `{command}`"]) + "\n"
    lines += ["", f"Recall of each tail leaf (at most {max(support[t] for t in tail) if tail else 0} images), "
              "columns in the order of the table above:", "",
              "| leaf (images) | " + " | ".join(f"({i + 1})" for i in range(len(names))) + " |",
              "|---|" + "---|" * len(names)]
    lines += [f"| {t} ({support[t]}) | " + " | ".join(f"{rows[n]['recall'].get(t, float('nan')):.2f}" for n in names) + " |"
              for t in tail]
    lines += ["", "(" + "; ".join(f"({i + 1}) {n}" for i, n in enumerate(names)) + ")", "", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def combine(files: list, out: Path) -> None:
    """One report from the .json twins of several runs on the same data (split runs in parallel)."""
    docs = [json.loads(Path(f).read_text()) for f in files]
    rows = {k: v for d in docs for k, v in d["rows"].items()}
    write_report(out, rows, docs[0]["tail"], docs[0]["support"], docs[0]["header"],
                 " && ".join(d["command"] for d in docs) + f" && python3 bench/tail.py --combine {shlex.join(map(str, files))} --out {out}")


def write_report(out: Path, rows: dict, tail: list, support: dict, header: str, command: str) -> None:
    from hiernet.safeio import write_json_atomic, write_text_atomic

    write_text_atomic(out, markdown(rows, tail, support, header, command))
    write_json_atomic(out.with_suffix(".json"), {"rows": rows, "support": support, "tail": tail, "header": header,
                                                 "command": command})


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.combine:
        if not args.out:
            raise SystemExit("--combine needs --out")
        combine(args.combine, args.out)
        return 0
    import ablation
    import torch

    torch.set_num_threads(args.threads)

    names = list(VARIANTS) if args.variants is None else args.variants
    if set(names) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(set(names) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    paths, leaves, hier = trainval_images(args.data_dir)
    ev, aug, ok = ablation.features(paths, args.backbone, args.image_size, args.views, args.cache_dir)
    views = ev if aug is None else np.concatenate([ev, aug], axis=1)
    ev, views, leaves = ev[ok], views[ok], leaves[ok]
    support, tail = support_and_tail(leaves, args.tail_max, args.folds)
    preds, seconds = cross_validate(hier, ev, views, leaves, methods(names, args.no_peers, args.hidden), args.folds, args.seed,
                                    args.max_folds)
    rows = score_rows(preds, seconds, leaves, tail)
    for name in rows:
        if VARIANTS.get(name, {}).get("decision") == "auto":
            rows[name]["auto_choices"] = list(AUTO_CHOICES)
    if args.out:
        header = (f"# Long tail: {args.folds}-fold CV on train+val of {args.data_dir} ({len(leaves)} images, "
                  f"{len(support)} leaves; test split unused{f'; only the first {args.max_folds} fold(s) held out' if args.max_folds else ''}); features {args.backbone} @ {args.image_size} px, "
                  f"eval view + mirror{f' + {args.views} augmented views' if args.views else ''}; suite heads: "
                  f"{f'MLP {args.hidden}' if args.hidden else 'linear'}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_report(args.out, rows, tail, support, header, f"python3 bench/tail.py {shlex.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
