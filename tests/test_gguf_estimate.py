"""The CPU RAM estimate of a GGUF catalogue entry (issues #12, #17): its denoiser's masters are
the file's blocks, the other components the base repo's bf16 files, and the only other setting
that changes its RAM is disk offload."""

from __future__ import annotations

import pytest

from engine.generation.estimate import GiB, cpu_ram_verdict, estimate_ram, stage_activations
from model_registry import get_model, list_models
from model_registry.families import FAMILIES

GGUF = [e.id for e in list_models() if getattr(e, "gguf", None) is not None]


def _estimate(entry, storage, disk=False):
    fam = FAMILIES[entry.family]
    return estimate_ram(entry, fam, storage=storage, disk=disk, limit_bytes=None,
                        activations=stage_activations(256, 256, 1), available_bytes=64 * GiB)


@pytest.mark.parametrize("model_id", GGUF)
def test_gguf_masters_are_the_files_blocks_plus_the_bf16_components(model_id):
    entry = get_model(model_id)
    fam = FAMILIES[entry.family]
    gguf = _estimate(entry, "gguf")
    bf16 = _estimate(entry, "bf16")
    denoiser_bf16 = entry.components[fam.denoiser].bytes_bf16
    # everything but the denoiser is the same bf16; the denoiser is the file instead of its bf16
    expected = bf16.masters_bytes - denoiser_bf16 + entry.gguf.bytes
    assert abs(gguf.masters_bytes - expected) <= 0.02 * expected, (gguf.masters_bytes / GiB, expected / GiB)
    assert gguf.masters_bytes < bf16.masters_bytes - 0.4 * denoiser_bf16


@pytest.mark.parametrize("model_id", GGUF)
def test_a_gguf_entry_that_does_not_fit_is_offered_disk_offload_only(model_id):
    entry = get_model(model_id)
    fam = FAMILIES[entry.family]
    need = _estimate(entry, "gguf").minimum_bytes
    verdict = cpu_ram_verdict(entry, fam, storage="gguf", disk=False, limit_bytes=None, width=256, height=256,
                              batch=1, available_bytes=need - GiB)
    assert not verdict.fits
    assert verdict.message.endswith("Use disk offload."), verdict.message
    assert "NF4" not in verdict.message and "FP8" not in verdict.message
    from engine.runtime.ram import machine_headroom_bytes  # "fits" leaves the rest of the machine its headroom

    fits = cpu_ram_verdict(entry, fam, storage="gguf", disk=False, limit_bytes=None, width=256, height=256,
                           batch=1, available_bytes=need + machine_headroom_bytes() + GiB)
    assert fits.fits
