"""Entry points of a managed component: where a step starts and ends.

A component is entered through `forward` (denoisers, text encoders) or `encode`/`decode` (VAEs,
which pipelines never call through forward). The outermost entry is one step: it starts the
execution-order trace on the first call, tells the scheduler the step ended (so it prefetches the
next step's first groups), and retries once after an out-of-memory error (engine.oom).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

from engine.runtime.oom import VramExhaustedError, is_oom, recover

if TYPE_CHECKING:
    from engine.runtime.component import VramRuntime

log = logging.getLogger(__name__)

ENTRY_METHODS = ("forward", "encode", "decode")


def install_entry_points(runtime: "VramRuntime") -> None:
    model = runtime.model
    depth = [0]  # nested entries (AutoencoderKL.forward calls encode and decode) are one step
    for name in ENTRY_METHODS:
        method = getattr(model, name, None)
        if callable(method):
            setattr(model, name, _wrap(runtime, method, depth))


def _wrap(runtime: "VramRuntime", method: Callable[..., Any], depth: list[int]) -> Callable[..., Any]:
    @functools.wraps(method)
    def entry(*args: Any, **kwargs: Any) -> Any:
        if depth[0]:
            return method(*args, **kwargs)
        depth[0] += 1
        try:
            return _run_step(runtime, method, args, kwargs)
        finally:
            depth[0] -= 1

    return entry


def _run_step(runtime: "VramRuntime", method: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    try:
        return _traced(runtime, method, args, kwargs)
    except Exception as exc:
        if not is_oom(exc):
            raise
        runtime.stats.oom_retries += 1
        cap = recover(runtime)
        log.warning("%s: out of memory in a step; retrying once with residency capped at %.2f GB", runtime.name, cap / 1024**3)
    try:
        return _traced(runtime, method, args, kwargs)
    except Exception as exc:
        if not is_oom(exc):
            raise
        recover(runtime)
        raise VramExhaustedError(
            f"{runtime.name}: out of memory on {runtime.comp_device} even after lowering residency. "
            "Lower the VRAM limit (or set it to 0), turn on FP8, or make the image smaller."
        ) from exc


def _traced(runtime: "VramRuntime", method: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    runtime.begin_step()
    try:
        out = method(*args, **kwargs)
    except BaseException:
        runtime.trace = None  # a partial trace is no execution order
        raise
    runtime.end_step()
    return out
