#!/usr/bin/env bash
# Every 2-GPU check and measurement of issue 13 on a machine with 2 GPUs (NCCL), logs under $OUT:
#
#   bash tests/multigpu/run_all.sh checks   # 1 and 2 with the SISO spec (estimated 6-8 minutes on 2 H100s)
#   bash tests/multigpu/run_all.sh perf     # 2 with the MIMO spec, 3 and 4 (estimated 6-7 minutes)
#   bash tests/multigpu/run_all.sh          # all of it (more than one 10-minute device call)
#
#   1. tests/multigpu/tp_parity.py --tp 1 2: parity, replicated weights (CPU- and GPU-initialised), dist checkpoint
#   2. launch/megatron_lm.sh: Megatron-LM's pretrain_hybrid.py, SISO and MIMO specs, TP 2 + SP, bf16, mock data
#   3. launch/train.py --bf16 on M*M-M*M- (hidden 2048, MIMO R=4, seq 2048, micro 2): TP 1, TP 2, TP 2 + SP
#   4. benchmarks/tp_profile.py: where the TP 2 + SP step's GPU time goes
#
# It needs TileLang and megatron-core on PYTHONPATH (the device bundle of ../shared/device/README.md) and
# Megatron-LM's scripts in MEGATRON_LM (default .megatron-lm: copy ../shared/megatron-lm there and carry it).
# Each step has its own time limit (STEP_S seconds, default 240, tp_parity 360; a device call allows 10 minutes) and
# a failure does not stop the others; the exit status is 1 when any step failed. A table is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/run_all_out}
PY=${PYTHON:-python3}
STEP_S=${STEP_S:-240}
PART=${1:-all}
[[ $PART =~ ^(checks|perf|all)$ ]] || { echo "run_all.sh: part must be checks, perf or all, not '$PART'" >&2; exit 2; }
export MEGATRON_LM=${MEGATRON_LM:-$PWD/.megatron-lm}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
declare -A STATUS

step() {  # step PART NAME COMMAND...: when PART is asked for, run with the time limit, log to $OUT/NAME.log,
    local part=$1 name=$2 rc   # record pass / FAIL (rc)
    shift 2
    [[ $PART == all || $PART == "$part" || $part == setup ]] || return 0
    echo "=== $name: $*" | cut -c1-300
    timeout "$STEP_S" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    STATUS[$name]=$([[ $rc == 0 ]] && echo pass || echo "FAIL (rc $rc)")
    tail -n 3 "$OUT/$name.log"
}

# setup.py installs layer_specs/ and patches/ as megatron_mamba3.layer_specs / .patches: install it (offline).
rm -rf /tmp/proj
step setup install "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/proj .
export PYTHONPATH=/tmp/proj:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.csv" 2>&1

STEP_S=${PARITY_S:-360} step checks tp_parity "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 tests/multigpu/tp_parity.py --tp 1 2

MLM_FLAGS=(
    --hybrid-layer-pattern 'M*M-' --num-layers 4 --hidden-size 512 --ffn-hidden-size 2048 --num-attention-heads 8
    --mamba-head-dim 64 --mamba-state-dim 128 --mamba-num-groups 2 --tensor-model-parallel-size 2 --sequence-parallel
    --seq-length 1024 --max-position-embeddings 1024 --micro-batch-size 2 --global-batch-size 4 --train-iters 10 --bf16
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 3 --weight-decay 0.1 --clip-grad 1.0
    --init-method-std 0.02 --seed 1234 --log-interval 1 --eval-iters 0 --eval-interval 1000 --log-throughput
    --no-one-logger --distributed-backend nccl --mock-data --tokenizer-type NullTokenizer --vocab-size 32000
)
for variant in siso mimo; do
    SPEC=mamba3_${variant}_stack_spec LOG=$OUT/megatron_lm_${variant}_run.log \
        step "$([[ $variant == siso ]] && echo checks || echo perf)" megatron_lm_$variant bash launch/megatron_lm.sh \
        "${MLM_FLAGS[@]}"
done

TRAIN_FLAGS=(
    --device cuda --bf16 --hybrid-layer-pattern 'M*M-M*M-' --hidden-size 2048 --num-attention-heads 16
    --mamba-head-dim 64 --mamba-state-dim 128 --mamba-num-groups 8 --mimo-rank 4 --vocab-size 32768
    --seq-length 2048 --micro-batch-size 2 --lr 3e-4 --train-iters 15 --log-interval 5
)
step perf train_tp1 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 launch/train.py "${TRAIN_FLAGS[@]}"
step perf train_tp2 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 launch/train.py "${TRAIN_FLAGS[@]}"
step perf train_tp2_sp "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 launch/train.py "${TRAIN_FLAGS[@]}" \
    --sequence-parallel
step perf profile_tp2_sp "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/tp_profile.py \
    --output "$OUT/profile_tp2_sp.txt" "${TRAIN_FLAGS[@]}" --sequence-parallel

echo
echo "| step | status | result |"
echo "|---|---|---|"
failed=0
for name in install tp_parity megatron_lm_siso megatron_lm_mimo train_tp1 train_tp2 train_tp2_sp profile_tp2_sp; do
    [[ -n ${STATUS[$name]:-} ]] || continue
    case $name in
        tp_parity) result=$(grep -E "^tp_parity:" "$OUT/$name.log" | tail -1) ;;
        megatron_lm_*) result=$(grep -E "Mamba-3 receipt|iteration +10/" "$OUT/$name.log" | sed 's/  */ /g' | tail -2 | tr '\n' ' ') ;;
        train_*) result=$(grep -E "^\[train\] step 15/" "$OUT/$name.log" | tail -1) ;;
        profile_*) result=$(grep -E "^split:" "$OUT/$name.log" | tail -1) ;;
        *) result="" ;;
    esac
    echo "| $name | ${STATUS[$name]} | ${result:0:400} |"
    [[ ${STATUS[$name]} == pass ]] || failed=1
done
exit $failed
