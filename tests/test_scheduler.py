"""The prefetching transfer scheduler, checked on CPU against a recording fake device.

The fake keeps two streams as ordered op lists and events as positions in them, the way CUDA
orders work, so the checks below are the real happens-before rules:
- every group's copy is issued, and waited on by the compute stream, before its layers compute;
- no slot is overwritten before the compute that read its previous content finished;
- prefetch runs `depth` groups ahead and wraps from the last group to the first of the next step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from engine import enable_vram_management, layer_state_counts, runtime_of, set_vram_limit, vram_budget
from engine.transfer.devices import DeviceBackend
from engine.layers.managed import ManagedModule
from engine.runtime.oom import VramExhaustedError

GB = 1024**3


@dataclass(frozen=True)
class Event:
    stream: str
    position: int  # number of ops on `stream` when recorded


class RecordingBackend(DeviceBackend):
    """Runs copies synchronously on the CPU (so results are real) and records stream order."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.streams: dict[str, list[tuple]] = {"compute": [], "copy": []}
        self.timeline: list[tuple] = []  # (stream, position) in issue order
        self.slots: list[torch.Tensor] = []

    def compute_stream(self):
        return "compute"

    def copy_stream(self):
        return "copy"

    def _append(self, stream: str, op: tuple) -> None:
        self.streams[stream].append(op)
        self.timeline.append((stream, len(self.streams[stream]) - 1))

    def record(self, stream):
        return Event(stream, len(self.streams[stream]))

    def wait(self, stream, event):
        if event is not None:
            self._append(stream, ("wait", event))

    def allocate(self, nbytes):
        slot = torch.empty(nbytes, dtype=torch.uint8)
        self.slots.append(slot)
        return slot

    def slot_of(self, tensor: torch.Tensor) -> int | None:
        ptr = tensor.untyped_storage().data_ptr()
        for i, slot in enumerate(self.slots):
            if slot.untyped_storage().data_ptr() == ptr:
                return i
        return None

    def copy(self, dst, src, stream):
        dst.copy_(src)
        self._append(stream, ("copy", self.slot_of(dst)))

    def compute(self, name: str, slot: int | None) -> None:
        self._append("compute", ("compute", name, slot))

    # --- the checks ------------------------------------------------------------------------
    def check_ordering(self) -> None:
        last_copy: dict[int, int] = {}  # slot -> copy-stream position of its latest copy
        last_read: dict[int, int] = {}  # slot -> compute-stream position of its latest reader
        for stream, pos in self.timeline:
            op = self.streams[stream][pos]
            if op[0] == "copy":
                slot = op[1]
                if slot in last_read:
                    assert self._waited("copy", pos, "compute", last_read[slot]), f"slot {slot} overwritten before its reader finished"
                last_copy[slot] = pos
            elif op[0] == "compute" and op[2] is not None:
                slot = op[2]
                assert slot in last_copy, f"{op[1]} computed from slot {slot} before any copy into it"
                assert self._waited("compute", pos, "copy", last_copy[slot]), f"{op[1]} computed before its copy was waited on"
                last_read[slot] = pos

    def _waited(self, stream: str, pos: int, other: str, other_pos: int) -> bool:
        """Did `stream` wait, before `pos`, on an event of `other` recorded after op `other_pos`?"""
        return any(
            op[0] == "wait" and op[1].stream == other and op[1].position > other_pos for op in self.streams[stream][:pos]
        )


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class Stack(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 6):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x)


def make_stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().to(torch.bfloat16).eval()


X = torch.randn(4, 32).to(torch.bfloat16)


def name_blocks(model: nn.Module) -> None:
    """Group layers by block, as a shipped module map declares it."""
    for record in runtime_of(model).layers:
        if record.name.startswith("blocks."):
            record.block = ".".join(record.name.split(".")[:2])


def scheduled(plain: nn.Module, config: dict, limit: float | None, backend: RecordingBackend, monkeypatch) -> nn.Module:
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config=config, vram_limit=limit)
    name_blocks(model)
    runtime_of(model).use_scheduler(backend)
    log_computes(backend, monkeypatch)
    return model


