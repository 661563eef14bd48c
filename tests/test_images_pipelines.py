"""Images in, under the memory engine: image-to-image (one image + strength) for the text-to-image
families and reference images for the edit families (FLUX.1 Kontext, FLUX.2 [klein],
Qwen-Image-Edit), on tiny pipelines of the real classes (CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.generation.pipelines import DECODE, DENOISE, ENCODE, FAMILIES, activation_bytes, build_pipeline
from engine.generation.pipelines.images import img2img_steps
from engine.generation.settings import vram_config_for
from engine.layers.managed import ManagedModule
from engine.management import runtime_of
from tests.fixtures.tiny_repos import TINY_DEFAULTS, write_tiny_repo

IMG2IMG = ("z-image", "flux1", "qwen-image", "sdxl")
REFERENCE = ("flux1-kontext", "flux2-klein")


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_img")
    cache: dict[str, object] = {}

    def get(family):
        if family not in cache:
            cache[family] = write_tiny_repo(family, root / family)
        return cache[family]

    return get


def picture(seed=0, size=(64, 64)):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def run(mp, family, images, *, seed=1, steps=4, strength=0.5, guidance=None, **kw):
    d = TINY_DEFAULTS[family]
    g = d.guidance if guidance is None else guidance
    out = mp.generate("a cat", "", width=64, height=64, steps=steps, guidance=g, seed=seed,
                      images=images, strength=strength if FAMILIES[family].image_mode == "img2img" else None, **kw)
    return np.asarray(out)


@pytest.mark.parametrize("family", IMG2IMG + REFERENCE)
def test_image_in_png_out_with_the_vae_encode_in_the_encoding_stage(repos, family):
    mp = build_pipeline(repos(family), vram_config_for(False, False, "cpu"), 0)
    stages, steps, active = [], [], []
    vae = runtime_of(mp.components["vae"])
    before = vae.stats.forwards

    def on_step(i, n, stats):
        steps.append((i, n))
        active.append({name for name, m in mp.components.items() if runtime_of(m).active})

    image = run(mp, family, [picture()], on_step=on_step, on_stage=stages.append)
    assert image.shape == (64, 64, 3) and image.std() > 0
    # the VAE encodes the input before the denoiser: reported as encoding, through the entry hook
    assert stages == [ENCODE, ENCODE, DENOISE, DECODE]
    assert vae.stats.forwards >= before + 2  # encode + decode, each one step of the VAE
    assert all(a == {mp.family.denoiser} for a in active)
    expected = img2img_steps(mp.family, 4, 0.5) if mp.family.image_mode == "img2img" else 4
    assert [n for _, n in steps] == [expected] * expected  # the steps that really run


def test_image_to_image_is_bitwise_identical_across_bf16_strategies_and_seeded(repos):
    images = {}
    for name, (disk, limit) in {"ram-unlimited": (False, None), "ram-0": (False, 0), "ram-partial": (False, 0.0001),
                                "disk-0": (True, 0)}.items():
        mp = build_pipeline(repos("z-image"), vram_config_for(False, disk, "cpu"), limit)
        images[name] = run(mp, "z-image", [picture()])
    for name, image in images.items():
        assert np.array_equal(image, images["ram-unlimited"]), name
    assert np.array_equal(run(mp, "z-image", [picture()]), images["disk-0"])  # same seed, same image
    assert not np.array_equal(run(mp, "z-image", [picture()], seed=2), images["disk-0"])
    assert not np.array_equal(run(mp, "z-image", [picture(1)]), images["disk-0"])  # the input matters
    assert not np.array_equal(run(mp, "z-image", [picture()], strength=1.0), images["disk-0"])


def test_edit_is_bitwise_identical_across_bf16_strategies(repos):
    images = {}
    for name, (disk, limit) in {"ram-unlimited": (False, None), "ram-0": (False, 0), "disk-0": (True, 0)}.items():
        mp = build_pipeline(repos("flux1-kontext"), vram_config_for(False, disk, "cpu"), limit)
        images[name] = run(mp, "flux1-kontext", [picture()], steps=2)
    for name, image in images.items():
        assert np.array_equal(image, images["ram-unlimited"]), name
    assert not np.array_equal(run(mp, "flux1-kontext", [picture(3)], steps=2), images["disk-0"])


def test_fp8_with_disk_offload_takes_images_too(repos):
    bf16 = run(build_pipeline(repos("z-image"), vram_config_for(False, False, "cpu"), None), "z-image", [picture()])
    fp8 = build_pipeline(repos("z-image"), vram_config_for(True, True, "cpu"), 0)
    a = run(fp8, "z-image", [picture()])
    assert np.array_equal(a, run(fp8, "z-image", [picture()]))  # reproducible
    assert np.abs(a.astype(int) - bf16.astype(int)).mean() < 8  # close to bf16
    klein = build_pipeline(repos("flux2-klein"), vram_config_for(True, True, "cpu"), 0)
    assert run(klein, "flux2-klein", [picture(), picture(1)], steps=2).shape == (64, 64, 3)  # two references


def test_text_to_image_is_unchanged_by_the_image_path(repos):
    """The image-to-image object shares the components; text-to-image afterwards is the same."""
    mp = build_pipeline(repos("z-image"), vram_config_for(False, False, "cpu"), 0)
    d = TINY_DEFAULTS["z-image"]
    first = np.asarray(mp.generate("a cat", "", width=64, height=64, steps=2, guidance=d.guidance, seed=1))
    run(mp, "z-image", [picture()])
    again = np.asarray(mp.generate("a cat", "", width=64, height=64, steps=2, guidance=d.guidance, seed=1))
    assert np.array_equal(first, again)
    assert all(mp.img2img_pipe().components[k] is v for k, v in mp.components.items())


def test_reference_latents_and_input_encodes_count_as_activations():
    base = activation_bytes(1024, 1024)
    assert activation_bytes(1024, 1024, reference_pixels=1024 * 1024) > base  # references join the sequence
    assert activation_bytes(512, 512, input_pixels=1400 * 1400) > activation_bytes(512, 512)  # a big input's encode


def test_qwen_image_edit_family_streams_its_vision_tower(repos):
    """Qwen-Image-Edit's references go through Qwen2.5-VL's vision tower: it is managed like the
    language layers (its layers are managed modules of the text encoder's runtime)."""
    images = {}
    for name, (disk, limit) in {"ram-unlimited": (False, None), "ram-0": (False, 0), "disk-0": (True, 0)}.items():
        mp = build_pipeline(repos("qwen-image-edit"), vram_config_for(False, disk, "cpu"), limit)
        visual = mp.components["text_encoder"].model.visual
        assert any(isinstance(m, ManagedModule) for m in visual.modules())
        stages = []
        per_step = []
        images[name] = run(mp, "qwen-image-edit", [picture(), picture(1)], steps=2, guidance=4.0, on_stage=stages.append,
                           on_step=lambda i, n, s: per_step.append(s.streamed_bytes))
        assert images[name].shape == (64, 64, 3)
        assert stages[0] == ENCODE and stages[-1] == DECODE and DENOISE in stages
        if limit == 0:
            assert all(b > 0 for b in per_step)  # streamed under limit 0
    for name, image in images.items():
        assert np.array_equal(image, images["ram-unlimited"]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_image_to_image_and_edit_under_limits_and_disk_offload(repos):
    """On a GPU: the input's VAE encode and the references run under the budget (activation
    reserve included) and give the same pixels at every limit and with disk offload."""
    for family in ("z-image", "flux1-kontext"):
        images = {}
        for name, (disk, limit) in {"unlimited": (False, None), "zero": (False, 0), "disk": (True, 0)}.items():
            mp = build_pipeline(repos(family), vram_config_for(False, disk, "cuda"), limit)
            assert mp.pipe._execution_device.type == "cuda"
            images[name] = run(mp, family, [picture()], steps=2)
            assert mp.budget.activation_reserve_bytes > 0
        for name, image in images.items():
            assert np.array_equal(image, images["unlimited"]), (family, name)


def test_a_large_input_image_turns_vae_tiling_on(repos):
    mp = build_pipeline(repos("z-image"), vram_config_for(False, False, "cpu"), 0)
    mp.configure_vae(64, 64)
    assert not mp.vae_tiling
    mp.configure_vae(64, 64, input_pixels=2048 * 2048)  # the encode of a big input tiles
    assert mp.vae_tiling
