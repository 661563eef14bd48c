"""suggest_settings: for every catalogue model on a table of hypothetical machines, the settings it
proposes fit (their estimate fits, the download fits the disk) and are the fastest that fit,
checked against a brute-force search of the whole settings grid under the same cost model."""

from __future__ import annotations

import dataclasses

import pytest

import model_registry
from engine.generation import suggest
from engine.generation.studio import Studio
from engine.generation.types import GenerateRequest, Machine

# (GPU GB or None, RAM GB, free disk GB)
MACHINES = [
    (4, 16, 200),
    (6, 16, 10),
    (8, 16, 200),
    (12, 32, 500),
    (16, 32, 500),
    (24, 64, 500),
    (80, 256, 2000),
    (None, 16, 200),
    (None, 32, 500),
    (None, 128, 500),
]
MODELS = [entry.id for entry in model_registry.list_models()]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("suggest")
    return Studio(root / "models", root / "outputs")


def test_the_catalogue_is_covered():
    assert {"demo", "qwen-image", "flux1-dev", "sdxl-base-1.0"} <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("vram,ram,disk", MACHINES)
def test_suggestion_fits_and_is_the_fastest(studio, model, vram, ram, disk):
    machine = Machine(vram, ram, disk)
    request = GenerateRequest("", model=model)
    req = dataclasses.replace(request, prompt="estimate")
    downloaded = model_registry.is_downloaded(model, studio.models_dir)
    work = studio.step_work(req)
    got = studio.suggest_settings(request, machine)
    best = suggest.brute_force(req, machine, studio.estimate, work, downloaded)
    if best is None:
        assert not got.fits and got.reason.startswith("Nothing fits")
        return
    assert got.fits, got.reason
    chosen = suggest.Candidate(got.weights, got.disk_offload, got.vram_limit)
    assert got.fp8 == (got.weights == "fp8")
    gguf = model_registry.get_model(model).gguf is not None
    assert (got.weights == "gguf") == gguf and (got.weights, got.disk_offload) in suggest.storage_forms(gguf)
    est = studio.estimate(suggest.request_for(req, chosen), suggest.hardware_of(machine))
    assert est.storage.split()[0] == got.weights  # the request really runs with that form
    assert est == got.estimate
    assert suggest.fits_on(est, machine, chosen, downloaded)
    assert got.seconds_per_step == pytest.approx(suggest.step_seconds(est, machine, chosen, work))
    assert got.seconds_per_step == pytest.approx(best[0], rel=1e-9), (got, best)
    assert got.candidates_tried <= len(suggest.candidates(machine, gguf))
    if vram is None:  # a CPU host: no VRAM limit unless disk offload bounds what stays in RAM
        assert got.vram_limit is None or got.disk_offload
        assert "VRAM" not in got.reason
    else:
        assert got.vram_limit is not None and got.vram_limit <= vram


def test_the_reason_names_the_choice_and_what_did_not_fit(studio):
    # int8 stores what FP8 does (a byte a weight and a scale per row); the cost model's size
    # factor (0.5 against 0.52) makes its dequantization a little cheaper, which outweighs the
    # little more it streams (the planner reserves its float32 dequantization workspace)
    got = studio.suggest_settings(GenerateRequest("", model="qwen-image"), Machine(12, 48, 500))
    assert got.fits and got.weights == "int8" and not got.fp8 and not got.disk_offload and got.vram_limit == pytest.approx(10.5)
    assert got.reason.startswith("int8 + VRAM limit 10.5 GB: ") and "GB streamed per step" in got.reason
    assert "bf16 does not fit in 48 GB RAM" in got.reason
    assert got.auto  # 10.5 GB is what Auto comes to on a 12 GB card
    # with 32 GB the int8 / FP8 masters (27 GiB), the staging buffers of what the pinned budget
    # (half the RAM) cannot hold and the process exceed 0.9 x 32 GB in RAM. Disk offload streams
    # the stored-form cache, int8's own bytes (14 GB a step, 5.6 s at 2.5 GB/s, hidden behind
    # the compute): int8 from disk is as fast as NF4 in RAM, and more precise
    small = studio.suggest_settings(GenerateRequest("", model="qwen-image"), Machine(12, 32, 500))
    assert small.fits and small.weights == "int8" and small.disk_offload
    assert small.reason.startswith("int8 + disk offload + VRAM limit 10.5 GB: 14.0 GB streamed per step")
    assert "bf16 does not fit in 32 GB RAM" in small.reason


def test_nothing_fits_says_why(studio):
    got = studio.suggest_settings(GenerateRequest("", model="qwen-image"), Machine(6, 16, 10))
    assert not got.fits and "free disk" in got.reason


def test_this_host_and_its_disk(studio):
    m = studio.machine()
    assert m.ram_gb > 0 and m.disk_free_gb is not None and m.disk_free_gb > 0
    got = studio.suggest_settings(GenerateRequest("", model="demo"))
    assert got.fits and got.weights == "bf16" and not got.fp8 and not got.disk_offload


