"""Settings that fit a machine: the fastest FP8 / disk offload / VRAM limit whose estimate fits.

    suggest_settings(request, machine, estimate, work) -> SuggestedSettings

Everything about memory comes from one function, `estimate(request, hardware) -> MemoryEstimate`
(Studio.estimate: the registry's sizes and the planner's rules), so whatever the estimate learns
(measured floors, RAM as a budget on the CPU, other storage forms) the suggestion follows. This
module adds only

* the grid of candidates: every storage form (`storage_forms`) times the VRAM limits a machine
  can take (`limit_grid`),
* `fits_on`: the estimate fits, and a model that still has to be downloaded fits on the free disk,
* `step_seconds`: a cost model, seconds per denoising step, to rank the candidates that fit.

The cost model (constants below; they are round figures for a mid-range desktop, not
measurements of this host, and only their ratios matter for the ranking):

    compute   = 2 * denoiser parameters * tokens * batch / FLOPS     (GPU or CPU figure)
    link      = streamed bytes per step / host-to-device bandwidth    (pinned part at PCIe speed,
                the part beyond the pinned-RAM budget through the staging buffers, slower)
    disk      = bytes read from the files per step / disk read rate   (disk offload only; the file
                form is bf16, so with FP8 the bytes read are the streamed bytes / FP8 factor)
    dequant   = FP8 bytes of the denoiser * 3 / memory bandwidth       (FP8 -> bf16 each forward)
    seconds per step = max(compute, link, disk) + dequant

Copies run on their own stream and disk reads ahead of use (engine.transfer / engine.loading),
so compute, link and disk overlap: the slowest of them sets the pace. tests/test_suggest.py checks
`suggest_settings` against a brute-force search of the same grid under the same cost function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from engine.generation.types import GenerateRequest, HardwareInfo, Machine, MemoryEstimate, SuggestedSettings

GB = 1024**3

# --- cost model constants ------------------------------------------------------------------------
#: effective bf16 dense throughput of a mid-range GPU (RTX 4070 class: ~120 TFLOPS peak with
#: sparsity, ~60 dense; diffusion transformers reach about two thirds of it)
GPU_FLOPS = 40e12
#: effective bf16 throughput of a desktop CPU (16 cores, AVX-512/AMX-less: PyTorch bf16 GEMM)
CPU_FLOPS = 0.4e12
#: host-to-device copies from pinned RAM: PCIe 4.0 x16 measures ~24-26 GB/s (bandwidthTest)
H2D_PINNED_BPS = 24e9
#: from pageable RAM through the engine's pinned staging buffers (a host memcpy first): ~half
H2D_STAGED_BPS = 12e9
#: sequential reads of a .safetensors file: a PCIe 3.0 NVMe SSD (~3 GB/s) with some margin
DISK_READ_BPS = 2.5e9
#: memory bandwidth the FP8 -> bf16 conversion runs at (GPU: GDDR6X ~500 GB/s; CPU: DDR5 dual channel)
GPU_MEM_BPS = 400e9
CPU_MEM_BPS = 30e9
#: FP8 storage bytes of the bf16 bytes (Studio's FP8_SIZE_FACTOR)
FP8_FACTOR = 0.52
#: the engine pins this fraction of the RAM by default (app.py --pinned-ram-gb)
PINNED_FRACTION = 0.5
#: VRAM limits are proposed in steps of this many GB
LIMIT_STEP_GB = 0.5
#: on a host without a GPU, disk offload keeps at most this many GB resident, in steps of RAM_STEP_GB
RAM_STEP_GB = 1.0


@dataclass(frozen=True)
class StepWork:
    """What a denoising step computes: the denoiser's bf16 bytes and the tokens it sees."""

    denoiser_bytes_bf16: int
    tokens: int  # latent patches of the image (width/16 * height/16)
    batch: int = 1  # 2 with batched classifier-free guidance


@dataclass(frozen=True)
class Candidate:
    fp8: bool
    disk_offload: bool
    vram_limit: float | None  # GB; None: unlimited


