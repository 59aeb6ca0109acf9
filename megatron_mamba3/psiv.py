"""The PsiV cache gate: a scaffold that fails closed.

PsiV, a cache of the MIMO-expanded value path, is not implemented. Setting its gate to anything but
unset or "0" makes every `Mamba3Config` construction raise, so the request is never silently ignored.
"""

import os

PSIV_GATE = "MEGATRON_MAMBA3_PSIV_CACHE"


def check_psiv_gate() -> None:
    """Raise `NotImplementedError` naming the gate when `MEGATRON_MAMBA3_PSIV_CACHE` asks for PsiV."""
    value = os.environ.get(PSIV_GATE)
    if value not in (None, "0"):
        raise NotImplementedError(
            f"{PSIV_GATE}={value!r} requests the PsiV cache, which is an unimplemented scaffold; "
            f"unset it or set it to 0"
        )
