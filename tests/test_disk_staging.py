"""Disk offload through the transfer scheduler: reads land in the stager's pinned staging buffers.

The GPU path is checked on CPU with the recording fakes of tests/test_scheduler.py: the stager's
worker reads each disk parameter with a positional read straight into a staging buffer and
enqueues the slot copy from there; the read-ahead prefetcher (synchronous path only) stays idle,
host RAM does not grow from step to step, and read errors surface in the forward and leave the
model usable.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import shutil
from pathlib import Path

import pytest
import torch

from engine import DiskStored, load_model, runtime_of
from engine.transfer.devices import CpuBackend
from engine.storage.disk import CheckpointError, SafetensorsFile
from engine.layers.managed import ManagedLinear, ManagedModule
from engine.transfer.pinned import PinnedBudget
from engine.transfer.scheduler import DISK_PART, Stager
from engine.storage.stored import PlainStored
from tests.fixtures.tiny_models import random_bf16_model, run_model, save_sharded, tiny_model
from tests.test_loader import DISK
from tests.test_scheduler import PinningBackend, RecordingBackend

GB = 1024**3
MB = 1024**2


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory) -> tuple[type, Path, dict]:
    """The tiny Qwen-Image DiT in the diffusers sharded layout, with inputs for it."""
    model, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    return type(model), save_sharded(model, tmp_path_factory.mktemp("qwen_image")), inputs


def log_all_computes(backend: RecordingBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record every managed compute (Linear ones too) with the slot its weights come from."""
    for cls in (ManagedModule, ManagedLinear):
        original = cls.__dict__["_vram_compute"]

        def logged(self, params, args, kwargs, _original=original):
            slots = {backend.slot_of(t) for t in params.values()} - {None}
            backend.compute(self._vram.name, slots.pop() if slots else None)
            return _original(self, params, args, kwargs)

        monkeypatch.setattr(cls, "_vram_compute", logged)


def disk_model(directory: Path, backend: RecordingBackend | CpuBackend, prefetch: bool = True) -> torch.nn.Module:
    """A disk-offloaded Qwen-Image DiT streamed by the transfer scheduler on `backend`."""
    from diffusers import QwenImageTransformer2DModel

    model = load_model(QwenImageTransformer2DModel, directory, vram_config=DISK, vram_limit=0, prefetch=prefetch)
    runtime_of(model).use_scheduler(backend, PinnedBudget(limit_bytes=GB))
    return model


def forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One forward, then wait for the stager's worker: it keeps reading the next step's first
    groups after the forward returned, and the counters below must not race with it."""
    out = run_model(model, inputs)
    stager = runtime_of(model).scheduler.stager
    if stager is not None:
        stager.drain()
    return out


def scheduled_disk_bytes(runtime) -> int:
    return sum(g.disk_bytes for g in runtime.scheduler.groups)


def forbid_fresh_reads(monkeypatch: pytest.MonkeyPatch, allowed_bytes: int = 0) -> list[int]:
    """Fail on a fresh-tensor read (SafetensorsFile.read) of at most `allowed_bytes`; return the
    list of read_into destinations (data pointers) for the caller to check."""
    real_read, real_read_into = SafetensorsFile.read, SafetensorsFile.read_into
    targets: list[int] = []

    def read(self, entry):
        assert entry.length > allowed_bytes, f"{entry.key}: read into a fresh tensor on the scheduled path"
        return real_read(self, entry)

    def read_into(self, entry, out, start=0):
        targets.append(out.untyped_storage().data_ptr())
        return real_read_into(self, entry, out, start)

    monkeypatch.setattr(SafetensorsFile, "read", read)
    monkeypatch.setattr(SafetensorsFile, "read_into", read_into)
    return targets


def test_disk_layers_stream_through_staging_buffers(qwen_checkpoint, monkeypatch):
    cls, directory, inputs = qwen_checkpoint
    reference = run_model(load_model(cls, directory, vram_config=DISK, vram_limit=0, prefetch=False), inputs)
    backend = PinningBackend()
    model = disk_model(directory, backend)
    runtime = runtime_of(model)
    stager, prefetcher = runtime.scheduler.stager, runtime.prefetcher
    assert stager is not None and all(backend.is_pinned(b) for b in stager.buffers)
    log_all_computes(backend, monkeypatch)
    assert torch.equal(run_model(model, inputs), reference)  # traces the order, synchronously
    misses = prefetcher.misses
    assert misses > 0 and runtime.stats.sync_fallbacks == 0
    targets = forbid_fresh_reads(monkeypatch)
    staged = []
    for _ in range(4):
        assert torch.equal(forward(model, inputs), reference)
        staged.append(stager.read_bytes)
    scheduler = runtime.scheduler
    assert scheduler.groups and all(g.pageable and g.disk_bytes for g in scheduler.groups)
    assert stager.buffer_bytes == max(g.nbytes for g in scheduler.groups)
    # every forward reads each disk parameter once, into the staging buffers and nowhere else
    per_forward = scheduled_disk_bytes(runtime)
    assert [b - a for a, b in itertools.pairwise(staged)] == [per_forward] * 3
    buffers = {b.untyped_storage().data_ptr() for b in stager.buffers}
    assert targets and set(targets) <= buffers and stager.fresh_reads == 0
    # the synchronous read-ahead stayed out of it
    assert prefetcher.misses == misses and prefetcher.hits == 0 and prefetcher.pending_layers() == []
    assert runtime.stats.sync_fallbacks == 0
    backend.check_ordering()
    assert runtime.budget.transient_bytes == 0


def test_staging_buffers_are_counted_in_the_pinned_budget(qwen_checkpoint):
    """Disk offload pins little but its staging buffers (two of the largest group: ~3-4 GB for
    Qwen-Image): they are taken from the pinned-RAM budget and returned on close."""
    from diffusers import QwenImageTransformer2DModel

    _, directory, inputs = qwen_checkpoint
    model = load_model(QwenImageTransformer2DModel, directory, vram_config=DISK, vram_limit=0, prefetch=False)
    runtime = runtime_of(model)
    budget = PinnedBudget(limit_bytes=GB)
    runtime.use_scheduler(PinningBackend(), budget)
    stager = runtime.scheduler.stager
    assert stager.pinned_bytes == 2 * stager.buffer_bytes > 0
    assert budget.used == runtime.arena.report.pinned_bytes + stager.pinned_bytes
    for _ in range(2):
        forward(model, inputs)
    runtime.close_scheduler()
    assert budget.used == 0


def test_a_profile_shows_the_workers_disk_reads(qwen_checkpoint):
    from tests.test_scheduler import profiled_names

    _, directory, inputs = qwen_checkpoint
    model = disk_model(directory, PinningBackend(), prefetch=False)
    run_model(model, inputs)  # traced, synchronous
    names = profiled_names(lambda: forward(model, inputs))
    assert {"lowvram.read", "lowvram.copy_group", "lowvram.enter_group"} <= names, names


def test_mixed_layers_and_oversize_tensors(qwen_checkpoint, monkeypatch):
    cls, directory, inputs = qwen_checkpoint
    reference = run_model(load_model(cls, directory, vram_config=DISK, vram_limit=0, prefetch=False), inputs)
    model = load_model(cls, directory, vram_config=DISK, vram_limit=0, prefetch=False)
    runtime = runtime_of(model)
    mixed = 0
    for record in runtime.layers:  # biases in RAM, weights on disk
        if "bias" in record.masters and "weight" in record.masters:
            record.masters["bias"] = PlainStored(record.masters["bias"].read())
            mixed += 1
    assert mixed
    backend = PinningBackend()
    runtime.use_scheduler(backend, PinnedBudget(limit_bytes=GB))
    assert runtime.arena.report.pinned_bytes > 0 and runtime.scheduler.stager is not None
    log_all_computes(backend, monkeypatch)
    run_model(model, inputs)
    forward(model, inputs)  # lays the schedule out (which fits the staging buffers to its groups)
    # staging buffers smaller than the largest weights: those are read into fresh tensors
    largest = max(s.nbytes for r in runtime.layers for s in r.masters.values() if isinstance(s, DiskStored))
    scheduler = runtime.scheduler
    scheduler.stager.close()
    scheduler.stager = Stager(backend, largest - 1)
    forbid_fresh_reads(monkeypatch, allowed_bytes=largest - 1)
    for _ in range(3):
        assert torch.equal(forward(model, inputs), reference)
    assert any(s.part == DISK_PART for g in scheduler.groups for s in g.slices)
    assert any({s.part for s in g.slices} >= {DISK_PART, "tensor"} for g in scheduler.groups)
    assert scheduler.stager.fresh_reads > 0 and scheduler.stager.read_bytes > 0
    assert runtime.stats.sync_fallbacks == 0
    backend.check_ordering()


def test_read_error_surfaces_in_the_forward_and_the_model_recovers(qwen_checkpoint, tmp_path, monkeypatch):
    cls, directory, inputs = qwen_checkpoint
    reference = run_model(load_model(cls, directory, vram_config=DISK, vram_limit=0, prefetch=False), inputs)
    shards = tmp_path / "copy"
    shutil.copytree(directory, shards)
    backend = RecordingBackend()
    model = disk_model(shards, backend)
    runtime = runtime_of(model)
    for _ in range(2):
        assert torch.equal(forward(model, inputs), reference)
    originals = {path: path.read_bytes() for path in shards.glob("*.safetensors")}
    for path, data in originals.items():  # the files change under a loaded model
        path.write_bytes(data[:16])
    with pytest.raises(CheckpointError, match=r"truncated file: tensor"):
        run_model(model, inputs)
    assert runtime.budget.transient_bytes == 0 and runtime.scheduler.loaded == {}
    for path, data in originals.items():
        path.write_bytes(data)
    assert torch.equal(forward(model, inputs), reference)
    # a single failing read (an I/O error), in whichever forward enters the group
    real = SafetensorsFile.read_into
    calls = {"n": 0}

    def failing(self, entry, out, start=0):
        calls["n"] += 1
        if calls["n"] == 3:
            raise CheckpointError(f"{self.path}: reading tensor {entry.key!r} failed (injected)")
        return real(self, entry, out, start)

    monkeypatch.setattr(SafetensorsFile, "read_into", failing)
    with pytest.raises(CheckpointError, match="injected"):
        for _ in range(2):
            run_model(model, inputs)
    for _ in range(2):
        assert torch.equal(forward(model, inputs), reference)
    assert runtime.stats.sync_fallbacks == 0
    backend.check_ordering()


# --- host RAM stays flat ------------------------------------------------------------------------
MID_CONFIG = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 3, "attention_head_dim": 64,
    "num_attention_heads": 6, "joint_attention_dim": 128, "axes_dims_rope": (8, 28, 28),
}


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """A ~45 MB Qwen-Image DiT in the diffusers sharded layout, with inputs for it."""
    from diffusers import QwenImageTransformer2DModel

    model = random_bf16_model(QwenImageTransformer2DModel, MID_CONFIG)
    directory = save_sharded(model, tmp_path_factory.mktemp("mid_qwen_image"))
    g = torch.Generator().manual_seed(1)
    side = 4
    inputs = {
        "hidden_states": torch.randn(1, side * side, 64, generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, 8, 128, generator=g).bfloat16(),
        "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long),
        "timestep": torch.tensor([0.5]).bfloat16(),
        "img_shapes": [(1, side, side)],
    }
    return directory, inputs


def rss_anon() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def test_host_ram_does_not_grow_step_after_step(mid_checkpoint, monkeypatch):
    directory, inputs = mid_checkpoint
    model = disk_model(directory, CpuBackend(), prefetch=False)
    runtime = runtime_of(model)
    disk_bytes = sum(s.nbytes for r in runtime.layers for s in r.masters.values() if isinstance(s, DiskStored))
    assert disk_bytes > 30 * MB
    run_model(model, inputs)  # trace
    forward(model, inputs)  # lays out the schedule: slots and staging buffers exist from here on
    forbid_fresh_reads(monkeypatch)
    stager = runtime.scheduler.stager
    before, read = rss_anon(), stager.read_bytes
    after = []
    for _ in range(6):
        forward(model, inputs)
        after.append(rss_anon() - before)
    assert stager.read_bytes - read == 6 * scheduled_disk_bytes(runtime) >= 6 * 0.9 * disk_bytes
    assert stager.fresh_reads == 0 and runtime.stats.sync_fallbacks == 0
    # reads land in the two staging buffers: nothing accumulates (a fresh layer would be MBs)
    assert max(after) < 4 * MB, [round(a / MB, 2) for a in after]