def test_the_cost_model_ranks_streaming_and_disk():
    m = Machine(12, 32, 500)
    work = suggest.StepWork(10 * 1024**3, 4096)
    from engine.generation.types import MemoryEstimate

    est = lambda streamed: MemoryEstimate(10, 10, 10, streamed, True)
    plain = suggest.Candidate("bf16", False, 10)
    assert suggest.step_seconds(est(0), m, plain, work) < suggest.step_seconds(est(200), m, plain, work)
    disk = suggest.Candidate("bf16", True, 10)
    assert suggest.step_seconds(est(50), m, plain, work) < suggest.step_seconds(est(50), m, disk, work)
    cost = {w: suggest.step_seconds(est(0), m, suggest.Candidate(w, False, 10), work) for w in suggest.FORMS}
    # nothing streamed: the dequantization alone ranks the forms (NF4 converts two values a byte)
    assert cost["bf16"] < cost["int8"] < cost["fp8"] < cost["nf4"]
    # disk offload reads the stored form (the stored-form cache): the streamed bytes themselves,
    # NF4's dequantization on top
    nf4_disk = suggest.step_seconds(est(5), m, suggest.Candidate("nf4", True, 10), work)
    bf16_disk = suggest.step_seconds(est(5), m, disk, work)
    assert nf4_disk > bf16_disk
    assert nf4_disk == pytest.approx(5 * 1024**3 / suggest.DISK_READ_BPS + 10 * 1024**3 * 0.29 * 6 / suggest.GPU_MEM_BPS)
    # a GGUF file is read as its blocks: the streamed bytes themselves
    gguf_work = dataclasses.replace(work, gguf_bytes=3 * 1024**3)
    gguf_disk = suggest.step_seconds(est(5), m, suggest.Candidate("gguf", True, 10), gguf_work)
    assert gguf_disk == pytest.approx(5 * 1024**3 / suggest.DISK_READ_BPS + 3 * 1024**3 * 6 / suggest.GPU_MEM_BPS)


def test_without_a_gpu_ram_is_the_budget(studio):
    got = studio.suggest_settings(GenerateRequest("", model="qwen-image"), Machine(None, 32, 500))
    assert got.fits and got.disk_offload and got.vram_limit is not None  # a bound on what stays in RAM
    assert got.estimate.ram_gb + got.estimate.vram_gb <= 0.9 * 32
    assert "resident limit" in got.reason and "read from disk per step" in got.reason and "VRAM" not in got.reason
    assert "does not fit in 32 GB RAM" in got.reason


def test_the_grid_has_every_storage_form():
    forms = suggest.storage_forms()
    assert forms == [("bf16", False), ("fp8", False), ("int8", False), ("nf4", False),
                     ("bf16", True), ("fp8", True), ("int8", True), ("nf4", True)]
    assert suggest.storage_forms(gguf=True) == [("gguf", False), ("gguf", True)]
    m = Machine(12, 32, 500)
    assert len(suggest.candidates(m)) == 8 * len(suggest.limit_grid(m, False))


def test_only_nf4_fits_in_24_gb_of_ram(studio, monkeypatch):
    """Qwen-Image (~41 GB bf16) on a 24 GB RAM machine without disk offload: bf16, FP8 (~21 GB)
    and int8 (~20 GB) do not fit in 0.9 x 24 GB with the rest of the pipeline; NF4 (~29%) does."""
    monkeypatch.setattr(suggest, "storage_forms", lambda gguf=False: [(w, False) for w in suggest.FORMS])
    machine = Machine(12, 24, 500)
    got = studio.suggest_settings(GenerateRequest("", model="qwen-image"), machine)
    assert got.fits and got.weights == "nf4" and not got.fp8 and not got.disk_offload, got.reason
    assert got.reason.startswith("NF4 + VRAM limit ") and "; bf16 does not fit in 24 GB RAM" in got.reason
    req = suggest.request_for(GenerateRequest("estimate", model="qwen-image"), suggest.Candidate("nf4", False, got.vram_limit))
    assert req.weights == "nf4" and studio.estimate(req, suggest.hardware_of(machine)).storage.startswith("nf4")
    for weights in ("bf16", "fp8", "int8"):  # what the brute force would have found: nothing else fits
        est = studio.estimate(dataclasses.replace(req, weights=weights), suggest.hardware_of(machine))
        assert not est.fits


def test_nf4_when_it_is_the_fastest_that_fits(studio):
    got = studio.suggest_settings(GenerateRequest("", model="flux1-dev"), Machine(8, 16, 200))
    assert got.fits and got.weights == "nf4" and not got.disk_offload and got.reason.startswith("NF4 + VRAM limit")
    assert got.as_dict()["weights"] == "nf4" and got.as_dict()["fp8"] is False


def test_a_gguf_entry_keeps_its_blocks(studio):
    got = studio.suggest_settings(GenerateRequest("", model="qwen-image-gguf-q4_k_m"), Machine(12, 32, 500))
    assert got.fits and got.weights == "gguf" and not got.fp8 and got.reason.startswith("GGUF")
    assert got.as_dict()["weights"] == "gguf"
