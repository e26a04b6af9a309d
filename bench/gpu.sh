#!/usr/bin/env bash
# The one command to run on a fresh single-GPU machine (<= 9 minutes: every step runs under
# its own `timeout`, and the limits add up to 540 s). It measures rdpt's GPU path and leaves
# the figures as JSON in OUT_DIR and in bench/results/gpu-<date>-<gpu name>/.
#
#   bench/gpu.sh OUT_DIR              # on the GPU machine, from the repository root
#   bench/gpu.sh OUT_DIR --dry-run    # anywhere: print the steps, run each bench's dry run
#
# The GPU image is expected to hold Python 3.12 and torch (2.11 cu130 when this was written)
# and nothing of rdpt's stack; the rest travels as wheels in gpu-wheels/ (git-ignored; fill it
# on a machine with network with bench/gpu_wheels.sh). They are installed with --no-deps into
# a venv that sees the system site-packages, so the preinstalled torch is the one used.
#
# Steps (log of each in OUT_DIR/<step>.log, exit codes in OUT_DIR/steps.json):
#   install    venv + wheels (--no-deps --no-index)
#   versions   python, torch, CUDA, GPU, megatron-core, deepspeed, FlashAttention import result
#   pytest     pytest -m gpu (the GPU tests; their CPU counterparts run in `make test`)
#   attention  bench/attention.py: cuDNN / flash / efficient SDPA, FlashAttention, fwd+bwd,
#              causal, B 2 H 16 S 4096 D 128
#   model      bench/model.py bench-0.7b, r 32 k 8, sdpa, eager and compiled, with
#              TORCH_LOGS=recompiles (every recompilation is logged with its reason)
#   train-z1   bench/train.py --synthetic bench-0.7b, r sampled (mean 32, k 8), ZeRO-1, with
#              the top 20 kernels of one profiled step; train-z2, train-z3: fixed r 32, k 8
#   loss       bench/loss.py at the bench shape: peak memory, unfused vs chunked
set -uo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
OUT="" DRY=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY=1 ;;
        -*) echo "unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done
[ -n "$OUT" ] || { usage >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${RDPT_GPU_WHEELS:-$ROOT/gpu-wheels}"
VENV="${RDPT_GPU_VENV:-$ROOT/.gpu-venv}"
SYS_PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT" DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
PY="$VENV/bin/python"
[ "$DRY" = 1 ] && PY="${PYTHON:-python3}"

STEPS_JSON="$OUT/steps.json"
echo "{" > "$STEPS_JSON"
step() {  # step NAME SECONDS COMMAND...: run under its own timeout, log, record the exit code
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (timeout ${limit}s): $*"
    if [ "$DRY" = 1 ]; then
        return 0
    fi
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    echo "--- $name: exit $rc after $((SECONDS - t0)) s"
    echo "  \"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - t0))}," >> "$STEPS_JSON"
}

MODEL=configs/model/bench-0.7b.yaml
TRAIN=(bench/train.py --synthetic --model "$MODEL" --seq-len 4096 --micro-batch 2 --k 8
       --steps 5 --warmup 2 --out "$OUT")

step install 40 bash -c "'$SYS_PY' -m venv --system-site-packages '$VENV' &&
    '$VENV/bin/pip' install -q --no-deps --no-index '$WHEELS'/*.whl"
step versions 20 "$PY" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
from pipeline.model.compat import megatron_version
import deepspeed
print('megatron-core', megatron_version(), 'deepspeed', deepspeed.__version__)
from pipeline.model.attention import FLASH, FLASH_IMPORT_ERRORS
print('flash attention:', FLASH.version if FLASH else None, FLASH_IMPORT_ERRORS)
"
# the files that hold GPU tests (tests/test_gpu_script.py checks this list against the suite)
GPU_TESTS=(tests/test_attention_backend.py tests/test_decode.py tests/test_eval_algorithms.py
    tests/test_model_gpu.py)
step pytest 80 "$PY" -m pytest -m gpu -q -x "${GPU_TESTS[@]}"
step attention 45 "$PY" bench/attention.py --out "$OUT"
step model 105 env TORCH_LOGS=recompiles "$PY" bench/model.py --config "$MODEL" --r 32 --k 8 \
    --backends sdpa --compile both --warmup 2 --iters 5 --out "$OUT"
step train-z1 95 "$PY" "${TRAIN[@]}" --zero 1 --r 32 --sampled-r --profile
step train-z2 60 "$PY" "${TRAIN[@]}" --zero 2 --r 32
step train-z3 60 "$PY" "${TRAIN[@]}" --zero 3 --r 32
step loss 25 "$PY" bench/loss.py --seq 4096 --hidden 2048 --vocab 65536 --chunk-tokens 2048 \
    --out "$OUT"
echo "  \"done\": true" >> "$STEPS_JSON"
echo "}" >> "$STEPS_JSON"

if [ "$DRY" = 1 ]; then  # what can run without a GPU: every bench's own dry run / help
    set -e
    "$PY" bench/attention.py --dry-run > /dev/null
    "$PY" bench/model.py --help > /dev/null
    "$PY" "${TRAIN[@]}" --zero 1 --r 32 --sampled-r --profile --dry-run > /dev/null
    "$PY" bench/loss.py --seq 4096 --hidden 2048 --vocab 65536 --dry-run > /dev/null
    "$PY" -m pytest -m gpu -q --collect-only "${GPU_TESTS[@]}" > /dev/null
    echo "dry run: every step's command is valid"
    exit 0
fi

GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo unknown)"
DEST="$ROOT/bench/results/gpu-$(date -u +%Y%m%d)-${GPU// /_}"
mkdir -p "$DEST"
cp "$OUT"/*.json "$DEST"/
echo "results: $OUT and $DEST"
