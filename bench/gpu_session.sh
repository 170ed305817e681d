#!/usr/bin/env bash
# Issue 27's GPU figures in one run on a lent CUDA machine: bench/gpu_check.py (every loss kind
# compiled against float64 on CUDA, the loss at 4096 x 151936 bf16, megatron-core through
# megaopsd's runtime) and bench/mfu.py at the Qwen3-1.7B shape (the old-to-default ladder and
# the plain-transformers step), each under its own time limit (together under the device tool's
# 600 s per command) so one that runs long leaves the other's log; mfu prints each rung as it
# finishes.
#
# The machine needs python3 with CUDA torch and transformers; it needs no network, no Hydra,
# vLLM, Transformer Engine or apex. megatron-core comes from a wheel in .wheels/ (git-ignored),
# fetched beforehand on a machine with network:
#
#     python -m pip download megatron-core==0.16.1 --no-deps --python-version 3.12 \
#         --only-binary=:all: -d .wheels
#     bash bench/gpu_session.sh            # logs and the RESULT lines under $OUT (default outputs/gpu_session)
#
# GPU_CHECK_ARGS and MFU_ARGS replace the two benches' arguments (defaults: none, and
# "--shape qwen3_1p7b"; add "--repeats 1" when time is short); GPU_CHECK_S / MFU_S their limits.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    wheels=(.wheels/megatron_core-0.16.1-*.whl)
    if [[ ! -e ${wheels[0]} ]]; then
        echo "gpu_session: megatron-core is not installed and no wheel is in .wheels/ (see the header of $0)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-deps "${wheels[0]}" || exit 2
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, '| transformers', transformers.__version__, '| megatron-core', m.__version__)"
} | tee "$OUT/machine.txt"

status=0
# shellcheck disable=SC2086  # the *_ARGS are lists of arguments
timeout -k 10 "${GPU_CHECK_S:-180}" "$PY" bench/gpu_check.py ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log" || status=1
# shellcheck disable=SC2086
timeout -k 10 "${MFU_S:-360}" "$PY" bench/mfu.py ${MFU_ARGS:---shape qwen3_1p7b} 2>&1 | tee "$OUT/mfu.log" || status=1
echo "--- RESULT lines"
grep -h '^RESULT' "$OUT"/gpu_check.log "$OUT"/mfu.log || true
exit $status
