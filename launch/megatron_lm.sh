#!/usr/bin/env bash
# Megatron-LM's own pretrain_hybrid.py with the Mamba-3 stack spec, on GPUs without Transformer Engine or apex.
#
#   MEGATRON_LM=/path/to/Megatron-LM [NPROC=2] [SPEC=mamba3_siso_stack_spec] [SPEC_MODULE=module] [LOG=file] \
#       bash launch/megatron_lm.sh --hybrid-layer-pattern 'M*M-' --num-layers 4 ... (model, data, optimizer flags)
#   bash launch/megatron_lm.sh --print-args     # the arguments this script adds, one per line
#
# MEGATRON_LM: a Megatron-LM checkout on branch core_r0.19.0 (the one matching megatron-core 0.19.2), or any
# folder holding its pretrain_hybrid.py, hybrid_builders.py and model_provider.py. Before training, this
# script fails loudly unless SPEC_MODULE (default megatron_mamba3.layer_specs) and its spec SPEC import there (Megatron's --spec
# import swallows an ImportError and silently trains its default Transformer Engine stack instead), and
# unless the megatron.core.datasets folder Megatron-LM will import has a Makefile (the megatron-core
# wheel ships none, and Megatron-LM's start-up runs `make -C` there and exits when make fails): where it
# has none, one is written whose only target checks that the wheel's compiled helpers_cpp is present.
# It sets CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron-LM asserts it for TP > 1) and MEGATRON_LOGGING_LEVEL=20
# (INFO, so the Mamba-3 receipts are logged), runs torchrun with NPROC processes, tees the output to LOG
# and fails unless at least one "mamba3 receipt:" line (which backend ran) appears in it.
set -euo pipefail

SPEC=${SPEC:-mamba3_siso_stack_spec}
SPEC_MODULE=${SPEC_MODULE:-megatron_mamba3.layer_specs}
# What a GPU host without Transformer Engine or apex needs (README "Megatron-LM"):
ARGS=(
    --spec "$SPEC_MODULE" "$SPEC"
    --transformer-impl local           # Megatron's own linears and attention, no TE
    --no-persist-layer-norm            # on by default; needs TE or apex
    --no-masked-softmax-fusion         # else attention imports apex's scaled_masked_softmax_cuda
    --no-gradient-accumulation-fusion  # needs TE/apex fused wgrad; the mixer refuses it at TP > 1
    --position-embedding-type none     # position comes from the Mamba layers, as in Megatron's hybrid examples
    --normalization RMSNorm
)
if [[ "${1:-}" == "--print-args" ]]; then
    printf '%s\n' "${ARGS[@]}"
    exit 0
fi

die() { echo "launch/megatron_lm.sh: $*" >&2; exit 1; }
[[ -n "${MEGATRON_LM:-}" ]] || die "set MEGATRON_LM to a Megatron-LM checkout (branch core_r0.19.0)"
[[ -f "$MEGATRON_LM/pretrain_hybrid.py" ]] || die "MEGATRON_LM=$MEGATRON_LM has no pretrain_hybrid.py"
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}
LOG=${LOG:-megatron_lm_mamba3.log}
LOG=$(realpath -m "$LOG")

cd "$MEGATRON_LM"  # imports resolve as pretrain_hybrid.py's will (the checkout's megatron/ comes first)
"$PYTHON" -c "import importlib; getattr(importlib.import_module('$SPEC_MODULE'), '$SPEC')" \
    || die "$SPEC_MODULE.$SPEC does not import from $MEGATRON_LM with $PYTHON (see the error above); Megatron would silently train its default TE stack without it"
DATASETS=$("$PYTHON" -c "import os, megatron.core.datasets as d; print(os.path.dirname(d.__file__))")
if [[ ! -f "$DATASETS/Makefile" ]]; then
    compgen -G "$DATASETS/helpers_cpp*.so" > /dev/null \
        || die "$DATASETS has neither a Makefile nor a compiled helpers_cpp: reinstall megatron-core"
    [[ -w "$DATASETS" ]] || die "$DATASETS has no Makefile (Megatron-LM runs make there) and is not writable"
    printf '%s\n' "# Written by megatron-mamba3's launch/megatron_lm.sh: the megatron-core wheel ships the compiled" \
        "# helpers_cpp extension but no Makefile, and Megatron-LM runs make here at start-up." \
        "default:" "	ls helpers_cpp*.so" > "$DATASETS/Makefile"
    echo "launch/megatron_lm.sh: wrote $DATASETS/Makefile"
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1 MEGATRON_LOGGING_LEVEL=${MEGATRON_LOGGING_LEVEL:-20}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_hybrid.py "${ARGS[@]}" "$@" 2>&1 \
    | tee "$LOG"
RECEIPTS=$(grep -c "mamba3 receipt:" "$LOG" || true)
[[ "$RECEIPTS" -gt 0 ]] || die "no Mamba-3 receipt in $LOG: the model ran no Mamba-3 layer"
echo "launch/megatron_lm.sh: $RECEIPTS Mamba-3 receipt(s) in $LOG"
