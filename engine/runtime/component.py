"""Per-component runtime: the layers of one model, their four states, and the streamed forward.

States (DiffSynth's model): offload and onload are set by whoever owns the component (the
pipeline, through `offload()` / `onload()`); preparing (a resident copy on the computation device)
is chosen by the planner within the budget and filled lazily at the layer's next forward, from
the copy that forward streams anyway (so a re-plan never reads weights); computation is
transient, only inside forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.planning.budget import VramBudget
from engine.config import STATES, Place, VramConfig
from engine.storage.stored import PlainStored, ScaledFp8Stored, StoredTensor, storage_dtype_for


@dataclass
class StreamStats:
    """Counters the telemetry panel reads."""

    streamed_bytes: int = 0
    streamed_layers: int = 0
    copy_seconds: float = 0.0
    compute_seconds: float = 0.0
    forwards: int = 0
    sync_fallbacks: int = 0  # streamed layers the traced schedule did not foresee
    oom_retries: int = 0


class LayerRecord:
    """Book-keeping of one managed layer (the module holds it as `_vram`)."""

    __slots__ = (
        "name",
        "module",
        "runtime",
        "state",
        "rest_state",
        "masters",
        "owned",
        "onloaded",
        "resident",
        "resident_bytes",
        "plan_resident",
        "fast",
        "placeholders",
        "is_leaf",
        "block",
    )

    def __init__(self, name: str, module: nn.Module, runtime: "VramRuntime", masters: dict[str, StoredTensor], owned: set[str]):
        self.name = name
        self.module = module
        self.runtime = runtime
        self.state = "offload"
        self.rest_state = "offload"
        self.masters = masters
        self.owned = frozenset(owned)
        self.onloaded: dict[str, StoredTensor] | None = None
        self.resident: dict[str, StoredTensor] | None = None
        self.resident_bytes = 0
        self.plan_resident = False
        self.fast = False
        self.placeholders: dict[str, torch.Tensor] = {}
        self.is_leaf = next(module.children(), None) is None
        self.block: str | None = None

    def set_rest_state(self, state: str) -> None:
        self.rest_state = state
        if self.state != "computation":
            self.state = state


def bytes_at(shapes: dict[str, tuple[torch.Size, torch.dtype]], place: Place, compute_dtype: torch.dtype) -> int:
    """Bytes a layer's parameters take when stored at `place` (FP8 includes its per-row scales)."""
    total = 0
    for shape, dtype in shapes.values():
        numel = 1
        for d in shape:
            numel *= d
        if place.on_disk:
            continue
        target = storage_dtype_for(dtype, len(shape), place.dtype, compute_dtype)
        total += numel * target.itemsize
        if target != dtype and target in (torch.float8_e4m3fn, torch.float8_e5m2) and len(shape) >= 2 and numel:
            total += shape[0] * 4
    return total


