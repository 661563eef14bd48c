"""RAM is a budget like VRAM: where the computation device is the CPU, residency is planned
against the RAM that is really available, never "unlimited" (docs/engine.md, "RAM as the budget").

On a CPU the "device" copies the planner keeps resident are RAM. So a pool with a member that
computes on the CPU bounds its limit by `ram_room`: the RAM available now (MemAvailable), plus
what the planner's own accounting already holds (the copies it made, and resident copies that
*are* their RAM master and so cost nothing more), minus the activations of the coming stage and a
margin. A user's explicit limit still applies when it is smaller. `vram_limit=None` on a CPU
therefore means "what this machine can hold", as "Auto" does on a GPU.

The RAM available is MemAvailable, or what the process's cgroup (a container, a systemd scope)
still allows when that is less (`memory.max - memory.current`): a process held to 18 GiB on a
24 GiB machine was killed in the denoising step while MemAvailable said there was room.

Auto on a CPU host leaves room for the rest of the machine (the OS, a browser, the page cache a
disk-offloaded model streams through): `machine_headroom_bytes`, the larger of
HEADROOM_MIN_BYTES (3 GiB) and HEADROOM_FRACTION (10 %) of the RAM. The RAM room and the
estimate's "fits" (engine.generation.estimate) keep the same headroom.

`LOWVRAM_RAM_AVAILABLE_GB` overrides the measured available RAM (tests, and a user who wants to
leave RAM to other programs): it says what the engine may use, so no machine headroom is taken
off it (only this process's margin).
"""

from __future__ import annotations

import os
from pathlib import Path

GiB = 1024**3
#: RAM left to the rest of the process (Python, torch's allocator, tokenizers).
RAM_MARGIN_BYTES = 1 * GiB
#: RAM left to the rest of the machine (OS, desktop, browser): at least this much ...
HEADROOM_MIN_BYTES = 3 * GiB
#: ... or this share of the RAM, whichever is larger
HEADROOM_FRACTION = 0.10
OVERRIDE = "LOWVRAM_RAM_AVAILABLE_GB"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dir() -> Path | None:
    """This process's cgroup v2 directory (None: no cgroup v2)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return CGROUP_ROOT / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def cgroup_room_bytes(cgroup: Path | None = None, root: Path = CGROUP_ROOT) -> int | None:
    """What this process's cgroup still allows (memory.max - memory.current, the tightest of it
    and its parents up to `root`); None without a limit."""
    directory = _cgroup_dir() if cgroup is None else cgroup
    room: int | None = None
    while directory is not None and root in (directory, *directory.parents):
        try:
            limit = (directory / "memory.max").read_text().strip()
            current = int((directory / "memory.current").read_text().strip())
            if limit != "max":
                left = max(0, int(limit) - current)
                room = left if room is None else min(room, left)
        except (OSError, ValueError):
            pass
        if directory == root:
            break
        directory = directory.parent
    return room


def available_ram_bytes() -> int:
    """MemAvailable, or the cgroup's room when smaller (or $LOWVRAM_RAM_AVAILABLE_GB)."""
    override = os.environ.get(OVERRIDE)
    if override:
        return int(float(override) * GiB)
    import psutil

    available = int(psutil.virtual_memory().available)
    room = cgroup_room_bytes()
    return available if room is None else min(available, room)


def machine_headroom_bytes(total_bytes: int | None = None) -> int:
    """RAM Auto leaves to the rest of the machine: max(HEADROOM_MIN_BYTES, HEADROOM_FRACTION of
    the RAM); 0 when $LOWVRAM_RAM_AVAILABLE_GB says what the engine may use."""
    if os.environ.get(OVERRIDE):
        return 0
    if total_bytes is None:
        import psutil

        total_bytes = int(psutil.virtual_memory().total)
    return max(HEADROOM_MIN_BYTES, int(HEADROOM_FRACTION * total_bytes))


def reserve_bytes() -> int:
    """What the RAM room keeps free: this process's margin and the machine's headroom."""
    return RAM_MARGIN_BYTES + machine_headroom_bytes()


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
    coming stage's activations - this process's margin and the machine's headroom."""
    free = available_ram_bytes() if available is None else available
    return max(0, free + held_bytes + fixed_bytes - activation_bytes - reserve_bytes())