def log_computes(backend: RecordingBackend, monkeypatch) -> None:
    """Record each layer's compute, with the slot its weights come from, on the compute stream."""
    original = ManagedModule._vram_compute

    def logged(self, params, args, kwargs):
        slots = {backend.slot_of(t) for t in params.values()}
        slots.discard(None)
        backend.compute(self._vram.name, slots.pop() if slots else None)
        return original(self, params, args, kwargs)

    monkeypatch.setattr(ManagedModule, "_vram_compute", logged)


CPU = {"computation_device": "cpu", "computation_dtype": "bfloat16"}
FP8 = dict(CPU, offload_dtype="float8_e4m3fn", onload_dtype="float8_e4m3fn", preparing_dtype="float8_e4m3fn")


@pytest.mark.parametrize("config", [CPU, FP8], ids=["bf16", "fp8"])
def test_streaming_schedule_is_ordered_and_bitwise_equal(config, monkeypatch):
    plain = make_stack()
    backend = RecordingBackend()
    model = scheduled(plain, config, 0, backend, monkeypatch)
    reference = copy.deepcopy(plain)
    if config is FP8:  # same FP8 weights, unscheduled: the scheduler must not change a bit
        enable_vram_management(reference, vram_config=config, vram_limit=0)
    outputs = [model(X) for _ in range(4)]
    expected = reference(X)
    for out in outputs:
        assert torch.equal(out, expected)
    backend.check_ordering()
    runtime = runtime_of(model)
    scheduler = runtime.scheduler
    assert [g.name for g in scheduler.groups] == ["proj_in"] + [f"blocks.{i}" for i in range(6)] + ["proj_out"]
    assert runtime.stats.sync_fallbacks == 0
    # at vram_limit=0 exactly two slots (one computing, one in flight)
    assert len(backend.slots) == 2 and scheduler.depth == 1
    assert vram_budget(model).slot_bytes == 2 * scheduler.slot_bytes
    assert layer_state_counts(model)["preparing"] == 0


def test_prefetch_depth_follows_budget_and_wraps_around(monkeypatch):
    plain = make_stack()
    probe = copy.deepcopy(plain)
    enable_vram_management(probe, vram_config=CPU, vram_limit=0)
    reserve = vram_budget(probe).streaming_reserve()
    backend = RecordingBackend()
    # room for the streaming reserve plus a few groups more, but not for everything resident
    model = scheduled(plain, CPU, None, backend, monkeypatch)
    model(X)  # trace
    group_bytes = runtime_of(model).scheduler.max_group_bytes(runtime_of(model).planning_order())
    set_vram_limit(model, (reserve + 3 * group_bytes) / GB)
    vram_budget(model).reset_peak()
    for _ in range(3):
        assert torch.equal(model(X), plain(X))
    backend.check_ordering()
    scheduler = runtime_of(model).scheduler
    assert scheduler.depth >= 2
    assert len(backend.slots) == scheduler.depth + 1
    # wrap-around: after a forward returns, the first groups of the next step are already in flight
    first_group = scheduler.groups[0].index
    assert first_group in scheduler.loaded
    ops_before = len(backend.streams["copy"])
    compute_mark = len(backend.streams["compute"])
    model(X)
    # the first compute of this step waited on a copy issued during the previous step
    first_wait = next(op for op in backend.streams["compute"][compute_mark:] if op[0] == "wait")
    assert first_wait[1].stream == "copy" and first_wait[1].position <= ops_before
    assert vram_budget(model).peak_bytes <= vram_budget(model).limit_bytes


def test_untraced_layer_falls_back_synchronously(monkeypatch):
    class Branchy(Stack):
        def __init__(self):
            super().__init__()
            self.rare = nn.Linear(32, 32)
            self.use_rare = False

        def forward(self, x):
            x = super().forward(x)
            return self.rare(x) if self.use_rare else x

    torch.manual_seed(0)
    plain = Branchy().to(torch.bfloat16).eval()
    backend = RecordingBackend()
    model = scheduled(plain, CPU, 0, backend, monkeypatch)
    model(X)
    model(X)
    model.use_rare = plain.use_rare = True
    assert torch.equal(model(X), plain(X))
    assert runtime_of(model).stats.sync_fallbacks == 1
    backend.check_ordering()


