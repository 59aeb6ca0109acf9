#!/usr/bin/env bash
# Train a Mamba-3 hybrid model (pattern M*M-M*M-, hidden 2048) on one host with 8 GPUs: 8 processes
# started by torchrun, NCCL, tensor parallel size 8 with sequence parallelism. No CPU patch is
# applied on CUDA; the stack spec's own final norm stands in for TENorm (Transformer Engine is not
# needed). The Mamba-3 scan backend is chosen automatically (TileLang where it runs, else the
# reference); set MEGATRON_MAMBA3_BACKEND or pass --mamba3-backend to force one.
#
#   bash launch/h200x8_tp8.sh                    # trains steps 1-100, saves checkpoints/h200x8_tp8/iter_0000050, iter_0000100
#   TRAIN_ITERS=200 bash launch/h200x8_tp8.sh    # resumes from the latest checkpoint and trains to step 200
#                                                # (the cosine schedule keeps the first run's length: min-lr after step 100)
#
# Arguments after the script name go to launch/train.py. Environment: PYTHON (default
# .venv/bin/python), CKPT_DIR (default checkpoints/h200x8_tp8), TRAIN_ITERS (default 100),
# SAVE_INTERVAL (default 50). The multicast / NVLink-SHARP paths stay off (below): they are not
# usable on the lent H200 hosts.
set -euo pipefail
cd "$(dirname "$0")/.."

export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1

PYTHON=${PYTHON:-.venv/bin/python}
CKPT_DIR=${CKPT_DIR:-checkpoints/h200x8_tp8}
TRAIN_ITERS=${TRAIN_ITERS:-100}
SAVE_INTERVAL=${SAVE_INTERVAL:-50}
if ! [ -x "$PYTHON" ]; then
  echo "h200x8_tp8.sh: no Python at $PYTHON: run the README's set-up command first, or set PYTHON=/path/to/python" >&2
  exit 1
fi

ARGS=(
  --device cuda --tensor-model-parallel-size 8 --sequence-parallel \
  --hybrid-layer-pattern 'M*M-M*M-' --hidden-size 2048 --num-attention-heads 16 \
  --mamba-head-dim 64 --mamba-state-dim 128 --mamba-num-groups 8 --vocab-size 32768 \
  --seq-length 2048 --micro-batch-size 2 --lr 3e-4 --lr-warmup-iters 10 --lr-decay-style cosine --min-lr 3e-5 \
  --train-iters "$TRAIN_ITERS" --log-interval 10 \
  --save "$CKPT_DIR" --save-interval "$SAVE_INTERVAL" --load "$CKPT_DIR" \
  "$@"
)
# Check the flags and the checkpoint in one process first: a mistake is one line, not torchrun's report.
WORLD_SIZE=8 "$PYTHON" launch/train.py --check-only "${ARGS[@]}" >/dev/null
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 8 launch/train.py "${ARGS[@]}"
