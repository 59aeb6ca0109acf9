"""Train a Mamba-3 hybrid language model on megatron-core alone (no Megatron-LM needed).

One process per tensor- x context-parallel rank (data-parallel size 1), started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 launch/train.py \\
        --hybrid-layer-pattern 'M*M-' --train-iters 20 --save ckpt --load ckpt

(`python launch/train.py ...` alone runs one process.) The model is Megatron's `HybridModel` with
`megatron_mamba3.layer_specs.mamba3_stack_spec` (M: Mamba-3, *: attention, -: MLP, E: MoE). On a
machine without CUDA it uses gloo and applies `megatron_mamba3.patches.apply_cpu_patches()`; with
CUDA it uses NCCL and applies `apply_cuda_patches()` (the optimizer's multi-tensor ops as
`torch._foreach_*` calls where megatron-core lacks Transformer Engine and apex). The optimizer is
Megatron's (`get_megatron_optimizer`, Adam; fp32 parameters, or with --bf16 bf16 parameters and
activations with fp32 master weights; torch's fused Adam where Megatron falls back to torch's, see
`fused_adam.py`) with Megatron's learning-rate scheduler (warm-up, then constant, linear or cosine).
Checkpoints are Megatron distributed checkpoints of model and optimizer, written atomically (see
`checkpoints.py`). Tokens are synthetic or read from a memory-mapped file (see `token_data.py`) and
depend only on the step, so a resumed run repeats the uninterrupted run's losses exactly (CPU, same
settings). Every bad flag or combination is refused up front, naming it, in one line on rank 0
(`preflight.py`; `--check-only` stops there); start-up notes that do not apply are dropped (`quiet.py`).

Rank 0 prints one progress line every `--log-interval` steps:

    step 12/20 | loss 2.315617 | 5866 tokens/s | step 87.3 ms | elapsed 1s | ETA 1s | lr 3.00e-03 | grad norm 0.412 | mamba3 reference/chunked float32 x2 layers

(`tokens/s` and `step` are averaged over the interval, `elapsed` counts from this run's first step
and `ETA` extrapolates its mean step time to --train-iters; on CUDA a `peak mem` field follows the grad norm; the last field is the Mamba-3 receipt: the
backend and kernel variant that ran ("+prep" where the kernels also ran the layer's prep; in parentheses the
kernel path, where the backend has more than one: TileLang's forward "chunk_walk" or "chunk-parallel"), the
dtype and the number of M layers that reported it; with --cuda-graph, once the layers replay their graphs, the
receipts of their capture followed by "(CUDA graph replay)".)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fused_adam
import layer_times
import lr_schedule
import main_grads
import preflight
import quiet

MODEL_ARGS = (
    "hybrid_layer_pattern", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_experts", "moe_router_topk",
    "mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "mimo_rank", "rope_fraction", "outproj_norm",
    "vocab_size", "transformer_impl",
)
LAYER_SYMBOLS = "M*-E"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = preflight.OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--hybrid-layer-pattern", default="M*M-",
                       help="one symbol per layer: M Mamba-3, * self-attention, - MLP, E MoE (CUDA only)")
    model.add_argument("--hidden-size", type=int, default=64)
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP width (default 4 x hidden size)")
    model.add_argument("--num-experts", type=int, default=None, help="experts of each E layer (needed for E)")
    model.add_argument("--moe-router-topk", type=int, default=2)
    model.add_argument("--mamba-head-dim", type=int, default=16, help="Mamba-3 head dim p")
    model.add_argument("--mamba-state-dim", type=int, default=32, help="Mamba-3 state size n")
    model.add_argument("--mamba-num-groups", type=int, default=1, help="Mamba-3 B/C groups g")
    model.add_argument("--mimo-rank", type=int, default=1, help="1 = SISO, > 1 = MIMO rank R")
    model.add_argument("--rope-fraction", type=float, default=0.5, choices=(0.5, 1.0))
    model.add_argument("--chunk-size", type=int, default=None, help="scan chunk (default 64 SISO, 16 MIMO)")
    model.add_argument("--outproj-norm", action="store_true", help="gated RMSNorm before out_proj")
    model.add_argument("--mamba3-backend", default=None,
                       help="auto, reference, tilelang or xla (default: MEGATRON_MAMBA3_BACKEND, else auto)")
    model.add_argument("--vocab-size", type=int, default=256, help="must be divisible by the TP size")
    model.add_argument("--transformer-impl", default="local", choices=("local", "transformer_engine"))
    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=None,
                          help="TP size; must equal the number of processes (default: the number of processes)")
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument("--context-parallel-size", type=int, default=1,
                          help="CP size: each sequence split over this many ranks (processes = TP x CP); attention "
                               "layers need --transformer-impl transformer_engine")
    data = parser.add_argument_group("data")
    data.add_argument("--seq-length", type=int, default=128)
    data.add_argument("--micro-batch-size", type=int, default=4)
    data.add_argument("--data-path", default=None,
                      help="memory-mapped 1-D integer .npy token file (default: synthetic Markov-chain tokens)")
    data.add_argument("--doc-ids-path", default=None,
                      help=".npy document id per token of --data-path: pack each window's documents (THD, "
                           "micro-batch 1; patterns without attention on the local implementation)")
    data.add_argument("--seed", type=int, default=1234, help="initialization and synthetic-data seed")
    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    optim.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    optim.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warm-up steps from 0 to --lr")
    optim.add_argument("--lr-decay-style", default="constant", choices=("constant", "linear", "cosine"))
    optim.add_argument("--lr-decay-iters", type=int, default=None,
                       help="steps from --lr to --min-lr (default: --train-iters, on a resume too; see lr_schedule.py)")
    optim.add_argument("--weight-decay", type=float, default=0.01)
    optim.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    optim.add_argument("--adam-beta1", type=float, default=0.9)
    optim.add_argument("--adam-beta2", type=float, default=0.95)
    lr_schedule.add_arguments(optim)
    train = parser.add_argument_group("training and checkpoints")
    train.add_argument("--train-iters", type=int, default=20, help="total steps, counting those before a resume")
    train.add_argument("--log-interval", type=int, default=1)
    train.add_argument("--save", default=None, help="checkpoint root to save into")
    train.add_argument("--save-interval", type=int, default=None, help="also save every N steps (always at the end)")
    train.add_argument("--load", default=None, help="checkpoint root to resume from (its latest; none there: start at 0)")
    train.add_argument("--ckpt-step", type=int, default=None, help="resume from this step instead of the latest")
    train.add_argument("--no-checkpoint-checksums", action="store_true",
                       help="check only the file sizes of the checkpoint to resume, not their checksums (very large ones)")
    train.add_argument("--metrics-file", default=None, help="rank 0 appends one JSON line per step (full-precision loss)")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    train.add_argument("--check-only", action="store_true",
                       help="check the flags (for WORLD_SIZE processes) and the checkpoint to resume, then exit")
    train.add_argument("--bf16", action="store_true",
                       help="bf16 parameters and activations (Megatron's Float16Module) with fp32 master weights in "
                            "the optimizer; CUDA only. The TileLang backend runs on bf16 activations only")
    train.add_argument("--layer-times", action="store_true",
                       help=f"at the end, print each layer kind's forward and backward ms per step and share of the "
                            f"step time, over the steps after a run's first {layer_times.WARMUP} (see layer_times.py)")
    train.add_argument("--cuda-graph", action="store_true",
                       help="capture each layer's forward and backward in CUDA graphs after Megatron's warm-up steps "
                            "(cuda_graph_impl='local', whole layers) and replay them: no host work per layer after "
                            "that. CUDA only; fixed shapes (no --doc-ids-path, MoE or context parallelism); not with "
                            "--layer-times, whose hooks the graphs skip")
    args = parser.parse_args(argv)

    pattern = args.hybrid_layer_pattern
    if not pattern or set(pattern) - set(LAYER_SYMBOLS):
        parser.error(f"--hybrid-layer-pattern {pattern!r}: use the symbols {LAYER_SYMBOLS!r} only "
                     f"(no '|' pipeline stages or '/' MTP: this entry has neither)")
    if "E" in pattern and args.num_experts is None:
        parser.error(f"--hybrid-layer-pattern {pattern!r} has MoE layers (E): give --num-experts")
    for name in ("train_iters", "log_interval", "seq_length", "micro_batch_size", "hidden_size", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.lr_warmup_iters < lr_schedule.decay_iters(args):
        parser.error(f"--lr-warmup-iters {args.lr_warmup_iters} must be >= 0 and below the decay length {lr_schedule.decay_iters(args)}")
    if not 0 <= args.min_lr <= args.lr:
        parser.error(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    if args.save_interval is not None and args.save_interval < 1:
        parser.error(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.save_interval is not None and args.save is None:
        parser.error("--save-interval needs --save")
    if args.ckpt_step is not None and args.load is None:
        parser.error("--ckpt-step needs --load")
    if args.doc_ids_path is not None and args.data_path is None:
        parser.error("--doc-ids-path needs --data-path")
    if args.doc_ids_path is not None and "*" in pattern and args.transformer_impl == "local":
        parser.error("packed documents (--doc-ids-path) reach attention layers as THD, which Megatron's local "
                     "DotProductAttention refuses: use a pattern without '*' or --transformer-impl transformer_engine")
    check_context_parallel(parser, args)
    check_cuda_graph(parser, args)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 needs --device cuda: Megatron's mixed-precision optimizer keeps its state on CUDA")
    if args.device == "cpu" and "E" in pattern:
        parser.error("MoE layers (E) need CUDA: megatron-core 0.19.2's router moves its weights to the GPU")
    return args


def check_context_parallel(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything starts, the --context-parallel-size settings that cannot run."""
    cp = args.context_parallel_size
    if cp < 1:
        parser.error(f"--context-parallel-size must be >= 1, got {cp}")
    if cp == 1:
        return
    if args.seq_length % (2 * cp):
        parser.error(f"--context-parallel-size {cp} cuts each sequence into 2 x {cp} pieces: --seq-length "
                     f"{args.seq_length} must be divisible by {2 * cp}")
    if "*" in args.hybrid_layer_pattern and args.transformer_impl == "local":
        parser.error(f"--context-parallel-size {cp}: Megatron's local attention refuses context parallelism; use a "
                     "pattern without '*' or --transformer-impl transformer_engine")
    if "*" in args.hybrid_layer_pattern and args.doc_ids_path is not None:
        parser.error(f"--context-parallel-size {cp} with packed documents: TE attention splits each document over the "
                     "CP ranks, the Mamba-3 layers split the whole row; use a pattern without '*'")


