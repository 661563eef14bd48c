"""Per-device, per-kind computation dtype on the CPU (issue #17): a VAE computes in float32 on a
CPU where bf16 convolutions measure slower, and the image stays what bf16 gives."""

from __future__ import annotations

import numpy as np
import torch

from engine.generation.pipelines import build_pipeline
from engine.generation.settings import vram_config_for
from engine.management import runtime_of
from engine.runtime import cpu_dtype
from tests.fixtures.tiny_repos import write_tiny_repo


def test_the_measurement_decides(monkeypatch):
    monkeypatch.delenv("LOWVRAM_CPU_CONV_DTYPE", raising=False)
    cpu_dtype.conv_dtype.cache_clear()
    monkeypatch.setattr(cpu_dtype, "_probe", lambda kind, ch, dt: 10.0 if dt == torch.bfloat16 else 0.1)
    assert cpu_dtype.conv_dtype("Conv3d", 384) == torch.float32
    cpu_dtype.conv_dtype.cache_clear()
    monkeypatch.setattr(cpu_dtype, "_probe", lambda kind, ch, dt: 0.1 if dt == torch.bfloat16 else 0.8)
    assert cpu_dtype.conv_dtype("Conv3d", 384) == torch.bfloat16
    cpu_dtype.conv_dtype.cache_clear()


def test_vae_in_float32_on_the_cpu_when_measured_faster(tmp_path, monkeypatch):
    repo = write_tiny_repo("flux1", tmp_path / "flux1")
    images = {}
    for choice in ("bfloat16", "float32"):
        monkeypatch.setenv("LOWVRAM_CPU_CONV_DTYPE", choice)
        cpu_dtype.conv_dtype.cache_clear()
        mp = build_pipeline(repo, vram_config_for(False, False, "cpu"), None)
        assert runtime_of(mp.components["vae"]).comp_dtype == getattr(torch, choice)
        assert runtime_of(mp.components["transformer"]).comp_dtype == torch.bfloat16
        images[choice] = np.asarray(mp.generate("a cat", "", width=64, height=64, steps=2, guidance=0.0, seed=1)).astype(int)
    cpu_dtype.conv_dtype.cache_clear()
    assert np.abs(images["float32"] - images["bfloat16"]).max() <= 8


def test_each_family_declares_which_convolution_its_vae_is_timed_with(tmp_path, monkeypatch):
    """Qwen-Image's VAE (Wan 2.1's) is 3-D, the others 2-D: the family says so
    (`Family.cpu_conv_probes`); no class name is guessed from."""
    from engine.config import VramConfig
    from engine.generation.pipelines import FAMILIES, managed

    kinds = []
    monkeypatch.setattr(cpu_dtype, "conv_dtype", lambda kind, channels, preferred=torch.bfloat16: kinds.append((kind, channels)) or torch.float32)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"block_out_channels": [8, 16]}')
    config = VramConfig.from_dict(vram_config_for(False, False, "cpu"))
    for family in ("qwen-image", "qwen-image-edit", "flux1", "z-image", "sdxl"):
        assert managed.component_config("vae", FAMILIES[family].cpu_conv_probes.get("vae"), tmp_path, config).computation_dtype == torch.float32
    assert kinds == [("Conv3d", 16), ("Conv3d", 16), ("Conv2d", 16), ("Conv2d", 16), ("Conv2d", 16)]
    assert managed.component_config("text_encoder", FAMILIES["flux1"].cpu_conv_probes.get("text_encoder"), tmp_path, config) is config
