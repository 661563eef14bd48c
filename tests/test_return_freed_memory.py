"""Freed copies give their RAM back before a stage plans (issue #17): on a CPU the pool plans
resident copies from MemAvailable, and heap memory glibc keeps after a free is not in it. On the
real-size Z-Image-Turbo FP8 run the text encoder's freed copies held 2.5 GiB of RssAnon after
its stage, and the denoiser kept 2.1 GiB fewer copies than the RAM allowed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.runtime import ram
from tests.fixtures.tiny_repos import write_tiny_repo

CHILD = textwrap.dedent(
    """
    import sys, torch
    from engine.runtime import ram

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    # glibc's mmap threshold rises (up to 32 MB) as mmapped blocks are freed, after which a
    # model's layer copies come from the heap; set it where it ends up, so the 8 MB copies below do
    # (and keep free() from trimming the heap's top itself, as it may when the copies end up last)
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD
    copies, keep = [], []
    for _ in range(64):
        copies.append(torch.ones(8 * 2**20, dtype=torch.uint8))
        keep.append(torch.ones(1024, dtype=torch.uint8))  # live allocations between them: holes, not a top to trim
    del copies
    held = anon()
    trimmed = ram.return_freed_memory()
    print(held, anon(), trimmed)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_copies_are_returned_to_the_kernel():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    held, after, trimmed = int(out[0]), int(out[1]), out[2] == "True"
    assert trimmed
    assert held - after > 256 * 2**20, (held, after)  # most of the 512 MB of freed copies went back


def test_a_stage_switch_on_the_cpu_returns_freed_memory_before_it_plans(monkeypatch, tmp_path):
    from engine.generation.pipelines import managed

    calls = []
    monkeypatch.setattr(ram, "return_freed_memory", lambda: calls.append("trim") or True)
    real_onload = managed.onload_model
    monkeypatch.setattr(managed, "onload_model", lambda model: (calls.append("onload"), real_onload(model)))

    pipe = managed.build_pipeline(write_tiny_repo("z-image", tmp_path / "repo"), vram_limit=None)
    pipe.switch(managed.DENOISE)
    assert calls and calls[0] == "trim" and "onload" in calls
    calls.clear()
    pipe.switch(managed.DECODE)
    assert calls.index("trim") < calls.index("onload")
