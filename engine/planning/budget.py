"""The VRAM budget: the engine counts its own bytes on the computation device.

No driver polling per layer: every copy the engine puts on the computation device goes through
this ledger (resident weights, transient computation copies, fixed bytes such as buffers), so the
same accounting runs, and can be tested, when the computation device is the CPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from engine.config import limit_to_bytes, parse_vram_limit

if TYPE_CHECKING:
    from engine.runtime.component import VramRuntime


@dataclass
class LedgerSnapshot:
    limit_bytes: int | None
    resident_bytes: int
    transient_bytes: int
    fixed_bytes: int
    slot_bytes: int
    peak_bytes: int
    peak_resident_bytes: int


@dataclass
class VramBudget:
    """Shared by every component of one pipeline: they draw on the same VRAM."""

    limit_gb: float | None = None
    activation_reserve_bytes: int = 0
    # Set by OOM recovery: resident bytes stay under this even when the limit would allow more.
    residency_cap_bytes: int | None = None
    resident_bytes: int = 0
    transient_bytes: int = 0
    fixed_bytes: int = 0
    slot_bytes: int = 0  # the scheduler's preallocated streaming slots
    peak_bytes: int = 0
    peak_resident_bytes: int = 0
    members: list["VramRuntime"] = field(default_factory=list)
    # Called when a layer of a component that is not onloaded runs: a pipeline sets it to switch
    # stages (onload that component, offload the others). None: stream from the offload place.
    on_demand: Callable[["VramRuntime"], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def limit_bytes(self) -> int | None:
        return limit_to_bytes(self.limit_gb)

    def set_limit(self, limit_gb: float | None) -> None:
        self.limit_gb = parse_vram_limit(limit_gb)
        self.residency_cap_bytes = None  # a new limit is a fresh start

    # --- the ledger -------------------------------------------------------------------------
    def _changed(self) -> None:
        in_use = self.in_use_bytes
        self.peak_bytes = max(self.peak_bytes, in_use)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    @property
    def in_use_bytes(self) -> int:
        return self.resident_bytes + self.transient_bytes + self.fixed_bytes + self.slot_bytes

    def add_resident(self, nbytes: int) -> None:
        with self._lock:
            self.resident_bytes += nbytes
            self._changed()

    def remove_resident(self, nbytes: int) -> None:
        with self._lock:
            self.resident_bytes -= nbytes

    def add_transient(self, nbytes: int) -> None:
        with self._lock:
            self.transient_bytes += nbytes
            self._changed()

    def remove_transient(self, nbytes: int) -> None:
        with self._lock:
            self.transient_bytes -= nbytes

    def add_fixed(self, nbytes: int) -> None:
        with self._lock:
            self.fixed_bytes += nbytes
            self._changed()

    def remove_fixed(self, nbytes: int) -> None:
        with self._lock:
            self.fixed_bytes -= nbytes

    def add_slots(self, nbytes: int) -> None:
        with self._lock:
            self.slot_bytes += nbytes
            self._changed()

    def remove_slots(self, nbytes: int) -> None:
        with self._lock:
            self.slot_bytes -= nbytes

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.in_use_bytes
            self.peak_resident_bytes = self.resident_bytes

    def snapshot(self) -> LedgerSnapshot:
        with self._lock:
            return LedgerSnapshot(
                self.limit_bytes,
                self.resident_bytes,
                self.transient_bytes,
                self.fixed_bytes,
                self.slot_bytes,
                self.peak_bytes,
                self.peak_resident_bytes,
            )

    # --- planning across components --------------------------------------------------------------
    def replan(self) -> None:
        """Re-choose the resident set of every active member within the limit (see engine.planner)."""
        from engine.planning.planner import plan_residency

        plan_residency(self)
