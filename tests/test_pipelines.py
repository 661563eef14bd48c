"""engine.pipelines and engine.settings on tiny, offline pipelines (CPU; one GPU test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.generation.types import GenerateRequest, HardwareInfo, UserFacingError
from engine.config import VramConfig
from engine.management import runtime_of
from engine.generation.pipelines import DECODE, DENOISE, ENCODE, FAMILIES, build_pipeline, vae_memory_plan
from engine.generation.settings import (
    auto_vram_limit_gb,
    resolve_vram_limit,
    settings_for,
    vram_config_for,
)
from tests.fixtures.tiny_repos import TINY_DEFAULTS, TINY_FAMILIES, write_tiny_repo


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: write_tiny_repo(family, root / family) for family in TINY_FAMILIES}


def cpu_config(fp8=False, disk=False):
    return vram_config_for(fp8, disk, "cpu")


def run(mp, family, *, seed=1, steps=2, guidance=None, negative="blurry", **kw):
    d = TINY_DEFAULTS[family]
    g = d.guidance if guidance is None else guidance
    return np.asarray(mp.generate("a cat on a chair", negative, width=d.width, height=d.height, steps=steps, guidance=g, seed=seed, **kw))


def count_forwards(module):
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    module.register_forward_pre_hook(hook)
    return counter


# --- settings ---------------------------------------------------------------------------------
def test_vram_config_for_ui_choices():
    plain = VramConfig.from_dict(vram_config_for(False, False, "cpu"))
    assert plain.offload_dtype == torch.bfloat16 and plain.computation_device == torch.device("cpu")
    fp8 = VramConfig.from_dict(vram_config_for(True, False, "cpu"))
    assert (fp8.offload_dtype, fp8.onload_dtype) == (torch.float8_e4m3fn,) * 2
    # on a CPU a resident copy is RAM: bf16, dequantized once (issue #17); on a GPU it stays FP8
    assert fp8.preparing_dtype == torch.bfloat16
    assert vram_config_for(True, False, "cuda")["preparing_dtype"] == torch.float8_e4m3fn
    assert fp8.computation_dtype == torch.bfloat16 and fp8.stores_fp8
    disk = VramConfig.from_dict(vram_config_for(False, True, "cpu"))
    assert disk.uses_disk and disk.onload_device == "disk" and disk.preparing_dtype == torch.bfloat16
    both = VramConfig.from_dict(vram_config_for(True, True, "cpu"))
    assert both.uses_disk and both.preparing_dtype == torch.bfloat16
    assert vram_config_for(True, True, "cuda")["preparing_dtype"] == torch.float8_e4m3fn


def test_vram_limit_from_slider():
    cpu = HardwareInfo(False, None, None, None, 16.0)
    gpu = HardwareInfo(True, "RTX", 8.0, auto_vram_limit_gb(8.0), 32.0)
    assert resolve_vram_limit(None, cpu) is None and resolve_vram_limit("Auto", cpu) is None
    assert resolve_vram_limit(None, gpu) == pytest.approx(6.5)
    assert auto_vram_limit_gb(80.0) == pytest.approx(80 - 6.4)
    assert resolve_vram_limit(3, gpu) == 3.0 and resolve_vram_limit("0", gpu) == 0.0
    with pytest.raises(UserFacingError, match="VRAM limit"):
        resolve_vram_limit(-1, gpu)
    with pytest.raises(UserFacingError, match="VRAM limit"):
        resolve_vram_limit("lots", gpu)
    s = settings_for(GenerateRequest("x", vram_limit=2, weights="fp8"), cpu, "cpu")
    assert s.vram_limit == 2 and s.fp8 and s.device == torch.device("cpu")
    assert s.build_key == settings_for(GenerateRequest("x", vram_limit=5, weights="fp8"), cpu, "cpu").build_key


def test_vae_memory_plan():
    assert vae_memory_plan(64, 64, 0) == (False, True)  # small images never tile
    assert vae_memory_plan(2048, 2048, None)[0]  # large images always do
    assert not vae_memory_plan(1024, 1024, None)[0]
    assert vae_memory_plan(1024, 1024, 2.0)[0]  # small budget: tile
    assert not vae_memory_plan(1024, 1024, 24.0)[0]


# --- pipelines ------------------------------------------------------------------------------------
def test_family_is_found_by_the_pipeline_class_and_unknown_classes_are_refused():
    from engine.generation.pipelines import family_for

    assert family_for("StableDiffusionXLPipeline").denoiser == "unet"
    with pytest.raises(ValueError, match=r"not supported; supported: .*QwenImagePipeline"):
        family_for("StableDiffusionPipeline")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_end_to_end_with_stage_switching(repos, family):
    if FAMILIES[family].requires_image:  # Qwen-Image-Edit: tests/test_images_pipelines.py
        pytest.skip("an edit family that needs an input image")
    mp = build_pipeline(repos[family], cpu_config(), None)
    assert len({id(runtime_of(m).budget) for m in mp.components.values()}) == 1  # ONE budget
    assert all(runtime_of(m).budget is mp.budget for m in mp.components.values())
    assert all(not runtime_of(m).active for m in mp.components.values())  # built offloaded
    stages, active_at_step = [], []

    def on_step(i, n, stats):
        active_at_step.append({name for name, m in mp.components.items() if runtime_of(m).active})

    image = run(mp, family, on_step=on_step, on_stage=stages.append)
    assert image.shape == (64, 64, 4 if family == "qwen-image-21" else 3)  # Qwen-Image-2.1 draws RGBA
    assert stages == [ENCODE, DENOISE, DECODE]
    assert all(active == {mp.family.denoiser} for active in active_at_step)  # only the denoiser while denoising
    assert {n for n, m in mp.components.items() if runtime_of(m).active} == {"vae"}
    assert mp.pipe._execution_device == torch.device("cpu")


def test_fp8_placeholders_on_meta_execution_device_is_computation(repos):
    mp = build_pipeline(repos["flux1"], cpu_config(fp8=True), 0)
    te = mp.components["text_encoder"]
    assert any(p.device.type == "meta" for p in te.parameters())  # weights sit in FP8 copies
    assert te.device == torch.device("cpu") and mp.pipe._execution_device == torch.device("cpu")
    image = run(mp, "flux1")
    assert image.std() > 0
    assert np.array_equal(image, run(mp, "flux1"))  # reproducible


def test_bf16_strategies_give_identical_images(repos):
    """vram_limit None / 0 / partial, with and without disk offload: the same pixels."""
    images, streamed = {}, {}
    for name, (disk, limit) in {
        "ram-unlimited": (False, None),
        "ram-0": (False, 0),
        "ram-partial": (False, 0.0001),
        "disk-0": (True, 0),
        "disk-unlimited": (True, None),
    }.items():
        mp = build_pipeline(repos["qwen-image"], cpu_config(disk=disk), limit)
        per_step = []
        images[name] = run(mp, "qwen-image", guidance=4.0, on_step=lambda i, n, s: per_step.append(s.streamed_bytes))
        streamed[name] = per_step
    for name, image in images.items():
        assert np.array_equal(image, images["ram-unlimited"]), name
    assert all(b == 0 for b in streamed["ram-unlimited"]) and all(b > 0 for b in streamed["ram-0"])
    assert 0 < streamed["ram-partial"][-1] < streamed["ram-0"][-1]
    assert all(b > 0 for b in streamed["disk-0"])


def test_fp8_images_are_close_to_bf16(repos):
    bf16 = run(build_pipeline(repos["z-image"], cpu_config(), None), "z-image").astype(int)
    fp8_none = run(build_pipeline(repos["z-image"], cpu_config(fp8=True), None), "z-image").astype(int)
    fp8_zero = run(build_pipeline(repos["z-image"], cpu_config(fp8=True), 0), "z-image").astype(int)
    assert np.array_equal(fp8_none, fp8_zero)  # FP8 strategies agree with each other
    assert np.abs(fp8_none - bf16).mean() < 8  # and stay close to bf16


def test_qwen_true_cfg_is_one_batched_forward_per_step(repos, monkeypatch, request):
    from diffusers import QwenImagePipeline

    from engine.runtime import cpu_dtype

    # the comparison with diffusers' bf16 pipeline needs our VAE in bf16 too: on a loaded CPU the
    # conv probe (engine.runtime.cpu_dtype) may time float32 faster and pick it (it then differs
    # from diffusers' by the VAE's rounding, whatever the batcher does)
    monkeypatch.setenv("LOWVRAM_CPU_CONV_DTYPE", "bfloat16")
    cpu_dtype.conv_dtype.cache_clear()
    request.addfinalizer(cpu_dtype.conv_dtype.cache_clear)  # later tests measure again
    steps = 3
    mp = build_pipeline(repos["qwen-image"], cpu_config(), 0)
    blocks = count_forwards(mp.components["transformer"].transformer_blocks[0])
    ours = run(mp, "qwen-image", steps=steps, guidance=4.0, negative="blurry, low quality").astype(float) / 255
    assert blocks["n"] == steps  # cond + uncond in ONE forward per step
    assert mp.batcher.batched_forwards == steps and mp.batcher.served_from_batch == steps
    assert mp.batcher.real_forwards == steps

    counters: list[dict] = []  # forwards of the reference pipelines' first block

    def diffusers_image(dtype, negative):
        pipe = QwenImagePipeline.from_pretrained(repos["qwen-image"], dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        counters.append(count_forwards(pipe.transformer.transformer_blocks[0]))
        image = pipe(
            "a cat on a chair", negative_prompt=negative, width=64, height=64, num_inference_steps=steps,
            true_cfg_scale=4.0, generator=torch.Generator("cpu").manual_seed(1), output_type="np",
        ).images[0]
        return np.asarray(image)

    # The batch pads the shorter prompt (masked keys): in bf16 the longer softmax rounds
    # differently, so the image is not bitwise diffusers' two-pass one; it must be as close to the
    # float32 result as diffusers' own bf16 image is (measured: mean 0.0031 both, max 0.040 ours
    # against 0.049 diffusers').
    exact = diffusers_image(torch.float32, "blurry, low quality")
    theirs = diffusers_image(torch.bfloat16, "blurry, low quality")
    assert counters[-1]["n"] == 2 * steps  # diffusers: two passes per step
    ours_err, theirs_err = np.abs(ours - exact), np.abs(theirs - exact)
    assert ours_err.mean() <= 1.1 * theirs_err.mean() and ours_err.max() <= 1.25 * theirs_err.max()
    # prompts of one token length need no padding: then the batch is bitwise the two passes
    same_length = run(build_pipeline(repos["qwen-image"], cpu_config(), 0), "qwen-image", steps=steps, guidance=4.0, negative="a dog on a chair")
    reference = diffusers_image(torch.bfloat16, "a dog on a chair")
    assert np.array_equal(same_length, np.round(reference * 255).astype(np.uint8))


@pytest.mark.parametrize(("family", "guidance", "steps"), [("qwen-image", 4.0, 3), ("qwen-image", 1.0, 2), ("z-image", None, 3)])
def test_the_last_step_tells_the_denoiser_no_forward_follows(repos, family, guidance, steps):
    """Before the last step the pipeline sets the denoiser's `forwards_left` (its scheduler then
    prefetches no step after it), counted by the forwards of the step before; after the run it is
    unknown again. (A one-step run has no step before: nothing is said.)"""
    mp = build_pipeline(repos[family], cpu_config(), 0)
    runtime = runtime_of(mp.components[mp.family.denoiser])
    seen: list[int | None] = []
    real_begin = runtime.begin_step
    runtime.begin_step = lambda: (seen.append(runtime.forwards_left), real_begin())[1]
    run(mp, family, steps=steps, guidance=guidance)
    per_step = len(seen) // steps
    assert seen[-per_step:] == list(range(per_step, 0, -1))  # the last step's forwards count down
    assert set(seen[:-per_step]) <= {None}
    assert runtime.forwards_left is None


def test_qwen_without_cfg_runs_one_plain_forward_per_step(repos):
    mp = build_pipeline(repos["qwen-image"], cpu_config(), None)
    blocks = count_forwards(mp.components["transformer"].transformer_blocks[0])
    run(mp, "qwen-image", guidance=1.0)
    assert blocks["n"] == 2 and mp.batcher.batched_forwards == 0


def _forbid_weight_reads(monkeypatch):
    import safetensors
    import safetensors.torch

    import engine.storage.disk
    from engine.generation.pipelines import components as loading

    def no_reads(*a, **k):
        raise AssertionError("a re-plan must not read weights")

    monkeypatch.setattr(safetensors, "safe_open", no_reads)
    monkeypatch.setattr(safetensors.torch, "load_file", no_reads)
    monkeypatch.setattr(engine.storage.disk.SafetensorsFile, "read", no_reads)
    monkeypatch.setattr(engine.storage.disk.SafetensorsFile, "read_into", no_reads)
    monkeypatch.setattr(loading, "load_component", no_reads)


def test_set_vram_limit_replans_without_reading_files(repos, monkeypatch):
    ram = build_pipeline(repos["flux1"], cpu_config(), None)
    disk = build_pipeline(repos["flux1"], cpu_config(disk=True), None)
    first = run(ram, "flux1")
    with monkeypatch.context() as m:
        _forbid_weight_reads(m)
        for limit in (0, 0.0002, None):
            ram.set_vram_limit(limit)
            disk.set_vram_limit(limit)  # re-planning a disk-offloaded pipeline reads nothing either
            assert ram.budget.limit_gb == limit == disk.budget.limit_gb
            # weights in RAM: generating after the re-plan reads no file at all
            assert np.array_equal(run(ram, "flux1"), first)
    disk.set_vram_limit(0)  # disk offload streams from its files while it runs, by design
    assert np.array_equal(run(disk, "flux1"), first)


def test_cancel_between_steps_skips_decode(repos):
    from engine.generation.pipelines import GenerationCancelled

    mp = build_pipeline(repos["z-image"], cpu_config(), None)
    stages = []
    steps_seen = []
    with pytest.raises(GenerationCancelled):
        run(mp, "z-image", steps=4, on_step=lambda i, n, s: steps_seen.append(i), should_stop=lambda: len(steps_seen) >= 1,
            on_stage=stages.append)
    assert steps_seen == [1] and DECODE not in stages
    assert run(mp, "z-image").shape == (64, 64, 3)  # still usable


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_end_to_end_cpu_and_disk_offload(repos):
    images = {}
    for name, (disk, limit) in {"cpu-offload": (False, 0), "cpu-unlimited": (False, None), "disk": (True, 0)}.items():
        mp = build_pipeline(repos["qwen-image"], vram_config_for(False, disk, "cuda"), limit)
        assert mp.pipe._execution_device.type == "cuda"
        images[name] = run(mp, "qwen-image", guidance=4.0)
        snap = mp.budget.snapshot()
        assert snap.peak_bytes > 0
    assert np.array_equal(images["cpu-offload"], images["disk"])
    assert np.array_equal(images["cpu-offload"], images["cpu-unlimited"])


def test_checkpoint_files_pick_one_variant(tmp_path):
    from engine.generation.pipelines.components import checkpoint_files

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"")
    assert checkpoint_files(plain) == plain
    both = tmp_path / "both"
    both.mkdir()
    for name in ("model.safetensors", "model.fp16.safetensors"):
        (both / name).write_bytes(b"")
    assert checkpoint_files(both) == [both / "model.safetensors"]
    assert checkpoint_files(both, "fp16") == [both / "model.fp16.safetensors"]
    only16 = tmp_path / "only16"
    only16.mkdir()
    (only16 / "model.fp16.safetensors").write_bytes(b"")
    assert checkpoint_files(only16) == [only16 / "model.fp16.safetensors"]


def test_from_pretrained_fallback_matches_streaming_loader(repos, monkeypatch):
    """Without engine.load_model, components come from from_pretrained + enable_vram_management."""
    from engine.generation.pipelines import components as loading

    streamed = run(build_pipeline(repos["z-image"], cpu_config(), 0), "z-image")
    monkeypatch.setattr(loading, "engine_loader", lambda: None)
    fallback = build_pipeline(repos["z-image"], cpu_config(), 0)
    assert np.array_equal(run(fallback, "z-image"), streamed)
    with pytest.raises(RuntimeError, match="disk offload needs"):
        build_pipeline(repos["z-image"], cpu_config(disk=True), 0)


def test_activation_reserve_only_on_a_gpu(repos):
    from engine.generation.pipelines import activation_bytes

    mp = build_pipeline(repos["z-image"], cpu_config(), 0.001)
    mp.reserve_activations(1024, 1024)
    assert mp.budget.activation_reserve_bytes == 0  # CPU: the limit bounds the weights' ledger only
    mp.device = torch.device("cuda")  # what a CUDA pipeline does (no tensor moves here)
    mp.reserve_activations(1024, 1024)
    assert mp.budget.activation_reserve_bytes == activation_bytes(1024, 1024) > activation_bytes(512, 512)


@pytest.mark.parametrize("disk", [False, True], ids=["ram", "disk"])
def test_components_streaming_through_the_scheduler_give_the_same_images(repos, disk, monkeypatch):
    """On a GPU every component streams through a TransferScheduler (engine.management). Here the
    same, with the recording fake device of tests/test_scheduler.py shared by all components (they
    share the compute stream on a GPU too): across stage switches (onload/offload re-plan and drop
    the schedules) and two generations the images are bitwise those of the synchronous path,
    every copy precedes its consumer, and only an onloaded component holds device slots."""
    from engine.transfer.pinned import PinnedBudget
    from tests.test_scheduler import PinningBackend, log_computes

    reference = run(build_pipeline(repos["qwen-image"], cpu_config(disk=disk), 0), "qwen-image", guidance=4.0)
    mp = build_pipeline(repos["qwen-image"], cpu_config(disk=disk), 0)
    backend = PinningBackend()
    budget = PinnedBudget(limit_bytes=1024**3)
    for model in mp.components.values():
        runtime_of(model).use_scheduler(backend, budget)
    log_computes(backend, monkeypatch)
    for _ in range(2):
        assert np.array_equal(run(mp, "qwen-image", guidance=4.0), reference)
    backend.check_ordering()
    denoiser = runtime_of(mp.components["transformer"])
    assert denoiser.stats.sync_fallbacks == 0 and denoiser.stats.streamed_layers > 0
    assert sum(op[0] == "copy" for op in backend.streams["copy"]) > 0  # groups went through slots
    if disk:  # disk masters were read into the staging buffers
        assert denoiser.scheduler.stager.read_bytes > 0
    # only the stage still onloaded (the VAE, until the next encode) holds slots; the offloaded
    # components dropped theirs, and the ledger counts exactly what is held
    held = {name: runtime_of(m).scheduler.slot_bytes * len(runtime_of(m).scheduler.slots) for name, m in mp.components.items()}
    assert all(held[name] == 0 for name, m in mp.components.items() if not runtime_of(m).active)
    assert mp.budget.snapshot().slot_bytes == sum(held.values())


def test_smallest_feasible_limit_is_the_planners_and_is_kept(repos, monkeypatch):
    """Each stage's floor is what the planner pays before residency (fixed bytes + streaming
    reserve, with the scheduler's slots where one streams); running at exactly that limit keeps
    the ledger's peak within it."""
    from engine.transfer.pinned import PinnedBudget
    from tests.test_scheduler import PinningBackend

    mp = build_pipeline(repos["flux1"], cpu_config(), None)
    for model in mp.components.values():  # as on a GPU: the scheduler's slots count in the floor
        runtime_of(model).use_scheduler(PinningBackend(), PinnedBudget(limit_bytes=1024**3))
    assert mp.smallest_feasible_limit_bytes(0) is None  # no stage has run yet
    run(mp, "flux1")
    floors = dict(mp.stage_floor_bytes)
    assert set(floors) == {ENCODE, DENOISE, DECODE} and all(f > 0 for f in floors.values())
    mp.switch(DENOISE)
    assert floors[DENOISE] == mp.budget.smallest_feasible_limit() - mp.budget.activation_reserve_bytes
    denoiser = runtime_of(mp.components["transformer"])
    assert floors[DENOISE] > 2 * denoiser.scheduler.max_group_bytes(denoiser.layers)  # two slots in it
    smallest = mp.smallest_feasible_limit_bytes(0)
    assert smallest == max(floors.values())
    assert mp.smallest_feasible_limit_bytes(1000) == smallest + 1000
    mp.set_vram_limit(smallest / 1024**3)
    mp.budget.ledger.peak_bytes = 0
    reference = run(build_pipeline(repos["flux1"], cpu_config(), None), "flux1")
    assert np.array_equal(run(mp, "flux1"), reference)
    assert 0 < mp.budget.peak_bytes <= smallest
