"""Out-of-memory recovery for one step (one entry of a managed component, see engine.runtime.entry).

A retry must be able to succeed, so it runs a plan with a lower peak, never the same one again:

1. The failed step is left first: the exception and its traceback (whose frames hold the step's
   activations) are dropped, the scheduler's slots and the partial trace freed, the garbage
   collected, then the caching allocator's free blocks given back (`free_failed_step`). Done
   inside the `except` block, `empty_cache()` could not free the activations the traceback holds.
2. The next relief not yet used is applied (`next_relief`), in this order: fewer prefetch slots,
   half the resident layers, the batch split in two (a batched CFG's two halves run one after the
   other), sliced attention (a UNet's `set_attention_slice`) or chunked attention (the queries of
   every attention call in parts: `chunked_attention`), a tiled VAE. Each lowers the peak; each
   is used once per step.
3. When none is left, the step stops at once with `VramExhaustedError`, whose message names the
   settings that would fit (`exhausted_message`).

The reliefs stay in force for the next steps (the pool's caps until the limit is set again).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.runtime.cuda_facts import OOM_ERRORS
from engine.runtime.member import Change

if TYPE_CHECKING:
    from engine.runtime.component import VramRuntime

GB = 1024**3


class VramExhaustedError(RuntimeError):
    """The computation device ran out of memory and no retry could lower the peak further."""


# How library kernels report a failed allocation of their own workspace (cuBLAS handle or
# workspace, cuDNN), besides torch's OutOfMemoryError and the driver's "out of memory".
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_oom(exc: BaseException) -> bool:
    """torch's out-of-memory error (resolved portably: engine.runtime.cuda_facts), or a library's."""
    if OOM_ERRORS and isinstance(exc, OOM_ERRORS):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in OOM_MARKERS)


def free_failed_step(runtime: "VramRuntime") -> None:
    """Call outside the `except` block, once the exception is dropped: the pool frees what the
    failed step held (every member's slots and trace), the collector the step's activations,
    then the caching allocator returns its free blocks to the driver."""
    runtime.pool.member_changed(runtime, Change.OUT_OF_MEMORY)
    gc.collect()
    device = runtime.comp_device
    if isinstance(device, torch.device) and device.type == "cuda" and torch.cuda.is_available():
        from engine.runtime.cuda_facts import empty_cache

        empty_cache(device)


@dataclass(frozen=True)
class Relief:
    """One way to lower a step's peak: its name (the log and the message say it) and how."""

    name: str
    apply: Callable[[], None]


def batch_size(args: tuple, kwargs: dict) -> int:
    """The batch of a step: dim 0 of its first tensor input with a dimension (1 when none)."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return 1


def next_relief(runtime: "VramRuntime", args: tuple, kwargs: dict, used: set[str]) -> Relief | None:
    """The first relief that lowers this step's peak and was not used in this step yet."""
    for relief in _reliefs(runtime, args, kwargs):
        if relief.name not in used:
            return relief
    return None


def _reliefs(runtime: "VramRuntime", args: tuple, kwargs: dict) -> list[Relief]:
    """The pool's reliefs are asked for through the one path back (engine.runtime.member): the
    pool caps the prefetch depth or the residency and re-plans."""
    model = runtime.model
    out: list[Relief] = []
    if runtime.stream_depth > 1:
        out.append(Relief("fewer prefetch slots", lambda: runtime.pool.member_changed(runtime, Change.FEWER_SLOTS)))
    if runtime.ledger.resident_bytes > 0:
        out.append(Relief("half the resident layers", lambda: runtime.pool.member_changed(runtime, Change.LESS_RESIDENT)))
    batch = batch_size(args, kwargs)
    if runtime.batch_chunks < batch:
        chunks = min(batch, runtime.batch_chunks * 2)
        out.append(Relief("the batch split in two", lambda: setattr(runtime, "batch_chunks", chunks)))
    if callable(getattr(model, "set_attention_slice", None)):
        if not runtime.attention_sliced:
            out.append(Relief("sliced attention", lambda: _slice_attention(runtime)))
    elif runtime.attention_chunks == 1 and has_attention(model):
        out.append(Relief("chunked attention", lambda: setattr(runtime, "attention_chunks", ATTENTION_CHUNKS)))
    if callable(getattr(model, "enable_tiling", None)) and not getattr(model, "use_tiling", True):
        out.append(Relief("a tiled VAE", model.enable_tiling))
    return out


#: the "chunked attention" relief runs each attention call in this many parts of its queries
ATTENTION_CHUNKS = 4


@contextmanager
def chunked_attention(chunks: int) -> Iterator[None]:
    """While a step runs under the "chunked attention" relief: `scaled_dot_product_attention`
    computes its queries in `chunks` parts (each row's softmax is over all keys, so the result is
    the same), so the math path's score matrix (pre-Ampere cards in bf16, the CPU) is that much
    smaller. Causal calls run whole (their mask depends on the query offset). Models without
    `set_attention_slice` (the diffusers transformers, transformers' text encoders) call the
    function through `torch.nn.functional` at run time, so they take the chunked one."""
    if chunks <= 1:
        yield
        return
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def chunked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        n = query.shape[-2]
        if kwargs.get("is_causal") or (len(args) > 1 and args[1]) or n < 2 * chunks:
            return original(query, key, value, attn_mask, *args, **kwargs)
        size = -(-n // chunks)
        parts = []
        for start in range(0, n, size):
            mask = attn_mask
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.shape[-2] == n:
                mask = mask[..., start : start + size, :]
            parts.append(original(query[..., start : start + size, :], key, value, mask, *args, **kwargs))
        return torch.cat(parts, dim=-2)

    functional.scaled_dot_product_attention = chunked
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def has_attention(model: Any) -> bool:
    """Does the model hold attention modules (diffusers' `Attention`, transformers' `*Attention`
    classes), whose calls `chunked_attention` can cut?"""
    return any("Attention" in type(m).__name__ for m in model.modules())


def _slice_attention(runtime: "VramRuntime") -> None:
    runtime.model.set_attention_slice("max")  # one head at a time: the score matrix shrinks by the heads
    runtime.attention_sliced = True


def exhausted_message(runtime: "VramRuntime", tried: list[str], had_resident: bool = False) -> str:
    """What ran out, what the retries tried, and the settings that would fit. `had_resident`:
    layers were resident when the step first failed (a lower VRAM limit would stream them)."""
    device = runtime.comp_device
    did = f"retried with {', then '.join(tried)}" if tried else "nothing can lower its peak"
    fits = ["a smaller image (the activations grow with its pixels)"]
    if had_resident:
        fits.append("a lower VRAM limit (0 streams every layer)")
    if not runtime.preparing_place.is_quantized and not runtime.offload_place.is_quantized:
        fits.append("FP8 or NF4 weights (each streamed layer takes a half or a quarter of the VRAM)")
    other = _held_by_others(device)
    if other is not None and other >= 0.25 * GB:
        fits.append(f"closing the other programs that use the GPU (they hold {other / GB:.1f} GB)")
    return f"{runtime.name}: out of memory on {device}; {did}. Settings that would fit: {'; '.join(fits)}."


def _held_by_others(device: Any) -> int | None:
    if not isinstance(device, torch.device) or device.type != "cuda" or not torch.cuda.is_available():
        return None
    from engine.runtime.cuda_facts import free_and_total, reserved_bytes

    try:
        free, total = free_and_total(device)
        return max(0, total - free - reserved_bytes(device))
    except RuntimeError:  # pragma: no cover
        return None
