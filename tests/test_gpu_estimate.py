"""The GPU estimate (engine/generation/vram_estimate.py: the planner's plan of each stage over
meta-built components) against what the GPU path measures, and its real-size figures.

No GPU is needed. The GPU path is the app's CUDA config with its resident and computation place
moved to the CPU, every component streaming through a transfer scheduler on the recording fake
device of tests/test_scheduler.py: the same plans, the same slots, the same ledger. The CPU
stand-in reserves no activations in the VRAM limit (on a CPU they come off the RAM room) and
its RAM room never binds here, so the estimate is asked with no activations; everything else
(fixed bytes of every member, the scheduler's slots, prefetch depth, transients) is the GPU's.

Measured per stage: the ledger's peak (resident + transient + slots + fixed bytes) and the
pipeline's recorded floor; per step: the bytes the denoiser streamed. Each component's execution order is
given up front as its registration order (the estimate's planning order; a later generation
knows it from its trace), so every stage streams through its slots from its first forward. The
floor and the streamed bytes must equal the estimate's exactly; the peak stays at or below the
estimate, within a stated tolerance: the planner's reserve assumes a streamed layer lands in a
copy of its own, as on the synchronous path, where a layer streamed from a slot computes from
the slot itself (bf16) or from one dequantized copy.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

import model_registry
from engine.generation.estimate import component_costs
from engine.generation.pipelines import (
    DECODE,
    DENOISE,
    ENCODE,
    FAMILIES,
    activation_bytes,
    build_pipeline,
    managed,
)
from engine.generation.settings import auto_vram_limit_gb, vram_config_for
from engine.generation.estimator import catalogued_sizes, denoiser_forwards
from engine.generation.studio import Studio
from engine.generation.types import GenerateRequest, HardwareInfo
from engine.generation.vram_estimate import gpu_estimate, plan_stage
from engine.management import runtime_of
from engine.planning import planner
from engine.transfer.pinned import PinnedBudget
from tests.fixtures import tiny_components as tc
from tests.fixtures.tiny_repos import write_tiny_repo
from tests.test_pipelines import run
from tests.test_scheduler import PinningBackend

GB = 1024**3
FAMILY = "flux1"  # two text encoders, a transformer with two block lists, a VAE
STEPS = 3


_TINY_FLUX = tc.flux_transformer


def deep_flux_transformer() -> torch.nn.Module:
    """The tiny FLUX.1 transformer with 2 double-stream and 10 single-stream blocks, so that a
    limit between the streaming floor (two slots of a block) and the whole model exists."""
    from diffusers import FluxTransformer2DModel

    base = _TINY_FLUX().config
    return FluxTransformer2DModel(**{**{k: v for k, v in base.items() if not k.startswith("_")}, "num_layers": 2, "num_single_layers": 10})


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tc, "flux_transformer", deep_flux_transformer)
        return write_tiny_repo(FAMILY, tmp_path_factory.mktemp("gpu-estimate") / FAMILY)


def tiny_entry():
    """A catalogue entry for the tiny repo without catalogued configs: the estimate reads the
    repo's own model_index.json and config.json files."""
    return dataclasses.replace(model_registry.get_model("demo"), id=f"tiny-{FAMILY}", name="Tiny FLUX.1", family=FAMILY, is_demo=False, components={})


def gpu_path_config(storage: str, disk: bool) -> dict:
    """The config the app gives a CUDA computation device (resident copies in the storage form),
    with the resident and computation place on the CPU."""
    return dict(vram_config_for(False, disk, "cuda", storage_name=storage), preparing_device="cpu", computation_device="cpu")


def estimate(repo, storage: str, disk: bool, limit_bytes: int | None):
    return gpu_estimate(tiny_entry(), FAMILIES[FAMILY], storage=storage, disk=disk, limit_bytes=limit_bytes, activation_bytes=0, local_path=repo)