def test_oom_in_a_step_retries_with_lower_residency_and_stops_when_nothing_lowers_the_peak():
    plain = make_stack()
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config=CPU, vram_limit=None)
    model(X)
    budget = vram_budget(model)
    resident_before = budget.resident_bytes
    failures = {"left": 1}
    calls = {"n": 0}

    def oom_once(_module, _inputs):
        calls["n"] += 1
        if failures["left"]:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = model.blocks[3].fc1.register_forward_pre_hook(oom_once)
    assert torch.equal(model(X), plain(X))  # the retry succeeded
    assert runtime_of(model).stats.oom_retries == 1
    assert budget.resident_bytes <= resident_before // 2
    assert budget.transient_bytes == 0
    # a step that keeps failing tries each relief once (residency halved again, the batch of 4
    # split), then stops at once with a message naming the settings that would fit
    failures["left"], calls["n"] = 100, 0
    with pytest.raises(VramExhaustedError, match="Settings that would fit: a smaller image") as raised:
        model(X)
    assert "retried with half the resident layers, then the batch split in two" in str(raised.value)
    assert calls["n"] == 3  # the first try and two retries under two different plans, no more
    failures["left"] = 0
    handle.remove()
    assert budget.transient_bytes == 0
    assert torch.equal(model(X), plain(X))


def test_other_errors_are_not_retried():
    model = enable_vram_management(make_stack(), vram_config=CPU, vram_limit=0)
    model.blocks[0].fc1.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(ValueError("bad input")))
    with pytest.raises(ValueError, match="bad input"):
        model(X)
    assert runtime_of(model).stats.oom_retries == 0


class PinningBackend(RecordingBackend):
    """Also hands out 'pinned' buffers (plain tensors it remembers) for the arena and staging."""

    def __init__(self):
        super().__init__()
        self.pinned: list[torch.Tensor] = []

    def pin(self, nbytes):
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.pinned.append(buffer)
        return buffer

    def is_pinned(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for b in self.pinned)

    def host_wait(self, event):
        pass


def host_bytes_aligned(model) -> int:
    from engine.transfer.pinned import aligned

    return sum(aligned(p.nbytes) for p in model.parameters())


def test_pinned_arena_is_one_exact_buffer_and_repoints_masters(monkeypatch):
    from engine.transfer.pinned import PinnedBudget

    plain = make_stack()
    backend = PinningBackend()
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config=CPU, vram_limit=0)
    runtime = runtime_of(model)
    runtime.use_scheduler(backend, PinnedBudget(limit_bytes=10 * GB))
    assert len(backend.pinned) == 1
    assert backend.pinned[0].numel() == host_bytes_aligned(plain)  # exact size, no rounding
    assert runtime.arena.report.pageable_bytes == 0
    for record in runtime.layers:
        for stored in record.masters.values():
            assert backend.is_pinned(stored.tensor)
    # parameter slots show the arena views, not stale pageable copies
    assert backend.is_pinned(model.proj_in.weight)
    for _ in range(3):
        assert torch.equal(model(X), plain(X))
    assert runtime.scheduler.stager is None


def test_pinned_budget_overflow_is_staged_by_the_worker(monkeypatch):
    from engine.transfer.pinned import PinnedBudget

    plain = make_stack()
    backend = PinningBackend()
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config=CPU, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    half = host_bytes_aligned(plain) // 2
    pinned_budget = PinnedBudget(limit_bytes=half)
    runtime.use_scheduler(backend, pinned_budget)
    report = runtime.arena.report
    assert 0 < report.pinned_bytes <= half and report.pageable_bytes > 0
    stager = runtime.scheduler.stager
    assert stager is not None
    # the staging buffers are pinned within the budget too, held back from the masters first
    assert stager.pinned_bytes == 2 * stager.buffer_bytes and all(backend.is_pinned(b) for b in stager.buffers)
    assert pinned_budget.used == report.pinned_bytes + stager.pinned_bytes <= half
    log_computes(backend, monkeypatch)
    for _ in range(4):
        assert torch.equal(model(X), plain(X))
    backend.check_ordering()
    assert stager.staged_bytes > 0
    assert any(g.pageable for g in runtime.scheduler.groups) and not all(g.pageable for g in runtime.scheduler.groups)
    runtime.close_scheduler()
    assert pinned_budget.used == 0


