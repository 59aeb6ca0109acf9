"""Decode state of Mamba-3 mixers kept in Megatron's static inference context.

Each mixer stores its `Mamba3State` under its layer number in the context's
`key_value_memory_dict`: the prefill step (sequence_len_offset == 0) writes the state after the
prompt, each decode step reads it and writes the advanced one.
"""

from __future__ import annotations

from megatron.core.inference.contexts import BaseInferenceContext

from megatron_mamba3.ops.interface import Mamba3State


def check_context(context: BaseInferenceContext, sequence_parallel: bool) -> None:
    """Refuse contexts the mixer cannot serve, naming what is wrong."""
    if not context.is_static_batching():
        raise NotImplementedError(
            f"Mamba3Mixer decodes through Megatron's StaticInferenceContext; got {type(context).__name__} "
            "(dynamic batching is not supported)"
        )
    if sequence_parallel:
        raise ValueError("Mamba3Mixer inference needs sequence_parallel=False in the TransformerConfig")


def is_prefill(context: BaseInferenceContext) -> bool:
    return context.sequence_len_offset == 0


def load_state(context: BaseInferenceContext, layer_number: int, batch: int) -> Mamba3State:
    """The state stored by this layer's prefill; `RuntimeError` when there is none for this batch."""
    state = context.key_value_memory_dict.get(layer_number)
    if not isinstance(state, Mamba3State) or state.h.shape[0] != batch:
        raise RuntimeError(
            f"no Mamba-3 decode state of batch {batch} for layer {layer_number}: run the prefill step "
            "(sequence_len_offset == 0) with this context first"
        )
    return state


def store_state(context: BaseInferenceContext, layer_number: int, state: Mamba3State) -> None:
    context.key_value_memory_dict[layer_number] = Mamba3State(*(t.detach() for t in state))
