"""The VRAM ledger: the engine counts its own bytes on the computation device.

No driver polling per layer: every copy the engine puts on the computation device is entered
here (resident weights, transient computation copies, streaming slots, fixed bytes such as
buffers), so the same accounting runs, and can be tested, when the computation device is the
CPU. The ledger only counts; deciding what to keep is the planner's job (engine.planning.planner)
and applying it the memory pool's (engine.runtime.pool).

Its writers are the code that makes the bytes, and no one else: a member (engine.runtime.
component.VramRuntime) enters its resident copies and the transient copies of its synchronous
forwards; its transfer scheduler (engine.transfer.scheduler) its slots and the copies it makes
from them; the pool sets the fixed bytes to the sum its members report (`set_fixed`), so code that
changes a member's fixed bytes (a LoRA's factors) tells the pool instead of writing here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class LedgerSnapshot:
    limit_bytes: int | None
    resident_bytes: int
    transient_bytes: int
    fixed_bytes: int
    slot_bytes: int
    peak_bytes: int
    peak_resident_bytes: int


class VramLedger:
    """Bytes in use on the computation device by kind, and their peaks. Thread-safe: the
    scheduler's worker and the compute thread both enter copies."""

    KINDS = ("resident", "transient", "fixed", "slot")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.resident_bytes = 0
        self.transient_bytes = 0
        self.fixed_bytes = 0
        self.slot_bytes = 0  # the scheduler's preallocated streaming slots
        self.peak_bytes = 0
        self.peak_resident_bytes = 0

    @property
    def in_use_bytes(self) -> int:
        return self.resident_bytes + self.transient_bytes + self.fixed_bytes + self.slot_bytes

    def _add(self, kind: str, nbytes: int) -> None:
        with self._lock:
            setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + nbytes)
            if nbytes > 0:
                self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)
                self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def add_resident(self, nbytes: int) -> None:
        self._add("resident", nbytes)

    def remove_resident(self, nbytes: int) -> None:
        self._add("resident", -nbytes)

    def add_transient(self, nbytes: int) -> None:
        self._add("transient", nbytes)

    def remove_transient(self, nbytes: int) -> None:
        self._add("transient", -nbytes)

    def set_fixed(self, nbytes: int) -> None:
        """The fixed bytes of every member together (the pool's sum of what they report)."""
        self._add("fixed", int(nbytes) - self.fixed_bytes)  # one writer (the pool), so no race

    def add_slots(self, nbytes: int) -> None:
        self._add("slot", nbytes)

    def remove_slots(self, nbytes: int) -> None:
        self._add("slot", -nbytes)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.in_use_bytes
            self.peak_resident_bytes = self.resident_bytes

    def snapshot(self, limit_bytes: int | None) -> LedgerSnapshot:
        with self._lock:
            return LedgerSnapshot(
                limit_bytes,
                self.resident_bytes,
                self.transient_bytes,
                self.fixed_bytes,
                self.slot_bytes,
                self.peak_bytes,
                self.peak_resident_bytes,
            )
