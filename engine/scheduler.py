"""Streaming that overlaps compute: groups, a ring of device slots, a copy stream and events.

Streamed layers are grouped (a transformer block is one group; the shipped module maps name the
block lists) in traced execution order. Each group's host tensors are copied on the copy stream
into one preallocated device slot; the compute stream waits on the copy's event before the group
runs, and a copy into a slot waits on the event recorded after that slot's previous group
finished. No host synchronisation per layer. Prefetch runs `depth` groups ahead (depth + 1
slots), cyclically, so group 0 of step t+1 loads during the tail of step t.

Layers the schedule did not foresee (not traced, or the plan changed) still run through the
synchronous path and are counted in `stats.sync_fallbacks`.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .devices import DeviceBackend
from .fp8 import dequantize
from .pinned import aligned
from .planner import MAX_DEPTH

if TYPE_CHECKING:
    from .runtime import LayerRecord, VramRuntime

log = logging.getLogger(__name__)



@dataclass
class SliceSpec:
    """One host tensor of one parameter, at `offset` in its group's slot."""

    record: "LayerRecord"
    param: str
    part: str  # the stored copy's attribute (StoredTensor.parts): "tensor", or "data"/"scale" for FP8
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class Group:
    index: int
    name: str
    records: list["LayerRecord"]
    slices: list[SliceSpec] = field(default_factory=list)
    nbytes: int = 0
    pageable: bool = False  # some source is not in pinned memory: staged by the worker


@dataclass
class Loaded:
    slot: int
    event: Any  # copy-done event on the copy stream


def group_key(record: "LayerRecord") -> str:
    return record.block or record.name


def build_groups(order: list["LayerRecord"], source_of: Any) -> list[Group]:
    """Consecutive streamed layers of one block form a group; layout each group's slot image."""
    groups: list[Group] = []
    for record in order:
        key = group_key(record)
        if groups and groups[-1].name == key:
            group = groups[-1]
        else:
            group = Group(len(groups), key, [])
            groups.append(group)
        group.records.append(record)
        for param, stored in source_of(record).items():
            parts = stored.parts()
            if not parts:
                raise TypeError(f"{record.name}.{param} is not a host tensor")
            for part, tensor in parts:
                nbytes = tensor.numel() * tensor.element_size()
                group.slices.append(SliceSpec(record, param, part, group.nbytes, nbytes, tensor.dtype, tensor.shape))
                group.nbytes += aligned(nbytes)
    return groups


def max_group_bytes(runtime: "VramRuntime", records: list["LayerRecord"]) -> int:
    """The largest group's slot bytes if `records` were all streamed (0 if they cannot be slot-copied)."""
    try:
        groups = build_groups(records, runtime.stream_source)
    except TypeError:
        return 0
    return max((g.nbytes for g in groups), default=0)


