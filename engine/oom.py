"""Out-of-memory recovery for one step (one forward of a managed component).

On an OOM the step's partial work is dropped, the streaming slots are freed, residency is halved
and the step runs once more. If it fails again the caller gets a clear error, and the model is
left consistent (no slots, no transient bytes) so the next request can run.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from .runtime import VramRuntime

log = logging.getLogger(__name__)


class VramExhaustedError(RuntimeError):
    """The computation device ran out of memory even after lowering residency."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def recover(runtime: "VramRuntime") -> int:
    """Free what the failed step held and halve residency. Returns the new residency cap in bytes."""
    budget = runtime.budget
    for member in budget.members:
        if member.scheduler is not None:
            member.scheduler.reset()
        member.trace = None
    cap = budget.resident_bytes // 2
    budget.residency_cap_bytes = cap
    budget.replan()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return cap


def install_oom_retry(runtime: "VramRuntime") -> None:
    """Wrap the component's forward: retry once after `recover` on an out-of-memory error."""
    model = runtime.model
    forward: Callable[..., Any] = model.forward

    @functools.wraps(forward)
    def forward_with_retry(*args: Any, **kwargs: Any) -> Any:
        try:
            return forward(*args, **kwargs)
        except Exception as exc:
            if not is_oom(exc):
                raise
            runtime.stats.oom_retries += 1
            cap = recover(runtime)
            log.warning("%s: out of memory in a step; retrying once with residency capped at %.2f GB", runtime.name, cap / 1024**3)
        try:
            return forward(*args, **kwargs)
        except Exception as exc:
            if not is_oom(exc):
                raise
            recover(runtime)
            raise VramExhaustedError(
                f"{runtime.name}: out of memory on {runtime.comp_device} even after lowering residency. "
                "Lower the VRAM limit (or set it to 0), turn on FP8, or make the image smaller."
            ) from exc

    model.forward = forward_with_retry