def check_cuda_graph(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse --cuda-graph with what a captured layer cannot replay: shapes or values that change from step to
    step on the host (packed documents' cu_seqlens and longest document, MoE routing, context parallelism's
    piece exchange), and --layer-times, whose module and tensor hooks replay skips."""
    if not args.cuda_graph:
        return
    refused = {
        "--layer-times": args.layer_times,
        "--doc-ids-path": args.doc_ids_path is not None,
        "MoE layers (E)": "E" in args.hybrid_layer_pattern,
        f"--context-parallel-size {args.context_parallel_size}": args.context_parallel_size > 1,
    }
    for name, given in refused.items():
        if given:
            parser.error(f"--cuda-graph cannot be combined with {name}")


def init_distributed(args: argparse.Namespace) -> None:
    """Join the torchrun process group (or make a one-process group when started without torchrun)
    and build Megatron's model-parallel groups: TP x CP = world size, DP = 1."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tp = args.tensor_model_parallel_size  # TP x CP checked against the process count by preflight.check_up_front
    cp = args.context_parallel_size
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mamba3.patches import apply_cpu_patches, apply_cuda_patches
    args.patches = [patch.name for patch in (apply_cpu_patches() if args.device == "cpu" else apply_cuda_patches())]
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    torch.manual_seed(args.seed)
    # --cuda-graph: the RNG tracker Megatron's CUDA graphs accept, made anew (a tracker made earlier would stay)
    model_parallel_cuda_manual_seed(args.seed, use_cudagraphable_rng=args.cuda_graph, force_reset_rng=args.cuda_graph)


def build_model(args: argparse.Namespace):
    """HybridModel with the Mamba-3 stack spec, fp32 parameters (bf16 with --bf16), built on the training device (the
    Megatron layers initialize there; the rest is moved)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig

    from megatron_mamba3.layer_specs import mamba3_stack_spec

    tp = args.tensor_model_parallel_size
    config = TransformerConfig(
        num_layers=len(args.hybrid_layer_pattern),
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        mamba_head_dim=args.mamba_head_dim,
        mamba_state_dim=args.mamba_state_dim,
        mamba_num_groups=args.mamba_num_groups,
        tensor_model_parallel_size=tp,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel and tp > 1,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=args.device == "cpu",
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        cuda_graph_impl="local" if args.cuda_graph else "none",  # whole layers (cuda_graph_modules empty)
    )
    spec = mamba3_stack_spec(
        transformer_engine=args.transformer_impl == "transformer_engine",
        backend=args.mamba3_backend,
        mimo_rank=args.mimo_rank,
        rope_fraction=args.rope_fraction,
        chunk_size=args.chunk_size,
        is_outproj_norm=args.outproj_norm,
    )
    model = HybridModel(
        config,
        spec,
        vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length,
        hybrid_layer_pattern=args.hybrid_layer_pattern,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    if args.device == "cuda":
        model.cuda()
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)  # every parameter bf16, the Mamba-3 ones included
    return model


def build_optimizer(args: argparse.Namespace, model):
    """(model wrapped for Megatron's optimizer and grad finalization, Megatron's optimizer, its
    learning-rate and weight-decay scheduler)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class OneReplica(_BaseDataParallel):
        """Megatron's data-parallel interface for a single replica: nothing to reduce across
        replicas; gradient sync only sums over the CP ranks, and gradients stay in `param.grad` (with
        CUDA graphs, in `param.main_grad`: launch/main_grads.py)."""

        def __init__(self, config, module):
            super().__init__(config=config, module=module)
            self.ddp_config = DistributedDataParallelConfig()
            # Megatron's CUDA graphs add the captured layers' weight gradients into param.main_grad
            self.grad_buffers = main_grads.attach_main_grads(module) if config.cuda_graph_impl == "local" else []

        def zero_grad_buffer(self) -> None:
            if self.grad_buffers:
                torch._foreach_zero_(self.grad_buffers)

        def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
            sum_over_context_parallel(self.module)

    wrapped = OneReplica(model.config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
            bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        ),
        [wrapped],
    )
    fused_adam.use_fused_adam(optimizer)  # megatron-core's torch Adam fallback: one fused pass per step
    decay = lr_schedule.decay_iters(args)
    scheduler = OptimizerParamScheduler(  # the settings are final here (a resume resolved them): they win on load
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
    return wrapped, optimizer, scheduler


def sum_over_context_parallel(model) -> None:
    """Sum the parameter gradients over the CP group: each CP rank saw its own pieces of the sequences."""
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group()
    if group.size() > 1:
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)


