#!/usr/bin/env bash
# Incremental training, measured: one new leaf (40 handbag photos of the fashion-product export) added under
# 'accessories' of the clothing tree, re-prepared into the same folder and trained with the same feature cache.
#
#   python bench/precision.py --datasets clothing --work W    # first: full training from an empty cache
#   bash bench/incremental.sh W [OUT]                          # then: copy W's int8 run, add the leaf, retrain
#
# The baseline (full training from an empty cache) is the "train (empty cache)" time of W's int8 row in
# bench/precision.py's report. Prints the wall times of prepare and train_lcpn.sh, which nodes were kept,
# and evaluate.py's leaf accuracy; W itself is not changed except for new feature-cache entries.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"; repo="$(dirname "$here")"
W="$(cd "${1:?usage: bench/incremental.sh PRECISION_WORK_DIR [OUT]}" && pwd)"; B="$W/clothing"
OUT="${2:-$(mktemp -d /tmp/hiernet-incremental-XXXXXX)}"; mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
SHARED="$(dirname "$repo")/shared/datasets"; [[ -d "$SHARED" ]] || SHARED=/work/shared/datasets
SRC="$SHARED/clothing"; FP="$SHARED/fashion-product"
export PYTHON="${PYTHON:-$repo/.venv/bin/python}" NO_FLAT=1
for need in "$B/int8/models/parent/model.pth" "$B/split/hierarchy.json" "$B/int8/cache"; do
  [[ -e "$need" ]] || { echo "incremental.sh: $need is missing; run bench/precision.py --datasets clothing --work $W first" >&2; exit 2; }
done
cd "$OUT"; rm -rf tree split models
(cd "$SRC" && find . -type f) | while read -r f; do mkdir -p "tree/$(dirname "$f")"; ln -s "$SRC/$f" "tree/$f"; done
mkdir -p tree/accessories/bag
"$PYTHON" - "$FP" <<'PY' | while read -r f; do ln -s "$f" tree/accessories/bag/; done
import csv, sys
fp = sys.argv[1]
rows = [r for r in csv.DictReader(open(f"{fp}/styles.csv", encoding="utf-8")) if r["articleType"] == "Handbags"]
print("\n".join(f"{fp}/{r['image']}" for r in rows[:40]))
PY
cp -a "$B/int8/models" models; cp -a "$B/split" split  # the earlier run: its models and its prepared folder
elapsed() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }
uptime
s=$(date +%s.%N); "$PYTHON" "$repo/prepare_dataset.py" -p tree -o split -q >prep.log 2>&1; t_prep=$(elapsed "$s")
s=$(date +%s.%N); bash "$repo/src/train_lcpn.sh" --data-dir split --output-dir models --cache-dir "$B/int8/cache" >train.log 2>&1
t_train=$(elapsed "$s")
grep -h "unchanged, kept\|test accuracy\|exported\|int8 guard" train.log || true
for n in parent accessories bottoms tops; do
  if cmp -s "models/$n/model.pth" "$B/int8/models/$n/model.pth"; then echo "node $n: kept (model.pth identical)"; else echo "node $n: retrained"; fi
done
"$PYTHON" "$repo/src/evaluate.py" --data-dir split --models-dir models --output "$OUT/eval" --no-flat -q 2>&1 | grep -i "leaf accuracy" || true
echo "incremental: prepare ${t_prep} s + train_lcpn.sh ${t_train} s (work folder: $OUT)"
