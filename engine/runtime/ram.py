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
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.runtime.component import VramRuntime

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


def computes_on_cpu(member: VramRuntime) -> bool:
    device = member.comp_device
    return getattr(device, "type", str(device)) == "cpu"


def resident_is_master(member: VramRuntime) -> bool:
    """A resident copy of this member is its RAM master itself (the preparing place is the
    offload place in RAM, so `to_place` returns the master): keeping it costs no RAM."""
    off, prep = member.offload_place, member.preparing_place
    return (
        computes_on_cpu(member)
        and not off.on_disk
        and getattr(off.device, "type", None) == "cpu"
        and getattr(prep.device, "type", None) == "cpu"
        and off.dtype == prep.dtype
    )


def ram_room(members: Iterable[VramRuntime], fixed_bytes: int, activation_bytes: int, available: int | None = None) -> int | None:
    """The limit (bytes, in the planner's accounting) that keeps new RAM within what is available;
    None when no member computes on the CPU."""
    members = list(members)
    cpu = [m for m in members if computes_on_cpu(m)]
    if not cpu:
        return None
    free = available_ram_bytes() if available is None else available
    held = 0  # what the planner counts that is already in RAM (so not in MemAvailable any more)
    for m in cpu:
        if resident_is_master(m):
            if m.active:
                held += sum(m.resident_cost(layer) for layer in m.layers)
        else:
            held += sum(layer.resident_bytes for layer in m.layers)
    return max(0, free + held + fixed_bytes - activation_bytes - RAM_MARGIN_BYTES)
