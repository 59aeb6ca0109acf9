#!/usr/bin/env bash
# Train a tiny Mamba-3 hybrid model (pattern M*M-) on the CPU: 2 processes started by torchrun,
# gloo, tensor parallel size 2, Megatron's optimizer, Megatron distributed checkpoints.
#
#   bash launch/cpu_tp2.sh                   # trains steps 1-20, saves checkpoints/cpu_tp2/iter_0000010 and iter_0000020
#   TRAIN_ITERS=40 bash launch/cpu_tp2.sh    # resumes from the latest checkpoint (step 20), trains steps 21-40
#
# Each invocation resumes from the latest checkpoint in CKPT_DIR when there is one and trains up to
# TRAIN_ITERS steps in all (a run that already reached it says so and stops). Arguments after the
# script name go to launch/train.py (`python launch/train.py --help`), e.g. `--mimo-rank 4` or
# `--hybrid-layer-pattern M-M-`. A different model needs a fresh CKPT_DIR.
#
# Environment: PYTHON (default .venv/bin/python), CKPT_DIR (default checkpoints/cpu_tp2),
# TRAIN_ITERS (default 20), SAVE_INTERVAL (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
CKPT_DIR=${CKPT_DIR:-checkpoints/cpu_tp2}
TRAIN_ITERS=${TRAIN_ITERS:-20}
SAVE_INTERVAL=${SAVE_INTERVAL:-10}
if ! [ -x "$PYTHON" ]; then
  echo "cpu_tp2.sh: no Python at $PYTHON: run the README's set-up command first, or set PYTHON=/path/to/python" >&2
  exit 1
fi

ARGS=(
  --device cpu --tensor-model-parallel-size 2 \
  --hybrid-layer-pattern 'M*M-' --hidden-size 64 --num-attention-heads 4 \
  --mamba-head-dim 16 --mamba-state-dim 32 --mamba-num-groups 1 --vocab-size 256 \
  --seq-length 128 --micro-batch-size 4 --lr 3e-3 \
  --train-iters "$TRAIN_ITERS" --log-interval 1 \
  --save "$CKPT_DIR" --save-interval "$SAVE_INTERVAL" --load "$CKPT_DIR" \
  "$@"
)
# Check the flags and the checkpoint in one process first: a mistake is one line, not torchrun's report.
WORLD_SIZE=2 "$PYTHON" launch/train.py --check-only "${ARGS[@]}" >/dev/null
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 launch/train.py "${ARGS[@]}"