def context_parallel_batch(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, seq_length + 1) tokens -> this CP rank's (inputs, labels): its two pieces of each sequence
    in Megatron's layout (`megatron_mamba3.context_parallel.local_part`)."""
    from megatron.core import parallel_state

    from megatron_mamba3.context_parallel import local_part

    cp, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    return local_part(tokens[:, :-1], cp, rank, dim=1), local_part(tokens[:, 1:], cp, rank, dim=1)


def build_data(args: argparse.Namespace):
    from token_data import SyntheticTokens, TokenFile

    if args.data_path is None:
        return SyntheticTokens(args.vocab_size, args.micro_batch_size, args.seq_length, args.seed)
    return TokenFile(args.data_path, args.vocab_size, args.micro_batch_size, args.seq_length, args.doc_ids_path)


def receipt_summary() -> str:
    """The Mamba-3 forward receipts since the last call, e.g. "reference/chunked float32 x2 layers"."""
    from megatron_mamba3 import clear_receipts, receipts

    kinds: dict[tuple, set] = {}
    for receipt in receipts():
        if receipt.step_kind == "forward":
            variant = receipt.variant + ("+prep" if receipt.fused_prep else "") + (f" ({receipt.path})" if receipt.path else "")
            kinds.setdefault((receipt.backend, variant, receipt.dtype), set()).add(receipt.layer)
    clear_receipts()
    if not kinds:
        return "none"
    return ", ".join(
        f"{backend}/{variant} {str(dtype).removeprefix('torch.')} x{len(layers)} layers"
        for (backend, variant, dtype), layers in sorted(kinds.items())
    )


