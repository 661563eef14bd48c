"""Issue 25 on a real GPU (skipped without CUDA; bench/gpu_session.sh runs these first).

The CPU tests prove the same points through the recording fake device (tests/test_gguf.py,
test_pinning_pieces.py, test_resident_fill.py, test_doctor.py); these check them against CUDA
itself: `torch.cuda.set_sync_debug_mode("error")` raises on any operation that makes the host
wait (a pageable copy, `.item()`, a blocking `.to(device)`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

GB = 1024**3


@contextmanager
def no_host_syncs():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sync_debug_mode_catches_a_blocking_copy():
    host = torch.ones(1024)
    with pytest.raises(RuntimeError):
        with no_host_syncs():
            host.to("cuda")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"])
def test_gguf_dequantization_on_cuda_makes_no_host_sync(qtype):
    pytest.importorskip("gguf")
    import gguf

    from engine.storage.gguf import dequantize
    from tools.gguf_write import random_blocks

    rows, n = 16, 512
    blocks = torch.from_numpy(random_blocks(qtype, rows, n)).cuda()
    reference = gguf.quants.dequantize(random_blocks(qtype, rows, n), gguf.GGMLQuantizationType[qtype])
    dequantize(blocks, qtype, (rows, n), torch.bfloat16)  # the first call per device makes the constants
    with no_host_syncs():
        out = dequantize(blocks, qtype, (rows, n), torch.bfloat16)
    # values as the reference (a GPU may fuse multiply-adds: not asked to be bitwise here)
    torch.testing.assert_close(out.cpu().float(), torch.from_numpy(np.array(reference)).float().reshape(rows, n), rtol=1e-2, atol=1e-6)


def test_resident_fill_from_pinned_memory_makes_no_host_sync():
    from engine.config import Place
    from engine.storage.stored import PlainStored
    from engine.transfer.devices import CudaBackend
    from engine.transfer.resident import copy_to_device

    backend = CudaBackend("cuda")
    master = torch.randn(1024, 1024).to(torch.bfloat16).pin_memory()
    source = {"weight": PlainStored(master)}
    with no_host_syncs():
        moved = copy_to_device(backend, source, backend.device)
        resident = moved["weight"].to_place(Place(backend.device, torch.bfloat16), torch.bfloat16)
    assert resident.device == backend.device and torch.equal(resident.tensor.cpu(), master)


def test_the_arena_is_pinned_in_pieces_on_cuda(monkeypatch):
    import engine.transfer.pinned as pinned
    from engine import enable_vram_management, runtime_of
    from engine.generation.doctor import SyntheticStack, _name_blocks

    monkeypatch.setattr(pinned, "PIN_PIECE_BYTES", 8 * 1024**2)
    torch.manual_seed(0)
    plain = SyntheticStack(dim=1024, depth=4).to(torch.bfloat16).eval()  # 4 blocks of 8 MiB weights
    x = torch.randn(64, 1024, dtype=torch.bfloat16, device="cuda")
    expected = copy.deepcopy(plain).cuda()(x)
    config = {"offload_device": "cpu", "onload_device": "cpu", "computation_device": "cuda", "computation_dtype": "bfloat16"}
    model = enable_vram_management(plain, vram_config=config, vram_limit=0)
    _name_blocks(model)
    for _ in range(3):
        assert torch.equal(model(x), expected)
    arena = runtime_of(model).arena
    assert arena is not None and len(arena.registered) > 1  # several cudaHostRegister calls
    assert arena.report.pageable_bytes == 0 and not arena.pieces_refused
    assert runtime_of(model).stats.sync_fallbacks == 0


def test_doctor_measures_this_gpu(tmp_path):
    from engine.generation.doctor import render_text, run_doctor

    report = run_doctor(tmp_path)
    g, t, run = report["gpu"], report["transfer"], report["streamed_run"]
    assert g["available"] and g["kernels_ok"] and g["vram_total_bytes"] > 0
    assert t["pin_ok"] and t["pinned_gib_s"] > 1 and t["pageable_gib_s"] > 0
    assert "error" not in run, run
    assert run["s_per_step"] > 0 and run["sync_fallbacks"] == 0
    assert run["streamed_bytes_per_step"] >= 0.9 * run["weights_bytes"]
    assert run["overlap"] is not None
    print(render_text(report))
    assert report["problems"] == []
