"""Streaming that overlaps compute: groups, a ring of device slots, a copy stream and events.

Streamed layers are grouped (a transformer block is one group; the shipped module maps name the
block lists) in traced execution order. Each group's host tensors are copied on the copy stream
into one preallocated device slot; the compute stream waits on the copy's event before the group
runs, and a copy into a slot waits on the event recorded after that slot's previous group
finished. No host synchronisation per layer. Prefetch runs `depth` groups ahead (depth + 1
slots), cyclically, so group 0 of step t+1 loads during the tail of step t.

Sources that are not in pinned memory go through the `Stager`, a worker thread with two pinned
staging buffers: pageable host tensors are copied into a staging buffer, and disk-offloaded
parameters (`engine.disk.DiskStored`) are read with a positional read straight into one; the
device copy is then enqueued from the staging view. A group with any such source is staged as a
whole by the worker, so the thread launching compute never blocks on a read or a pageable copy,
and host RAM stays at the two staging buffers however many steps run (a single tensor larger than
a staging buffer is the exception: it is read into a fresh tensor and copied from there). A read
error reaches the compute thread through the group's future, when the group is entered; the
schedule is then dropped and laid out again at the next forward.

Layers the schedule did not foresee (not traced, or the plan changed) still run through the
synchronous path and are counted in `stats.sync_fallbacks`.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch
from torch.autograd import profiler as autograd_profiler
from torch.profiler import record_function

from engine.config import Place
from engine.transfer.devices import DeviceBackend
from engine.storage.disk import DiskStored, TensorEntry
from engine.storage.stored import piece_bytes, stored_layout
from engine.transfer.pinned import PINNED_RAM_ENV, PROCESS_PINNED_BUDGET, PinnedArena, PinnedBudget, aligned, budgeted_pinned
from engine.layers.state import ManagedLayer as LayerRecord
from engine.planning.planner import MAX_DEPTH
from engine.storage.stored import StoredTensor
from engine.transfer.host_arena import HostArena  # noqa: F401  (StreamedComponent.host_arena)
from engine.transfer.streamed import StreamedComponent, StreamStats

log = logging.getLogger(__name__)

DISK_PART = "file"  # SliceSpec.part of a parameter read from its .safetensors file

F = TypeVar("F", bound=Callable[..., Any])


def profiled(name: str) -> AbstractContextManager[Any]:
    """A named range ("lowvram.*") in a torch.profiler trace, so a GPU profile shows which copy,
    read or wait streaming spends its time in. Nothing while no profiler runs: an unrecorded
    record_function still costs ~8 us (measured on a CPU), and a step runs hundreds of layers.
    (The staging worker's ranges need `profile_all_threads` in the profiler's experimental config.)"""
    if getattr(autograd_profiler, "_is_profiler_enabled", True):  # torch's process-wide flag
        return record_function(name)
    return nullcontext()


def ranged(name: str) -> Callable[[F], F]:
    """Run the decorated function inside `profiled(name)`."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with profiled(name):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


@dataclass
class SliceSpec:
    """One host tensor (or file entry) of one parameter, at `offset` in its group's slot."""

    record: LayerRecord
    param: str
    # the stored copy's attribute (StoredTensor.parts): "tensor", or "data"/"scale" for FP8;
    # DISK_PART for a DiskStored master (its bytes are read from the file)
    part: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class Group:
    index: int
    name: str
    records: list[LayerRecord]
    slices: list[SliceSpec] = field(default_factory=list)
    nbytes: int = 0
    pageable: bool = False  # some source is not in pinned memory: staged by the worker
    disk_bytes: int = 0  # bytes read from checkpoint files (always staged by the worker)


@dataclass
class Loaded:
    slot: int
    event: Any  # copy-done event on the copy stream


def group_key(record: LayerRecord) -> str:
    return record.block or record.name