def checkpoint_to_resume(args: argparse.Namespace):
    """The checkpoint folder --load / --ckpt-step ask for (None: start at step 0). Raises SystemExit
    when it was trained with other model settings, before anything is built."""
    from checkpoints import find_checkpoint, read_train_state
    from integrity import verify

    if args.load is None:
        return None
    try:
        folder = find_checkpoint(args.load, args.ckpt_step)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    if folder is None:
        log(f"no checkpoint under {args.load}: starting at step 0")
        return None
    verify(folder, checksums=not args.no_checkpoint_checksums)
    state = read_train_state(folder)
    saved = state["args"]
    changed = {name: (saved.get(name), getattr(args, name)) for name in MODEL_ARGS if saved.get(name) != getattr(args, name)}
    if changed:
        raise SystemExit(f"{folder} was trained with other model settings (saved, now): {changed}")
    note = lr_schedule.resolve_schedule(args, state["scheduler"], folder)
    if note:
        log(note)
    return folder


def resume(folder, model, optimizer, scheduler) -> int:
    """Load model, optimizer and scheduler state from `folder`; return the step to continue from."""
    from checkpoints import load_checkpoint, read_train_state

    state = read_train_state(folder)
    saved = state["scheduler"]
    lr_schedule.set_group_lrs(optimizer, saved["max_lr"], saved["min_lr"])  # the keys its groups were saved under
    load_checkpoint(folder, model, optimizer)
    lr_schedule.set_group_lrs(optimizer, scheduler.max_lr, scheduler.min_lr)
    scheduler.load_state_dict(saved)
    log(f"resumed from {folder} at step {state['iteration']}")
    return state["iteration"]


