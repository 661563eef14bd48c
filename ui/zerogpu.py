"""Hugging Face ZeroGPU: a GPU is attached only while a `@spaces.GPU` function runs, in a worker
process forked from the main one.

So the work is split where the GPU is:

* in the main process, on the CPU: resolve the request, download, load and quantize the masters
  (`Studio.preload`). A worker is forked from this process and inherits them: a new worker never
  reads the model from disk again (one built inside a worker would die with it);
* inside the GPU call (`engine_events`, wrapped by `on_gpu`): detect the hardware again (the
  main process sees ZeroGPU's virtual CUDA, the worker the real card), then only pin, stream and
  compute;
* the call's `duration` (what ZeroGPU reserves, and charges to the visitor's quota) is sized per
  model and setting from the estimate (`gpu_seconds`): the steps at the cost model's seconds per
  step (engine.generation.suggest), plus the text encoder, the VAE and pinning the masters, with a
  margin; a too-short duration kills the run, a too-long one wastes the visitor's quota.

Without the `spaces` package (everywhere but on Spaces) or without SPACES_ZERO_GPU, `on_gpu`
returns the function as it is and nothing is preloaded.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

log = logging.getLogger("lowvram_studio.zerogpu")

MIN_SECONDS = 20  # ZeroGPU's scheduling overhead makes shorter reservations pointless
MAX_SECONDS = 300  # what a visitor's quota can usually pay for at once
FIXED_SECONDS = 8.0  # text encoder, VAE decode, first-forward tracing
PIN_BYTES_PER_S = 4e9  # registering the masters' host memory (page-locking runs at a few GB/s)
MARGIN = 1.5  # the cost model is a round-figure model (suggest.py): reserve half again
DURATION_ENV = "LVS_ZEROGPU_DURATION"  # a fixed duration in seconds overrides the estimate


def spaces_module() -> Any | None:
    """The `spaces` package, or None where it is not installed or does not import."""
    try:
        import spaces  # type: ignore[import-not-found]
    except Exception:  # not installed, or not usable here
        return None
    return spaces


def zero_gpu() -> bool:
    """Running on a ZeroGPU Space: `spaces` imports and Spaces says so."""
    return spaces_module() is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu_seconds(studio: Any, request: Any) -> int:
    """Seconds to reserve for `request` on ZeroGPU: steps x the cost model's seconds per step for
    the request's own storage form, disk offload and limit, plus fixed costs and pinning the
    denoiser's stored bytes, times MARGIN, within [MIN_SECONDS, MAX_SECONDS]. $LVS_ZEROGPU_DURATION
    fixes it instead. Any failure to estimate falls back to MAX_SECONDS (a run cut short loses
    the image; a long reservation only costs quota)."""
    fixed = os.environ.get(DURATION_ENV)
    if fixed:
        return int(fixed)
    try:
        from engine.generation.suggest import Candidate, step_seconds
        from engine.storage.forms import get_form

        r = studio.resolve(request)
        est = studio.estimate(request)
        work = studio.step_work(request)
        machine = studio.machine()
        weights = r.settings.storage_name
        limit = r.settings.vram_limit
        per_step = step_seconds(est, machine, Candidate(weights, bool(request.disk_offload), limit), work)
        form = get_form(weights)
        stored = (work.gguf_bytes or work.denoiser_bytes_bf16) if form.from_file else work.denoiser_bytes_bf16 * form.size_factor
        seconds = (r.steps * per_step + FIXED_SECONDS + stored / PIN_BYTES_PER_S) * MARGIN
    except Exception:
        log.warning("could not size the ZeroGPU duration from the estimate; reserving %d s", MAX_SECONDS, exc_info=True)
        return MAX_SECONDS
    return int(min(MAX_SECONDS, max(MIN_SECONDS, math.ceil(seconds))))


def on_gpu(fn: Callable[..., Any], duration: Callable[..., int]) -> Callable[..., Any]:
    """`fn` as a ZeroGPU function whose reservation `duration(*args)` sizes per call; `fn` itself
    where there is no ZeroGPU."""
    spaces = spaces_module()
    if spaces is None:
        return fn
    try:
        return spaces.GPU(duration=duration)(fn)
    except Exception:  # a `spaces` without callable durations: one fixed reservation
        log.warning("spaces.GPU(duration=callable) failed; reserving %d s per call", MAX_SECONDS, exc_info=True)
        return spaces.GPU(duration=MAX_SECONDS)(fn)


def preload(studio: Any, request: Any) -> None:
    """Main process, before the GPU call: load (and quantize) the request's masters on the CPU,
    so the worker forked for the call inherits them instead of reading the files."""
    load = getattr(studio, "preload", None)
    if load is not None:
        load(request)