def test_dropped_component_returns_its_pinned_bytes_and_stops_its_worker():
    import gc

    from engine.transfer.pinned import PinnedBudget

    plain = make_stack()
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config=CPU, vram_limit=0)
    pinned_budget = PinnedBudget(limit_bytes=host_bytes_aligned(plain) // 2)
    runtime_of(model).use_scheduler(PinningBackend(), pinned_budget)
    thread = runtime_of(model).scheduler.stager.thread
    assert pinned_budget.used > 0 and thread.is_alive()
    del model
    gc.collect()
    thread.join(timeout=5)
    assert pinned_budget.used == 0
    assert not thread.is_alive()


class TimingBackend(RecordingBackend):
    """Timing events are ticks of a fake clock (one per event); the 'device' has only reached the
    events up to `reached`, as a GPU running behind the host would."""

    def __init__(self):
        super().__init__()
        self.clock = 0.0
        self.reached = float("inf")

    def timing_event(self, stream):
        self.clock += 1.0
        return self.clock

    def elapsed_seconds(self, start, end):
        return None if end > self.reached else end - start


def test_copy_and_compute_times_come_from_stream_events_once_the_device_got_there(monkeypatch):
    plain = make_stack()
    backend = TimingBackend()
    backend.reached = 0.0  # nothing finished on the device yet
    model = scheduled(plain, CPU, 0, backend, monkeypatch)
    runtime = runtime_of(model)
    assert torch.equal(model(X), plain(X))  # the traced forward streams synchronously (host clock)
    traced = copy.copy(runtime.stats)
    for _ in range(3):
        assert torch.equal(model(X), plain(X))
    timer = runtime.scheduler.timer
    copies, computes = len(timer.pending["copy"]), len(timer.pending["compute"])
    assert copies > 0 and computes > 0
    assert (runtime.stats.copy_seconds, runtime.stats.compute_seconds) == (traced.copy_seconds, traced.compute_seconds)
    backend.reached = float("inf")
    runtime.collect_timings()
    assert not timer.pending["copy"] and not timer.pending["compute"]
    # start and end of each group's copies are adjacent ticks; compute brackets also hold the
    # prefetch launches, so they span more
    assert runtime.stats.copy_seconds - traced.copy_seconds == copies
    assert runtime.stats.compute_seconds - traced.compute_seconds >= computes


def test_device_timing_stops_at_the_first_unfinished_pair():
    from engine.runtime.component import StreamStats
    from engine.transfer.scheduler import StreamTimer

    backend = TimingBackend()
    timer = StreamTimer(backend)
    for _ in range(3):
        timer.stop("copy", timer.start("copy"), "copy")  # pairs (1,2), (3,4), (5,6)
    stats = StreamStats()
    backend.reached = 4.0  # the third pair ends at tick 6: not there yet
    timer.collect(stats)
    assert stats.copy_seconds == 2.0 and len(timer.pending["copy"]) == 1
    backend.reached = 6.0
    timer.collect(stats)
    assert stats.copy_seconds == 3.0 and not timer.pending["copy"]


def test_cpu_backend_times_the_schedule_with_the_host_clock():
    from engine.transfer.devices import CpuBackend

    plain = make_stack()
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config=CPU, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    runtime.use_scheduler(CpuBackend())
    for _ in range(3):
        assert torch.equal(model(X), plain(X))
    assert runtime.stats.sync_fallbacks == 0
    assert runtime.stats.copy_seconds > 0 and runtime.stats.compute_seconds > 0


@pytest.mark.parametrize("name", ["ZImageTransformer2DModel", "QwenImageTransformer2DModel", "FluxTransformer2DModel", "CLIPTextModel"])
def test_real_models_through_the_cpu_scheduler_are_bitwise_equal(name):
    """The synchronous CpuBackend copies into the slot ring for real, so a layer that reads a slot
    after it was handed to the next group reads other weights here too. Z-Image's root holds pad
    tokens it reads after its children (other groups) ran: the case that made this test."""
    from engine.transfer.devices import CpuBackend
    from tests.fixtures.tiny_models import run_model, tiny_model

    plain, inputs = tiny_model(name, torch.bfloat16)
    expected = run_model(plain, inputs)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=CPU, vram_limit=0)
    runtime = runtime_of(model)
    runtime.use_scheduler(CpuBackend())
    for _ in range(3):  # traced, then scheduled with wrap-around prefetch
        assert torch.equal(run_model(model, inputs), expected)
    assert runtime.stats.sync_fallbacks == 0 and runtime.scheduler.groups


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_what_counts_as_out_of_memory(error, expected):
    from engine.runtime.oom import is_oom

    assert is_oom(error) is expected