def lock_checkpoint_root(args: argparse.Namespace):
    """Rank 0 holds the lock of the --save root for this run's life (the open file it returns);
    every rank stops, naming the holder, when another run holds it."""
    from integrity import try_lock

    held = try_lock(Path(args.save)) if dist.get_rank() == 0 else None
    message = [held if isinstance(held, str) else None]
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise SystemExit(message[0])
    return held


def log(message: str) -> None:
    if preflight.is_rank_zero():
        print(f"[train] {message}", flush=True)


def clock(seconds: float) -> str:
    """A duration as "1h02m03s" / "2m03s" / "3s"."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def train_step(wrapped, optimizer, tokens: torch.Tensor, packed) -> tuple[torch.Tensor, bool, float]:
    """Forward, backward, gradient finalization and optimizer step on `tokens` (b, l + 1; inputs and
    shifted labels of whole sequences: each CP rank takes its part) -> (mean loss, whether the
    optimizer applied the step, gradient norm)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core import parallel_state

    optimizer.zero_grad()
    wrapped.zero_grad_buffer()
    inputs, labels = context_parallel_batch(tokens)
    losses = wrapped(inputs, None, None, labels=labels, packed_seq_params=packed)
    # The step's loss is the mean over the CP ranks' equal parts; their gradients are summed.
    loss = losses.float().mean() / parallel_state.get_context_parallel_world_size()
    loss.backward()
    if wrapped.config.cuda_graph_impl == "local":  # as Megatron's schedules do after a step's forward and backward:
        from megatron.core.transformer.cuda_graphs import create_cudagraphs

        create_cudagraphs()  # captures the graphs its layers recorded (once, after their warm-up steps)
    dist.all_reduce(loss.detach(), group=parallel_state.get_context_parallel_group())
    finalize_model_grads([wrapped])
    updated, grad_norm, _ = optimizer.step()
    return loss, updated, grad_norm


