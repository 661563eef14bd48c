"""`vram_limit` at each level: what None means there, the one check, the one place Auto is resolved.

Two levels, one meaning of None each:

* **Request level** (`GenerateRequest.vram_limit`, the API's and the page's `vram_limit`):
  None (or "auto") = **Auto**, what this machine can hold; a number of GB >= 0; `math.inf`
  (the API's "Infinity") = unlimited. `requested_vram_limit` checks it where it enters: the
  API/page boundary (ui.inputs) and the engine's own entry for Python users
  (`settings_for` / `resolve_vram_limit`, which `Studio.resolve` calls).
* **Engine level** (`EngineSettings.vram_limit`, `build_pipeline`, `enable_vram_management`,
  `load_model`, `set_vram_limit`, `MemoryPool`: DiffSynth's API): None = **unlimited**, 0 = keep
  nothing resident, N = a budget of N GB. There is no Auto down there; `engine.config.
  parse_vram_limit` is its one check, made by the memory pool that holds the limit.

`resolve_vram_limit` turns a request-level value into an engine-level one, and is the only code
that resolves Auto: on a GPU, the free VRAM minus a margin (`auto_vram_limit_gb`; the session
measures it again when it builds the pipeline, and checks it after the first step); on a host
without a GPU, unlimited (the RAM really available, less the machine's headroom, bounds residency
there, engine.runtime.ram), with disk offload on a CPU 0 (the weights stay in their files; the
page cache holds them), and 0 for quantized masters on a run too short for their bf16 copies to
pay back (AUTO_COPY_MIN_STEPS).

Torch-free, so the UI's input checks import it cheaply.
"""

from __future__ import annotations

import math
from typing import Any

from engine.generation.types import HardwareInfo, UserFacingError

#: Auto leaves this much VRAM (GB) to the CUDA context, activations and other programs ...
AUTO_MARGIN_GB = 1.5
#: ... or this fraction of the card, whichever is larger.
AUTO_MARGIN_FRACTION = 0.08

#: On a CPU, Auto makes bf16 copies of quantized (FP8, int8, NF4, GGUF) masters only for runs of
#: at least this many steps. A copy is made at a layer's first forward (one dequantization plus
#: writing twice the bytes) and saves one dequantization per later forward. Measured on real-size
#: Z-Image-Turbo FP8 (24 GiB host, 1 step): 34-43 s/step with the copies against 30-33 s/step at
#: vram_limit=1, at 16 GiB instead of 11 GiB: a 1-step run loses; by the dequantization a copy saves
#: per step, the first step's extra cost is paid back within about 3 steps (an estimate, not a
#: multi-step measurement).
AUTO_COPY_MIN_STEPS = 4

#: what a request-level vram_limit may be (the error message says it)
ACCEPTED = 'a number of GB, 0 or more (Infinity = unlimited), or null / "auto" for Auto'
_AUTO_WORDS = ("", "auto")
_UNLIMITED_WORDS = ("unlimited",)


def is_auto(value: Any) -> bool:
    """Does a request-level value ask for Auto (None, "", "auto")?"""
    return value is None or (isinstance(value, str) and value.strip().lower() in _AUTO_WORDS)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def requested_vram_limit(value: Any, name: str = "vram_limit") -> float | None:
    """Check a request-level value: None = Auto, else GB >= 0 (`math.inf` = unlimited). Numeric
    strings are read as numbers ("Infinity" too); bools, NaN and negative numbers are refused.
    UserFacingError names `name` once and says what is accepted."""
    if is_auto(value):
        return None
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            number = math.inf if text in _UNLIMITED_WORDS else float(text)
        except ValueError:
            number = None
    if number is None or math.isnan(number) or number < 0:
        raise UserFacingError(f"{name} must be {ACCEPTED}; got {_show(value)}.")
    return number


def auto_vram_limit_gb(vram_total_gb: float | None, vram_free_gb: float | None = None) -> float | None:
    """What Auto comes to on a GPU of `vram_total_gb` with `vram_free_gb` free (None: a machine
    planned for, nothing held yet, so the whole card): the free VRAM minus a margin (the CUDA
    context, cuBLAS workspaces, fragmentation), the margin sized by the card. What other programs
    hold (a desktop and a browser often hold 1-2 GB) is not free, so Auto leaves it to them.
    None (unlimited) without a GPU."""
    if vram_total_gb is None:
        return None
    free = vram_total_gb if vram_free_gb is None else min(vram_free_gb, vram_total_gb)
    margin = max(AUTO_MARGIN_GB, AUTO_MARGIN_FRACTION * vram_total_gb)
    return round(max(0.0, free - margin), 2)


def resolve_vram_limit(
    value: Any, hardware: HardwareInfo, *, device_type: str | None = None, disk_offload: bool = False,
    steps: int | None = None, quantized: bool = False,
) -> float | None:
    """Request level -> engine level (None = unlimited), checked here (UserFacingError "VRAM
    limit must be ..."). Auto: `hardware`'s Auto limit; where the computation runs on the CPU
    (`device_type` "cpu") with no Auto number: 0 with disk offload, and 0 for quantized masters
    (`quantized`) on a run of fewer than AUTO_COPY_MIN_STEPS `steps`, whose bf16 copies would not
    pay back; else unlimited (the RAM room, with the machine's headroom, bounds the copies)."""
    asked = requested_vram_limit(value, "VRAM limit")
    if asked is None:
        limit = hardware.auto_vram_limit_gb
        if limit is None and device_type == "cpu":
            if disk_offload:
                return 0.0  # weights stay in their files (module docstring)
            if quantized and steps is not None and steps < AUTO_COPY_MIN_STEPS:
                return 0.0  # the copies would cost more than they save in so few steps
        return limit
    return None if math.isinf(asked) else asked