def measure(repo, storage: str, disk: bool, limit_bytes: int | None, monkeypatch):
    """One generation on the GPU path: (pipeline, peak bytes per stage, streamed bytes per step,
    per component which layers ran)."""
    monkeypatch.setenv("LOWVRAM_RAM_AVAILABLE_GB", "64")  # a GPU has no RAM room: it must not bind
    # a GPU computes the VAE in the pipeline's dtype (only a CPU may measure float32 faster)
    monkeypatch.setattr(managed, "component_config", lambda name, cls, path, config: config)
    mp = build_pipeline(repo, gpu_path_config(storage, disk), None if limit_bytes is None else limit_bytes / GB)
    backend, pinned = PinningBackend(), PinnedBudget(limit_bytes=GB)
    for model in mp.components.values():
        runtime = runtime_of(model)
        runtime.use_scheduler(backend, pinned)
        # the order a later generation knows from its trace, given up front as the estimate's
        # planning order: every stage streams through its slots from its first forward
        runtime.execution_order = list(runtime.layers)
    ran = {name: [False] * len(runtime_of(model).layers) for name, model in mp.components.items()}
    for name, model in mp.components.items():
        for i, layer in enumerate(runtime_of(model).layers):
            layer.module.register_forward_pre_hook(lambda *_, name=name, i=i: ran[name].__setitem__(i, True))
    peaks: dict[str, int] = {}
    current: list[str | None] = [None]

    def on_stage(stage: str) -> None:
        if current[0] is not None:
            peaks[current[0]] = max(peaks.get(current[0], 0), mp.budget.peak_bytes)
        mp.budget.reset_peak()
        current[0] = stage

    streamed: list[int] = []
    run(mp, FAMILY, steps=STEPS, on_step=lambda i, n, stats: streamed.append(stats.streamed_bytes), on_stage=on_stage)
    peaks[current[0]] = max(peaks.get(current[0], 0), mp.budget.peak_bytes)
    backend.check_ordering()
    return mp, peaks, streamed, ran


def partial_limit(repo, storage: str) -> int:
    """A limit that keeps part of the denoiser resident: half way between its stage's floor and
    what it holds with every layer resident."""
    floor = estimate(repo, storage, False, 0).stages[DENOISE].smallest_feasible_bytes
    whole = estimate(repo, storage, False, None).stages[DENOISE].peak_bytes
    assert floor < whole
    return (floor + whole) // 2


def tolerance(repo, storage: str, disk: bool, limit_bytes: int | None, stage: str, ran: dict[str, list[bool]]) -> int:
    """What the planner's accounting may hold above a run in `stage`: the largest transient it
    reserves for a streamed layer (the run computes from the slot, or from one dequantized copy),
    and the resident copies of layers that never ran (a VAE's encoder while it decodes, a tied
    embedding's first owner): residency is filled at a layer's forward."""
    costs = component_costs(tiny_entry(), FAMILIES[FAMILY], storage, disk, "cuda", repo)
    members = {n: c for n, c in costs.items() if FAMILIES[FAMILY].stage_of(n) == stage}
    fixed = sum(c.unmanaged_bytes for c in costs.values())
    _, plan = plan_stage(list(members.values()), planner.Limits(limit_bytes, fixed, 0))
    transient = max(layer.transient_streamed for c in members.values() for layer in c.member.layers)
    unfilled = sum(
        layer.resident_bytes
        for n, c in members.items()
        for i, layer in enumerate(c.member.layers)
        if layer.key in plan.resident and not ran[n][i]
    )
    return transient + unfilled


CASES = [("bf16", False, "none"), ("bf16", False, "zero"), ("bf16", False, "partial"), ("fp8", False, "partial"), ("fp8", False, "zero"),
         ("bf16", True, "zero")]


@pytest.mark.parametrize("storage,disk,which", CASES, ids=[f"{s}{'-disk' if d else ''}-{w}" for s, d, w in CASES])
def test_estimate_matches_the_gpu_path(repo, storage, disk, which, monkeypatch):
    limit = {"none": None, "zero": 0}[which] if which != "partial" else partial_limit(repo, storage)
    est = estimate(repo, storage, disk, limit)
    mp, peaks, streamed, ran = measure(repo, storage, disk, limit, monkeypatch)
    for stage in (ENCODE, DENOISE, DECODE):
        slack = tolerance(repo, storage, disk, limit, stage, ran)
        planned = est.stages[stage]
        print(f"{storage}{' disk' if disk else ''} limit={limit} {stage}: measured peak {peaks[stage]}, estimated {planned.peak_bytes} "
              f"(slots {planned.slot_bytes}, resident {planned.resident_bytes}, slack {slack}); floor {mp.stage_floor_bytes[stage]} vs "
              f"{planned.smallest_feasible_bytes}")
        # the floor is the planner's own figure, from the same costs: exactly the pipeline's record
        assert planned.smallest_feasible_bytes == mp.stage_floor_bytes[stage]
        assert peaks[stage] <= planned.peak_bytes
        assert planned.peak_bytes - peaks[stage] <= slack, (stage, planned.peak_bytes - peaks[stage], slack)
    # the steps after the first stream through the scheduler's slots: exactly what the plan streams
    print(f"streamed per step: measured {streamed}, estimated {est.streamed_bytes_per_step}")
    assert streamed[-1] == est.streamed_bytes_per_step
    if limit is None:
        assert est.streamed_bytes_per_step == 0 and all(s.slot_bytes == 0 for s in est.stages.values())
    if limit == 0:
        assert all(s.resident_bytes == 0 for s in est.stages.values())
    if which == "partial":
        assert 0 < est.stages[DENOISE].resident_bytes and 0 < est.streamed_bytes_per_step
        assert est.stages[DENOISE].peak_bytes <= limit  # the plan keeps within the limit it covers


