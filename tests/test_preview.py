"""The live preview: latent-to-RGB projections per family (packed latents unpacked first), the
preview's timing rules, previews and the ETA in a demo run, and what a preview costs a step."""

from __future__ import annotations

import time

import pytest
import torch

from engine.generation import preview
from engine.generation.studio import Studio, eta_seconds
from engine.generation.types import GenerateRequest, GenerationEvent
from model_registry.families import FAMILIES
from model_registry.families.latent_rgb import FLUX1_16CH, FLUX2_32CH, SDXL_4CH, WAN21_16CH


def test_every_family_has_its_published_factors():
    assert FAMILIES["sdxl"].latent_rgb is SDXL_4CH and SDXL_4CH.channels == 4
    assert FAMILIES["flux1"].latent_rgb is FLUX1_16CH and FAMILIES["z-image"].latent_rgb is FLUX1_16CH
    assert FAMILIES["qwen-image"].latent_rgb is WAN21_16CH and WAN21_16CH.channels == 16
    assert FAMILIES["flux2-klein"].latent_rgb is FLUX2_32CH and FLUX2_32CH.channels == 32
    # no published factors for the 64-channel VAEs of HunyuanImage-2.1 and Qwen-Image-2.1: the
    # preview's generic view (engine.generation.preview.project)
    assert {name for name, family in FAMILIES.items() if family.latent_rgb is None} == {"hunyuan-image", "qwen-image-21"}
    for family in FAMILIES.values():
        if family.latent_rgb is not None:
            assert all(len(row) == 3 for row in family.latent_rgb.factors) and len(family.latent_rgb.bias) == 3


def test_packed_latents_are_unpacked_like_the_pipelines_pack_them():
    from diffusers import FluxPipeline, QwenImagePipeline

    image = torch.randn(1, 16, 32, 48)  # (B, C, H/8, W/8) of a 384x256 image
    for packed in (FluxPipeline._pack_latents(image, 1, 16, 32, 48), QwenImagePipeline._pack_latents(image, 1, 16, 32, 48)):
        assert packed.shape == (1, 16 * 24, 64)
        unpacked = preview._unpack(packed[0], 384, 256, 16)
        assert torch.equal(unpacked, image[0])
    # FLUX.2: 128 channels of 2x2 patches of 32, packed as tokens (c * 4 + dy * 2 + dx)
    vae = torch.randn(1, 32, 16, 16)
    patched = vae.reshape(1, 32, 8, 2, 8, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 128, 8, 8)
    tokens = patched.reshape(1, 128, 64).permute(0, 2, 1)
    assert torch.equal(preview._unpack(tokens[0], 128, 128, 32), vae[0])


@pytest.mark.parametrize(
    "family,shape,size,expected",
    [
        ("sdxl", (1, 4, 32, 24), (192, 256), (24, 32)),
        ("flux1", (1, 16 * 12, 64), (192, 256), (24, 32)),
        ("z-image", (1, 16, 32, 24), (192, 256), (24, 32)),
        ("qwen-image", (1, 16 * 12, 64), (192, 256), (24, 32)),
        ("qwen-image", (1, 16, 1, 32, 24), (192, 256), (24, 32)),
        ("flux2-klein", (1, 16 * 12, 128), (192, 256), (24, 32)),
    ],
)
def test_each_family_gives_an_rgb_image(family, shape, size, expected):
    image = preview.latents_to_image(torch.randn(shape, dtype=torch.bfloat16), FAMILIES[family].latent_rgb, *size)
    assert image.mode == "RGB" and image.size == expected


def test_a_projection_without_matching_factors_is_generic():
    image = preview.latents_to_image(torch.randn(1, 8, 16, 16), SDXL_4CH, 128, 128)
    assert image.size == (16, 16)
    assert preview.latents_to_image(torch.randn(1, 4, 16, 16), None, 128, 128).size == (16, 16)