class TransferScheduler:
    """Prefetching streamer for one component. The runtime hands it every streamed layer."""

    def __init__(self, runtime: "VramRuntime", backend: DeviceBackend, stager: "Stager | None" = None):
        self.runtime = runtime
        self.backend = backend
        self.stager = stager
        self.groups: list[Group] = []
        self.group_of: dict[int, int] = {}
        self.slots: list[torch.Tensor] = []
        self.slot_owner: list[int | None] = []
        self.slot_free: list[Any] = []
        self.loaded: dict[int, Loaded] = {}
        self.current: int | None = None
        self.depth = 0
        self.ready = False
        self.slot_bytes = 0

    # --- building and tearing down ----------------------------------------------------------
    def max_group_bytes(self, records: list["LayerRecord"]) -> int:
        """Slot size needed if `records` were all streamed (used by the planner's reserve)."""
        return max_group_bytes(self.runtime, records)

    def build(self, depth: int) -> None:
        """Lay out groups for the layers the current plan streams, allocate depth + 1 slots."""
        self.reset()
        runtime = self.runtime
        # only traced layers are scheduled; a layer the trace never saw streams synchronously
        traced = runtime.execution_order or []
        streamed = [r for r in traced if not r.plan_resident and r.resident is None]
        try:
            self.groups = build_groups(streamed, self.runtime.stream_source)
        except TypeError:
            self.groups = []  # sources that cannot be slot-copied stream synchronously
        self.group_of = {id(r): g.index for g in self.groups for r in g.records}
        for group in self.groups:
            group.pageable = any(not self.backend.is_pinned(self._part(spec)) for spec in group.slices)
        if not self.groups:
            self.ready = True
            return
        self.depth = max(1, min(depth, MAX_DEPTH, len(self.groups)))
        self.slot_bytes = max(g.nbytes for g in self.groups)
        n_slots = self.depth + 1
        self.slots = [self.backend.allocate(self.slot_bytes) for _ in range(n_slots)]
        self.slot_owner = [None] * n_slots
        self.slot_free = [None] * n_slots
        runtime.budget.add_slots(self.slot_bytes * n_slots)
        self.ready = True

    def reset(self) -> None:
        """Drop the schedule and free the slots (after in-flight copies and computes finished)."""
        for event in self.slot_free:
            self.backend.host_wait(event)
        for loaded in self.loaded.values():
            self.backend.host_wait(self._event(loaded))
        if self.slots:
            self.runtime.budget.remove_slots(self.slot_bytes * len(self.slots))
        self.groups, self.group_of, self.slots = [], {}, []
        self.slot_owner, self.slot_free, self.loaded = [], [], {}
        self.current = None
        self.slot_bytes = 0
        self.ready = False

    # --- the schedule -------------------------------------------------------------------------
    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self.slot_owner):
            if owner is None:
                return slot
        return None

    def _issue(self, index: int, slot: int) -> None:
        free_event = self.slot_free[slot]
        if self.stager is not None and self.groups[index].pageable:
            # pageable sources: the worker thread stages them; it is then the copy stream's only
            # producer until it drains, so copies stay in issue order
            event: Any = self.stager.submit(lambda: self._copy_group(index, slot, free_event))
        else:
            if self.stager is not None:
                self.stager.drain()
            event = self._copy_group(index, slot, free_event)
        self.loaded[index] = Loaded(slot, event)
        self.slot_owner[slot] = index
        self.runtime.stats.streamed_bytes += self.groups[index].nbytes

    def _copy_group(self, index: int, slot: int, free_event: Any) -> Any:
        """Enqueue the group's copies into `slot` on the copy stream; returns the copy-done event."""
        backend = self.backend
        stream = backend.copy_stream()
        backend.wait(stream, free_event)  # the slot's previous consumer is done
        buffer = self.slots[slot]
        for spec in self.groups[index].slices:
            source = self._part(spec)
            dst = buffer[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
            if self.stager is not None and not backend.is_pinned(source):
                source = self.stager.stage(source)
            backend.copy(dst, source, stream)
        event = backend.record(stream)
        if self.stager is not None:
            self.stager.staged_copies_issued(event)
        return event

    def _event(self, loaded: Loaded) -> Any:
        event = loaded.event
        return event.result() if isinstance(event, Future) else event

    def _part(self, spec: SliceSpec) -> torch.Tensor:
        return getattr(self.runtime.stream_source(spec.record)[spec.param], spec.part)

    def _prefetch_after(self, index: int) -> None:
        n = len(self.groups)
        for k in range(1, self.depth + 1):
            ahead = (index + k) % n  # wraps into the next step
            if ahead in self.loaded:
                continue
            slot = self._free_slot()
            if slot is None:
                return
            self._issue(ahead, slot)

    def _finish_current(self) -> None:
        if self.current is None:
            return
        loaded = self.loaded.pop(self.current)
        self.slot_free[loaded.slot] = self.backend.record(self.backend.compute_stream())
        self.slot_owner[loaded.slot] = None
        self.current = None

    def _enter(self, index: int) -> None:
        self._finish_current()
        if index not in self.loaded:
            # not prefetched (first run of a schedule, or out of order): evict the farthest prefetch
            slot = self._free_slot()
            if slot is None:
                victim = max(self.loaded, key=lambda g: (g - index) % len(self.groups))
                slot = self.loaded.pop(victim).slot
                self.slot_owner[slot] = None
            self._issue(index, slot)
        self.current = index
        self.backend.wait(self.backend.compute_stream(), self._event(self.loaded[index]))
        self._prefetch_after(index)

    def run(self, module: nn.Module, record: "LayerRecord", args: tuple, kwargs: dict) -> Any:
        """Compute a streamed layer from its group's slot. Returns NotImplemented when the layer is
        not in the schedule (the caller then streams it synchronously)."""
        index = self.group_of.get(id(record))
        if index is None:
            return NotImplemented
        if index != self.current:
            self._enter(index)
        buffer = self.slots[self.loaded[index].slot]
        runtime = self.runtime
        comp_dtype = runtime.comp_dtype
        params: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[str, torch.Tensor]] = {}
        transient = 0
        for spec in self.groups[index].slices:
            if spec.record is not record:
                continue
            view = buffer[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
            parts.setdefault(spec.param, {})[spec.part] = view
        for param, found in parts.items():
            if "tensor" in found:
                tensor = found["tensor"]
                if tensor.is_floating_point() and tensor.dtype != comp_dtype:
                    tensor = tensor.to(comp_dtype)
                    transient += tensor.numel() * tensor.element_size()
                params[param] = tensor
            else:  # FP8 bytes crossed; upcast here, on the computation device
                tensor = dequantize(found["data"], found["scale"], comp_dtype)
                transient += tensor.numel() * tensor.element_size()
                params[param] = tensor
        runtime.budget.add_transient(transient)
        record.state = "computation"
        try:
            return module._vram_compute(params, args, kwargs)
        finally:
            record.state = record.rest_state
            runtime.budget.remove_transient(transient)
            runtime.stats.streamed_layers += 1

    def end_forward(self) -> None:
        """The component's forward returned: free the last group's slot and keep prefetching
        from the top of the order, so the next step starts with its first groups loaded."""
        if not self.groups or self.current is None:
            return
        last = self.current
        self._finish_current()
        self._prefetch_after(last)

    def slots_in_flight(self) -> int:
        return len(self.loaded)


class Stager:
    """Worker thread that copies pageable host tensors into pinned staging buffers and enqueues
    their device copies, so the thread launching compute never blocks on a pageable copy.

    Two staging buffers alternate; before one is refilled the worker waits (on its own thread)
    for the device copy that read it last. Disk offload can feed the same path.
    """

    def __init__(self, backend: DeviceBackend, buffer_bytes: int, n_buffers: int = 2):
        self.backend = backend
        self.buffer_bytes = buffer_bytes
        self.buffers = [self._staging_buffer(backend, buffer_bytes) for _ in range(n_buffers)]
        self.buffer_done: list[Any] = [None] * n_buffers
        self.current = 0
        self.offset = 0
        self.used_in_group: set[int] = set()
        self.jobs: "queue.Queue[tuple[Callable[[], Any], Future] | None]" = queue.Queue()
        # the thread holds the queue, not the stager, so a dropped stager is collected and its
        # finalizer stops the thread
        self.thread = threading.Thread(target=_run_jobs, args=(self.jobs,), name="lowvram-stager", daemon=True)
        self.thread.start()
        self._stop = weakref.finalize(self, self.jobs.put, None)
        self.staged_bytes = 0

    @staticmethod
    def _staging_buffer(backend: DeviceBackend, nbytes: int) -> torch.Tensor:
        pinned = backend.pin(nbytes)
        return pinned if pinned is not None else torch.empty(nbytes, dtype=torch.uint8)

    def submit(self, job: "Callable[[], Any]") -> Future:
        future: Future = Future()
        self.jobs.put((job, future))
        return future

    def drain(self) -> None:
        """Wait until every submitted job has enqueued its copies."""
        self.submit(lambda: None).result()

    def stage(self, source: torch.Tensor) -> torch.Tensor:
        """Copy `source` into the current staging buffer (switching buffers when full)."""
        nbytes = source.numel() * source.element_size()
        if nbytes > self.buffer_bytes:
            return source  # larger than a staging buffer: copied from pageable memory directly
        if self.offset + nbytes > self.buffer_bytes:
            self._switch()
        if self.current not in self.used_in_group:
            self.backend.host_wait(self.buffer_done[self.current])  # its last reader finished
            self.used_in_group.add(self.current)
        view = self.buffers[self.current][self.offset : self.offset + nbytes].view(source.dtype).view(source.shape)
        view.copy_(source)
        self.offset += aligned(nbytes)
        self.staged_bytes += nbytes
        return view

    def _switch(self) -> None:
        self.current = (self.current + 1) % len(self.buffers)
        self.offset = 0

    def staged_copies_issued(self, event: Any) -> None:
        """The group's copies are enqueued: the buffers it used are free once `event` completes."""
        for index in self.used_in_group:
            self.buffer_done[index] = event
        self.used_in_group = set()
        self._switch()

    def close(self) -> None:
        self._stop()
        self.thread.join(timeout=5)


def _run_jobs(jobs: "queue.Queue[tuple[Callable[[], Any], Future] | None]") -> None:
    """The stager's worker loop: run each job, hand its result (or error) to its future."""
    while True:
        item = jobs.get()
        if item is None:
            return
        job, future = item
        try:
            future.set_result(job())
        except BaseException as exc:  # surfaced to the compute thread through the future
            future.set_exception(exc)
