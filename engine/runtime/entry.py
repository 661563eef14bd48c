"""Entry points of a managed component: where a step starts and ends.

A component is entered through `forward` (denoisers, text encoders) or `encode`/`decode` (VAEs,
which pipelines never call through forward). `StepEntryHook` (a named hook, engine.layers.hooks)
makes the outermost entry one step: it starts the execution-order trace on the first call,
tells the component the step ended (so its scheduler prefetches the next step's first groups),
and after an out-of-memory error retries under plans with a lower peak (engine.runtime.oom).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.layers.hooks import ModelHook
import torch

from engine.runtime.oom import (
    VramExhaustedError,
    batch_size,
    chunked_attention,
    exhausted_message,
    free_failed_step,
    is_oom,
    next_relief,
)

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
    """Run one step; on an out-of-memory error leave the `except` block, free the failed step,
    and retry under a plan with a lower peak (engine.runtime.oom), until one succeeds or nothing
    can lower it: then VramExhaustedError at once, naming the settings that would fit."""
    used: set[str] = set()
    tried: list[str] = []
    had_resident = runtime.ledger.resident_bytes > 0
    while True:
        failed = ""
        try:
            with chunked_attention(runtime.attention_chunks):
                return _chunked(runtime, method, args, kwargs)
        except Exception as exc:
            if not is_oom(exc):
                raise
            failed = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        # outside the except block: the exception, its traceback and the frames that held the
        # failed step's activations are gone, so the collector and empty_cache can free them
        free_failed_step(runtime)
        relief = next_relief(runtime, args, kwargs, used)
        if relief is None:
            raise VramExhaustedError(exhausted_message(runtime, tried, had_resident) + f" ({failed})")
        used.add(relief.name)
        tried.append(relief.name)
        relief.apply()
        runtime.stats.oom_retries += 1
        log.warning("%s: out of memory in a step (%s); retrying with %s", runtime.name, failed, relief.name)


def _chunked(runtime: "VramRuntime", method: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The step, or, after the "batch split" relief, one step per part of its batch (each a step
    of its own: traced and prefetched as one), outputs joined along the batch."""
    chunks = runtime.batch_chunks
    batch = batch_size(args, kwargs)
    if chunks <= 1 or batch <= 1:
        return _traced(runtime, method, args, kwargs)
    parts = [_traced(runtime, method, a, k) for a, k in split_batch(args, kwargs, batch, chunks)]
    return join_batch(parts)


def split_batch(args: tuple, kwargs: dict, batch: int, chunks: int) -> list[tuple[tuple, dict]]:
    """The step's inputs cut into `chunks` parts along dim 0: every tensor whose dim 0 is the
    batch is cut; anything else (a scalar timestep, position ids, flags) goes to every part."""
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in torch.arange(batch).chunk(chunks)]

    def cut(value: Any, lo: int, hi: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            return value[lo:hi]
        return value

    return [(tuple(cut(a, lo, hi) for a in args), {k: cut(v, lo, hi) for k, v in kwargs.items()}) for lo, hi in bounds]


def join_batch(parts: list[Any]) -> Any:
    """The parts' outputs joined along dim 0: tensors, tuples/lists of them, and dict-like
    outputs (diffusers' BaseOutput) field by field; anything else is the first part's."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0) if first.dim() >= 1 else first
    if isinstance(first, (tuple, list)):
        joined = [join_batch([p[i] for p in parts]) for i in range(len(first))]
        return type(first)(joined) if not hasattr(first, "_fields") else type(first)(*joined)
    if isinstance(first, dict):
        return type(first)(**{k: join_batch([p[k] for p in parts]) for k in first})
    return first


def _traced(runtime: "VramRuntime", method: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    runtime.begin_step()
    try:
        out = method(*args, **kwargs)
    except BaseException:
        runtime.abandon_trace()  # a partial trace is no execution order
        raise
    runtime.end_step()
    return out