def train(args: argparse.Namespace, folder) -> None:
    """Train from step 0, or from the checkpoint `folder` (see `checkpoint_to_resume`)."""
    from checkpoints import save_checkpoint
    from megatron.core.packed_seq_params import PackedSeqParams

    lock = lock_checkpoint_root(args) if args.save else None  # noqa: F841  (held until the process ends)
    data = build_data(args)
    model = build_model(args)
    wrapped, optimizer, scheduler = build_optimizer(args, model)
    start = 0 if folder is None else resume(folder, model, optimizer, scheduler)
    timer = layer_times.LayerTimes(layer_times.hybrid_layers(model), args.device == "cuda",
                                   range(start + 1, args.train_iters + 1)) if args.layer_times else None
    params = sum(p.numel() for p in model.parameters())
    log(f"HybridModel {args.hybrid_layer_pattern!r} hidden {args.hidden_size} vocab {args.vocab_size} | "
        f"{params} parameters on each of {args.tensor_model_parallel_size} TP ranks "
        f"(sequence parallel {model.config.sequence_parallel}) | device {args.device} | "
        f"patches {', '.join(args.patches) or 'none'} | data {type(data).__name__}")
    if start >= args.train_iters:
        log(f"the checkpoint is at step {start}, which already reaches --train-iters {args.train_iters}: nothing to do")
        return

    device = torch.device(args.device)
    tokens_per_step = args.micro_batch_size * args.seq_length
    metrics = open(args.metrics_file, "a") if args.metrics_file and dist.get_rank() == 0 else None
    interval_time, interval_steps = 0.0, 0
    run_began = time.perf_counter()
    receipt_summary()  # start the first interval's receipts afresh
    last_ran = "none"  # the last interval's receipts that were not empty
    for step in range(start, args.train_iters):
        began = time.perf_counter()
        batch = data.batch(step)
        tokens = batch.tokens.to(device)
        packed = None
        if batch.cu_seqlens is not None:
            cu_seqlens = batch.cu_seqlens.to(device)
            longest = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                     max_seqlen_q=longest, max_seqlen_kv=longest)
        lr = optimizer.param_groups[0]["lr"]
        loss, updated, grad_norm = train_step(wrapped, optimizer, tokens, packed)
        if not updated:
            raise RuntimeError(f"the optimizer skipped step {step + 1}")
        scheduler.step(increment=1)
        loss_value = loss.item()
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - began
        interval_time, interval_steps = interval_time + elapsed, interval_steps + 1
        if timer:
            timer.end_step(elapsed)
        if metrics:
            metrics.write(json.dumps({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                                      "step_time_s": elapsed, "tokens_per_s": tokens_per_step / elapsed}) + "\n")
            metrics.flush()
        if (step + 1) % args.log_interval == 0 or step + 1 == args.train_iters:
            mean = interval_time / interval_steps
            memory = f" | peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if args.device == "cuda" else ""
            elapsed_run = time.perf_counter() - run_began
            eta = elapsed_run / (step + 1 - start) * (args.train_iters - step - 1)
            ran = receipt_summary()
            if ran != "none":
                last_ran = ran
            elif args.cuda_graph:  # replayed layers run no Python and record nothing: what their capture ran
                ran = f"{last_ran} (CUDA graph replay)"
            log(f"step {step + 1}/{args.train_iters} | loss {loss_value:.6f} | {tokens_per_step / mean:.0f} tokens/s | "
                f"step {mean * 1e3:.1f} ms | elapsed {clock(elapsed_run)} | ETA {clock(eta)} | lr {lr:.2e} | grad norm {float(grad_norm):.3f}{memory} | mamba3 {ran}")
            interval_time, interval_steps = 0.0, 0
        if args.save and (step + 1 == args.train_iters or (args.save_interval and (step + 1) % args.save_interval == 0)):
            train_state = {"args": vars(args), "scheduler": scheduler.state_dict()}
            folder = save_checkpoint(args.save, step + 1, model, optimizer, train_state)
            log(f"saved {folder}")
    if metrics:
        metrics.close()
    for line in timer.table() if timer else ():
        log(line)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet.quiet_notes(on_cuda=args.device == "cuda")
    preflight.report_project_errors(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    preflight.check_up_front(args)
    folder = checkpoint_to_resume(args)
    if args.check_only:
        if args.save:  # another run saving there now is refused here already
            from integrity import check_unlocked

            check_unlocked(Path(args.save))
        return
    with quiet.without_gloo_connected_lines():
        init_distributed(args)
    try:
        train(args, folder)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
