"""engine.studio.Studio on the demo model and tiny registered pipelines (CPU, offline)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import model_registry
from engine.generation.types import (
    GenerateRequest,
    GenerationResult,
    MemoryEstimate,
    TelemetrySnapshot,
    UserFacingError,
)
from engine.generation.studio import Studio, parse_infotext
from tests.fixtures.tiny_repos import write_tiny_repo
from tests.judge import judge
from tools.demo_shapes import held_out_scenes


class TinyRegistry:
    """model_registry plus tiny local stand-ins for real families (ids "tiny-<family>")."""

    def __init__(self, root: Path, families=("qwen-image", "flux1")):
        demo = model_registry.get_model("demo")
        self.entries, self.paths = {}, {}
        for family in families:
            model_id = f"tiny-{family}"
            guidance = 4.0 if family == "qwen-image" else 0.0
            self.entries[model_id] = dataclasses.replace(
                demo,
                id=model_id,
                name=f"Tiny {family}",
                family=family,
                is_demo=False,
                defaults={"steps": 2, "guidance": guidance, "width": 64, "height": 64},
                limits={**demo.limits, "min_guidance": 1.0 if family == "qwen-image" else 0.0},
            )
            self.paths[model_id] = write_tiny_repo(family, root / model_id)
        self.download_error: Exception | None = None
        self.downloads = 0

    def get_model(self, model_id):
        return self.entries.get(model_id) or model_registry.get_model(model_id)

    def model_choices(self, models_dir=None):
        return model_registry.model_choices(models_dir)

    def default_model_id(self, models_dir=None):
        return model_registry.default_model_id(models_dir)

    def is_downloaded(self, model_id, models_dir=None):
        if model_id in self.entries:
            return True
        return model_registry.is_downloaded(model_id, models_dir)

    def local_path(self, model_id, models_dir=None):
        return self.paths.get(model_id) or model_registry.local_path(model_id, models_dir)

    def download(self, model_id, source="hf", progress=None, models_dir=None, token=None):
        self.downloads += 1
        if progress is not None:
            progress(0.5, "half way")
        if self.download_error is not None:
            raise self.download_error
        return model_registry.download(model_id, source, progress=progress, models_dir=models_dir, token=token)

    def load_options(self, model_id, path):
        return {} if model_id in self.entries else model_registry.load_options(model_id, path)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return TinyRegistry(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def studio(tmp_path_factory, registry):
    root = tmp_path_factory.mktemp("studio")
    return Studio(root / "models", root / "outputs", registry=registry)


def collect(studio, request, cancel=None, on_event=None):
    events, result = [], None
    for item in studio.generate(request, cancel):
        if isinstance(item, GenerationResult):
            assert item.path.exists()  # saved BEFORE it is yielded
            result = item
        else:
            events.append(item)
            if on_event is not None:
                on_event(item)
    return events, result


def pixels(result):
    return np.asarray(result.image)


# --- the demo, end to end ---------------------------------------------------------------------
def test_demo_end_to_end_events_png_and_infotext(studio):
    events, result = collect(studio, GenerateRequest("a red fox", negative_prompt="blurry", seed=7, steps=2))
    phases = [e.phase for e in events]
    assert phases[0] in ("downloading", "loading")
    assert phases[phases.index("loading") :] == ["loading", "encoding", "denoising", "denoising", "denoising", "decoding", "done"]
    steps = [e for e in events if e.phase == "denoising" and e.step > 0]
    assert [(e.step, e.total_steps) for e in steps] == [(1, 2), (2, 2)]
    assert all(e.seconds_per_step is not None and e.seconds_per_step >= 0 for e in steps)
    assert all(isinstance(e.telemetry, TelemetrySnapshot) for e in events)
    assert set(steps[-1].telemetry.layer_states) == {"text_encoder", "transformer", "vae"}

    assert isinstance(result, GenerationResult) and result.image.size == (64, 64)
    assert result.path.parent == studio.outputs_dir and result.path.suffix == ".png"
    with Image.open(result.path) as png:
        text = png.text["parameters"]
        assert np.array_equal(np.asarray(png.convert("RGB")), pixels(result))
    assert text == result.parameters
    lines = text.split("\n")
    assert lines[0] == "a red fox" and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 2, Sampler: ")
    fields = parse_infotext(text)
    assert fields["Seed"] == "7" and fields["Size"] == "64x64" and fields["Model"] == "demo"
    assert fields["CFG scale"] == "0" and fields["VRAM limit"].startswith("Auto (")  # and what Auto came to
    assert fields["FP8"] == "off" and fields["Disk offload"] == "off"
    assert result.settings["seed"] == 7


def test_same_seed_same_image_other_seed_other_image(studio):
    _, a = collect(studio, GenerateRequest("a lighthouse", seed=11))
    _, b = collect(studio, GenerateRequest("a lighthouse", seed=11))
    _, c = collect(studio, GenerateRequest("a lighthouse", seed=12))
    assert np.array_equal(pixels(a), pixels(b)) and not np.array_equal(pixels(a), pixels(c))
    assert a.path != b.path  # every image gets its own file


def test_random_seed_is_recorded(studio):
    _, r = collect(studio, GenerateRequest("a lighthouse", seed=-1))
    seed = r.settings["seed"]
    assert 0 <= seed < 2**32 and parse_infotext(r.parameters)["Seed"] == str(seed)


def test_vram_limit_change_replans_other_settings_rebuild(studio, registry, monkeypatch):
    scene = held_out_scenes(1, seed=4)[0]
    _, base = collect(studio, GenerateRequest(scene.caption(), seed=3))
    assert judge(base.image, scene).colours_and_place_ok, judge(base.image, scene)  # the picture is the caption's ...
    builds = studio.builds
    pipe = studio.pipeline

    def no_reads(*a, **k):
        raise AssertionError("changing the VRAM limit must not read weights or rebuild")

    import engine.storage.disk
    import engine.generation.session as session_mod
    from engine.generation.pipelines import components as loading

    with monkeypatch.context() as m:
        m.setattr(engine.storage.disk.SafetensorsFile, "read", no_reads)
        m.setattr(engine.storage.disk.SafetensorsFile, "read_into", no_reads)
        m.setattr(loading, "load_component", no_reads)
        m.setattr(session_mod, "build_pipeline", no_reads)
        for limit in (0, 0.0005, 2, None):
            events, r = collect(studio, GenerateRequest(scene.caption(), seed=3, vram_limit=limit))
            assert "loading" not in [e.phase for e in events]
            assert studio.pipeline is pipe and pipe.budget.limit_gb == limit
            assert np.array_equal(pixels(r), pixels(base))  # ... and bf16 draws it identically at every limit
    assert studio.builds == builds
    collect(studio, GenerateRequest("a bowl of fruit", seed=3, weights="fp8"))
    assert studio.builds == builds + 1 and studio.pipeline is not pipe
    collect(studio, GenerateRequest("a bowl of fruit", seed=3, weights="fp8", vram_limit=1))
    assert studio.builds == builds + 1
    collect(studio, GenerateRequest("a bowl of fruit", model="tiny-flux1", seed=3, weights="fp8", vram_limit=1))
    assert studio.builds == builds + 2


# --- three families x strategies --------------------------------------------------------------
STRATEGIES = {
    "demo": [(False, False, None), (False, False, 0), (True, False, 0.0003), (False, True, 0), (True, True, None)],
    "tiny-qwen-image": [(False, False, None), (True, False, 0), (False, True, 0.0003)],
    "tiny-flux1": [(False, False, 0), (True, False, None), (False, True, None)],
}


@pytest.mark.parametrize("model", sorted(STRATEGIES))
def test_families_under_fp8_disk_and_limits(studio, model):
    bf16 = []
    scene = held_out_scenes(2, seed=6)[1]
    prompt = scene.caption() if model == "demo" else "a cat in a garden"
    for fp8, disk, limit in STRATEGIES[model]:
        request = GenerateRequest(prompt, negative_prompt="ugly" if model != "demo" else "", model=model, seed=5, weights="fp8" if fp8 else "auto", disk_offload=disk, vram_limit=limit)
        events, r = collect(studio, request)
        if model == "demo":  # the trained demo: every strategy draws what the caption says
            assert judge(r.image, scene).colours_and_place_ok, (fp8, disk, limit, str(judge(r.image, scene)))
        assert r is not None and r.image.size == (64, 64), (fp8, disk, limit)
        fields = parse_infotext(Image.open(r.path).text["parameters"])
        assert fields["Model"] == model and fields["FP8"] == ("on" if fp8 else "off")
        assert fields["Disk offload"] == ("on" if disk else "off")
        assert fields["VRAM limit"].startswith("Auto (") if limit is None else fields["VRAM limit"] == f"{limit:g} GB"
        if not fp8:
            bf16.append(pixels(r))
        streamed = [e.telemetry.streamed_bytes_last_step for e in events if e.phase == "denoising" and e.step > 0]
        if limit == 0:
            assert all(b > 0 for b in streamed)
    assert all(np.array_equal(img, bf16[0]) for img in bf16)  # bf16 strategies: identical images


def test_qwen_true_cfg_batched_through_studio(studio):
    collect(studio, GenerateRequest("a sign that says hello", negative_prompt="blurry", model="tiny-qwen-image", seed=1, steps=3))
    batcher = studio.pipeline.batcher
    assert batcher.batched_forwards == 3 and batcher.real_forwards == 3


# --- cancel -----------------------------------------------------------------------------------
def test_cancel_between_steps(studio):
    before = set(studio.outputs_dir.glob("*.png"))
    cancel = threading.Event()

    def on_event(e):
        if e.phase == "denoising" and e.step == 1:
            cancel.set()

    events, result = collect(studio, GenerateRequest("a dragon", seed=2, steps=20), cancel, on_event)
    phases = [e.phase for e in events]
    assert result is None and phases[-1] == "cancelled"
    assert "decoding" not in phases and "done" not in phases
    assert max(e.step for e in events if e.phase == "denoising") < 20  # stopped at a step boundary
    assert set(studio.outputs_dir.glob("*.png")) == before
    _, r = collect(studio, GenerateRequest("a dragon", seed=2))  # usable afterwards
    assert r is not None


def test_cancel_before_start_and_abandoned_iterator(studio):
    cancel = threading.Event()
    cancel.set()
    events, result = collect(studio, GenerateRequest("a dragon", seed=2), cancel)
    assert result is None and [e.phase for e in events] == ["cancelled"]
    it = studio.generate(GenerateRequest("a dragon", seed=2, steps=4))
    next(it)
    it.close()  # the UI went away mid-generation: the worker stops, the Studio is free again
    _, r = collect(studio, GenerateRequest("a dragon", seed=2))
    assert r is not None


def test_telemetry_from_another_thread_during_generation(studio):
    snaps, errors, done = [], [], threading.Event()

    def poll():
        while not done.is_set():
            try:
                snaps.append(studio.telemetry())
            except Exception as exc:  # pragma: no cover - the assertion below reports it
                errors.append(exc)

    t = threading.Thread(target=poll)
    t.start()
    try:
        collect(studio, GenerateRequest("a robot reading", seed=4, steps=3))
    finally:
        done.set()
        t.join()
    assert not errors and snaps
    snap = studio.telemetry()
    assert snap.vram_used_gb is None and snap.vram_total_gb is None  # no GPU here
    assert 0 < snap.ram_used_gb <= snap.ram_total_gb
    assert all(set(c) == {"offload", "onload", "preparing", "computation"} for c in snap.layer_states.values())
    assert sum(snap.totals().values()) > 0


def test_one_generation_at_a_time(studio):
    it = studio.generate(GenerateRequest("a dragon", seed=2, steps=3))
    next(it)
    with pytest.raises(UserFacingError, match="already running"):
        next(studio.generate(GenerateRequest("a dragon", seed=2)))
    list(it)


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_, message",
    [
        (GenerateRequest("x", model="no-such-model"), "Unknown model"),
        (GenerateRequest("   "), "prompt is empty"),
        (GenerateRequest(""), "prompt is empty"),
        (GenerateRequest("x", width=70), "multiple of 16"),
        (GenerateRequest("x", height=100), "multiple of 16"),
        (GenerateRequest("x", width=1024), "outside"),
        (GenerateRequest("x", height=32), "outside"),
        (GenerateRequest("x", steps=0), "Steps"),
        (GenerateRequest("x", steps=1000), "Steps"),
        (GenerateRequest("x", steps=2.5), "Steps"),
        (GenerateRequest("x", guidance=11.0), "Guidance"),
        (GenerateRequest("x", guidance=-1.0), "Guidance"),
        (GenerateRequest("x", guidance=float("nan")), "Guidance"),
        (GenerateRequest("x", seed=-5), "Seed"),
        (GenerateRequest("x", seed=2**40), "Seed"),
        (GenerateRequest("x", vram_limit=-1), "VRAM limit"),
        (GenerateRequest("x", model="tiny-qwen-image", guidance=0.5), "Guidance"),
    ],
)
def test_bad_input_is_rejected_before_any_work(studio, monkeypatch, request_, message):
    import engine.generation.session as session_mod

    def no_work(*a, **k):
        raise AssertionError("heavy work started for a bad request")

    monkeypatch.setattr(session_mod, "build_pipeline", no_work)
    with pytest.raises(UserFacingError, match=message):
        studio.generate(request_)  # raises when called, before iterating
    with pytest.raises(UserFacingError, match=message):
        studio.estimate(request_) if message != "prompt is empty" else studio.generate(request_)


@pytest.mark.parametrize(
    "error",
    [
        UserFacingError("Qwen-Image is gated on Hugging Face and no Hugging Face token is set."),
        UserFacingError("Cannot download Qwen-Image: huggingface.co is not reachable."),
        UserFacingError("Not enough disk space to download Qwen-Image."),
    ],
)
def test_download_failures_are_reported_and_studio_survives(studio, registry, error):
    registry.download_error = error
    try:
        events = []
        with pytest.raises(UserFacingError, match=str(error)[:20]):
            for item in studio.generate(GenerateRequest("x", model="qwen-image")):
                events.append(item)
        phases = [e.phase for e in events]
        assert phases[0] == "downloading" and phases[-1] == "error"
        assert any(e.download_fraction == 0.5 for e in events)
        assert str(error) in events[-1].message
    finally:
        registry.download_error = None
    _, r = collect(studio, GenerateRequest("still works", seed=1))
    assert r is not None


def test_failed_generation_leaves_studio_usable(studio, monkeypatch):
    pipe = collect(studio, GenerateRequest("a cat", seed=1))[1] and studio.pipeline

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    with monkeypatch.context() as m:
        m.setattr(type(pipe), "generate", boom)
        with pytest.raises(RuntimeError, match="kaboom"):
            collect(studio, GenerateRequest("a cat", seed=1))
    _, r = collect(studio, GenerateRequest("a cat", seed=1))
    assert r is not None


# --- catalogue, hardware, estimate ----------------------------------------------------------------
def test_models_hardware_and_defaults(studio):
    choices = studio.list_models()
    assert choices[0].id == "demo" and choices[0].is_demo and choices[0].downloaded
    assert studio.default_model_id() == "demo"
    hw = studio.hardware()
    assert not hw.has_gpu and hw.auto_vram_limit_gb is None and hw.ram_total_gb > 0


def test_estimate(studio):
    demo = studio.estimate(GenerateRequest("x"))
    assert isinstance(demo, MemoryEstimate) and demo.fits and demo.streamed_gb_per_step == 0
    big = studio.estimate(GenerateRequest("x", model="qwen-image", width=1024, height=1024, vram_limit=0.5))
    assert not big.fits and big.smallest_feasible_vram_limit_gb > 0.5
    assert any("below the smallest" in w for w in big.warnings)
    ok = studio.estimate(GenerateRequest("x", model="qwen-image", width=1024, height=1024, vram_limit=8, weights="fp8", disk_offload=True))
    assert ok.vram_gb <= 8 and ok.streamed_gb_per_step > 0 and ok.disk_gb > 40
    plain = studio.estimate(GenerateRequest("x", model="qwen-image", width=1024, height=1024, vram_limit=8))
    assert plain.ram_gb > ok.ram_gb  # disk offload + FP8 need far less RAM
    assert studio.estimate(GenerateRequest("x", model="qwen-image", vram_limit=8, weights="fp8")).streamed_gb_per_step < plain.streamed_gb_per_step
    assert "" not in (studio.estimate(GenerateRequest("", model="qwen-image")).warnings or ("x",))  # empty prompt is fine for an estimate


def test_estimate_counts_the_gpu_schedulers_slots(tmp_path):
    """On a GPU the smallest workable limit is the planner's floor of the hungriest stage, which
    pays for two scheduler slots of its components' largest group, laid out on meta-device builds.
    For Qwen-Image that is the encode stage: its text encoder streams its 1.1 GB embedding table
    (152064 x 3584 in bf16) as one group, so the floor holds two slots and the transient of it.
    On a CPU there are no slots."""
    from engine.generation.estimate import component_costs
    from engine.generation.pipelines import FAMILIES

    request = GenerateRequest("x", model="qwen-image", width=1024, height=1024, vram_limit=0.5)
    cpu = Studio(tmp_path / "m", tmp_path / "o", device="cpu").estimate(request)
    gpu = Studio(tmp_path / "m", tmp_path / "o", device="cuda").estimate(request)
    costs = component_costs(model_registry.get_model("qwen-image"), FAMILIES["qwen-image"], "bf16", False, "cuda")
    embedding = costs["text_encoder"].member.group_bytes
    assert embedding == max(c.member.group_bytes for c in costs.values()) and embedding >= 152064 * 3584 * 2
    gap = gpu.smallest_feasible_vram_limit_gb - cpu.smallest_feasible_vram_limit_gb
    assert 2 * embedding / 1024**3 <= gap <= 3 * embedding / 1024**3, gap
    fp8 = Studio(tmp_path / "m", tmp_path / "o", device="cuda").estimate(dataclasses.replace(request, weights="fp8"))
    assert fp8.smallest_feasible_vram_limit_gb < gpu.smallest_feasible_vram_limit_gb  # FP8 slots are half


def test_estimate_uses_the_planners_floor_once_the_build_has_run(tmp_path, registry, monkeypatch):
    import math

    from engine.generation.pipelines.managed import ManagedPipeline

    studio = Studio(tmp_path / "models", tmp_path / "outputs", registry=registry)
    request = GenerateRequest("x", seed=1, vram_limit=0)
    by_formula = studio.estimate(request).smallest_feasible_vram_limit_gb
    collect(studio, request)
    floor = studio.pipeline.smallest_feasible_limit_bytes(0)
    assert floor is not None and floor > 0
    # a floor that differs from the formula's shows which one the estimate reports
    monkeypatch.setattr(ManagedPipeline, "smallest_feasible_limit_bytes", lambda self, act: 7 * 1024**3 + act)
    measured = studio.estimate(request)
    assert measured.smallest_feasible_vram_limit_gb > 7 and not measured.fits
    assert measured.smallest_feasible_vram_limit_gb == math.ceil((7 * 1024**3 + _activations(studio, request)) / 1024**3 * 10) / 10
    other_build = studio.estimate(dataclasses.replace(request, weights="fp8"))  # not the pipeline that ran
    assert other_build.smallest_feasible_vram_limit_gb < 7
    assert by_formula < 7


def _activations(studio, request):
    from engine.generation.pipelines.managed import activation_bytes

    r = studio.resolve(request)
    return activation_bytes(r.width, r.height, 1)


def test_no_network_through_the_real_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    studio = Studio(tmp_path / "models", tmp_path / "outputs")
    events = []
    with pytest.raises(UserFacingError, match="not reachable"):
        for item in studio.generate(GenerateRequest("x", model="qwen-image", width=256, height=256, steps=2)):
            events.append(item)
    assert [e.phase for e in events] == ["downloading", "error"]
    assert studio.pipeline is None and studio.builds == 0
    _, r = collect(studio, GenerateRequest("offline demo still works", seed=1))
    assert r is not None and r.path.parent == tmp_path / "outputs"


def test_out_of_memory_becomes_a_user_facing_error(studio, monkeypatch):
    from engine.runtime.oom import VramExhaustedError

    collect(studio, GenerateRequest("a cat", seed=1))
    pipe = studio.pipeline

    def oom(*a, **k):
        raise VramExhaustedError("transformer: out of memory on cuda even after lowering residency. Lower the VRAM limit.")

    with monkeypatch.context() as m:
        m.setattr(type(pipe), "generate", oom)
        with pytest.raises(UserFacingError, match="Lower the VRAM limit"):
            collect(studio, GenerateRequest("a cat", seed=1))
    assert collect(studio, GenerateRequest("a cat", seed=1))[1] is not None