class VramRuntime:
    """The managed layers of one model (a pipeline component) and how they move."""

    def __init__(self, model: nn.Module, config: VramConfig, budget: VramBudget, name: str):
        self.model = model
        self.config = config
        self.budget = budget
        self.name = name
        self.layers: list[LayerRecord] = []
        self.active = False  # onloaded by the pipeline
        self.execution_order: list[LayerRecord] | None = None
        self.trace: list[LayerRecord] | None = None
        self.stats = StreamStats()
        self.fixed_bytes = 0
        self.comp_device = config.computation_device
        self.comp_dtype = config.computation_dtype
        self.preparing_place = config.place("preparing")
        self.onload_place = config.place("onload")
        self.offload_place = config.place("offload")
        # Onload on the (non-CPU) computation device means "resident", within the budget.
        self.onload_is_resident = (
            isinstance(config.onload_device, torch.device) and config.onload_device == self.comp_device and self.comp_device.type != "cpu"
        )
        self._shapes: dict[int, dict[str, tuple[torch.Size, torch.dtype]]] = {}
        self._transient_cache: dict[tuple[int, bool, bool], int] = {}
        # Optional read-ahead (engine.prefetch.DiskPrefetcher, set by engine.load_model for disk
        # offload): `on_layer_start(record, source)` returns the layer's computation parameters
        # when it read them ahead (else None) and queues the next layers' reads. Only the
        # synchronous path uses it: layers the scheduler streams are read by its stager.
        self.prefetcher: Any = None
        # Optional prefetching streamer (engine.scheduler.TransferScheduler): copy stream, slot ring.
        self.scheduler: Any = None
        self.arena: Any = None  # engine.pinned.PinnedArena, while a scheduler streams
        self.host_arena: Any = None  # engine.host_arena.HostArena the loader read the masters into
        self.stream_depth = 1
        # forwards the owner still expects, the running one included (None: unknown); at 1 the
        # scheduler does not prefetch into a next forward that will not come (engine.scheduler)
        self.forwards_left: int | None = None

    # --- sizes -------------------------------------------------------------------------------
    def shapes(self, record: LayerRecord) -> dict[str, tuple[torch.Size, torch.dtype]]:
        key = id(record)
        if key not in self._shapes:
            self._shapes[key] = {name: (s.shape, _logical_dtype(s)) for name, s in record.masters.items()}
        return self._shapes[key]

    def resident_cost(self, record: LayerRecord) -> int:
        return bytes_at(self.shapes(record), self.preparing_place, self.comp_dtype)

    def computation_bytes(self, record: LayerRecord) -> int:
        return bytes_at(self.shapes(record), Place(self.comp_device, self.comp_dtype), self.comp_dtype)

    def resident_is_computation_form(self) -> bool:
        return self.preparing_place.device == self.comp_device and self.preparing_place.dtype == self.comp_dtype

    def transient_cost(self, record: LayerRecord, resident: bool) -> int:
        """Bytes a forward of this layer adds on the computation device beyond resident copies."""
        key = (id(record), resident, self.active)
        cost = self._transient_cache.get(key)
        if cost is None:
            cost = self._transient_cache[key] = self._transient_cost(record, resident)
        return cost

    def _transient_cost(self, record: LayerRecord, resident: bool) -> int:
        if resident:
            return 0 if self.resident_is_computation_form() else self.computation_bytes(record)
        source = self.stream_source_place()
        comp = self.computation_bytes(record)
        if source.on_disk:
            return comp
        if source.dtype != self.comp_dtype:  # the source form lands first, then converts
            return comp + bytes_at(self.shapes(record), Place(self.comp_device, source.dtype), self.comp_dtype)
        return comp

    def stream_source(self, record: LayerRecord) -> dict[str, StoredTensor]:
        """The copy a non-resident layer streams from: its onload copy while the component is
        onloaded and has one, else its master."""
        if self.active and record.onloaded is not None:
            return record.onloaded
        return record.masters

    def stream_source_place(self) -> Place:
        return self.onload_place if self.active and not self.onload_is_resident else self.offload_place

    # --- component states (the pipeline's switch) ------------------------------------------------
    def onload(self) -> None:
        """The component will run soon: onload copies where the config asks for them, then re-plan."""
        if self.active:
            return
        self.active = True
        if self.onload_place != self.offload_place and not self.onload_is_resident:
            for record in self.layers:
                record.onloaded = {n: s.to_place(self.onload_place, self.comp_dtype) for n, s in record.masters.items()}
        for record in self.layers:
            record.set_rest_state("onload")
        self.budget.replan()

    def offload(self) -> None:
        """The component will not run soon: drop every copy but the master."""
        if not self.active and all(r.resident is None for r in self.layers):
            return
        self.active = False
        if self.prefetcher is not None:
            self.prefetcher.clear()
        for record in self.layers:
            self.drop_resident(record)
            record.plan_resident = False
            record.onloaded = None
            record.set_rest_state("offload")
        self.budget.replan()

    # --- residency ----------------------------------------------------------------------------
    def apply_plan(self, chosen: set[int]) -> None:
        if self.scheduler is not None:
            self.scheduler.reset()  # the streamed set may change: lay the groups out again
        for record in self.layers:
            want = id(record) in chosen
            record.plan_resident = want
            if not want and record.resident is not None:
                self.drop_resident(record)

    def drop_resident(self, record: LayerRecord) -> None:
        if record.resident is None:
            return
        slots = record.module._parameters
        for name, placeholder in record.placeholders.items():
            slots[name] = placeholder
        record.resident = None
        record.fast = False
        self.budget.remove_resident(record.resident_bytes)
        record.resident_bytes = 0
        record.set_rest_state("onload" if self.active else "offload")

    def _fill_resident(self, record: LayerRecord, source: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
        resident = {name: stored.to_place(self.preparing_place, self.comp_dtype) for name, stored in source.items()}
        record.resident = resident
        record.resident_bytes = self.resident_cost(record)
        self.budget.add_resident(record.resident_bytes)
        if self.resident_is_computation_form():
            slots = record.module._parameters
            for name, stored in resident.items():
                tensor = stored.tensor  # type: ignore[attr-defined]
                slots[name] = nn.Parameter(tensor, requires_grad=False) if tensor.is_floating_point() else tensor
            record.fast = True
        record.set_rest_state("preparing")
        return resident

    # --- the streamed forward -----------------------------------------------------------------
    @torch.compiler.disable  # the transfer path's entry from model code: torch.compile runs it as it is
    def run_streamed(self, module: nn.Module, record: LayerRecord, args: tuple, kwargs: dict) -> Any:
        if not self.active and self.budget.on_demand is not None:
            self.budget.on_demand(self)
            if record.fast:
                return module.forward(*args, **kwargs)
        if self.trace is not None:
            self.trace.append(record)
        source = record.resident
        resident = source is not None
        if source is None:
            source = self.stream_source(record)
            if record.plan_resident and self.active:
                source = self._fill_resident(record, source)
                resident = True
                if record.fast:  # now resident in computation form
                    return module.forward(*args, **kwargs)
            elif self.scheduler is not None and self.active:
                out = self._run_scheduled(module, record, args, kwargs)
                if out is not NotImplemented:
                    return out
        transient = self.transient_cost(record, resident)
        self.budget.add_transient(transient)
        record.state = "computation"
        try:
            t0 = time.perf_counter()
            params = self.prefetcher.on_layer_start(record, source) if self.prefetcher is not None else None
            if params is None:
                params = {name: stored.materialize(self.comp_device, self.comp_dtype) for name, stored in source.items()}
            t1 = time.perf_counter()
            out = module._vram_compute(params, args, kwargs)
            t2 = time.perf_counter()
        finally:
            record.state = record.rest_state
            self.budget.remove_transient(transient)
        stats = self.stats
        stats.copy_seconds += t1 - t0
        stats.compute_seconds += t2 - t1
        if not resident:
            stats.streamed_layers += 1
            stats.streamed_bytes += sum(s.nbytes for s in source.values())
        return out

    def _run_scheduled(self, module: nn.Module, record: LayerRecord, args: tuple, kwargs: dict) -> Any:
        scheduler = self.scheduler
        if not scheduler.ready:
            if self.execution_order is None:
                return NotImplemented  # the first forward traces the order, streaming synchronously
            scheduler.build(self.stream_depth)
            if self.prefetcher is not None:
                self.prefetcher.clear()  # reads queued for layers the scheduler now streams itself
        out = scheduler.run(module, record, args, kwargs)
        if out is NotImplemented and scheduler.groups:
            self.stats.sync_fallbacks += 1
        return out

    def use_scheduler(self, backend: Any, pinned_budget: Any = None) -> None:
        """Stream through a TransferScheduler on `backend` (engine.devices) instead of layer by
        layer: host masters are pinned (in place where the device can register memory) under the
        pinned-RAM budget (engine.pinned); what stays pageable, and masters left on disk, go
        through a worker thread's staging buffers (each the size of the largest group in any form
        it streams from), pinned under the same budget (engine.scheduler.pin_and_stage)."""
        from engine.transfer.pinned import PROCESS_PINNED_BUDGET
        from engine.transfer.scheduler import TransferScheduler, pin_and_stage

        self.close_scheduler()
        self.arena, stager = pin_and_stage(self, backend, pinned_budget or PROCESS_PINNED_BUDGET)
        self.scheduler = TransferScheduler(self, backend, stager)
        self.budget.replan()

    def collect_timings(self) -> None:
        """Add the copy/compute times the device has finished measuring to `stats` (a scheduler
        times on the streams, so its figures arrive when the device got there, not at launch)."""
        if self.scheduler is not None:
            self.scheduler.timer.collect(self.stats)

    def is_scheduled(self, record: LayerRecord) -> bool:
        """Will the transfer scheduler stream this layer's next forward (so nothing else reads it)?"""
        scheduler = self.scheduler
        return scheduler is not None and self.active and scheduler.ready and id(record) in scheduler.group_of

    def close_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.reset()
            if self.scheduler.stager is not None:
                self.scheduler.stager.close()
            self.scheduler = None
        if self.arena is not None:
            self.arena.release()
            self.arena = None

    # --- execution order tracing ----------------------------------------------------------------
    def begin_step(self) -> None:
        """Called by the component's entry point (engine.entry) before a forward/encode/decode."""
        self.stats.forwards += 1
        if self.execution_order is None and self.trace is None:
            self.trace = []

    def end_step(self) -> None:
        if self.trace is not None:
            seen: set[int] = set()
            order = []
            for record in self.trace:
                if id(record) not in seen:
                    seen.add(id(record))
                    order.append(record)
            self.execution_order = order
            self.trace = None
        if self.scheduler is not None:
            self.scheduler.end_forward()
        if self.forwards_left:
            self.forwards_left -= 1

    def planning_order(self) -> list[LayerRecord]:
        """Traced execution order, then any layer the trace did not see, in registration order."""
        if self.execution_order is None:
            return list(self.layers)
        seen = {id(r) for r in self.execution_order}
        return list(self.execution_order) + [r for r in self.layers if id(r) not in seen]

    # --- reporting ------------------------------------------------------------------------------
    def state_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for record in self.layers:
            counts[record.state] += 1
        return counts

    def state_bytes(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for record in self.layers:
            state = record.state
            if state == "preparing" and record.resident is not None:
                out[state] += record.resident_bytes
            elif state == "computation":
                out[state] += self.resident_cost(record) if record.fast else self.computation_bytes(record)
            elif state == "onload" and record.onloaded is not None:
                out[state] += sum(s.nbytes for n, s in record.onloaded.items() if n in record.owned)
            else:
                out[state] += sum(s.nbytes for n, s in record.masters.items() if n in record.owned)
        return out


def _logical_dtype(stored: StoredTensor) -> torch.dtype:
    """The dtype a parameter had before storage (FP8 copies report the float dtype they stand for)."""
    if isinstance(stored, ScaledFp8Stored):
        return torch.bfloat16
    if isinstance(stored, PlainStored):
        return stored.tensor.dtype
    return getattr(stored, "logical_dtype", torch.bfloat16)
