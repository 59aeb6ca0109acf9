"""`Patch`: one pinned, explicit, undo-able replacement of Megatron-Core attributes.

A patch names the attributes it replaces as (owner, attribute name, replacement) triples, built
only when it is applied (building them may refuse, naming why). `apply()` refuses
(`MegatronVersionError`) unless the installed megatron-core is the version the patch was written for,
refuses a CPU seam (the default) on a machine with CUDA unless `allow_cuda=True` (a patch meant for
CUDA machines, `for_cuda=True`, skips that check), and is idempotent; `undo()` puts the original
attributes back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

SUPPORTED_MEGATRON_CORE = "0.19.2"

logger = logging.getLogger(__name__)


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not the version a patch was written for."""


def installed_megatron_core_version() -> str:
    """The installed megatron-core release, e.g. "0.19.2".

    megatron-core appends "+<hash>" of whatever git checkout surrounds its install folder (a
    `.venv` inside a project clone gets the project's hash), so that local label is dropped."""
    from megatron.core import package_info

    return package_info.__version__.split("+", 1)[0]


def check_megatron_core_version(patch_name: str) -> None:
    """Raise `MegatronVersionError` unless megatron-core is `SUPPORTED_MEGATRON_CORE`."""
    version = installed_megatron_core_version()
    if version != SUPPORTED_MEGATRON_CORE:
        raise MegatronVersionError(
            f"patch {patch_name!r} was written for megatron-core {SUPPORTED_MEGATRON_CORE} and "
            f"refuses to touch megatron-core {version}: re-check the patched code before "
            f"raising SUPPORTED_MEGATRON_CORE"
        )


Target = tuple[object, str, object]


@dataclasses.dataclass(eq=False)
class Patch:
    """Replaces the attributes `targets()` names while applied.

    `name` identifies the patch; `reason` says which Megatron code lacks a seam; `for_cuda` marks a
    patch meant for CUDA machines (False: a CPU seam, refused where CUDA is available unless asked).
    """

    name: str
    reason: str
    targets: Callable[[], list[Target]]
    for_cuda: bool = False
    _originals: list[Target] | None = dataclasses.field(default=None, repr=False)

    @property
    def applied(self) -> bool:
        return self._originals is not None

    def apply(self, *, allow_cuda: bool = False) -> None:
        """Replace the targets (no-op when already applied).

        Raises `MegatronVersionError` on another megatron-core version, and `RuntimeError` for a CPU
        seam when CUDA is available and `allow_cuda` is False (CPU seams exist for machines without it).
        """
        if self.applied:
            return
        check_megatron_core_version(self.name)
        if not self.for_cuda and torch.cuda.is_available() and not allow_cuda:
            raise RuntimeError(
                f"patch {self.name!r} redirects CUDA-only Megatron code to the CPU and CUDA is "
                f"available here; it is not needed (pass allow_cuda=True to force it)"
            )
        targets = self.targets()
        self._originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
        for owner, attr, replacement in targets:
            setattr(owner, attr, replacement)
        logger.info("megatron_mamba3 patch applied: %s (%s)", self.name, self.reason)

    def undo(self) -> None:
        """Put the original attributes back (no-op when not applied)."""
        if self._originals is None:
            return
        for owner, attr, original in reversed(self._originals):
            setattr(owner, attr, original)
        self._originals = None
        logger.info("megatron_mamba3 patch undone: %s", self.name)
