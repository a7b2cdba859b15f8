#!/usr/bin/env bash
# One-GPU FSDP2 check (NCCL + bf16) for issues 6 and 19. Run from the repo root on a GPU machine:
#   bash bench/gpu_fsdp_check.sh            # python from $PYTHON, else .venv/bin/python, else python3
#   bash bench/gpu_fsdp_check.sh --recipes grpo,ppo --no-loop-checks    # arguments go to gpu_fsdp_check.py
# Needs torch (CUDA build) and transformers; no download, no internet. Takes well under 2 minutes
# on one H200 (a ~150M-parameter random Llama, 8+8+8+4 optimizer steps), plus one 4-step run of each of the
# 7 recipes on a ~100M random Llama (issue 19). Prints loss per step, peak GPU memory per run, one JSON line
# per recipe, and OK / FAILED at the end (exit status 0 / 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
exec timeout 540 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 bench/gpu_fsdp_check.py "$@"