def build_groups(order: list[LayerRecord], source_of: Callable[[LayerRecord], dict[str, StoredTensor]]) -> list[Group]:
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
            for part, nbytes, dtype, shape in slice_layout(stored):
                group.slices.append(SliceSpec(record, param, part, group.nbytes, nbytes, dtype, shape))
                group.nbytes += aligned(nbytes)
                if part == DISK_PART:
                    group.disk_bytes += nbytes
                    group.pageable = True
    return groups


def slice_layout(stored: StoredTensor) -> list[tuple[str, int, torch.dtype, torch.Size]]:
    """(part, nbytes, dtype, shape) of each piece of a stored copy that crosses to the device:
    its host tensors, or its file entry when it is a disk master."""
    if isinstance(stored, DiskStored):
        entry = stored.entry
        return [(DISK_PART, entry.length, entry.dtype, torch.Size(entry.shape))]
    parts = stored.parts()
    if not parts:
        raise TypeError(f"{stored!r} is neither a host tensor nor a file entry")
    return [(part, t.nbytes, t.dtype, t.shape) for part, t in parts]


def max_group_bytes(runtime: StreamedComponent, records: list[LayerRecord]) -> int:
    """The largest group's slot bytes if `records` were all streamed (0 if they cannot be slot-copied)."""
    try:
        return _largest_group(records, lambda r: _stored_bytes(runtime.stream_source(r)))
    except TypeError:
        return 0


def planned_piece_bytes(runtime: StreamedComponent, record: LayerRecord, place: Place) -> list[int]:
    """Bytes of each piece a layer's copy at `place` sends through a slot, from its shapes alone
    (`build_groups` lays out the real copies; a meta build for the estimate has none): the stored
    form's pieces (FP8, int8 and NF4 data and scales), GGUF blocks as they are in the file, and a
    disk master as its file entry (the file's dtype, or its blocks)."""
    pieces: list[int] = []
    for item in runtime.shapes(record).values():  # (shape, dtype[, (form, bytes) of a file's blocks])
        encoded = item[2] if len(item) > 2 else None
        if place.on_disk:
            pieces.append(encoded[1] if encoded is not None else math.prod(item[0]) * item[1].itemsize)
        else:
            pieces += piece_bytes(item, place.dtype, runtime.comp_dtype)
    return pieces


def planned_group_bytes(runtime: StreamedComponent, records: list[LayerRecord], place: Place) -> int:
    """`max_group_bytes` from shapes: the largest group's slot bytes if `records` all streamed
    from `place` (the estimate's meta builds, whose masters are placeholders)."""
    return _largest_group(records, lambda r: planned_piece_bytes(runtime, r, place))


def staging_bytes(runtime: StreamedComponent, records: list[LayerRecord]) -> int:
    """Bytes of one staging buffer: the largest group in any form the component streams it from,
    its masters or, once onloaded, its onload copies (FP8 offload with bf16 onload: about twice
    the masters'). Sized from the masters alone, every group of onload copies would outgrow a
    buffer, and the worker would wait for the copy stream in the middle of each."""
    try:
        largest = _largest_group(records, lambda r: _stored_bytes(r.masters))
    except TypeError:
        largest = 0
    if makes_onload_copies(runtime):
        largest = max(largest, _largest_group(records, lambda r: _onload_copy_bytes(runtime, r)))
    return largest


def makes_onload_copies(runtime: StreamedComponent) -> bool:
    """Does onloading the component make a separate copy of each layer (VramRuntime.onload)?"""
    return runtime.onload_place != runtime.offload_place and not runtime.onload_is_resident


def _largest_group(records: list[LayerRecord], bytes_of: Callable[[LayerRecord], list[int]]) -> int:
    """The largest slot image of consecutive layers of one block (laid out as `build_groups`
    does: each piece 256-byte aligned), given the bytes of each layer's pieces."""
    largest = size = 0
    key = None
    for record in records:
        if group_key(record) != key:
            key, size = group_key(record), 0
        size += sum(aligned(n) for n in bytes_of(record))
        largest = max(largest, size)
    return largest


