"""Settings that fit a machine: the fastest storage form / disk offload / VRAM limit whose estimate fits.

    fastest_fit(request, machine, estimate, work) -> SuggestedSettings

(`Studio.suggest_settings` and `engine.suggest_settings` call it through
`engine.generation.estimator.Estimator.suggest`.) Everything about memory comes from one
function, `estimate(request, hardware) -> MemoryEstimate` (the Estimator's: the planner's plans
of meta-built components), so whatever the estimate learns
(measured floors, RAM as a budget on the CPU, other storage forms) the suggestion follows. This
module adds only

* the grid of candidates: every storage form the UI offers (`storage_forms`: the registry's,
  engine.storage.forms: bf16, FP8, int8, NF4, ..., each with and without disk offload; a GGUF
  catalogue entry keeps its file's blocks, so only its disk offload choice varies) times the VRAM
  limits a machine can take (`limit_grid`),
* `fits_on`: the estimate fits, and a model that still has to be downloaded fits on the free disk,
* `step_seconds`: a cost model, seconds per denoising step, to rank the candidates that fit.

The cost model (constants below; they are round figures for a mid-range desktop, not
measurements of this host, and only their ratios matter for the ranking):

    compute   = 2 * denoiser parameters * tokens * batch / FLOPS     (GPU or CPU figure)
    link      = streamed bytes per step / host-to-device bandwidth    (pinned part at PCIe speed,
                the part beyond the pinned-RAM budget through the staging buffers, slower)
    disk      = bytes read from the files per step / disk read rate   (disk offload only; it
                streams the stored form, from the stored-form cache for FP8 / int8 / NF4 and for
                bf16 of an F32 checkpoint (engine.storage.form_cache), from a GGUF file its
                blocks: the bytes read are the streamed bytes)
    dequant   = stored bytes of the denoiser * the form's dequant_traffic / memory bandwidth
                (the form -> bf16 each forward; bf16: none)
    seconds per step = max(compute, link, disk) + dequant

The streamed bytes are the estimate's; the stored bytes (dequant, the pinned share) use the
form's size factor (`StorageForm.size_factor`, the figure the Estimator uses too: FP8 0.52, int8
0.5, NF4 0.29; a GGUF denoiser is its file's bytes). `StorageForm.dequant_traffic` is the memory
traffic of the conversion per stored byte: read the byte, write the bf16 values it holds. FP8 and int8 hold one value per byte: 1 + 2 = 3 (the per-row
or per-channel scales are noise). NF4 holds two values per byte: 1 + 4 = 5, plus the codebook
lookups and the per-group absmax, rounded up to 6. GGUF blocks are mostly 4-5 bit K-quants
(nested scales): 6 like NF4.

Copies run on their own stream and disk reads ahead of use (engine.transfer / engine.loading),
so compute, link and disk overlap: the slowest of them sets the pace. tests/test_suggest.py checks
`fastest_fit` against a brute-force search of the same grid under the same cost function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from engine.generation.types import GenerateRequest, HardwareInfo, Machine, MemoryEstimate, SuggestedSettings
from engine.storage.forms import FP8, file_form, get_form, offered_forms

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
#: memory bandwidth a form -> bf16 conversion runs at (GPU: GDDR6X ~500 GB/s; CPU: DDR5 dual channel)
GPU_MEM_BPS = 400e9
CPU_MEM_BPS = 30e9
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
    gguf_bytes: int | None = None  # a GGUF catalogue entry: its denoiser file's bytes (its only form)


@dataclass(frozen=True)
class Candidate:
    weights: str  # a storage form: one the UI offers (GenerateRequest.weights) or "gguf" (a GGUF entry)
    disk_offload: bool
    vram_limit: float | None  # GB, engine level: None = unlimited

    @property
    def fp8(self) -> bool:
        """For the page's FP8 checkbox and the /suggest answer (SuggestedSettings.fp8)."""
        return self.weights == FP8


def size_factor(weights: str) -> float:
    """Stored bytes per bf16 byte of a form (the registry's figure, which Studio.estimate uses)."""
    return get_form(weights).size_factor