def test_previews_are_throttled_but_never_more_than_two_seconds_apart(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(preview.time, "perf_counter", lambda: now[0])
    p = preview.Previewer(FLUX1_16CH, 64, 64)
    latents = torch.randn(1, 16, 8, 8)
    p.start()  # the denoising begins
    now[0] += 0.1
    assert p(latents, 1, 10) is None  # younger than 0.25 s
    now[0] += 0.2
    assert p(latents, 2, 10) is not None
    now[0] += 0.1
    assert p(latents, 3, 10) is None
    p.last_cost = 0.03  # a preview that took 30 ms waits 1 s for the 3% budget
    now[0] += 0.5
    assert p(latents, 4, 10) is None
    now[0] += 0.5
    assert p(latents, 5, 10) is not None
    p.last_cost = 1.0  # a preview that took 1 s would wait 33 s for the budget ...
    now[0] += 2.0
    assert p(latents, 6, 10) is not None  # ... but 2 s is the longest gap
    assert p.count == 3
    assert p(None, 7, 10) is None


def test_eta_from_measured_steps():
    assert eta_seconds([], 5) == 0.0
    assert eta_seconds([3.0], 4) == pytest.approx(12.0)  # only the first step so far
    assert eta_seconds([9.0, 1.0, 1.0], 2) == pytest.approx(2.0)  # the warm-up step left out
    assert eta_seconds([1.0, 1.0], 0) == 0.0


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    return Studio(root / "models", root / "outputs")


def _denoising(studio, request):
    return [e for e in studio.generate(request) if isinstance(e, GenerationEvent) and e.phase == "denoising" and e.step]


def test_a_demo_run_yields_previews_and_a_falling_eta(studio, monkeypatch):
    monkeypatch.setattr(preview, "PREVIEW_INTERVAL_S", 0.0)
    monkeypatch.setattr(preview, "PREVIEW_BUDGET", 1.0)  # a preview every step
    events = _denoising(studio, GenerateRequest("a lighthouse", model="demo", steps=6, width=128, height=128, seed=3))
    assert [e.step for e in events] == list(range(1, 7))
    images = [e.preview for e in events if e.preview is not None]
    assert len(images) == 6 and images[0].size == (16, 16)
    assert images[0].tobytes() != images[-1].tobytes()
    assert events[-1].eta_seconds == 0.0
    assert all(e.eta_seconds is not None for e in events) and events[0].eta_seconds > 0
    off = _denoising(studio, GenerateRequest("a lighthouse", model="demo", steps=3, width=128, height=128, seed=3, preview=False))
    assert all(e.preview is None and e.preview_index == 0 for e in off)


def test_a_preview_costs_under_three_percent_of_the_run(studio, monkeypatch):
    """The previews' own time (Previewer.seconds) against the denoising time of the same run."""
    monkeypatch.setattr(preview, "PREVIEW_INTERVAL_S", 0.02)  # many previews in a short run
    request = GenerateRequest("a lighthouse", model="demo", steps=12, width=256, height=256, seed=4)
    start = time.perf_counter()
    events = _denoising(studio, request)
    took = sum(e.seconds_per_step for e in events)
    assert time.perf_counter() - start >= took
    p = studio.last_previewer
    assert p is not None and p.count >= 2
    assert p.seconds <= 0.03 * took, (p.seconds, took)


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory):
    from tests.fixtures.tiny_repos import TINY_FAMILIES, write_tiny_repo

    root = tmp_path_factory.mktemp("tiny")
    return {family: write_tiny_repo(family, root / family) for family in TINY_FAMILIES}


@pytest.mark.parametrize("family", ["qwen-image", "z-image", "flux1", "flux2-klein", "sdxl"])
def test_each_real_pipeline_hands_latents_the_family_projection_reads(tiny_repos, family, monkeypatch):
    """The latents each diffusers pipeline hands its step callback (packed or not) go through the
    family's own factors (not the generic view) and come out at 1/8 of the image size."""
    from engine.generation.pipelines import build_pipeline
    from engine.generation.settings import vram_config_for
    from tests.fixtures.tiny_repos import TINY_DEFAULTS

    d = TINY_DEFAULTS[family]
    mp = build_pipeline(tiny_repos[family], vram_config_for(False, False, "cpu"), None)
    seen = []
    mp.generate("a cat", "blurry", width=d.width, height=d.height, steps=2, guidance=d.guidance, seed=1,
                on_latents=lambda i, n, latents: seen.append((i, n, latents.clone())))
    assert [(i, n) for i, n, _ in seen] == [(1, 2), (2, 2)]
    fam = mp.family.latent_rgb
    calls = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = preview.latents_to_image(seen[-1][2], fam, d.width, d.height)
    monkeypatch.undo()
    assert calls, f"{family}: latents {tuple(seen[-1][2].shape)} did not match the {fam.channels}-channel factors"
    assert image.size == (d.width // 8, d.height // 8)
    mp.close()