def _stored_bytes(source: dict[str, Any]) -> list[int]:
    return [nbytes for stored in source.values() for _, nbytes, _, _ in slice_layout(stored)]


def _onload_copy_bytes(runtime: StreamedComponent, record: LayerRecord) -> list[int]:
    """Bytes of each piece of a layer's onload copy, from its shapes: the copy is made at each
    onload (StoredTensor.to_place), so it may not exist yet (stored_layout: the pieces `store`
    makes at that place, FP8 scales and int8/nf4 scales included)."""
    place = runtime.onload_place
    return [
        math.prod(shape) * dtype.itemsize
        for logical in runtime.shapes(record).values()  # (shape, dtype[, (form, bytes) of a file's blocks])
        for shape, dtype in stored_layout(logical[0], logical[1], place.dtype, runtime.comp_dtype)
    ]


class StreamTimer:
    """Copy and compute time measured on the streams themselves (CUDA timing events), not with
    host clocks: the host runs ahead of the device, so a host clock around an asynchronous copy
    measures only its launch. Event pairs are kept in stream order and turned into seconds once
    the device has passed them (`collect`, at the end of each step), without waiting for them.
    Pairs are appended by the compute thread and the stager's worker (deque: thread-safe)."""

    def __init__(self, backend: DeviceBackend):
        self.backend = backend
        self.pending: dict[str, deque[tuple[Any, Any]]] = {"copy": deque(), "compute": deque()}

    def start(self, stream: Any) -> Any:
        return self.backend.timing_event(stream)

    def stop(self, kind: str, start: Any, stream: Any) -> None:
        if start is not None:
            self.pending[kind].append((start, self.backend.timing_event(stream)))

    def collect(self, stats: StreamStats) -> None:
        """Add every completed pair's seconds to `stats.copy_seconds` / `stats.compute_seconds`."""
        for kind, pairs in self.pending.items():
            while pairs:
                seconds = self.backend.elapsed_seconds(*pairs[0])
                if seconds is None:
                    break  # the device has not got there yet; later pairs are later still
                pairs.popleft()
                setattr(stats, f"{kind}_seconds", getattr(stats, f"{kind}_seconds") + seconds)