def hardware_of(machine: Machine) -> HardwareInfo:
    """The HardwareInfo a machine would detect (Auto = its VRAM minus the usual margin)."""
    from engine.generation.settings import auto_vram_limit_gb

    has_gpu = machine.vram_gb is not None
    return HardwareInfo(
        has_gpu, machine.gpu_name if has_gpu else None, machine.vram_gb, auto_vram_limit_gb(machine.vram_gb), machine.ram_gb
    )


def storage_forms() -> list[tuple[bool, bool]]:
    """(fp8, disk_offload) pairs, in order of preference at equal speed (bf16 before FP8: FP8 loses
    a little precision; RAM before disk). A new storage form is added here."""
    return [(False, False), (True, False), (False, True), (True, True)]


def limit_grid(machine: Machine, disk_offload: bool) -> list[float | None]:
    """The VRAM limits a candidate may have, highest first. GPU: from the Auto limit (VRAM minus
    the margin) down to 0 in LIMIT_STEP_GB steps. No GPU: unlimited; with disk offload the limit
    is what stays resident in RAM, from 0.9 x RAM down to 0 in RAM_STEP_GB steps."""
    if machine.vram_gb is None:
        if not disk_offload:
            return [None]
        top = math.floor(0.9 * machine.ram_gb / RAM_STEP_GB) * RAM_STEP_GB
        return [round(top - i * RAM_STEP_GB, 2) for i in range(int(top / RAM_STEP_GB) + 1)]
    auto = hardware_of(machine).auto_vram_limit_gb or 0.0
    top = math.floor(auto / LIMIT_STEP_GB) * LIMIT_STEP_GB
    grid = [round(top - i * LIMIT_STEP_GB, 2) for i in range(int(round(top / LIMIT_STEP_GB)) + 1)]
    return ([auto] if auto > top else []) + grid


def candidates(machine: Machine) -> list[Candidate]:
    """The whole settings grid (the brute-force search walks all of it)."""
    return [Candidate(fp8, disk, limit) for fp8, disk in storage_forms() for limit in limit_grid(machine, disk)]


def fits_on(est: MemoryEstimate, machine: Machine, candidate: Candidate, downloaded: bool = True) -> bool:
    """The estimate fits, and the download (when the model is not on disk yet) fits the free disk.
    On a host without a GPU, what disk offload keeps resident sits in RAM too."""
    if not est.fits:
        return False
    if not downloaded and machine.disk_free_gb is not None and est.disk_gb > machine.disk_free_gb:
        return False
    if machine.vram_gb is None and candidate.disk_offload and est.ram_gb + est.vram_gb > 0.9 * machine.ram_gb:
        return False
    return True


def step_seconds(est: MemoryEstimate, machine: Machine, candidate: Candidate, work: StepWork) -> float:
    """Seconds per denoising step under the cost model (module docstring)."""
    gpu = machine.vram_gb is not None
    params = work.denoiser_bytes_bf16 / 2
    compute = 2 * params * work.tokens * work.batch / (GPU_FLOPS if gpu else CPU_FLOPS)
    streamed = est.streamed_gb_per_step * GB
    stored = work.denoiser_bytes_bf16 * (FP8_FACTOR if candidate.fp8 else 1.0)
    link = 0.0
    if gpu and streamed:
        pinned = 0.0 if candidate.disk_offload else min(1.0, PINNED_FRACTION * machine.ram_gb * GB / max(1.0, stored))
        link = streamed * (pinned / H2D_PINNED_BPS + (1 - pinned) / H2D_STAGED_BPS)
    disk = 0.0
    if candidate.disk_offload and streamed:
        disk = streamed / (FP8_FACTOR if candidate.fp8 else 1.0) / DISK_READ_BPS
    dequant = stored * 3 / (GPU_MEM_BPS if gpu else CPU_MEM_BPS) if candidate.fp8 else 0.0
    return max(compute, link, disk) + dequant


EstimateFn = Callable[[GenerateRequest, HardwareInfo], MemoryEstimate]


def _request(request: GenerateRequest, c: Candidate) -> GenerateRequest:
    return replace(request, fp8=c.fp8, disk_offload=c.disk_offload, vram_limit=c.vram_limit)