# --- the CUDA backend's host-side details, without a GPU ----------------------------------------
def test_events_the_host_waits_on_block_and_timing_events_stay_apart(monkeypatch):
    """A default CUDA event spins a core in `synchronize()`; the stager's worker waits on the copy
    events every group, so those are blocking-sync events. Timing events are only queried."""
    from engine.transfer.devices import CudaBackend

    made: list[dict] = []

    class FakeEvent:
        def __init__(self, **flags):
            made.append(flags)

        def record(self, stream):
            pass

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    backend = object.__new__(CudaBackend)  # no device: only the event flags are checked
    backend.record("copy")
    backend.timing_event("copy")
    assert made == [{"blocking": True}, {"enable_timing": True}]


@pytest.mark.parametrize(
    ("binding", "mapped", "loadable", "cleared_by"),
    [
        (True, ["/opt/cuda/libcudart.so.12.4"], {"/opt/cuda/libcudart.so.12.4", "libcudart.so"}, "torch"),
        (False, ["/opt/cuda/libcudart.so.12.4"], {"/opt/cuda/libcudart.so.12.4", "libcudart.so"}, "/opt/cuda/libcudart.so.12.4"),
        (False, [], {"libcudart.so.12", "libcudart.so.13"}, "libcudart.so.12"),
        (False, ["/gone/libcudart.so.12"], {"libcudart.so.13"}, "libcudart.so.13"),
        (False, [], set(), None),
    ],
    ids=["torch-binding", "mapped-libcudart", "by-name", "mapped-but-unloadable", "none"],
)
def test_a_failed_registration_clears_the_cuda_error_with_whatever_runtime_is_there(binding, mapped, loadable, cleared_by, monkeypatch, tmp_path, caplog):
    """torch's cudart binding first (when it has cudaGetLastError), then the libcudart the process
    mapped, then the usual library names; nothing found is a no-op with a debug line."""
    import ctypes
    import logging
    import types

    from engine.transfer import devices

    cleared: list[str] = []

    def clearer(name):
        return lambda: cleared.append(name) or 0

    binding_module = types.SimpleNamespace(cudaGetLastError=clearer("torch")) if binding else types.SimpleNamespace()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: binding_module)
    maps = tmp_path / "maps"
    maps.write_text("".join(f"7f00-7f01 r-xp 00000000 08:01 42 {path}\n" for path in mapped) + "7f02-7f03 r--p 0 08:01 7 /usr/lib/libc.so.6\n")
    monkeypatch.setattr(devices, "MAPS", str(maps))
    opened: list[str] = []

    def cdll(name):
        opened.append(name)
        if name not in loadable:
            raise OSError(f"{name}: cannot open shared object file")
        return types.SimpleNamespace(cudaGetLastError=clearer(name))

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    with caplog.at_level(logging.DEBUG, logger=devices.__name__):
        devices._clear_cuda_error()
    assert cleared == ([cleared_by] if cleared_by else [])
    if cleared_by == "torch":
        assert opened == []
    if cleared_by is None:
        assert opened == mapped + list(devices.CUDART_NAMES)
        assert "no cudaGetLastError found" in caplog.text


