"""Computation dtype per layer kind on the CPU, chosen by measurement (issue #17).

On some CPUs torch's bfloat16 convolutions are far slower than float32 (a report: a bf16
Conv3d(384, 384, 3) on (1, 384, 3, 64, 64) did not finish in 2 minutes where float32 took
0.77 s); on CPUs with AVX512-BF16 they are faster (this project's CI machine: bf16 Conv2d 8x,
Conv3d 1.6x faster than float32, bench/results/cpu-kernels.md). So nothing is assumed: the first
time a component with convolutions is built for the CPU, a small probe of its own kind and
channel width is timed in both dtypes, and float32 is used when it is faster by more than
`MARGIN`. The probe runs at a small spatial size and is capped (a bf16 probe slower than
`PROBE_CAP_S` counts as slow without waiting for it to end its repeats).

`LOWVRAM_CPU_CONV_DTYPE=float32|bfloat16` overrides the measurement.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache

import torch

MARGIN = 1.2
PROBE_CAP_S = 2.0


def _probe(kind: str, channels: int, dtype: torch.dtype) -> float:
    conv = {"Conv2d": torch.nn.functional.conv2d, "Conv3d": torch.nn.functional.conv3d}[kind]
    spatial = (16, 16) if kind == "Conv2d" else (3, 16, 16)
    x = torch.randn(1, channels, *spatial).to(dtype)
    w = torch.randn(channels, channels, *([3] * len(spatial))).to(dtype)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        conv(x, w, padding=1)
        best = min(best, time.perf_counter() - t0)
        if best > PROBE_CAP_S:
            break
    return best


@lru_cache(maxsize=32)
def conv_dtype(kind: str, channels: int, preferred: torch.dtype = torch.bfloat16) -> torch.dtype:
    """float32 or `preferred` for a convolution of `kind` ("Conv2d"/"Conv3d") at `channels` on the CPU."""
    override = os.environ.get("LOWVRAM_CPU_CONV_DTYPE")
    if override:
        return getattr(torch, override)
    if preferred == torch.float32:
        return preferred
    fast, slow = _probe(kind, channels, torch.float32), _probe(kind, channels, preferred)
    return torch.float32 if slow > MARGIN * fast else preferred


def component_conv_dtype(kind: str, config: dict, preferred: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The computation dtype a component with convolutions of `kind` ("Conv2d"/"Conv3d": data its
    owner declares, e.g. a model family's `cpu_conv_probes`) should use on the CPU: its widest
    convolution (from its config's block_out_channels) decides."""
    channels = config.get("block_out_channels") or config.get("dim_mult") and [config.get("base_dim", 96) * m for m in config["dim_mult"]]
    if not channels:
        return preferred
    return conv_dtype(kind, int(max(channels)), preferred)
