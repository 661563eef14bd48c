"""Pinning without a second copy: load_model reads RAM masters into one exact-size host arena, and
the scheduler's pinned arena registers it in place (cudaHostRegister on CUDA).

Checked on CPU with a fake device that records what it registers and what it pins: the masters
are views of one buffer of exactly their size; registering it pins every master with no copy and
no second buffer, so host RAM does not grow when streaming starts (the copy path, kept for models
built in RAM, does grow by the model's size: measured side by side); a pinned budget smaller than
the arena registers a page-aligned prefix that cuts no tensor; a device that cannot register
falls back to the copy. Outputs stay bitwise those of the unmanaged model.
"""

from __future__ import annotations

import copy
import gc
import mmap
from pathlib import Path

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from engine import enable_vram_management, load_model, runtime_of
from engine.config import Place
from engine.transfer.devices import RegisteredRanges
from engine.transfer.host_arena import release_free_heap
from engine.loading.loader import read_stored
from engine.transfer.pinned import PinnedBudget
from engine.storage.fp8 import ScaledFp8Stored
from tests.test_scheduler import Block, PinningBackend, Stack, log_computes, name_blocks

GB = 1024**3
CPU_BF16 = {"offload_dtype": torch.bfloat16, "offload_device": "cpu", "computation_dtype": torch.bfloat16, "computation_device": "cpu"}
CPU_FP8 = dict(CPU_BF16, offload_dtype="float8_e4m3fn")


class LinearStack(ModelMixin, ConfigMixin):
    """tests.test_scheduler's Stack as a diffusers model class, so load_model can build it from
    its config.json."""

    @register_to_config
    def __init__(self, dim: int = 64, depth: int = 6):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    forward = Stack.forward


class RegisteringBackend(PinningBackend):
    """Also pins existing buffers in place and judges them by address range, with the CUDA
    backend's own bookkeeping (engine.devices.RegisteredRanges), as cudaHostRegister does."""

    def __init__(self, registers: bool = True):
        super().__init__()
        self.registers = registers
        self.ranges = RegisteredRanges()
        self.unregistered: list[int] = []

    @property
    def registered(self) -> list[tuple[int, int]]:
        return list(self.ranges.ranges.items())

    def can_register(self):
        return self.registers

    def pin(self, nbytes):
        return super().pin(nbytes).zero_()  # page-locked memory is resident from the start, as here

    def register(self, buffer):
        if not self.registers:
            return False
        self.ranges.add(buffer)
        return True

    def unregister(self, buffer):
        self.unregistered.append(buffer.data_ptr())
        self.ranges.remove(buffer)

    def is_pinned(self, tensor):
        covered = self.ranges.covers(tensor)
        return super().is_pinned(tensor) if covered is None else covered


def save_stack(directory: Path, dim: int = 64, depth: int = 6, seed: int = 0) -> tuple[LinearStack, Path]:
    torch.manual_seed(seed)
    model = LinearStack(dim=dim, depth=depth).to(torch.bfloat16).eval()
    model.save_pretrained(directory)
    return model, directory


def master_parts(runtime):
    return [t for r in runtime.layers for s in r.masters.values() for _, t in s.parts()]


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    return save_stack(tmp_path_factory.mktemp("stack"))


