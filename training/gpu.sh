#!/usr/bin/env bash
# The long run (training/long) continued on a CUDA GPU: first a check that 3 meta-steps from
# training/long/state.pt in bfloat16 on the GPU follow the same 3 steps in float32 on the CPU
# (training/gpu_check.py, on copies of the state), then GPU_MINUTES of the real run in bf16, which
# writes state.pt and log.json back. Never needed: training/long/run.sh continues the run on any CPU.
#   bash training/gpu.sh                    (from anywhere, after the README's install)
#   REGRAD_DATA  folder holding nq_open and fictional_knowledge (default ../shared/data)
#   GPU_MINUTES  minutes of training after the check (default 10)
#   OUT          if set, the check's gpu_check.json goes there (else training/long/)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
cuda=$(python -c "import torch; print(torch.cuda.is_available(), torch.__version__)") \
    || { echo "training/gpu.sh: cannot import torch: install regrad first (README)" >&2; exit 1; }
if [ "${cuda%% *}" != True ]; then
    echo "training/gpu.sh: no CUDA GPU here (torch ${cuda#* }: torch.cuda.is_available() is False); nothing done" >&2
    exit 1
fi
minutes=${GPU_MINUTES:-10}
check=${OUT:-training/long}/gpu_check.json
echo "training/gpu.sh: 3 steps on cpu float32 against cuda bfloat16, from copies of training/long/state.pt" >&2
python training/gpu_check.py --state training/long/state.pt --steps 3 --a cpu:float32 --b cuda:bfloat16 \
    --out "$check" -- training/long/run.sh
echo "training/gpu.sh: the run continues on cuda in bfloat16 for $minutes min" >&2
# SIGTERM at the end: meta-train finishes its step, saves state.pt and log.json and exits 143
# (timeout then says 124); a step still running 5 min later is killed (state: the last save).
rc=0
timeout -s TERM -k 5m "${minutes}m" training/long/run.sh --device cuda --precision bfloat16 || rc=$?
case $rc in
    0|124|143) ;;
    *) echo "training/gpu.sh: the run ended with status $rc; training/long/state.pt holds its last save" >&2
       exit "$rc" ;;
esac
step=$(python -c "from regrad_cli.learning.train_state import read_state; print(read_state('training/long/state.pt')['step'])")
echo "training/gpu.sh: the run is at step $step; commit training/long/state.pt, training/long/log.json and the check, $check"