def __getattr__(name: str) -> object:
    if name == "FORMS":  # the forms the grid tries, as registered now
        return tuple(f.name for f in offered_forms())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hardware_of(machine: Machine) -> HardwareInfo:
    """The HardwareInfo a machine would detect (Auto = its VRAM minus the usual margin)."""
    from engine.generation.vram_limit import auto_vram_limit_gb

    has_gpu = machine.vram_gb is not None
    return HardwareInfo(
        has_gpu, machine.gpu_name if has_gpu else None, machine.vram_gb, auto_vram_limit_gb(machine.vram_gb), machine.ram_gb
    )


def storage_forms(gguf: bool = False) -> list[tuple[str, bool]]:
    """(weights, disk_offload) pairs, in order of preference at equal speed: RAM before disk, and
    within each the more precise forms first (the registry's order: bf16, FP8, int8, NF4, ...:
    each loses a little more precision). A GGUF entry keeps its file's blocks whatever is asked:
    ("gguf", False), ("gguf", True). A form registered as offered joins the grid."""
    forms = (file_form().name,) if gguf else tuple(f.name for f in offered_forms())  # type: ignore[union-attr]
    return [(w, disk) for disk in (False, True) for w in forms]


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


def candidates(machine: Machine, gguf: bool = False) -> list[Candidate]:
    """The whole settings grid (the brute-force search walks all of it)."""
    return [Candidate(w, disk, limit) for w, disk in storage_forms(gguf) for limit in limit_grid(machine, disk)]


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
    form = get_form(candidate.weights)
    factor = 1.0 if form.from_file else form.size_factor
    stored = (work.gguf_bytes or work.denoiser_bytes_bf16) if form.from_file else work.denoiser_bytes_bf16 * factor
    link = 0.0
    if gpu and streamed:
        pinned = 0.0 if candidate.disk_offload else min(1.0, PINNED_FRACTION * machine.ram_gb * GB / max(1.0, stored))
        link = streamed * (pinned / H2D_PINNED_BPS + (1 - pinned) / H2D_STAGED_BPS)
    disk = 0.0
    if candidate.disk_offload and streamed:
        disk = streamed / DISK_READ_BPS  # the stored form is what is read (cache or GGUF blocks)
    dequant = stored * form.dequant_traffic / (GPU_MEM_BPS if gpu else CPU_MEM_BPS)
    return max(compute, link, disk) + dequant


EstimateFn = Callable[[GenerateRequest, HardwareInfo], MemoryEstimate]


def request_for(request: GenerateRequest, c: Candidate) -> GenerateRequest:
    """The request a candidate runs as: its weights (a GGUF entry: "auto", its file decides),
    disk offload and limit (a candidate's None is unlimited: the request's math.inf, since a
    request's None is Auto)."""
    weights = "auto" if get_form(c.weights).from_file else c.weights
    limit = math.inf if c.vram_limit is None else c.vram_limit
    return replace(request, weights=weights, disk_offload=c.disk_offload, vram_limit=limit)




def describe(c: Candidate, gpu: bool = True) -> str:
    """"NF4 + disk offload + VRAM limit 10.5 GB" and the like (without a GPU the limit bounds
    what stays resident in RAM)."""
    parts = [get_form(c.weights).title]
    if c.disk_offload:
        parts.append("disk offload")
    if c.vram_limit is not None:
        parts.append(f"{'VRAM limit' if gpu else 'resident limit'} {c.vram_limit:g} GB")
    return " + ".join(parts)


def _why_not(form: tuple[str, bool], est: MemoryEstimate, machine: Machine, downloaded: bool) -> str:
    weights, disk = form
    name = get_form(weights).title + (" with disk offload" if disk else "")
    if not downloaded and machine.disk_free_gb is not None and est.disk_gb > machine.disk_free_gb:
        return f"{name} needs {est.disk_gb:.1f} GB of free disk, {machine.disk_free_gb:.1f} GB free"
    if est.ram_gb > 0.9 * machine.ram_gb or (machine.vram_gb is None and disk):
        return f"{name} does not fit in {machine.ram_gb:g} GB RAM"
    if machine.vram_gb is not None:
        return f"{name} does not fit in {machine.vram_gb:g} GB VRAM"
    return f"{name} does not fit"