@pytest.mark.parametrize("negative", ["blurry", ""], ids=["cfg", "no-negative"])
def test_two_passes_a_step_stream_twice(tmp_path, negative, monkeypatch):
    """Qwen-Image-Edit runs classifier-free guidance as two denoiser forwards a step (its pipeline
    encodes its own prompts, so the engine cannot batch the pair), and only with a negative
    prompt: the estimate streams what one forward streams once per pass, as the run does."""
    family = "qwen-image-edit"
    path = write_tiny_repo(family, tmp_path / family)
    entry = dataclasses.replace(tiny_entry(), id="tiny-edit", family=family)
    studio = Studio(tmp_path / "models", tmp_path / "outputs")
    r = dataclasses.replace(studio.resolve(GenerateRequest("x", model="qwen-image-edit-2509"), estimate=True), negative_prompt=negative)
    forwards = denoiser_forwards(FAMILIES[family], r, True)
    assert forwards == (2 if negative else 1)
    est = gpu_estimate(entry, FAMILIES[family], storage="bf16", disk=False, limit_bytes=0, activation_bytes=0,
                       forwards_per_step=forwards, local_path=path)
    monkeypatch.setenv("LOWVRAM_RAM_AVAILABLE_GB", "64")
    monkeypatch.setattr(managed, "component_config", lambda name, cls, p, config: config)
    mp = build_pipeline(path, gpu_path_config("bf16", False), 0)
    backend, pinned = PinningBackend(), PinnedBudget(limit_bytes=GB)
    for model in mp.components.values():
        runtime = runtime_of(model)
        runtime.use_scheduler(backend, pinned)
        runtime.execution_order = list(runtime.layers)
    streamed: list[int] = []
    mp.generate("a cat", negative, width=64, height=64, steps=3, guidance=4.0, seed=1, images=[Image.new("RGB", (64, 64), "gray")],
                on_step=lambda i, n, stats: streamed.append(stats.streamed_bytes))
    backend.check_ordering()
    print(f"{family} negative={negative!r}: streamed per step {streamed}, estimated {est.streamed_bytes_per_step}")
    assert streamed[-1] == est.streamed_bytes_per_step == forwards * est.stages[DENOISE].streamed_bytes_per_forward


def test_studio_reports_the_planners_figures_for_a_gpu(repo, tmp_path):
    """Studio.estimate for a GPU machine is the planner's figures (activations and all), not the
    size formula: its VRAM, floor and streamed bytes are those of gpu_estimate."""
    from tests.test_studio import TinyRegistry

    registry = TinyRegistry(tmp_path / "tiny", families=(FAMILY,))
    studio = Studio(tmp_path / "models", tmp_path / "outputs", registry=registry)
    gpu = HardwareInfo(True, "a 12 GB GPU", 12.0, auto_vram_limit_gb(12.0), 32.0)
    for limit in (0, 0.35, None):
        request = GenerateRequest("x", model=f"tiny-{FAMILY}", vram_limit=limit)
        got = studio.estimate(request, gpu)
        r = studio.resolve(request)
        act = activation_bytes(r.width, r.height, 1)
        limit_bytes = int(gpu.auto_vram_limit_gb * GB) if limit is None else int(limit * GB)
        direct = gpu_estimate(
            registry.entries[f"tiny-{FAMILY}"], FAMILIES[FAMILY], storage="bf16", disk=False, limit_bytes=limit_bytes,
            activation_bytes=act, ram_total_bytes=int(32 * GB), local_path=registry.paths[f"tiny-{FAMILY}"],
        )
        assert direct is not None
        assert got.vram_gb == round(direct.vram_bytes / GB, 3)
        assert got.smallest_feasible_vram_limit_gb == math.ceil(direct.smallest_feasible_bytes / GB * 10) / 10
        assert got.streamed_gb_per_step == round(direct.streamed_bytes_per_step / GB, 3)
        assert got.ram_gb == round(direct.ram_bytes / GB, 3)
        assert any("per-pixel guess" in w for w in got.warnings)


