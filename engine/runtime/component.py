"""One managed component at run time: its layers, how they move, and the streamed forward.

States (DiffSynth's model, engine.layers.state): offload and onload are set by whoever owns the
component (the pipeline, through `offload()` / `onload()`); preparing (a resident copy on the
computation device) is chosen by the planner within the budget and filled lazily at the layer's
next forward, from the copy that forward streams anyway (so a re-plan never reads weights);
computation is transient, only inside forward.

A layer's forward takes one of four routes (`forward_layer`): in place (resident in
computation form, handled by the layer class itself), from its resident copy, through the
transfer scheduler's slots, or synchronously from the copy it streams from.

A component is a member of a memory pool (engine.runtime.pool): it reports its costs, fixed and
held bytes through `PoolMember` and takes its part of the pool's plan; when it changes something
the plan depends on (onloaded, offloaded, a scheduler started, its LoRA factors) it tells the pool
through the one path back, `pool.member_changed` (engine.runtime.member), and never plans itself.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import torch
from torch import nn

from engine.config import Place, VramConfig
from engine.layers.adapters import Adapter
from engine.layers.state import STATES, LayerState, ManagedLayer
from engine.planning.ledger import VramLedger
from engine.planning.planner import LayerCost, MemberCost
from engine.runtime.member import Change, Coordinator
from engine.storage.stored import PlainStored, StoredTensor, piece_bytes, workspace_bytes
from engine.transfer.devices import DeviceBackend
from engine.transfer.host_arena import HostArena
from engine.transfer.pinned import PinnedArena, PinnedBudget
from engine.transfer.resident import copy_to_device
from engine.transfer.scheduler import TransferScheduler, max_group_bytes, pin_and_stage
from engine.transfer.streamed import StreamStats

log = logging.getLogger(__name__)

# Kept for users' scripts and older tests: a layer's record is its ManagedLayer.
LayerRecord = ManagedLayer


class ReadAhead(Protocol):
    """Read-ahead for the synchronous path (engine.loading.prefetch.DiskPrefetcher)."""

    def on_layer_start(self, layer: ManagedLayer, source: dict[str, StoredTensor]) -> dict[str, torch.Tensor] | None:
        """The layer's computation parameters when they were read ahead (else None); queues the
        next layers' reads."""

    def clear(self) -> None: ...

    def close(self) -> None: ...


def bytes_at(shapes: dict[str, tuple], place: Place, compute_dtype: torch.dtype) -> int:
    """Bytes a layer's parameters take when stored at `place`: the real bytes of each form, its
    scales included (engine.storage.stored.piece_bytes). An entry may carry a third item, the
    (form, bytes) of blocks a checkpoint file already holds in a form (GGUF), which is what such a
    tensor takes at a place of that form (blocks are moved as they are)."""
    if place.on_disk:
        return 0
    return sum(sum(piece_bytes(item, place.dtype, compute_dtype)) for item in shapes.values())


