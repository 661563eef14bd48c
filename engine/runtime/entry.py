"""Entry points of a managed component: where a step starts and ends.

A component is entered through `forward` (denoisers, text encoders) or `encode`/`decode` (VAEs,
which pipelines never call through forward). `StepEntryHook` (a named hook, engine.layers.hooks)
makes the outermost entry one step: it starts the execution-order trace on the first call,
tells the component the step ended (so its scheduler prefetches the next step's first groups),
and retries once after an out-of-memory error (engine.runtime.oom).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.layers.hooks import ModelHook
from engine.runtime.oom import VramExhaustedError, is_oom, recover

if TYPE_CHECKING:
    from engine.runtime.component import VramRuntime

log = logging.getLogger(__name__)

ENTRY_HOOK = "lowvram.step"


class StepEntryHook(ModelHook):
    """The outermost forward/encode/decode of a component is one step."""

    name = ENTRY_HOOK
    methods = ("forward", "encode", "decode")

    def __init__(self, runtime: "VramRuntime"):
        self.runtime = runtime
        self.depth = 0  # nested entries (AutoencoderKL.forward calls encode and decode) are one step

    def call(self, method: str, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.depth:
            return inner(*args, **kwargs)
        self.depth += 1
        try:
            return _run_step(self.runtime, inner, args, kwargs)
        finally:
            self.depth -= 1


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
        runtime.abandon_trace()  # a partial trace is no execution order
        raise
    runtime.end_step()
    return out