def fastest_fit(
    request: GenerateRequest,
    machine: Machine,
    estimate: EstimateFn,
    work: StepWork,
    downloaded: bool = True,
) -> SuggestedSettings:
    """The fastest candidate that fits `machine` (ties: the earlier storage form, the higher limit).

    Per storage form the limits are tried from the highest down, until one fits that streams
    nothing: a higher limit does not always stream less, since the planner buys a second group in
    flight (prefetch depth 2) before residency, so just above that threshold a little more
    streams than just below it. Then the forms are compared by `step_seconds`. The reason line names the
    choice and the first form (in `storage_forms` order) that did not fit although it would have
    won (the cost model rates it faster at its highest limit, or as fast and preferred), and why: "NF4 + VRAM limit 10.5 GB: ...; bf16 does
    not fit in 24 GB RAM"."""
    hw = hardware_of(machine)
    forms = storage_forms(work.gguf_bytes is not None)
    best: tuple[float, int, Candidate, MemoryEstimate] | None = None
    rejected: list[tuple[tuple[str, bool], MemoryEstimate, float]] = []  # form, estimate and cost at its top limit
    tried = 0
    for rank, form in enumerate(forms):
        first: tuple[Candidate, MemoryEstimate] | None = None
        fitted = False
        for limit in limit_grid(machine, form[1]):
            c = Candidate(form[0], form[1], limit)
            est = estimate(request_for(request, c), hw)
            tried += 1
            first = first or (c, est)
            if fits_on(est, machine, c, downloaded):
                fitted = True
                cost = step_seconds(est, machine, c, work)
                if best is None or (cost, rank) < (best[0], best[1]):
                    best = (cost, rank, c, est)
                if not est.streamed_gb_per_step:
                    break  # nothing streams: no lower limit of this form is faster
        if not fitted and first is not None:
            rejected.append((form, first[1], step_seconds(first[1], machine, first[0], work)))
    if best is None:
        why = "; ".join(_why_not(f, e, machine, downloaded) for f, e, _ in rejected[:2])
        last = forms[-1][0]
        return SuggestedSettings(False, last == FP8, True, 0.0 if machine.vram_gb is not None else None, False, None,
                                 f"Nothing fits this machine: {why}.", None, tried, last)
    cost, rank, c, est = best
    moved = "streamed" if machine.vram_gb is not None else "read from disk"  # no GPU: disk offload reads per step
    streamed = f"{est.streamed_gb_per_step:.1f} GB {moved} per step" if est.streamed_gb_per_step else f"nothing {moved}"
    head = f"{describe(c, machine.vram_gb is not None)}: {streamed}, about {cost:.2f} s per step"
    faster = [(f, e) for f, e, seconds in rejected if (seconds, forms.index(f)) < (cost, rank)]  # would have won
    reason = head + "".join(f"; {_why_not(f, e, machine, downloaded)}" for f, e in faster[:1])
    auto = machine.vram_gb is not None and c.vram_limit == hw.auto_vram_limit_gb
    return SuggestedSettings(True, c.fp8, c.disk_offload, c.vram_limit, auto, cost, reason, est, tried, c.weights)


def brute_force(
    request: GenerateRequest, machine: Machine, estimate: EstimateFn, work: StepWork, downloaded: bool = True
) -> tuple[float, Candidate, MemoryEstimate] | None:
    """Every candidate of the grid, the cheapest that fits (the test's reference)."""
    hw = hardware_of(machine)
    best: tuple[float, Candidate, MemoryEstimate] | None = None
    for c in candidates(machine, work.gguf_bytes is not None):
        est = estimate(request_for(request, c), hw)
        if fits_on(est, machine, c, downloaded):
            cost = step_seconds(est, machine, c, work)
            if best is None or cost < best[0]:
                best = (cost, c, est)
    return best
