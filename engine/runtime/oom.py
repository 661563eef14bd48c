"""Out-of-memory recovery for one step (one entry of a managed component, see engine.runtime.entry).

On an OOM the step's partial work is dropped, the streaming slots are freed, residency is halved
and the step runs once more. If it fails again the caller gets a clear error, and the model is
left consistent (no slots, no transient bytes) so the next request can run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.runtime.member import Change

if TYPE_CHECKING:
    from engine.runtime.component import VramRuntime


class VramExhaustedError(RuntimeError):
    """The computation device ran out of memory even after lowering residency."""


# How library kernels report a failed allocation of their own workspace (cuBLAS handle or
# workspace, cuDNN), besides torch's OutOfMemoryError and the driver's "out of memory".
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in OOM_MARKERS)


def recover(runtime: "VramRuntime") -> int:
    """Tell the pool: it frees what the failed step held (every member's slots and trace) and
    halves residency (engine.runtime.pool). Returns the new residency cap in bytes."""
    runtime.pool.member_changed(runtime, Change.OUT_OF_MEMORY)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return runtime.pool.residency_cap_bytes or 0
