"""Issue 25, point 6: pinning in pieces, a pinned budget that respects the container's and WSL2's
limits, and the live panel saying how much is pinned.

One cudaHostRegister of a whole arena (tens of GB) fails as a whole on WSL2 or in a container
near its memory limit. Checked on CPU with the recording fake device of tests/test_pinned_in_place.py,
whose `register` refuses after N calls, as a page-lock limit does.
"""

from __future__ import annotations

import copy
import mmap
from pathlib import Path

import pytest
import torch

import engine.transfer.pinned as pinned
from engine import enable_vram_management, load_model, runtime_of
from engine.transfer.host_memory import DEFAULT_PINNED_SHARE, WSL_PINNED_SHARE, host_memory
from engine.transfer.pinned import PinnedBudget, piece_ends
from tests.test_pinned_in_place import CPU_BF16, LinearStack, RegisteringBackend, master_parts, save_stack, x_for
from tests.test_scheduler import log_computes, name_blocks

GB = 1024**3
PAGE = mmap.PAGESIZE


class RefusingBackend(RegisteringBackend):
    """Registers the first `grants` buffers, then refuses every one (an OS page-lock limit)."""

    def __init__(self, grants: int):
        super().__init__()
        self.grants = grants
        self.calls: list[int] = []

    def register(self, buffer):
        self.calls.append(buffer.nbytes)
        if len(self.calls) > self.grants:
            return False
        return super().register(buffer)


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    # blocks of 2 x 128x256 bf16 = 2 x 64 KiB weights: many pages, several tensors per piece
    return save_stack(tmp_path_factory.mktemp("stack-pieces"), dim=128, depth=8)


def assert_prefix_cuts_no_tensor(runtime, start: int, length: int) -> None:
    for t in master_parts(runtime):
        begin, end = t.data_ptr() - start, t.data_ptr() - start + t.nbytes
        assert end <= length or begin >= length, (begin, end, length)