class VramRuntime:
    """The managed layers of one model (a pipeline component) and how they move."""

    def __init__(self, model: nn.Module, config: VramConfig, pool: Coordinator, name: str):
        self.model = model
        self.config = config
        self.pool = pool  # its coordinator (engine.runtime.pool.MemoryPool), told of changes only
        self.ledger: VramLedger = pool.ledger  # the pool's, which counts for every member
        self.name = name
        self.layers: list[ManagedLayer] = []
        self.active = False  # onloaded by the pipeline
        self.execution_order: list[ManagedLayer] | None = None
        self.trace: list[ManagedLayer] | None = None
        self.stats = StreamStats()
        # buffers and parameters a module map leaves out, on the computation device (set at enable)
        self.unmanaged_bytes = 0
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
        # Optional read-ahead, set by engine.load_model for disk offload. Only the synchronous
        # path uses it: layers the scheduler streams are read by its stager.
        self.prefetcher: ReadAhead | None = None
        # Optional prefetching streamer (engine.transfer.scheduler): copy stream, slot ring.
        self.scheduler: TransferScheduler | None = None
        self.backend: DeviceBackend | None = None
        self.arena: PinnedArena | None = None  # pinned host memory, while a scheduler streams
        self.host_arena: HostArena | None = None  # the buffer the loader read the masters into
        self.pinned_budget: PinnedBudget | None = None  # None: the pool's
        self.pin_priority = 1  # lower pins first (the pipeline gives its denoiser 0)
        self.stream_depth = 1  # prefetch depth the last plan gave
        self.resident_plan: frozenset[int] = frozenset()  # ids of the layers the last plan keeps resident
        self._planned_active = False  # whether the last plan saw the component onloaded
        # forwards the owner still expects, the running one included (None: unknown); at 1 the
        # scheduler does not prefetch into a next forward that will not come (engine.transfer.scheduler)
        self.forwards_left: int | None = None
        # OOM reliefs in force (engine.runtime.oom): a step's batch runs in this many parts, and
        # whether the model's attention was sliced
        self.batch_chunks = 1
        self.attention_sliced = False
        self.attention_chunks = 1
        self.compiled: Any = None  # what engine.compilation.compile_model did (None: eager)

    @property
    def budget(self) -> Coordinator:
        return self.pool

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            f"{self.name}: a model under VRAM management cannot be deep-copied: call "
            "engine.disable_vram_management(model) first, copy the plain model, then manage each copy"
        )

    # --- what the pool reads (engine.runtime.member.PoolMember) ----------------------------------
    @property
    def fixed_bytes(self) -> int:
        """Bytes on the computation device whatever the plan: buffers and parameters a map leaves
        out, and the LoRA factors its layers hold (engine.layers.adapters)."""
        return self.unmanaged_bytes + self.adapter_bytes()

    def adapter_bytes(self) -> int:
        return sum(layer.lora.nbytes for layer in self.layers if layer.lora is not None)

    @property
    def computes_on_cpu(self) -> bool:
        return getattr(self.comp_device, "type", str(self.comp_device)) == "cpu"

    def resident_is_master(self) -> bool:
        """A resident copy of this component is its RAM master itself (the preparing place is the
        offload place in RAM, so `to_place` returns the master): keeping it costs no RAM."""
        off, prep = self.offload_place, self.preparing_place
        return (
            self.computes_on_cpu
            and not off.on_disk
            and getattr(off.device, "type", None) == "cpu"
            and getattr(prep.device, "type", None) == "cpu"
            and off.dtype == prep.dtype
        )

    def ram_held_bytes(self) -> int:
        """What the planner counts for this component that is already in RAM: its resident
        copies, or, when those are its masters, the resident cost of its layers while onloaded."""
        if self.resident_is_master():
            return sum(self.resident_cost(layer) for layer in self.layers) if self.active else 0
        return sum(layer.resident_bytes for layer in self.layers)

    # --- sizes -------------------------------------------------------------------------------
    def shapes(self, layer: ManagedLayer) -> dict[str, tuple[torch.Size, torch.dtype]]:
        key = id(layer)
        if key not in self._shapes:
            self._shapes[key] = {name: (s.shape, _logical_dtype(s), s.encoded) for name, s in layer.masters.items()}
        return self._shapes[key]

    def resident_cost(self, layer: ManagedLayer) -> int:
        return bytes_at(self.shapes(layer), self.preparing_place, self.comp_dtype)

    def computation_bytes(self, layer: ManagedLayer) -> int:
        return bytes_at(self.shapes(layer), Place(self.comp_device, self.comp_dtype), self.comp_dtype)

    def resident_is_computation_form(self) -> bool:
        return self.preparing_place.device == self.comp_device and self.preparing_place.dtype == self.comp_dtype

    def transient_cost(self, layer: ManagedLayer, resident: bool) -> int:
        """Bytes a forward of this layer adds on the computation device beyond resident copies."""
        key = (id(layer), resident, self.active)
        cost = self._transient_cache.get(key)
        if cost is None:
            cost = self._transient_cache[key] = self._transient_cost(layer, resident)
        return cost

    def _transient_cost(self, layer: ManagedLayer, resident: bool) -> int:
        if resident:
            return 0 if self.resident_is_computation_form() else self.computation_bytes(layer)
        source = self.stream_source_place()
        comp = self.computation_bytes(layer) + self._dequant_workspace(layer, source)
        if source.on_disk:
            # a .safetensors tensor lands in its file dtype (bf16: as is); GGUF blocks land, then dequantize
            return comp + sum(item[2][1] for item in self.shapes(layer).values() if item[2] is not None)
        if source.dtype != self.comp_dtype:  # the source form lands first, then converts
            return comp + bytes_at(self.shapes(layer), Place(self.comp_device, source.dtype), self.comp_dtype)
        return comp

    def _dequant_workspace(self, layer: ManagedLayer, source: Place) -> int:
        """Temporaries of rebuilding the layer's largest tensor from its stored form on the
        computation device (the form's codec: int8, nf4 codes, GGUF blocks; none for FP8)."""
        return max((workspace_bytes(item, source.dtype) for item in self.shapes(layer).values()), default=0)

    def stream_source(self, layer: ManagedLayer) -> dict[str, StoredTensor]:
        """The copy a non-resident layer streams from: its onload copy while the component is
        onloaded and has one, else its master."""
        if self.active and layer.onload_copy is not None:
            return layer.onload_copy
        return layer.masters

    def stream_source_place(self) -> Place:
        return self.onload_place if self.active and not self.onload_is_resident else self.offload_place

    def costs(self) -> MemberCost:
        """What the planner needs to know of this component (plain data)."""
        order = self.planning_order()
        layers = tuple(
            LayerCost(id(layer), self.resident_cost(layer), self.transient_cost(layer, True), self.transient_cost(layer, False), layer.is_leaf)
            for layer in order
        )
        group_bytes = max_group_bytes(self, order) if self.scheduler is not None else None
        return MemberCost(id(self), layers, group_bytes)

    # --- component states (the pipeline's switch) ------------------------------------------------
    def onload(self) -> None:
        """The component will run soon: onload copies where the config asks for them, then re-plan."""
        if self.active:
            return
        self.active = True
        separate_copy = self.onload_place != self.offload_place and not self.onload_is_resident
        for layer in self.layers:
            layer.onload({n: s.to_place(self.onload_place, self.comp_dtype) for n, s in layer.masters.items()} if separate_copy else None)
        self.pool.member_changed(self, Change.ONLOADED)

    def offload(self) -> None:
        """The component will not run soon: drop every copy but the master."""
        if not self.active and all(layer.resident is None for layer in self.layers):
            return
        self.active = False
        if self.prefetcher is not None:
            self.prefetcher.clear()
        for layer in self.layers:
            self.ledger.remove_resident(layer.offload())
        self.pool.member_changed(self, Change.OFFLOADED)

    # --- residency ----------------------------------------------------------------------------
    def apply_plan(self, resident: frozenset[int], depth: int) -> None:
        """Take this component's part of a plan: copies that lost residency are dropped now. The
        schedule is laid out again only when the streamed set, the prefetch depth or the onload
        state changed (a re-plan for another component leaves this one's slots alone)."""
        mine = frozenset(resident.intersection(id(layer) for layer in self.layers))
        # an onload or offload changes what streams from where, and frees or needs the slots
        changed = mine != self.resident_plan or depth != self.stream_depth or self.active != self._planned_active
        self.resident_plan, self.stream_depth, self._planned_active = mine, depth, self.active
        if changed:
            self.drop_schedule()
        for layer in self.layers:
            if layer.resident is not None and id(layer) not in mine:
                self.ledger.remove_resident(layer.drop_resident())

    def wants_resident(self, layer: ManagedLayer) -> bool:
        return self.active and id(layer) in self.resident_plan

    def _fill_resident(self, layer: ManagedLayer) -> None:
        """The plan keeps this layer resident: its copy is made from the one it streams anyway,
        copied without blocking the host where the device streams (engine.transfer.resident)."""
        source = self.stream_source(layer)
        device = self.preparing_place.device
        if self.backend is not None and not _is_host(device):
            source = copy_to_device(self.backend, source, device) or source
        copies = {name: stored.to_place(self.preparing_place, self.comp_dtype) for name, stored in source.items()}
        nbytes = self.resident_cost(layer)
        layer.make_resident(copies, nbytes, self.resident_is_computation_form())
        self.ledger.add_resident(nbytes)

    # --- the streamed forward -----------------------------------------------------------------
    @torch.compiler.disable  # the transfer path's entry from model code: torch.compile runs it as it is
    def forward_layer(self, layer: ManagedLayer, args: tuple, kwargs: dict) -> Any:
        """A layer's forward when it is not resident in computation form (the class's fast path)."""
        if not self.active:
            self.pool.member_changed(self, Change.NEEDED)  # the owner's stage switch decides
        if self.trace is not None:
            self.trace.append(layer)
        resident = layer.resident
        if resident is None and self.active and id(layer) in self.resident_plan:
            self._fill_resident(layer)
            if layer.fast:
                return self._run_in_place(layer, args, kwargs)
            resident = layer.resident
        if resident is not None:
            return self._run_from(layer, resident, True, args, kwargs)
        if self.scheduler is not None and self._scheduled(layer):
            return self.scheduler.compute(layer, args, kwargs)
        return self._run_from(layer, self.stream_source(layer), False, args, kwargs)

    def _run_in_place(self, layer: ManagedLayer, args: tuple, kwargs: dict) -> Any:
        with layer.computing():
            return layer.module._vram_run_in_place(args, kwargs)

    def _run_from(self, layer: ManagedLayer, source: dict[str, StoredTensor], resident: bool, args: tuple, kwargs: dict) -> Any:
        """Materialize computation copies from `source` (a resident copy or the streamed one)."""
        transient = self.transient_cost(layer, resident)
        ledger = self.ledger
        ledger.add_transient(transient)
        layer.enter_computation()
        try:
            t0 = time.perf_counter()
            params = self.prefetcher.on_layer_start(layer, source) if self.prefetcher is not None else None
            if params is None:
                params = {name: stored.materialize(self.comp_device, self.comp_dtype) for name, stored in source.items()}
            t1 = time.perf_counter()
            out = layer.module._vram_compute(params, args, kwargs)
            t2 = time.perf_counter()
        finally:
            layer.exit_computation()
            ledger.remove_transient(transient)
        stats = self.stats
        stats.copy_seconds += t1 - t0
        stats.compute_seconds += t2 - t1
        if not resident:
            stats.streamed_layers += 1
            stats.streamed_bytes += sum(s.nbytes for s in source.values())
        return out

    def _scheduled(self, layer: ManagedLayer) -> bool:
        """Does the transfer scheduler stream this layer? Lays the schedule out when the order is
        known (the first forward traces it, streaming synchronously)."""
        scheduler = self.scheduler
        if scheduler is None or not self.active:
            return False
        if not scheduler.ready:
            if self.execution_order is None:
                return False
            scheduler.build(self.stream_depth)
            if self.prefetcher is not None:
                self.prefetcher.clear()  # reads queued for layers the scheduler now streams itself
        if scheduler.has(layer):
            return True
        if scheduler.groups:
            self.stats.sync_fallbacks += 1
        return False

    def is_scheduled(self, layer: ManagedLayer) -> bool:
        """Will the transfer scheduler stream this layer's next forward (so nothing else reads it)?"""
        scheduler = self.scheduler
        return scheduler is not None and self.active and scheduler.ready and scheduler.has(layer)

    # --- the transfer path ------------------------------------------------------------------------
    def use_scheduler(self, backend: DeviceBackend, pinned_budget: PinnedBudget | None = None) -> None:
        """Stream through a TransferScheduler on `backend` (engine.transfer.devices) instead of
        layer by layer. Host masters are pinned (in place where the device can register memory)
        when the pool assigns pinned RAM, by priority, once the component is onloaded; what stays
        pageable, and masters left on disk, go through a worker thread's pinned staging buffers."""
        self.close_scheduler()
        self.backend = backend
        self.pinned_budget = pinned_budget
        self.scheduler = TransferScheduler(self, backend, None)
        self.pool.member_changed(self, Change.STREAMING)

    def needs_pinning(self) -> bool:
        return self.scheduler is not None and self.arena is None

    def pin_masters(self, budget: PinnedBudget) -> None:
        """Pin what the budget grants (its own, when `use_scheduler` was given one, else the
        pool's `budget`) and start a staging worker for what cannot be copied asynchronously as it
        is (engine.transfer.scheduler.pin_and_stage)."""
        assert self.backend is not None and self.scheduler is not None
        self.arena, self.scheduler.stager = pin_and_stage(self, self.backend, self.pinned_budget or budget)

    # --- LoRA factors (engine.lora converts the files; the component owns what its layers hold) ----
    def attach_adapters(self, adapters: list[tuple[ManagedLayer, Adapter]]) -> int:
        """Apply each adapter to its layer, after the ones already there; returns their bytes. The
        pool re-reads this component's fixed bytes and re-plans."""
        for layer, adapter in adapters:
            layer.attach_adapter(adapter)
        self.pool.member_changed(self, Change.FIXED)
        return sum(adapter.nbytes for _, adapter in adapters)

    def detach_adapters(self, key: int) -> int:
        """Take LoRA `key`'s adapters off every layer; returns their bytes (the pool re-plans)."""
        freed = sum(layer.detach_adapters(key) for layer in self.layers)
        self.pool.member_changed(self, Change.FIXED)
        return freed

    def drop_schedule(self) -> None:
        """Free the scheduler's slots; it lays its groups out again at the next forward."""
        if self.scheduler is not None:
            self.scheduler.reset()

    def collect_timings(self) -> None:
        """Add the copy/compute times the device has finished measuring to `stats` (a scheduler
        times on the streams, so its figures arrive when the device got there, not at launch)."""
        if self.scheduler is not None:
            self.scheduler.timer.collect(self.stats)

    def close_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.reset()
            if self.scheduler.stager is not None:
                self.scheduler.stager.close()
            self.scheduler = None
        if self.arena is not None:
            self.arena.release()
            self.arena = None

    def close(self) -> None:
        """Stop streaming for good: the scheduler, its pinned memory and the read-ahead go."""
        self.close_scheduler()
        if self.prefetcher is not None:
            self.prefetcher.close()

    # --- execution order tracing ----------------------------------------------------------------
    # the step's bookkeeping runs eagerly even when the whole model is compiled: the trace is filled
    # by the layers' opaque steps (engine.layers.opaque), which a traced end_step would not see
    @torch.compiler.disable
    def begin_step(self) -> None:
        """Called by the component's entry hook (engine.runtime.entry) before a forward/encode/decode."""
        self.stats.forwards += 1
        if self.execution_order is None and self.trace is None:
            self.trace = []

    @torch.compiler.disable
    def end_step(self) -> None:
        if self.trace is not None:
            seen: set[int] = set()
            order = []
            for layer in self.trace:
                if id(layer) not in seen:
                    seen.add(id(layer))
                    order.append(layer)
            self.execution_order = order
            self.trace = None
        if self.scheduler is not None:
            self.scheduler.end_forward()
        if self.forwards_left:
            self.forwards_left -= 1

    @torch.compiler.disable
    def abandon_trace(self) -> None:
        """A step failed: what it traced is no execution order."""
        self.trace = None

    def planning_order(self) -> list[ManagedLayer]:
        """Traced execution order, then any layer the trace did not see, in registration order."""
        if self.execution_order is None:
            return list(self.layers)
        seen = {id(layer) for layer in self.execution_order}
        return list(self.execution_order) + [layer for layer in self.layers if id(layer) not in seen]

    # --- reporting ------------------------------------------------------------------------------
    def state_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for layer in self.layers:
            counts[layer.state.value] += 1
        return counts

    def state_bytes(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for layer in self.layers:
            state = layer.state
            if state is LayerState.PREPARING:
                out[state.value] += layer.resident_bytes
            elif state is LayerState.COMPUTATION:
                out[state.value] += self.resident_cost(layer) if layer.fast else self.computation_bytes(layer)
            elif state is LayerState.ONLOAD and layer.onload_copy is not None:
                out[state.value] += sum(s.nbytes for n, s in layer.onload_copy.items() if n in layer.owned)
            else:
                out[state.value] += sum(s.nbytes for n, s in layer.masters.items() if n in layer.owned)
        return out


def _logical_dtype(stored: StoredTensor) -> torch.dtype:
    """The dtype a parameter had before storage (quantized copies report the float dtype they
    stand for)."""
    if isinstance(stored, PlainStored):
        return stored.tensor.dtype
    return getattr(stored, "logical_dtype", torch.bfloat16)


def _is_host(device: torch.device) -> bool:
    """Is `device` host memory (no copy stream to fill a resident copy through)?"""
    return device.type == "cpu"
