#!/usr/bin/env bash
# Train every local classifier of the hierarchy (root 'parent' first), the flat baseline, then export
# ONNX for fast CPU prediction. Extra arguments are passed on to every train.py call. Nodes whose
# dataset and recipe did not change since they were trained are kept (a rerun resumes); --force retrains all.
#
#   ./train_lcpn.sh                          # default CPU recipe, offline
#   ./train_lcpn.sh --data-dir D --output-dir M   # other folders (same as DATA_DIR=D MODELS_DIR=M)
#   ./train_lcpn.sh --preset fast            # one frozen Lite0 @ 224 px: ~2x faster, a little less accurate
#   ./train_lcpn.sh --preset original        # EfficientNet-B4 fine-tuned per node (GPU)
#   ./train_lcpn.sh --tune-backbone efficientnet-lite0   # tune Lite0's last block first (tune_backbone.py), train on it;
#                                            the flat head is the tuned classifier (TRAIN_FLAT_HEAD=1: train one instead)
#   ./train_lcpn.sh --weights W.pth --flat-classifier W.classifier.pth   # a backbone tuned before, its classifier as flat head
#   GPUS=0,1,2,3 ./train_lcpn.sh --preset original        # spread nodes over 4 GPUs, one node per GPU
#   NPROC_PER_NODE=4 ./train_lcpn.sh --preset original    # each node on 4 GPUs with torchrun (DDP)
#   NPROC_PER_NODE=8 TORCHRUN_ARGS="--nnodes=2 --node-rank=0 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400" ...
#
# Environment: PYTHON (interpreter; default: the repo's .venv if present, else python3),
# DATA_DIR / MODELS_DIR (default: <repo>/split_datasets, <repo>/trained_models),
# NO_FLAT=1 (skip the flat baseline), NO_EXPORT=1 (skip the ONNX export), TRAIN_FLAT_HEAD=1 (with
# --tune-backbone: train the flat head on the tuned features instead of using the tuned classifier),
# TORCHRUN_ARGS (torchrun's launch flags with NPROC_PER_NODE; default: --standalone).
set -euo pipefail


here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"  # the header comment
  echo "train.py flags:"
  exec "$PYTHON" "$here/train.py" --help
fi
if [[ -n "${GPUS:-}" && -n "${NPROC_PER_NODE:-}" ]]; then
  echo "train_lcpn.sh: set GPUS (one node per GPU) or NPROC_PER_NODE (each node on several GPUs with torchrun), not both" >&2
  exit 2
fi
read -r -a torchrun_args <<<"${TORCHRUN_ARGS:---standalone}"
DATA_DIR="${DATA_DIR:-$repo/split_datasets}"
MODELS_DIR="${MODELS_DIR:-$repo/trained_models}"
# --data-dir/--output-dir given as flags choose the folders of every step (node list, training, flat,
# export), like DATA_DIR=/MODELS_DIR=; --force also re-exports. The other flags go to train.py.
passed=()
force=""
tune=""
flat_clf=""
while (( $# )); do
  case "$1" in
    --tune-backbone)
      if (( $# < 2 )); then echo "train_lcpn.sh: --tune-backbone needs a backbone name, e.g. efficientnet-lite0" >&2; exit 2; fi
      tune="$2"; shift 2 ;;
    --tune-backbone=*) tune="${1#*=}"; shift ;;
    --flat-classifier)  # the flat node's alone
      if (( $# < 2 )); then echo "train_lcpn.sh: --flat-classifier needs a file (tune_backbone.py writes one)" >&2; exit 2; fi
      flat_clf="$2"; shift 2 ;;
    --flat-classifier=*) flat_clf="${1#*=}"; shift ;;
    --data-dir|--output-dir)
      if (( $# < 2 )); then echo "train_lcpn.sh: $1 needs a folder" >&2; exit 2; fi
      if [[ "$1" == --data-dir ]]; then DATA_DIR="$2"; else MODELS_DIR="$2"; fi
      shift 2 ;;
    --data-dir=*) DATA_DIR="${1#*=}"; shift ;;
    --output-dir=*) MODELS_DIR="${1#*=}"; shift ;;
    --force) force=1; passed+=("$1"); shift ;;
    *) passed+=("$1"); shift ;;
  esac
done
set -- "${passed[@]+"${passed[@]}"}"
common=(--data-dir "$DATA_DIR" --output-dir "$MODELS_DIR")
mkdir -p "$MODELS_DIR"