# --- the end of a run -----------------------------------------------------------------------------
def test_no_prefetch_past_the_last_forward_and_streamed_bytes_are_the_groups_consumed(monkeypatch):
    """Wrap-around prefetch loads the next step's first groups; after the last step (the owner
    says so with `forwards_left`) there is none, so nothing is copied (or read from disk) for it.
    Streamed bytes count groups a forward entered, not copies issued ahead."""
    plain = make_stack()
    backend = RecordingBackend()
    model = scheduled(plain, CPU, 0, backend, monkeypatch)
    name_blocks(model)
    runtime = runtime_of(model)
    model(X)  # traced, synchronous
    before = runtime.stats.streamed_bytes
    model(X)  # the first scheduled forward: its wrap-around prefetch is the next forward's
    scheduler = runtime.scheduler
    per_forward = sum(g.nbytes for g in scheduler.groups)
    assert runtime.stats.streamed_bytes - before == per_forward
    assert scheduler.groups[0].index in scheduler.loaded  # the next step's first group is in flight
    runtime.forwards_left = 2  # two more forwards (say cond and uncond of the last step)
    model(X)
    assert scheduler.groups[0].index in scheduler.loaded and runtime.forwards_left == 1
    copies = len(backend.streams["copy"])
    assert torch.equal(model(X), plain(X))
    assert scheduler.loaded == {} and runtime.forwards_left == 0
    assert runtime.stats.streamed_bytes - before == 3 * per_forward
    # the last forward copied its groups but the ones already in flight, and no group beyond
    copied = sum(op[0] == "copy" for op in backend.streams["copy"][copies:])
    prefetched_slices = len(scheduler.groups[0].slices)
    assert copied == sum(len(g.slices) for g in scheduler.groups) - prefetched_slices
    backend.check_ordering()


def test_a_cancelled_staging_job_is_skipped_and_the_worker_lives_on():
    """A dropped schedule cancels the jobs still queued on the worker (reads nobody will use);
    the worker skips them instead of running them and dying on the cancelled future."""
    import threading

    from engine.transfer.scheduler import Stager

    stager = Stager(PinningBackend(), 1024)
    gate = threading.Event()
    ran: list[str] = []
    first = stager.submit(lambda: gate.wait(5) and ran.append("first"))
    second = stager.submit(lambda: ran.append("second"))
    assert second.cancel()
    gate.set()
    stager.submit(lambda: ran.append("third")).result(timeout=5)
    assert first.done() and ran == ["first", "third"]
    stager.close()


# --- staging buffers: sized for every form a group streams from, pinned within the budget ---------
FP8_OFFLOAD_BF16_ONLOAD = dict(CPU, offload_dtype="float8_e4m3fn", onload_dtype="bfloat16", preparing_dtype="bfloat16")


def test_staging_buffers_fit_the_onload_copies_of_an_fp8_offload(monkeypatch):
    """On a GPU the scheduler starts before onload, when a layer streams from its FP8 master;
    onloaded it streams from its bf16 onload copy, twice the size. Staging buffers sized from the
    masters made every group outgrow its buffer (and wait for the copy stream midway). (The pool
    pins, and starts the staging worker, at the first onload.)"""
    from engine.transfer.pinned import PinnedBudget

    plain = make_stack()
    reference = enable_vram_management(copy.deepcopy(plain), vram_config=FP8_OFFLOAD_BF16_ONLOAD, vram_limit=0)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=FP8_OFFLOAD_BF16_ONLOAD, vram_limit=0, onload=False)
    name_blocks(model)
    runtime = runtime_of(model)
    backend = PinningBackend()
    runtime.use_scheduler(backend, PinnedBudget(limit_bytes=10 * GB))
    assert runtime.arena is None  # nothing pinned before the component is onloaded
    runtime.onload()
    stager = runtime.scheduler.stager
    log_computes(backend, monkeypatch)
    for _ in range(4):
        assert torch.equal(model(X), reference(X))
    backend.check_ordering()
    scheduler = runtime.scheduler
    assert all(g.pageable for g in scheduler.groups) and stager.staged_bytes > 0
    assert stager.overflows == 0 and runtime.stats.sync_fallbacks == 0
    assert stager.buffer_bytes == max(g.nbytes for g in scheduler.groups)  # the bf16 form, exactly