def test_the_arena_is_registered_in_pieces_and_keeps_what_the_device_grants(stack_dir, monkeypatch):
    plain, directory = stack_dir
    monkeypatch.setattr(pinned, "PIN_PIECE_BYTES", 24 * PAGE)
    model = load_model(LinearStack, directory, vram_config=CPU_BF16, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    arena = runtime.host_arena
    assert arena.nbytes > 4 * 24 * PAGE  # several pieces
    backend = RefusingBackend(grants=2)
    budget = PinnedBudget(limit_bytes=10 * GB)
    runtime.use_scheduler(backend, budget)
    pieces = [(p, n) for p, n in backend.registered if arena.buffer.data_ptr() <= p < arena.buffer.data_ptr() + arena.nbytes]
    assert len(pieces) == 2  # the two it granted, kept; nothing after the refusal is tried
    stager = runtime.scheduler.stager
    assert stager is not None  # the rest is staged; its two buffers asked to register after the arena
    assert backend.calls[:2] == [n for _, n in pieces] and backend.calls[3:] == [stager.buffer_bytes] * 2
    start = arena.buffer.data_ptr()
    assert pieces[0][0] == start and pieces[1][0] == start + pieces[0][1]  # contiguous from the start
    length = pieces[0][1] + pieces[1][1]
    assert all(n <= 24 * PAGE and n % PAGE == 0 for _, n in pieces)
    assert_prefix_cuts_no_tensor(runtime, start, pieces[0][1])
    assert_prefix_cuts_no_tensor(runtime, start, length)
    report = runtime.arena.report
    assert report.in_place_bytes == report.pinned_bytes == length
    assert report.pageable_bytes > 0 and runtime.arena.pieces_refused
    assert budget.used == length + stager.pinned_bytes  # the refused bytes went back to the budget
    inside = [t for t in master_parts(runtime) if t.data_ptr() + t.nbytes - start <= length]
    assert inside and all(backend.is_pinned(t) for t in inside)
    assert not any(backend.is_pinned(t) for t in master_parts(runtime) if t.data_ptr() - start >= length)
    log_computes(backend, monkeypatch)
    for _ in range(3):
        assert torch.equal(model(x_for(128)), plain(x_for(128)))
    backend.check_ordering()
    runtime.close_scheduler()
    assert backend.registered == [] and budget.used == 0


def test_masters_moved_into_an_arena_are_registered_in_pieces_too(stack_dir, monkeypatch):
    plain, _ = stack_dir
    monkeypatch.setattr(pinned, "PIN_PIECE_BYTES", 24 * PAGE)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=CPU_BF16, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    backend = RefusingBackend(grants=3)
    budget = PinnedBudget(limit_bytes=10 * GB)
    runtime.use_scheduler(backend, budget)
    packed = runtime.arena.packed
    assert packed is not None
    start = packed.buffer.data_ptr()
    pieces = [(p, n) for p, n in backend.registered if start <= p < start + packed.nbytes]
    assert len(pieces) == 3
    length = sum(n for _, n in pieces)
    assert_prefix_cuts_no_tensor(runtime, start, length)
    report = runtime.arena.report
    assert report.in_place_bytes == length < packed.nbytes and report.pageable_bytes > 0
    assert report.tensors_pinned == sum(1 for t in master_parts(runtime) if packed.contains(t) and t.data_ptr() + t.nbytes - start <= length)
    log_computes(backend, monkeypatch)
    for _ in range(2):
        assert torch.equal(model(x_for(128)), plain(x_for(128)))
    runtime.close_scheduler()
    assert budget.used == 0


def test_piece_ends_cut_between_tensors_and_give_a_large_tensor_its_own_piece():
    piece = 4 * PAGE
    # tensors: a small one, one across the first natural cut, one larger than a piece, small ones
    spans = [(0, 100), (3 * PAGE, 5 * PAGE), (5 * PAGE, 15 * PAGE + 10), (16 * PAGE, 16 * PAGE + 64), (16 * PAGE + 256, 17 * PAGE)]
    length = 17 * PAGE
    ends = piece_ends(length, spans, piece)
    assert ends[-1] == length and ends == sorted(set(ends))
    for end in ends:
        assert end == length or end % PAGE == 0
        assert not any(s < end < e for s, e in spans), end
    assert ends[0] == 3 * PAGE  # moved down below the tensor across 4 pages
    assert 16 * PAGE in ends  # the large tensor's piece ends at the first page after it
    assert piece_ends(0, spans, piece) == []
    assert piece_ends(length, [], 1024**3) == [length]  # small arenas: one call, as before


def fake_root(tmp_path: Path, memory_max: str, current: int, inactive: int = 0, wsl: bool = False) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/user.slice/app.scope\n")
    (tmp_path / "proc/version").write_text("Linux version 6.6.36.3-microsoft-standard-WSL2\n" if wsl else "Linux version 6.8.0-generic\n")
    group = tmp_path / "sys/fs/cgroup/user.slice/app.scope"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("max\n")
    (tmp_path / "sys/fs/cgroup/user.slice/memory.max").write_text(memory_max + "\n")
    (tmp_path / "sys/fs/cgroup/user.slice/memory.current").write_text(f"{current}\n")
    (tmp_path / "sys/fs/cgroup/user.slice/memory.stat").write_text(f"anon 1\ninactive_file {inactive}\n")
    return tmp_path


class VM:
    def __init__(self, total: int, available: int):
        self.total, self.available = total, available


def test_default_pinned_budget_respects_the_cgroup_limit_and_wsl(tmp_path, monkeypatch):
    monkeypatch.setattr("psutil.virtual_memory", lambda: VM(64 * GB, 48 * GB))
    monkeypatch.delenv("WSL_DISTRO_NAME", raising=False)
    # a container limited to 16 GiB (set on the parent group), 6 GiB used of which 2 GiB is clean cache
    root = fake_root(tmp_path / "box", str(16 * GB), 6 * GB, inactive=2 * GB)
    mem = host_memory(root)
    assert mem.cgroup_limit_bytes == 16 * GB and mem.cgroup_used_bytes == 4 * GB
    assert mem.available_bytes == 12 * GB  # not the machine's 48
    assert mem.default_pinned_bytes == int(12 * GB * DEFAULT_PINNED_SHARE)
    unlimited = host_memory(fake_root(tmp_path / "free", "max", 6 * GB))
    assert unlimited.cgroup_limit_bytes is None and unlimited.available_bytes == 48 * GB
    wsl = host_memory(fake_root(tmp_path / "wsl", "max", 0, wsl=True))
    assert wsl.wsl and wsl.default_pinned_bytes == int(48 * GB * WSL_PINNED_SHARE)
    # the process budget takes it when nothing else is said
    monkeypatch.delenv(pinned.PINNED_RAM_ENV, raising=False)
    monkeypatch.setattr(pinned, "host_memory", lambda: mem)
    assert PinnedBudget().limit_bytes == mem.default_pinned_bytes
    monkeypatch.setenv(pinned.PINNED_RAM_ENV, "3")
    assert PinnedBudget().limit_bytes == 3 * GB  # the user's figure wins


def test_the_live_panel_says_how_much_is_pinned():
    from engine.generation.types import TelemetrySnapshot
    from ui.formatting import live_panel_html

    snap = TelemetrySnapshot(2.0, 8.0, 10.0, 32.0, pinned_bytes=3 * GB, pinned_limit_bytes=12 * GB)
    html = live_panel_html(snap, None, "")
    assert 'data-k="pinned">3.00 GB of 12.00 GB allowed<' in html
    cpu = TelemetrySnapshot(None, None, 10.0, 32.0)
    assert "Pinned RAM" not in live_panel_html(cpu, None, "")


def test_a_cgroup_v1_memory_limit_counts_on_a_hybrid_host(tmp_path, monkeypatch):
    monkeypatch.setattr("psutil.virtual_memory", lambda: VM(64 * GB, 48 * GB))
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("4:memory:/box\n0::/\n")
    (tmp_path / "proc/version").write_text("Linux version 6.8.0-generic\n")
    group = tmp_path / "sys/fs/cgroup/memory/box"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{8 * GB}\n")
    (group / "memory.usage_in_bytes").write_text(f"{3 * GB}\n")
    (group / "memory.stat").write_text(f"total_inactive_file {1 * GB}\n")
    (tmp_path / "sys/fs/cgroup/memory.max").parent.mkdir(parents=True, exist_ok=True)
    mem = host_memory(tmp_path)
    assert mem.cgroup_limit_bytes == 8 * GB and mem.available_bytes == 6 * GB
    (tmp_path / "proc/self/cgroup").write_text("0::/\n4:memory:/box\n")  # the unified line first
    assert host_memory(tmp_path).available_bytes == 6 * GB