if [[ -n "$tune" ]]; then  # tune the backbone's last block on the training split first; every node trains on it
  tuned="$MODELS_DIR/tuned_backbone.pth"
  tune_args=(--data-dir "$DATA_DIR" --backbone "$tune" -o "$tuned" --no-hint)
  prev=""
  for a in "$@"; do  # the flags tuning shares with training
    case "$a" in
      --backbone|--backbone=*|--weights|--weights=*)
        echo "train_lcpn.sh: --tune-backbone NAME sets --backbone and --weights itself; drop $a" >&2; exit 2 ;;
      --image-size=*|--resize=*|--cache-dir=*|-q|--quiet|--force) tune_args+=("$a") ;;
    esac
    case "$prev" in --image-size|--resize|--cache-dir) tune_args+=("$prev" "$a") ;; esac
    prev="$a"
  done
  echo "== tuning the last block of $tune"
  if ! "$PYTHON" "$here/tune_backbone.py" "${tune_args[@]}"; then
    echo "train_lcpn.sh: tuning $tune failed (see the error above)" >&2
    exit 1
  fi
  set -- --backbone "$tune" --weights "$tuned" "$@"
  if [[ -z "$flat_clf" && -z "${TRAIN_FLAT_HEAD:-}" ]]; then flat_clf="$MODELS_DIR/tuned_backbone.classifier.pth"; fi
fi

if ! nodes="$("$PYTHON" "$here/train.py" --list-nodes "${common[@]}")"; then
  echo "train_lcpn.sh: cannot list the nodes to train (see the error above)" >&2
  exit 2
fi
mapfile -t node_list <<<"$nodes"
if [[ -z "${NO_FLAT:-}" ]]; then node_list+=(flat); fi

train_one() {  # node [gpu]
  local node="$1" gpu="${2:-}"; shift 2
  local cmd=("$PYTHON" "$here/train.py")
  if [[ "$node" == flat && -n "$flat_clf" ]]; then set -- "$@" --flat-classifier "$flat_clf"; fi
  if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    cmd=("$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" --nproc_per_node="$NPROC_PER_NODE" "$here/train.py")
  fi
  if [[ -n "$gpu" ]]; then
    CUDA_VISIBLE_DEVICES="$gpu" "${cmd[@]}" -d "$node" "${common[@]}" "$@"
  else
    "${cmd[@]}" -d "$node" "${common[@]}" "$@"
  fi
}

start=$SECONDS
stop_jobs() {  # Ctrl-C / SIGTERM: stop the running trainings (they ignore SIGINT in the background)
  local p
  for p in $(jobs -rp); do
    pkill -TERM -P "$p" 2>/dev/null || true
    kill -TERM "$p" 2>/dev/null || true
  done
}
if [[ -n "${GPUS:-}" ]]; then
  IFS=',' read -r -a free_gpus <<<"$GPUS"
  declare -A pid_gpu=()  # running node -> its GPU; a node starts on a GPU that is free
  trap 'echo "train_lcpn.sh: interrupted; stopping the running node trainings" >&2; stop_jobs; wait || true; exit 130' INT TERM
  failed=""
  rm -f "$MODELS_DIR/.failed_nodes"
  for node in "${node_list[@]}"; do
    while (( ${#free_gpus[@]} == 0 )); do
      wait -n || true
      for pid in "${!pid_gpu[@]}"; do  # the GPUs of every node that has finished are free again
        if ! kill -0 "$pid" 2>/dev/null; then free_gpus+=("${pid_gpu[$pid]}"); unset "pid_gpu[$pid]"; fi
      done
    done
    gpu="${free_gpus[0]}"; free_gpus=("${free_gpus[@]:1}")
    echo "== training node '$node' on GPU $gpu"
    ( train_one "$node" "$gpu" "$@" > "$MODELS_DIR/.$node.train.log" 2>&1 || { echo "$node" >> "$MODELS_DIR/.failed_nodes"; exit 1; } ) &
    pid_gpu[$!]="$gpu"
  done
  wait || true
  if [[ -s "$MODELS_DIR/.failed_nodes" ]]; then
    failed="$(tr '\n' ' ' < "$MODELS_DIR/.failed_nodes")"; rm -f "$MODELS_DIR/.failed_nodes"
    echo "train_lcpn.sh: training failed for node(s): $failed(logs: $MODELS_DIR/.<node>.train.log)" >&2
    exit 1
  fi
else
  for node in "${node_list[@]}"; do
    echo "== training node '$node'"
    if ! train_one "$node" "" "$@"; then
      echo "train_lcpn.sh: training failed for node '$node'; fix the error above, then rerun (finished nodes are kept; rerun resumes)" >&2
      exit 1
    fi
  done
fi
echo "== trained ${#node_list[@]} model(s) in $((SECONDS - start)) s (unchanged ones kept)"

if [[ -z "${NO_EXPORT:-}" ]]; then
  echo "== exporting ONNX for fast CPU prediction"
  export_args=(--models-dir "$MODELS_DIR" --data-dir "$DATA_DIR" -q)
  if [[ -z "$force" ]]; then export_args+=(--if-stale); fi  # re-export only when a model.pth changed (or the export is missing)
  prev=""
  for a in "$@"; do  # the training's feature cache holds its int8 backbone
    if [[ "$prev" == "--cache-dir" ]]; then export_args+=(--cache-dir "$a"); fi
    if [[ "$a" == --cache-dir=* ]]; then export_args+=(--cache-dir "${a#--cache-dir=}"); fi
    prev="$a"
  done
  if ! "$PYTHON" "$here/export.py" "${export_args[@]}"; then
    echo "train_lcpn.sh: ONNX export failed; predict.py still works with --runtime torch" >&2
    exit 1
  fi
fi
