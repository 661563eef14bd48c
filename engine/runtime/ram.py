"""RAM is a budget like VRAM: where the computation device is the CPU, residency is planned
against the RAM that is really available, never "unlimited" (docs/engine.md, "RAM as the budget").

On a CPU the "device" copies the planner keeps resident are RAM. So a pool with a member that
computes on the CPU bounds its limit by `ram_room`: the RAM available now (MemAvailable), plus
what the planner's own accounting already holds (the copies it made, and resident copies that
*are* their RAM master and so cost nothing more), minus the activations of the coming stage and a
margin. A user's explicit limit still applies when it is smaller. `vram_limit=None` on a CPU
therefore means "what this machine can hold", as "Auto" does on a GPU.

`LOWVRAM_RAM_AVAILABLE_GB` overrides the measured available RAM (tests, and a user who wants to
leave RAM to other programs).
"""

from __future__ import annotations

import os

GiB = 1024**3
#: RAM left to the rest of the process (Python, torch's allocator, tokenizers) and the system.
RAM_MARGIN_BYTES = 1 * GiB


def available_ram_bytes() -> int:
    """MemAvailable (or $LOWVRAM_RAM_AVAILABLE_GB)."""
    override = os.environ.get("LOWVRAM_RAM_AVAILABLE_GB")
    if override:
        return int(float(override) * GiB)
    import psutil

    return int(psutil.virtual_memory().available)


def return_freed_memory() -> bool:
    """Hand the heap memory freed copies left behind back to the kernel (glibc's malloc_trim), so
    MemAvailable, which `ram_room` plans from, counts it again. Without it the text encoder's
    freed bf16 copies stayed in the process (2.5 GiB of RssAnon after its stage, real-size
    Z-Image-Turbo FP8): the denoiser's room came out 2.1 GiB short of the estimate's, and the
    run kept that much fewer copies than the RAM allowed. False where there is no glibc."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def ram_room(held_bytes: int, fixed_bytes: int, activation_bytes: int, available: int | None = None) -> int:
    """The limit (bytes, in the planner's accounting) that keeps new RAM within what is available:
    MemAvailable + `held_bytes` (what the planner counts that is already in RAM, so no longer in
    MemAvailable; each member reports its own, `PoolMember.ram_held_bytes`) + fixed bytes - the
    coming stage's activations - the margin."""
    free = available_ram_bytes() if available is None else available
    return max(0, free + held_bytes + fixed_bytes - activation_bytes - RAM_MARGIN_BYTES)