def test_staging_buffers_the_budget_has_no_room_for_stay_pageable_and_say_so(caplog):
    import logging

    from engine.transfer.devices import CpuBackend
    from engine.transfer.pinned import PinnedBudget
    from engine.transfer.scheduler import Stager

    backend = PinningBackend()
    budget = PinnedBudget(limit_bytes=1500)
    with caplog.at_level(logging.WARNING, logger="engine.transfer.scheduler"):
        stager = Stager(backend, 1024, budget=budget)
    assert stager.pinned_bytes == budget.used == 1024  # taken before pinning
    assert backend.is_pinned(stager.buffers[0]) and not backend.is_pinned(stager.buffers[1])
    assert "1 of 2 staging buffers (0.0 MB each) are pageable" in caplog.text
    stager.close()
    assert budget.used == 0  # given back on close
    # a device that pins nothing keeps nothing of the budget (and has nothing to say)
    caplog.clear()
    stager = Stager(CpuBackend(), 1024, budget=budget)
    assert stager.pinned_bytes == budget.used == 0 and "pageable" not in caplog.text
    stager.close()


# --- a readable profile, and torch.compile stays out of the transfer path --------------------------
def profiled_names(action) -> set[str]:
    """Names of the "lowvram.*" ranges a torch.profiler CPU profile of `action()` shows, the
    staging worker's thread included."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
        action()
    return {e.name for e in prof.events() if e.name.startswith("lowvram.")}


def test_a_profile_of_a_scheduled_forward_names_the_transfer_work(monkeypatch):
    from engine.transfer.pinned import PinnedBudget

    plain = make_stack()
    model = enable_vram_management(copy.deepcopy(plain), vram_config=FP8, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    runtime.use_scheduler(PinningBackend(), PinnedBudget(limit_bytes=host_bytes_aligned(plain) // 3))  # some staged
    model(X)  # traced, synchronous

    def two_forwards():
        model(X)
        model(X)
        runtime.scheduler.stager.drain()

    names = profiled_names(two_forwards)
    expected = {"lowvram.build_schedule", "lowvram.enter_group", "lowvram.prefetch", "lowvram.copy_group", "lowvram.stage", "lowvram.dequantize"}
    assert expected <= names, names
    assert profiled_names(lambda: None) == set()


def test_the_transfer_path_is_outside_torch_compile(monkeypatch):
    """Entry points from model code are `torch.compiler.disable`d: a compiled model runs the
    scheduler as it is (its copies, events and slot ring are no graph), with the same results."""
    from engine.runtime.component import VramRuntime
    from engine.transfer.scheduler import TransferScheduler

    for entry in (VramRuntime.forward_layer, TransferScheduler.compute, TransferScheduler.end_forward, TransferScheduler.build):
        assert getattr(entry, "_torchdynamo_disable", False), entry
    plain = make_stack()
    backend = RecordingBackend()
    model = scheduled(plain, CPU, 0, backend, monkeypatch)
    compiled = torch.compile(model, backend="eager")
    for _ in range(3):
        assert torch.equal(compiled(X), plain(X))
    assert runtime_of(model).stats.sync_fallbacks == 0 and runtime_of(model).scheduler.groups
    backend.check_ordering()


def test_a_schedule_with_larger_groups_grows_the_staging_buffers(monkeypatch):
    """Staging buffers sized for smaller groups (another order, another plan) are grown, within
    the budget, when a schedule is laid out: no group outgrows them."""
    from engine.transfer.pinned import PinnedBudget
    from engine.transfer.scheduler import Stager

    plain = make_stack()
    reference = enable_vram_management(copy.deepcopy(plain), vram_config=FP8_OFFLOAD_BF16_ONLOAD, vram_limit=0)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=FP8_OFFLOAD_BF16_ONLOAD, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    backend = PinningBackend()
    budget = PinnedBudget(limit_bytes=10 * GB)
    runtime.use_scheduler(backend, budget)
    scheduler = runtime.scheduler
    scheduler.stager.close()
    scheduler.stager = small = Stager(backend, 1024, budget=budget)
    model(X)  # traced
    log_computes(backend, monkeypatch)
    for _ in range(3):
        assert torch.equal(model(X), reference(X))
    largest = max(g.nbytes for g in scheduler.groups)
    assert small.buffer_bytes == largest and small.overflows == 0
    assert small.pinned_bytes == 2 * largest and budget.used == runtime.arena.report.pinned_bytes + 2 * largest
    assert all(backend.is_pinned(b) for b in small.buffers)
    backend.check_ordering()
    runtime.close_scheduler()
    assert budget.used == 0
