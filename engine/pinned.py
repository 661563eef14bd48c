"""Pinned host memory: one exact-size arena per component, under a process-wide pinned budget.

Per-tensor `pin_memory()` goes through the caching host allocator, which rounds every block up
(users of diffusers' group offloading report ~2x host RAM). Here each component's streamed host
tensors are packed, 256-byte aligned, into a single pinned buffer of exactly their size, and the
stored copies are re-pointed at views of it. What does not fit under the pinned budget stays
pageable and is staged by the scheduler's worker thread through small pinned staging buffers.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import torch
from torch import nn

from .devices import DeviceBackend
from .stored import StoredTensor

if TYPE_CHECKING:
    from .runtime import VramRuntime

ALIGN = 256  # byte alignment of each tensor inside an arena, a slot or a staging buffer
DEFAULT_PINNED_SHARE = 0.5  # of the RAM available when the first arena is built


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class PinnedBudget:
    """How much host RAM all arenas together may pin (env LOWVRAM_PINNED_RAM_GB overrides)."""

    def __init__(self, limit_bytes: int | None = None):
        self._limit = limit_bytes
        self.used = 0
        self._lock = threading.Lock()

    @property
    def limit_bytes(self) -> int:
        if self._limit is None:
            env = os.environ.get("LOWVRAM_PINNED_RAM_GB")
            if env:
                self._limit = int(float(env) * 1024**3)
            else:
                self._limit = int(psutil.virtual_memory().available * DEFAULT_PINNED_SHARE)
        return self._limit

    def take(self, wanted: int) -> int:
        with self._lock:
            granted = max(0, min(wanted, self.limit_bytes - self.used))
            self.used += granted
            return granted

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


PROCESS_PINNED_BUDGET = PinnedBudget()


@dataclass
class ArenaReport:
    pinned_bytes: int
    pageable_bytes: int
    tensors_pinned: int


class PinnedArena:
    """The pinned buffer of one component and what it holds."""

    def __init__(self, runtime: "VramRuntime", backend: DeviceBackend, budget: PinnedBudget = PROCESS_PINNED_BUDGET):
        self.runtime = runtime
        self.backend = backend
        self.budget = budget
        self.buffer: torch.Tensor | None = None
        self.report = ArenaReport(0, 0, 0)
        self._finalizer: weakref.finalize | None = None

    def build(self) -> ArenaReport:
        """Pack the component's host masters (execution order first) into one pinned buffer."""
        runtime = self.runtime
        order = runtime.planning_order()
        todo: list[tuple[StoredTensor, str, torch.Tensor]] = []
        seen: set[int] = set()
        wanted = 0
        for record in order:
            for stored in record.masters.values():
                if id(stored) in seen:
                    continue
                seen.add(id(stored))
                for part, tensor in stored.parts():
                    if tensor.device.type != "cpu":
                        continue
                    todo.append((stored, part, tensor))
                    wanted += aligned(tensor.numel() * tensor.element_size())
        granted = self.budget.take(wanted)
        buffer = self.backend.pin(granted) if granted else None
        if buffer is None:
            self.budget.give_back(granted)
            self.report = ArenaReport(0, wanted, 0)
            return self.report
        offset = 0
        pinned = 0
        repointed: dict[int, torch.Tensor] = {}
        for stored, part, tensor in todo:
            nbytes = tensor.numel() * tensor.element_size()
            if offset + aligned(nbytes) > granted:
                continue  # stays pageable: staged by the scheduler's worker
            view = buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            setattr(stored, part, view)
            repointed[tensor.untyped_storage().data_ptr()] = view
            offset += aligned(nbytes)
            pinned += 1
        self._repoint_placeholders(repointed)
        self.buffer = buffer
        self.report = ArenaReport(offset, wanted - offset, pinned)
        if granted > offset:
            self.budget.give_back(granted - offset)
        # the pinned bytes return to the budget when the arena goes, released or collected
        self._finalizer = weakref.finalize(self, self.budget.give_back, offset)
        return self.report

    def _repoint_placeholders(self, repointed: dict[int, torch.Tensor]) -> None:
        """Parameter slots that showed a master (computation-dtype masters) now show its arena view,
        so the old pageable copy is freed rather than kept alive by the module."""
        for record in self.runtime.layers:
            for name, placeholder in list(record.placeholders.items()):
                if placeholder.device.type != "cpu":
                    continue
                view = repointed.get(placeholder.untyped_storage().data_ptr())
                if view is None:
                    continue
                new = nn.Parameter(view, requires_grad=False) if view.is_floating_point() else view
                record.placeholders[name] = new
                if not record.fast:
                    record.module._parameters[name] = new

    def release(self) -> None:
        if self.buffer is not None:
            self._finalizer()
            self.buffer = None
