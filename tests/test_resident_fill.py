"""Issue 25, point 8: filling resident copies after a re-plan, inside a streamed forward, without
one blocking `.to(device)` per parameter.

The recording fake device (tests.test_scheduler.RecordingBackend) plays the GPU: the resident
place counts as a device (`_is_host` patched), so a fill must go through the backend: the host
parts copied on the copy stream (non-blocking on CUDA: they are pinned), after one event that
orders the copy stream behind compute, and one event the compute stream waits on before the
layer runs. Sources the device cannot copy asynchronously fall back to the synchronous path.
"""

from __future__ import annotations

import copy

import pytest
import torch

import engine.runtime.component as component
from engine import enable_vram_management, layer_state_counts, runtime_of, set_vram_limit, vram_budget
from tests.test_scheduler import CPU, FP8, GB, X, RecordingBackend, make_stack, scheduled


class PageableBackend(RecordingBackend):
    def is_pinned(self, tensor):
        return False


def replanned(config, backend, monkeypatch):
    """(what the model computes unscheduled, the scheduled model after a re-plan that keeps about
    half its layers resident; not filled yet)."""
    plain = make_stack()
    expected = enable_vram_management(copy.deepcopy(plain), vram_config=config, vram_limit=0)(X)  # FP8 included
    model = scheduled(plain, config, 0, backend, monkeypatch)
    reserve = vram_budget(model).streaming_reserve()
    for _ in range(2):  # trace, then stream everything
        assert torch.equal(model(X), expected)
    assert layer_state_counts(model)["preparing"] == 0
    total = sum(p.nbytes for p in plain.parameters())
    set_vram_limit(model, (reserve + total // 2) / GB)  # the re-plan: about half the layers resident now
    return expected, model


@pytest.mark.parametrize("config", [CPU, FP8], ids=["bf16", "fp8"])
def test_resident_copies_are_filled_through_the_copy_stream_with_one_event(config, monkeypatch):
    monkeypatch.setattr(component, "_is_host", lambda device: False)
    backend = RecordingBackend()
    expected, model = replanned(config, backend, monkeypatch)
    runtime = runtime_of(model)
    copies_before = len(backend.streams["copy"])
    waits_before = sum(1 for op in backend.streams["compute"] if op[0] == "wait")
    assert torch.equal(model(X), expected)  # the forward that fills them
    filled = [layer for layer in runtime.layers if layer.resident is not None]
    assert filled and layer_state_counts(model)["preparing"] == len(filled)
    parts = sum(len(stored.parts()) for layer in filled for stored in layer.resident.values())
    fill_copies = [op for op in backend.streams["copy"][copies_before:] if op[0] == "copy" and op[1] is None]
    assert len(fill_copies) == parts  # every part went through the backend's copy, none through .to()
    for layer in filled:  # copies of their own, not the masters
        for name, stored in layer.resident.items():
            for (_, mine), (_, master) in zip(stored.parts(), layer.masters[name].parts()):
                assert mine.data_ptr() != master.data_ptr() and torch.equal(mine, master)
    # one event each way per filled layer (ordered behind compute, then waited on by compute)
    copy_waits = [op for op in backend.streams["copy"][copies_before:] if op[0] == "wait" and op[1].stream == "compute"]
    assert len(copy_waits) >= len(filled)
    compute_waits = sum(1 for op in backend.streams["compute"] if op[0] == "wait") - waits_before
    assert compute_waits >= len(filled)
    backend.check_ordering()
    for _ in range(2):  # and they run from there
        assert torch.equal(model(X), expected)
    assert runtime.stats.sync_fallbacks == 0


def test_sources_that_cannot_be_copied_asynchronously_take_the_synchronous_path(monkeypatch):
    monkeypatch.setattr(component, "_is_host", lambda device: False)
    backend = PageableBackend()
    expected, model = replanned(CPU, backend, monkeypatch)
    copies_before = len(backend.streams["copy"])
    assert torch.equal(model(X), expected)
    assert layer_state_counts(model)["preparing"] > 0
    assert not [op for op in backend.streams["copy"][copies_before:] if op[0] == "copy" and op[1] is None]