def x_for(dim: int = 64) -> torch.Tensor:
    return torch.randn(4, dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


@pytest.mark.parametrize("config", [CPU_BF16, CPU_FP8], ids=["bf16", "fp8"])
def test_masters_are_views_of_one_exact_size_arena(stack_dir, config):
    plain, directory = stack_dir
    model = load_model(LinearStack, directory, vram_config=config, vram_limit=0)
    runtime = runtime_of(model)
    arena = runtime.host_arena
    assert arena is not None and arena.offset == arena.nbytes  # sized from the headers, exactly used
    parts = master_parts(runtime)
    assert parts and all(arena.contains(t) for t in parts)
    if config is CPU_FP8:
        assert any(isinstance(s, ScaledFp8Stored) for r in runtime.layers for s in r.masters.values())
        # bitwise what the loader makes without an arena
        place = Place(torch.device("cpu"), torch.float8_e4m3fn)
        from engine.storage.disk import SafetensorsFile

        shard = SafetensorsFile(next(directory.glob("*.safetensors")))
        entry = shard.entries["blocks.0.fc1.weight"]
        alone = read_stored(entry, place, torch.bfloat16)
        loaded = runtime_of(model).layers[1].masters["weight"]
        assert torch.equal(alone.data.view(torch.uint8), loaded.data.view(torch.uint8))
        assert torch.equal(alone.scale, loaded.scale)
    else:
        assert torch.equal(model(x_for()), plain(x_for()))


def test_registering_the_arena_pins_every_master_without_a_copy(stack_dir, monkeypatch):
    plain, directory = stack_dir
    model = load_model(LinearStack, directory, vram_config=CPU_BF16, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    backend = RegisteringBackend()
    budget = PinnedBudget(limit_bytes=10 * GB)
    runtime.use_scheduler(backend, budget)
    report = runtime.arena.report
    assert report.in_place_bytes == runtime.host_arena.nbytes == report.pinned_bytes
    assert report.pageable_bytes == 0
    assert backend.registered == [(runtime.host_arena.buffer.data_ptr(), runtime.host_arena.nbytes)]
    assert backend.pinned == []  # no second buffer, no staging buffers
    assert runtime.scheduler.stager is None
    assert all(backend.is_pinned(t) for t in master_parts(runtime))
    log_computes(backend, monkeypatch)
    for _ in range(3):
        assert torch.equal(model(x_for()), plain(x_for()))
    backend.check_ordering()
    assert runtime.stats.sync_fallbacks == 0
    runtime.close_scheduler()
    assert backend.unregistered and budget.used == 0


def test_a_smaller_budget_registers_a_page_aligned_prefix_that_cuts_no_tensor(stack_dir, monkeypatch):
    plain, directory = stack_dir
    model = load_model(LinearStack, directory, vram_config=CPU_BF16, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    backend = RegisteringBackend()
    budget = PinnedBudget(limit_bytes=runtime.host_arena.nbytes // 2)
    runtime.use_scheduler(backend, budget)
    start, length = backend.registered[0]  # then the two staging buffers
    assert start == runtime.host_arena.buffer.data_ptr()
    assert 0 < length <= runtime.host_arena.nbytes // 2 and length % mmap.PAGESIZE == 0
    for t in master_parts(runtime):  # each tensor is wholly inside or wholly outside
        begin, end = t.data_ptr() - start, t.data_ptr() - start + t.nbytes
        assert end <= length or begin >= length
    report = runtime.arena.report
    assert report.in_place_bytes == length and report.pageable_bytes > 0
    stager = runtime.scheduler.stager
    assert stager is not None  # the rest is staged, through staging buffers pinned in place too
    assert [n for _, n in backend.registered[1:]] == [stager.buffer_bytes] * 2 and backend.pinned == []
    # which the budget counts as well: the arena got what the staging buffers left
    assert budget.used == length + stager.pinned_bytes == length + 2 * stager.buffer_bytes <= budget.limit_bytes
    log_computes(backend, monkeypatch)
    for _ in range(3):
        assert torch.equal(model(x_for()), plain(x_for()))
    backend.check_ordering()
    assert stager.staged_bytes > 0
    runtime.close_scheduler()
    assert budget.used == 0 and backend.registered == []  # all unregistered


def test_registered_ranges_judge_a_partly_registered_buffer_by_address():
    """torch's is_pinned looks at the storage's start only; the tail of a buffer registered in
    part must read as pageable, so the stager copies it instead of a blocking 'async' copy."""
    from engine.transfer.host_arena import HostArena

    arena = HostArena(4 * mmap.PAGESIZE)
    head, tail = arena.take((mmap.PAGESIZE,), torch.uint8), arena.take((mmap.PAGESIZE,), torch.uint8)
    ranges = RegisteredRanges()
    ranges.add(arena.buffer[: mmap.PAGESIZE])
    assert ranges.covers(head) is True and ranges.covers(tail) is False
    assert ranges.covers(torch.empty(8)) is None  # not ours: torch decides
    ranges.remove(arena.buffer[: mmap.PAGESIZE])
    assert ranges.covers(head) is None


def test_a_budget_below_the_first_tensor_leaves_the_loader_arena_pageable_not_copied(stack_dir, monkeypatch):
    plain, directory = stack_dir
    model = load_model(LinearStack, directory, vram_config=CPU_BF16, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    backend = RegisteringBackend()
    runtime.use_scheduler(backend, PinnedBudget(limit_bytes=256))
    report = runtime.arena.report
    assert report.pinned_bytes == 0 and report.pageable_bytes > 0
    assert runtime.arena.packed is None and runtime.arena.buffer is None  # no second copy anywhere
    assert all(runtime.host_arena.contains(t) for t in master_parts(runtime))
    log_computes(backend, monkeypatch)
    for _ in range(2):
        assert torch.equal(model(x_for()), plain(x_for()))
    backend.check_ordering()


def test_a_device_that_cannot_register_falls_back_to_one_packed_copy(stack_dir, monkeypatch):
    plain, directory = stack_dir
    model = load_model(LinearStack, directory, vram_config=CPU_BF16, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    backend = RegisteringBackend(registers=False)
    runtime.use_scheduler(backend, PinnedBudget(limit_bytes=10 * GB))
    report = runtime.arena.report
    assert report.in_place_bytes == 0 and report.pageable_bytes == 0
    assert len(backend.pinned) == 1 and report.pinned_bytes == backend.pinned[0].numel()
    assert all(backend.is_pinned(t) and not runtime.host_arena.contains(t) for t in master_parts(runtime))
    log_computes(backend, monkeypatch)
    assert torch.equal(model(x_for()), plain(x_for()))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def peak_growth(action) -> int:
    """How far the resident set peaks above where it was, while `action` runs (Linux: VmHWM is
    reset by writing 5 to /proc/self/clear_refs)."""
    gc.collect()
    release_free_heap()  # free heap pages would otherwise be reused without showing in the RSS
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    action()
    return _status_kb("VmHWM") - before


def test_pinning_never_holds_the_masters_twice(tmp_path):
    """The point of it all, measured as the peak of the resident set while streaming starts:
    masters the loader read into its arena are registered where they are (~0 extra); masters of
    a model built in RAM are moved into a new arena one tensor at a time, each old one freed as it
    goes (a few MiB extra); only a device that cannot register pays ~1x for a pinned copy."""
    dim, depth = 1024, 8
    plain, directory = save_stack(tmp_path / "mid", dim=dim, depth=depth)
    model_bytes = sum(p.nbytes for p in plain.parameters())

    def start_streaming(model, backend):
        return lambda: runtime_of(model).use_scheduler(backend, PinnedBudget(limit_bytes=10 * GB))

    loaded = load_model(LinearStack, directory, vram_config=CPU_BF16, vram_limit=0)
    from_loader = peak_growth(start_streaming(loaded, RegisteringBackend()))
    in_ram = enable_vram_management(copy.deepcopy(plain), vram_config=CPU_BF16, vram_limit=0)
    moved = peak_growth(start_streaming(in_ram, RegisteringBackend()))
    copied_model = enable_vram_management(copy.deepcopy(plain), vram_config=CPU_BF16, vram_limit=0)
    copied = peak_growth(start_streaming(copied_model, RegisteringBackend(registers=False)))

    mib = 2**20
    print(f"masters {model_bytes / mib:.0f} MiB; peak RSS growth: loader arena registered +{from_loader / mib:.1f} MiB, "
          f"moved and registered +{moved / mib:.1f} MiB, copied to a pinned buffer +{copied / mib:.1f} MiB")
    assert from_loader < 0.05 * model_bytes
    assert moved < 0.35 * model_bytes
    assert copied > 0.8 * model_bytes
    assert runtime_of(in_ram).arena.report.in_place_bytes > 0 and runtime_of(in_ram).arena.report.pageable_bytes == 0
    x = x_for(dim)
    expected = plain(x)
    for model in (loaded, in_ram, copied_model):
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("registers", [True, False], ids=["moved", "copied"])
def test_parameters_that_are_views_of_one_storage_are_relocated_one_by_one(registers, monkeypatch):
    """A model whose parameters all live in one flat storage (as from a mapped checkpoint file):
    each parameter slot must end up showing its own tensor's new home, not a neighbour's."""
    torch.manual_seed(0)
    plain = LinearStack(dim=64, depth=3).to(torch.bfloat16).eval()
    flat = torch.cat([p.detach().reshape(-1) for p in plain.parameters()])
    shared = copy.deepcopy(plain)
    offset = 0
    for module in shared.modules():
        for name, param in list(module._parameters.items()):
            n = param.numel()
            module._parameters[name] = nn.Parameter(flat[offset : offset + n].view(param.shape), requires_grad=False)
            offset += n
    assert len({p.untyped_storage().data_ptr() for p in shared.parameters()}) == 1
    model = enable_vram_management(shared, vram_config=CPU_BF16, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    backend = RegisteringBackend(registers=registers)
    runtime.use_scheduler(backend, PinnedBudget(limit_bytes=10 * GB))
    assert runtime.arena.report.pageable_bytes == 0
    for record in runtime.layers:  # slots show the masters' new homes
        for name, placeholder in record.placeholders.items():
            assert placeholder.data_ptr() == record.masters[name].tensor.data_ptr()
            assert backend.is_pinned(placeholder)
    log_computes(backend, monkeypatch)
    for _ in range(3):
        assert torch.equal(model(x_for()), plain(x_for()))
    assert torch.equal(model.state_dict()["blocks.1.fc2.weight"], plain.state_dict()["blocks.1.fc2.weight"])
