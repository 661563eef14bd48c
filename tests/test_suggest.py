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
    chosen = suggest.Candidate(got.fp8, got.disk_offload, got.vram_limit)
    est = studio.estimate(dataclasses.replace(req, fp8=got.fp8, disk_offload=got.disk_offload, vram_limit=got.vram_limit),
                          suggest.hardware_of(machine))
    assert est == got.estimate
    assert suggest.fits_on(est, machine, chosen, downloaded)
    assert got.seconds_per_step == pytest.approx(suggest.step_seconds(est, machine, chosen, work))
    assert got.seconds_per_step == pytest.approx(best[0], rel=1e-9), (got, best)
    assert got.candidates_tried <= len(suggest.candidates(machine))
    if vram is None:  # a CPU host: no VRAM limit unless disk offload bounds what stays in RAM
        assert got.vram_limit is None or got.disk_offload
        assert "VRAM" not in got.reason
    else:
        assert got.vram_limit is not None and got.vram_limit <= vram


def test_the_reason_names_the_choice_and_what_did_not_fit(studio):
    got = studio.suggest_settings(GenerateRequest("", model="qwen-image"), Machine(12, 32, 500))
    assert got.fits and got.fp8 and not got.disk_offload and got.vram_limit == pytest.approx(10.5)
    assert got.reason.startswith("FP8 + VRAM limit 10.5 GB: ") and "GB streamed per step" in got.reason
    assert "bf16 does not fit in 32 GB RAM" in got.reason
    assert got.auto  # 10.5 GB is what Auto comes to on a 12 GB card


def test_nothing_fits_says_why(studio):
    got = studio.suggest_settings(GenerateRequest("", model="qwen-image"), Machine(6, 16, 10))
    assert not got.fits and "free disk" in got.reason


def test_this_host_and_its_disk(studio):
    m = studio.machine()
    assert m.ram_gb > 0 and m.disk_free_gb is not None and m.disk_free_gb > 0
    got = studio.suggest_settings(GenerateRequest("", model="demo"))
    assert got.fits and not got.fp8 and not got.disk_offload


def test_the_cost_model_ranks_streaming_and_disk():
    m = Machine(12, 32, 500)
    work = suggest.StepWork(10 * 1024**3, 4096)
    from engine.generation.types import MemoryEstimate

    est = lambda streamed: MemoryEstimate(10, 10, 10, streamed, True)
    plain = suggest.Candidate(False, False, 10)
    assert suggest.step_seconds(est(0), m, plain, work) < suggest.step_seconds(est(200), m, plain, work)
    disk = suggest.Candidate(False, True, 10)
    assert suggest.step_seconds(est(50), m, plain, work) < suggest.step_seconds(est(50), m, disk, work)
    fp8 = suggest.Candidate(True, False, 10)
    assert suggest.step_seconds(est(0), m, plain, work) < suggest.step_seconds(est(0), m, fp8, work)


def test_without_a_gpu_ram_is_the_budget(studio):
    got = studio.suggest_settings(GenerateRequest("", model="qwen-image"), Machine(None, 32, 500))
    assert got.fits and got.disk_offload and got.vram_limit is not None  # a bound on what stays in RAM
    assert got.estimate.ram_gb + got.estimate.vram_gb <= 0.9 * 32
    assert "resident limit" in got.reason and "read from disk per step" in got.reason and "VRAM" not in got.reason
    assert "does not fit in 32 GB RAM" in got.reason