class TransferScheduler:
    """Prefetching streamer for one component. The runtime hands it every streamed layer."""

    def __init__(self, runtime: StreamedComponent, backend: DeviceBackend, stager: "Stager | None" = None):
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
        self.timer = StreamTimer(backend)
        self._compute_start: Any = None

    # --- building and tearing down ----------------------------------------------------------
    def max_group_bytes(self, records: list[LayerRecord]) -> int:
        """Slot size needed if `records` were all streamed (used by the planner's reserve)."""
        return max_group_bytes(self.runtime, records)

    @torch.compiler.disable
    @ranged("lowvram.build_schedule")
    def build(self, depth: int) -> None:
        """Lay out groups for the layers the current plan streams, allocate depth + 1 slots."""
        self.reset()
        runtime = self.runtime
        # only traced layers are scheduled; a layer the trace never saw streams synchronously
        traced = runtime.execution_order or []
        streamed = [r for r in traced if not runtime.wants_resident(r) and r.resident is None]
        try:
            self.groups = build_groups(streamed, self.runtime.stream_source)
        except TypeError:
            self.groups = []  # sources that cannot be slot-copied stream synchronously
        self.group_of = {id(r): g.index for g in self.groups for r in g.records}
        for group in self.groups:
            group.pageable = group.disk_bytes > 0 or any(not self.backend.is_pinned(self._part(spec)) for spec in group.slices)
        if not self.groups:
            self.ready = True
            return
        self.depth = max(1, min(depth, MAX_DEPTH, len(self.groups)))
        self.slot_bytes = max(g.nbytes for g in self.groups)
        if self.stager is not None:
            self.stager.fit(max((g.nbytes for g in self.groups if g.pageable), default=0))
        n_slots = self.depth + 1
        self.slots = [self.backend.allocate(self.slot_bytes) for _ in range(n_slots)]
        self.slot_owner = [None] * n_slots
        self.slot_free = [None] * n_slots
        runtime.ledger.add_slots(self.slot_bytes * n_slots)
        self.ready = True

    def reset(self) -> None:
        """Drop the schedule and free the slots (after in-flight copies and computes finished).
        Also after a failed staging job (a read error): then it waits for the whole copy stream,
        since the failed group may have enqueued some of its copies."""
        for event in self.slot_free:
            self.backend.host_wait(event)
        failed = False
        for loaded in self.loaded.values():
            event = loaded.event
            if isinstance(event, Future) and event.cancel():
                continue  # still queued on the worker: it never reads or copies anything
            if isinstance(event, Future) and event.exception() is not None:  # waits for the job
                failed = True
            else:
                self.backend.host_wait(self._event(loaded))
        if failed:
            self.backend.host_wait(self.backend.record(self.backend.copy_stream()))
        if self.slots:
            self.runtime.ledger.remove_slots(self.slot_bytes * len(self.slots))
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
        if self.stager is not None:
            # with a worker, every group's copies go through it, pinned ones too: it is the copy
            # stream's only producer, so copies keep their issue order, and the thread launching
            # compute never waits for a read or a pageable copy still queued before it
            event: Any = self.stager.submit(lambda: self._copy_group(index, slot, free_event))
        else:
            event = self._copy_group(index, slot, free_event)
        self.loaded[index] = Loaded(slot, event)
        self.slot_owner[slot] = index

    @ranged("lowvram.copy_group")
    def _copy_group(self, index: int, slot: int, free_event: Any) -> Any:
        """Enqueue the group's copies into `slot` on the copy stream; returns the copy-done event.
        Runs on the stager's worker for pageable groups (disk reads included)."""
        backend = self.backend
        stream = backend.copy_stream()
        backend.wait(stream, free_event)  # the slot's previous consumer is done
        buffer = self.slots[slot]
        stager = self.stager
        started = self.timer.start(stream)
        try:
            for spec in self.groups[index].slices:
                dst = buffer[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
                if spec.part == DISK_PART:
                    entry = self._entry(spec)
                    source = stager.read(entry) if stager is not None else entry.file.read(entry)
                else:
                    source = self._part(spec)
                    if stager is not None and not backend.is_pinned(source):
                        source = stager.stage(source)
                backend.copy(dst, source, stream)
        finally:
            # also after a read error: the staging buffers used so far are free once the copies
            # already enqueued from them are done
            self.timer.stop("copy", started, stream)
            event = backend.record(stream)
            if stager is not None:
                stager.staged_copies_issued(event)
        return event

    def _event(self, loaded: Loaded) -> Any:
        event = loaded.event
        return event.result() if isinstance(event, Future) else event

    def _part(self, spec: SliceSpec) -> torch.Tensor:
        return getattr(self.runtime.stream_source(spec.record)[spec.param], spec.part)

    def _entry(self, spec: SliceSpec) -> TensorEntry:
        return self.runtime.stream_source(spec.record)[spec.param].entry

    @ranged("lowvram.prefetch")
    def _prefetch_after(self, index: int) -> None:
        n = len(self.groups)
        for k in range(1, self.depth + 1):
            ahead = index + k
            if ahead >= n:
                if not self._next_forward_expected():
                    return
                ahead %= n  # wraps into the next step
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
        compute = self.backend.compute_stream()
        self.timer.stop("compute", self._compute_start, compute)
        self._compute_start = None
        self.slot_free[loaded.slot] = self.backend.record(compute)
        self.slot_owner[loaded.slot] = None
        self.current = None

    @ranged("lowvram.enter_group")
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
        self.runtime.stats.streamed_bytes += self.groups[index].nbytes  # consumed, not just issued
        compute = self.backend.compute_stream()
        self.backend.wait(compute, self._event(self.loaded[index]))
        self._compute_start = self.timer.start(compute)  # after the wait: compute time excludes stalls
        self._prefetch_after(index)

    def has(self, record: LayerRecord) -> bool:
        """Is this layer in the schedule? (Else the component streams it synchronously.)"""
        return id(record) in self.group_of

    @torch.compiler.disable  # the transfer path: torch.compile of a model runs it as it is
    def compute(self, record: LayerRecord, args: tuple, kwargs: dict) -> Any:
        """Compute a scheduled layer from its group's slot."""
        index = self.group_of[id(record)]
        if index != self.current:
            try:
                self._enter(index)
            except Exception:
                # a failed read (or copy): drop everything in flight, so the model stays usable
                # and the next forward lays the schedule out again
                self.reset()
                raise
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
        source = runtime.stream_source(record)
        for param, found in parts.items():
            # the stored form rebuilds its computation tensor from the slot views (a plain tensor
            # may come back as the view itself; quantized bytes are dequantized here, on the device)
            with profiled("lowvram.dequantize"):
                tensor = source[param].from_parts(found, comp_dtype)
            aliased = any(tensor is view for view in found.values())
            if aliased and not record.is_leaf:
                # a container's forward runs children of other groups, and entering one hands
                # this slot to the next prefetch while the container still reads its weights
                # (Z-Image's pad tokens): it computes from its own copy, made in stream order
                tensor = tensor.clone()
                aliased = False
            if not aliased:
                transient += tensor.nbytes
            params[param] = tensor
        ledger = runtime.ledger
        ledger.add_transient(transient)
        record.enter_computation()
        try:
            return record.module._vram_compute(params, args, kwargs)
        finally:
            record.exit_computation()
            ledger.remove_transient(transient)
            runtime.stats.streamed_layers += 1

    @torch.compiler.disable
    def end_forward(self) -> None:
        """The component's forward returned: free the last group's slot and keep prefetching
        from the top of the order, so the next step starts with its first groups loaded (unless
        the owner said no forward follows)."""
        if not self.groups or self.current is None:
            return
        last = self.current
        self._finish_current()
        self._prefetch_after(last)
        self.timer.collect(self.runtime.stats)

    def _next_forward_expected(self) -> bool:
        """Does another forward follow this one, so that prefetch may wrap into it? The owner says
        so when it knows (`runtime.forwards_left`: forwards still to run, this one included; a
        pipeline sets it before its last step); not knowing means yes."""
        left = self.runtime.forwards_left
        return left is None or left > 1

    def slots_in_flight(self) -> int:
        return len(self.loaded)


class Stager:
    """Worker thread that fills pinned staging buffers and enqueues the device copies from them,
    so the thread launching compute never blocks on a pageable copy or a disk read.

    Pageable host tensors are copied in (`stage`); disk-offloaded parameters are read from their
    file straight into the buffer (`read`). Two staging buffers alternate; before one is refilled
    the worker waits (on its own thread) for the device copy that read it last. The buffers are
    pinned within the pinned-RAM budget; a buffer the budget has no room for stays pageable.
    """

    def __init__(self, backend: DeviceBackend, buffer_bytes: int, n_buffers: int = 2, budget: PinnedBudget = PROCESS_PINNED_BUDGET):
        self.backend = backend
        self.budget = budget
        self.n_buffers = n_buffers
        self._pin_buffers(buffer_bytes)
        self.jobs: "queue.Queue[tuple[Callable[[], Any], Future] | None]" = queue.Queue()
        # the thread holds the queue, not the stager, so a dropped stager is collected and its
        # finalizer stops the thread
        self.thread = threading.Thread(target=_run_jobs, args=(self.jobs,), name="lowvram-stager", daemon=True)
        self.thread.start()
        self._stop = weakref.finalize(self, self.jobs.put, None)
        self.staged_bytes = 0  # bytes that went through the staging buffers (copies and reads)
        self.read_bytes = 0  # of which read from checkpoint files
        self.fresh_reads = 0  # file tensors larger than a staging buffer, read into a fresh tensor
        self.overflows = 0  # groups that outgrew a staging buffer (the worker then waits for copies)
        self._overflowed = False  # the current group did

    def _pin_buffers(self, buffer_bytes: int) -> None:
        """Allocate the staging buffers, pinned as far as the budget allows."""
        backend, budget, n_buffers = self.backend, self.budget, self.n_buffers
        self.buffer_bytes = buffer_bytes
        self.buffers: list[torch.Tensor] = []
        registered: list[torch.Tensor] = []
        self.pinned_bytes = 0  # of the buffers, taken from `budget` until close
        refused = 0
        for _ in range(n_buffers):
            buffer, how = budgeted_pinned(backend, buffer_bytes, budget)
            self.buffers.append(buffer)
            registered += [buffer] if how == "registered" else []
            self.pinned_bytes += buffer_bytes if how in ("registered", "pinned") else 0
            refused += how == "refused"
        if refused:
            log.warning(
                "%d of %d staging buffers (%.1f MB each) are pageable: the pinned-RAM budget has %.1f of %.1f GB left "
                "(%s sets it); copies through them are synchronous and slower",
                refused, n_buffers, buffer_bytes / 1024**2, budget.room / 1024**3, budget.limit_bytes / 1024**3, PINNED_RAM_ENV,
            )
        self.buffer_done: list[Any] = [None] * n_buffers
        # unpin after the last copies that read the buffers, on close or when the stager is dropped
        self._unpin = weakref.finalize(self, _unpin_staging, backend, registered, self.buffer_done, budget, self.pinned_bytes)
        self.current = 0
        self.offset = 0
        self.used_in_group: set[int] = set()

    def fit(self, group_bytes: int) -> None:
        """Grow the staging buffers to hold a group of `group_bytes` (a schedule whose groups came
        out larger than the ones the buffers were sized for): else every such group would wait for
        the copy stream midway. Only between schedules; waits for the jobs still queued."""
        if group_bytes <= self.buffer_bytes:
            return
        self.drain()
        self._unpin()  # after the copies that read the old buffers; their budget is given back
        self._pin_buffers(group_bytes)

    def submit(self, job: "Callable[[], Any]") -> Future:
        future: Future = Future()
        self.jobs.put((job, future))
        return future

    def drain(self) -> None:
        """Wait until every submitted job has enqueued its copies."""
        self.submit(lambda: None).result()

    @ranged("lowvram.stage")
    def stage(self, source: torch.Tensor) -> torch.Tensor:
        """Copy `source` into the current staging buffer (switching buffers when full)."""
        nbytes = source.nbytes
        if nbytes > self.buffer_bytes:
            return source  # larger than a staging buffer: copied from pageable memory directly
        view = self._reserve(nbytes, source.dtype, source.shape)
        view.copy_(source)
        self.staged_bytes += nbytes
        return view

    @ranged("lowvram.read")
    def read(self, entry: TensorEntry) -> torch.Tensor:
        """Read a file entry with a positional read straight into the current staging buffer.
        A CheckpointError propagates (to the job's future)."""
        if entry.length > self.buffer_bytes:
            # larger than a staging buffer: a fresh tensor, freed once its copy is done
            self.fresh_reads += 1
            return entry.file.read(entry)
        view = self._reserve(entry.length, entry.dtype, torch.Size(entry.shape))
        entry.file.read_into(entry, view)
        self.staged_bytes += entry.length
        self.read_bytes += entry.length
        return view

    def _reserve(self, nbytes: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """The next `nbytes` of staging memory, once no device copy still reads them."""
        if self.offset + nbytes > self.buffer_bytes:
            self.overflows += not self._overflowed
            self._overflowed = True
            self._switch()
            if self.current in self.used_in_group:
                # the group outgrew both buffers: wait for the copies already enqueued from this one
                with profiled("lowvram.wait_staging_buffer"):
                    self.backend.host_wait(self.backend.record(self.backend.copy_stream()))
        if self.current not in self.used_in_group:
            with profiled("lowvram.wait_staging_buffer"):
                self.backend.host_wait(self.buffer_done[self.current])  # its last reader finished
            self.used_in_group.add(self.current)
        view = self.buffers[self.current][self.offset : self.offset + nbytes].view(dtype).view(shape)
        self.offset += aligned(nbytes)
        return view

    def _switch(self) -> None:
        self.current = (self.current + 1) % len(self.buffers)
        self.offset = 0

    def staged_copies_issued(self, event: Any) -> None:
        """The group's copies are enqueued: the buffers it used are free once `event` completes."""
        for index in self.used_in_group:
            self.buffer_done[index] = event
        self.used_in_group = set()
        self._overflowed = False
        self._switch()

    def close(self) -> None:
        self._stop()
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            # still reading (a slow disk): it may yet copy from the staging buffers, so they stay
            # pinned (and allocated) rather than be unregistered under it
            log.warning("the staging worker did not stop within 30 s; its pinned buffers are left in place")
            self._unpin.detach()
            return
        self._unpin()


def _unpin_staging(backend: DeviceBackend, registered: list[torch.Tensor], done: list[Any], budget: PinnedBudget, pinned_bytes: int) -> None:
    for event in done:
        backend.host_wait(event)
    for buffer in registered:
        backend.unregister(buffer)
    budget.give_back(pinned_bytes)


def pin_and_stage(runtime: StreamedComponent, backend: DeviceBackend, budget: PinnedBudget) -> tuple[PinnedArena, "Stager | None"]:
    """Pin the component's host masters under `budget` and start a staging worker for what cannot
    be copied asynchronously as it is: disk masters, masters left pageable, and onload copies
    (made in pageable RAM at each onload). When staging is certain, the staging buffers' bytes
    are held back while the masters are pinned: every pageable byte crosses through them, so
    they are worth more pinned than two more groups of masters."""
    size = max(1, staging_bytes(runtime, runtime.planning_order()))
    held = budget.take(2 * size) if _staging_certain(runtime, budget) else 0
    try:
        arena = PinnedArena(runtime, backend, budget)
        arena.build()
    finally:
        budget.give_back(held)
    stager = Stager(backend, size, budget=budget) if _needs_staging(runtime, backend) else None
    return arena, stager


def _host_tensors(runtime: StreamedComponent) -> list[torch.Tensor]:
    return [t for r in runtime.layers for s in r.masters.values() for _, t in s.parts() if t.device.type == "cpu"]


def _has_disk_masters(runtime: StreamedComponent) -> bool:
    return any(isinstance(s, DiskStored) for r in runtime.layers for s in r.masters.values())


def _staging_certain(runtime: StreamedComponent, budget: PinnedBudget) -> bool:
    """Will the component need staging buffers whatever is pinned: masters on disk, onload
    copies, or more host masters than the pinned budget has room for?"""
    return _has_disk_masters(runtime) or makes_onload_copies(runtime) or sum(t.nbytes for t in _host_tensors(runtime)) > budget.room


def _needs_staging(runtime: StreamedComponent, backend: DeviceBackend) -> bool:
    """Once the masters are pinned: is anything left that the device cannot copy asynchronously?"""
    return _has_disk_masters(runtime) or makes_onload_copies(runtime) or any(not backend.is_pinned(t) for t in _host_tensors(runtime))


def _run_jobs(jobs: "queue.Queue[tuple[Callable[[], Any], Future] | None]") -> None:
    """The stager's worker loop: run each job, hand its result (or error) to its future; a job
    whose future was cancelled while it waited (a schedule dropped) is skipped."""
    while True:
        item = jobs.get()
        if item is None:
            return
        job, future = item
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(job())
        except BaseException as exc:  # surfaced to the compute thread through the future
            future.set_exception(exc)
