#!/usr/bin/env bash
# Train every local classifier of the hierarchy (root 'parent' first), the flat baseline, then export
# ONNX for fast CPU prediction. Extra arguments are passed on to every train.py call.
#
#   ./train_lcpn.sh                          # default CPU recipe, offline
#   ./train_lcpn.sh --preset original        # EfficientNet-B4 fine-tuned per node (GPU)
#   GPUS=0,1,2,3 ./train_lcpn.sh --preset original        # spread nodes over 4 GPUs, one node per GPU
#   NPROC_PER_NODE=4 ./train_lcpn.sh --preset original    # each node on 4 GPUs with torchrun (DDP)
#
# Environment: PYTHON (interpreter; default: the repo's .venv if present, else python3),
# DATA_DIR / MODELS_DIR (default: <repo>/split_datasets, <repo>/trained_models),
# NO_FLAT=1 (skip the flat baseline), NO_EXPORT=1 (skip the ONNX export).
set -euo pipefail


here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "train.py flags:"
  exec "$PYTHON" "$here/train.py" --help
fi
DATA_DIR="${DATA_DIR:-$repo/split_datasets}"
MODELS_DIR="${MODELS_DIR:-$repo/trained_models}"
common=(--data-dir "$DATA_DIR" --output-dir "$MODELS_DIR")
mkdir -p "$MODELS_DIR"

if ! nodes="$("$PYTHON" "$here/train.py" --list-nodes "${common[@]}")"; then
  echo "train_lcpn.sh: cannot list the nodes to train (see the error above)" >&2
  exit 2
fi
mapfile -t node_list <<<"$nodes"
if [[ -z "${NO_FLAT:-}" ]]; then node_list+=(flat); fi

train_one() {  # node [gpu]
  local node="$1" gpu="${2:-}"; shift 2
  local cmd=("$PYTHON" "$here/train.py")
  if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" "$here/train.py")
  fi
  if [[ -n "$gpu" ]]; then
    CUDA_VISIBLE_DEVICES="$gpu" "${cmd[@]}" -d "$node" "${common[@]}" "$@"
  else
    "${cmd[@]}" -d "$node" "${common[@]}" "$@"
  fi
}

start=$SECONDS
if [[ -n "${GPUS:-}" ]]; then
  IFS=',' read -r -a gpus <<<"$GPUS"
  declare -A pid_node=()
  failed=""
  rm -f "$MODELS_DIR/.failed_nodes"
  i=0
  for node in "${node_list[@]}"; do
    while (( $(jobs -rp | wc -l) >= ${#gpus[@]} )); do wait -n || true; done
    gpu="${gpus[$(( i % ${#gpus[@]} ))]}"; i=$((i + 1))
    echo "== training node '$node' on GPU $gpu"
    ( train_one "$node" "$gpu" "$@" > "$MODELS_DIR/.$node.train.log" 2>&1 || { echo "$node" >> "$MODELS_DIR/.failed_nodes"; exit 1; } ) &
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
echo "== trained ${#node_list[@]} model(s) in $((SECONDS - start)) s"

if [[ -z "${NO_EXPORT:-}" ]]; then
  echo "== exporting ONNX for fast CPU prediction"
  export_args=(--models-dir "$MODELS_DIR" --data-dir "$DATA_DIR" -q)
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