def describe(c: Candidate, gpu: bool = True) -> str:
    """"FP8 + disk offload + VRAM limit 10.5 GB" and the like (without a GPU the limit bounds
    what stays resident in RAM)."""
    parts = ["FP8" if c.fp8 else "bf16"]
    if c.disk_offload:
        parts.append("disk offload")
    if c.vram_limit is not None:
        parts.append(f"{'VRAM limit' if gpu else 'resident limit'} {c.vram_limit:g} GB")
    return " + ".join(parts)


def _why_not(form: tuple[bool, bool], est: MemoryEstimate, machine: Machine, downloaded: bool) -> str:
    fp8, disk = form
    name = ("FP8" if fp8 else "bf16") + (" with disk offload" if disk else "")
    if not downloaded and machine.disk_free_gb is not None and est.disk_gb > machine.disk_free_gb:
        return f"{name} needs {est.disk_gb:.1f} GB of free disk, {machine.disk_free_gb:.1f} GB free"
    if est.ram_gb > 0.9 * machine.ram_gb or (machine.vram_gb is None and disk):
        return f"{name} does not fit in {machine.ram_gb:g} GB RAM"
    if machine.vram_gb is not None:
        return f"{name} does not fit in {machine.vram_gb:g} GB VRAM"
    return f"{name} does not fit"


def suggest_settings(
    request: GenerateRequest,
    machine: Machine,
    estimate: EstimateFn,
    work: StepWork,
    downloaded: bool = True,
) -> SuggestedSettings:
    """The fastest candidate that fits `machine` (ties: the earlier storage form, the higher limit).

    Per storage form the limits are tried from the highest down and the first that fits is taken:
    a higher limit never streams more (the estimate streams what the limit cannot hold), so it is
    that form's fastest. Then the forms are compared by `step_seconds`."""
    hw = hardware_of(machine)
    best: tuple[float, int, Candidate, MemoryEstimate] | None = None
    rejected: list[tuple[tuple[bool, bool], MemoryEstimate]] = []
    tried = 0
    for rank, form in enumerate(storage_forms()):
        first_est: MemoryEstimate | None = None
        for limit in limit_grid(machine, form[1]):
            c = Candidate(form[0], form[1], limit)
            est = estimate(_request(request, c), hw)
            tried += 1
            first_est = first_est or est
            if fits_on(est, machine, c, downloaded):
                cost = step_seconds(est, machine, c, work)
                if best is None or (cost, rank) < (best[0], best[1]):
                    best = (cost, rank, c, est)
                break
        else:
            if first_est is not None:
                rejected.append((form, first_est))
    if best is None:
        why = "; ".join(_why_not(f, e, machine, downloaded) for f, e in rejected[:2])
        return SuggestedSettings(False, True, True, 0.0 if machine.vram_gb is not None else None, False, None,
                                 f"Nothing fits this machine: {why}.", None, tried)
    cost, rank, c, est = best
    moved = "streamed" if machine.vram_gb is not None else "read from disk"  # no GPU: disk offload reads per step
    streamed = f"{est.streamed_gb_per_step:.1f} GB {moved} per step" if est.streamed_gb_per_step else f"nothing {moved}"
    head = f"{describe(c, machine.vram_gb is not None)}: {streamed}, about {cost:.2f} s per step"
    faster = [(f, e) for f, e in rejected if storage_forms().index(f) < rank]
    reason = head + "".join(f"; {_why_not(f, e, machine, downloaded)}" for f, e in faster[:1])
    auto = machine.vram_gb is not None and c.vram_limit == hw.auto_vram_limit_gb
    return SuggestedSettings(True, c.fp8, c.disk_offload, c.vram_limit, auto, cost, reason, est, tried)


def brute_force(
    request: GenerateRequest, machine: Machine, estimate: EstimateFn, work: StepWork, downloaded: bool = True
) -> tuple[float, Candidate, MemoryEstimate] | None:
    """Every candidate of the grid, the cheapest that fits (the test's reference)."""
    hw = hardware_of(machine)
    best: tuple[float, Candidate, MemoryEstimate] | None = None
    for c in candidates(machine):
        est = estimate(_request(request, c), hw)
        if fits_on(est, machine, c, downloaded):
            cost = step_seconds(est, machine, c, work)
            if best is None or cost < best[0]:
                best = (cost, c, est)
    return best
