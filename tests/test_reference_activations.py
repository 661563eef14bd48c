"""What input images cost before the first step (issues #14, #17): Qwen-Image-Edit-2509 resizes
every reference to about 1024² for its VAE, whatever its size, so a small reference costs what a
1024² one does; FLUX.2 klein and Kontext (called with _auto_resize=False) keep a small one's size.
The real-size Qwen-Image-Edit run peaked 1.1 GiB above an estimate that counted the reference
at its own 256x256 (bench/results/realsize-cpu.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.generation.estimate import GiB, cpu_ram_verdict
from engine.generation.pipelines.images import reference_pixels, vae_input_pixels
from model_registry import get_model
from model_registry.families import FAMILIES

SMALL = SimpleNamespace(width=256, height=256)
HUGE = SimpleNamespace(width=4096, height=4096)


def test_qwen_image_edit_encodes_every_reference_at_about_1024_squared():
    fam = FAMILIES["qwen-image-edit"]
    assert reference_pixels(fam, [SMALL]) == reference_pixels(fam, [HUGE]) == 1024 * 1024
    assert vae_input_pixels(fam, [SMALL]) == 1024 * 1024


@pytest.mark.parametrize("family", ["flux2-klein", "flux1-kontext"])
def test_others_keep_a_small_reference_and_reduce_a_large_one(family):
    fam = FAMILIES[family]
    assert reference_pixels(fam, [SMALL]) == 256 * 256
    assert reference_pixels(fam, [HUGE]) == 1024 * 1024
    assert reference_pixels(fam, [SMALL, SMALL]) == 2 * 256 * 256


def test_image_to_image_encodes_its_input_at_its_own_size():
    fam = FAMILIES["z-image"]
    assert reference_pixels(fam, [SMALL]) == 0
    assert vae_input_pixels(fam, [SMALL]) == 256 * 256


def test_the_cpu_ram_estimate_counts_the_reference_encode():
    entry = get_model("qwen-image-edit-2509")
    fam = FAMILIES[entry.family]
    common = dict(storage="bf16", disk=True, limit_bytes=0, width=256, height=256, batch=1, available_bytes=64 * GiB)
    bare = cpu_ram_verdict(entry, fam, **common).estimate
    fam_ref = reference_pixels(fam, [SMALL])
    with_ref = cpu_ram_verdict(entry, fam, **common, reference_pixels=fam_ref, input_pixels=vae_input_pixels(fam, [SMALL])).estimate
    assert with_ref.stages["encode"] - bare.stages["encode"] >= GiB  # a ~1024² VAE encode
    assert with_ref.stages["denoise"] > bare.stages["denoise"]  # the reference latents join the sequence