def test_costing_for_a_gpu_never_touches_cuda(monkeypatch):
    """The estimate sizes GPUs this host does not have: the "cuda" config is not checked against
    the host, no scheduler (streams, events) is made, and the slot is laid out from shapes."""
    from engine.generation.estimate import model_cost

    def touched(*_args, **_kwargs):
        raise AssertionError("the GPU estimate touched CUDA")

    with torch.device("meta"):  # built (and its libraries imported) before CUDA is fenced off
        models = [deep_flux_transformer(), deep_flux_transformer()]
    for name in ("_lazy_init", "current_device", "Stream", "Event", "cudart", "set_device"):
        monkeypatch.setattr(torch.cuda, name, touched)
    bf16 = model_cost(models[0], "bf16", False, "cuda")
    fp8 = model_cost(models[1], "fp8", False, "cuda")
    assert bf16.member.group_bytes > fp8.member.group_bytes > 0.45 * bf16.member.group_bytes  # FP8 slots: about half
    resident = lambda c: sum(layer.resident_bytes for layer in c.member.layers)
    assert resident(fp8) < 0.6 * resident(bf16)  # on a GPU the resident copies keep the storage form
    assert sum(bf16.stream_bytes.values()) >= resident(bf16)  # streamed pieces are 256-byte aligned


# --- real sizes: every catalogue model on meta ---------------------------------------------------
GPU_24 = HardwareInfo(True, "a 24 GB GPU", 24.0, auto_vram_limit_gb(24.0), 64.0)
REAL = [e.id for e in model_registry.list_models() if not e.is_demo]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-estimate-catalogue")
    return Studio(root / "models", root / "outputs")


@pytest.mark.parametrize("model", REAL)
def test_every_catalogue_model_is_planned_on_meta(studio, model):
    """The estimate builds every catalogue model on meta for a GPU and plans it: the smallest
    feasible limit is at most the VRAM Auto would use, and across limits the VRAM grows while
    the streamed bytes shrink (up to one group: the planner buys a second group in flight before
    residency). The old size formula's figures are printed beside the planner's (not asserted)."""
    entry = model_registry.get_model(model)
    fam = FAMILIES[entry.family]
    gguf = entry.gguf is not None
    rows = []
    for weights in ("auto",) if gguf else ("bf16", "fp8"):
        request = GenerateRequest("x", model=model, weights=weights)
        r = studio.resolve(request, estimate=True)
        batched = (fam.pair_batched_cfg or fam.native_batched_cfg) and fam.does_cfg(r.guidance, r.negative_prompt)
        forwards = denoiser_forwards(fam, r, fam.does_cfg(r.guidance, r.negative_prompt) and not batched)
        act = activation_bytes(r.width, r.height, 2 if batched else 1)
        storage = "gguf" if gguf else weights

        def planned(limit_bytes, storage=storage, act=act, forwards=forwards):
            est = gpu_estimate(entry, fam, storage=storage, disk=False, limit_bytes=limit_bytes, activation_bytes=act,
                               forwards_per_step=forwards, ram_total_bytes=int(64 * GB))
            assert est is not None, f"{model}: no meta build"
            return est

        auto = int(GPU_24.auto_vram_limit_gb * GB)
        at_auto = planned(auto)
        assert at_auto.smallest_feasible_bytes <= at_auto.vram_bytes <= auto
        floor = at_auto.smallest_feasible_bytes
        limits = [0, floor, floor + 2 * GB, auto, None]
        series = [planned(limit) for limit in limits]
        group = max(c.member.group_bytes or 0 for c in component_costs(entry, fam, storage, False, "cuda").values())
        for (low, lo), (high, hi) in zip(zip(limits, series), zip(limits[1:], series[1:])):
            assert hi.vram_bytes >= lo.vram_bytes - group, (model, low, high)
            assert hi.streamed_bytes_per_step <= lo.streamed_bytes_per_step + forwards * group, (model, low, high)
            assert hi.smallest_feasible_bytes == lo.smallest_feasible_bytes
        assert series[-1].streamed_bytes_per_step == 0
        sizes = catalogued_sizes(entry, fam)
        for limit, est in zip(limits, series):
            rq = dataclasses.replace(request, vram_limit=None if limit is None else limit / GB)
            rr = studio.resolve(rq, estimate=True)
            rr = dataclasses.replace(rr, settings=dataclasses.replace(rr.settings, device=torch.device("cuda")))
            old = studio.estimator._formula_figures(rr, sizes, act, 0, limit)
            rows.append((storage, limit, old, est))
    print(f"\n{model}: limit | old formula vram / floor / streamed | planner vram / floor / streamed (GiB)")
    for storage, limit, (vram, smallest, streamed, _ram), est in rows:
        shown = "None" if limit is None else f"{limit / GB:.2f}"
        print(f"  {storage:5} {shown:>6} | {vram / GB:6.2f} {smallest / GB:6.2f} {streamed / GB:6.2f} | "
              f"{est.vram_bytes / GB:6.2f} {est.smallest_feasible_bytes / GB:6.2f} {est.streamed_bytes_per_step / GB:6.2f}")
