"""RAM is a budget like VRAM where the computation device is the CPU (issue #17).

* "Auto" on a CPU host: disk offload keeps nothing resident (limit 0); RAM masters plan residency
  against the RAM available (engine.runtime.ram), never unlimited.
* The pool bounds an unlimited limit by the RAM room: FP8 masters on the CPU get bf16 resident
  copies (dequantized once) only as far as the available RAM allows.
* A real-width model (Qwen3-4B's width: 2560 hidden, 9728 MLP, 151936-token embedding; 8
  layers, 2.4 GB in bf16, a sparse file) with disk offload on the CPU: the peak anonymous RSS of a
  forward, measured in a subprocess, stays within the largest layer + activations + 1 GB.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import enable_vram_management, layer_state_bytes
from engine.generation.settings import settings_for, vram_config_for
from engine.generation.types import GenerateRequest, HardwareInfo
from engine.management import runtime_of, vram_budget
from engine.runtime import ram

GiB = 1024**3
CPU_HOST = HardwareInfo(False, None, None, None, 24.0)


def test_auto_on_a_cpu_host():
    disk = settings_for(GenerateRequest("x", disk_offload=True), CPU_HOST, "cpu")
    assert disk.vram_limit == 0.0
    ram_masters = settings_for(GenerateRequest("x"), CPU_HOST, "cpu")
    assert ram_masters.vram_limit is None and ram_masters.describe_limit() == "Auto (RAM available)"
    assert settings_for(GenerateRequest("x", disk_offload=True, vram_limit=3), CPU_HOST, "cpu").vram_limit == 3


def _model(layers: int = 6, width: int = 1024) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(torch.bfloat16).eval()


def test_unlimited_on_the_cpu_is_bounded_by_the_ram_room(monkeypatch):
    layer = 1024 * 1024 * 2  # one bf16 layer
    # room = available - margin - activations: three layers' worth
    monkeypatch.setenv("LOWVRAM_RAM_AVAILABLE_GB", str((ram.RAM_MARGIN_BYTES + 3.5 * layer) / GiB))
    model = enable_vram_management(_model(), vram_config=vram_config_for(True, False, "cpu"), vram_limit=None)
    pool = vram_budget(model)
    assert pool.limit_gb is None and 0 < pool.effective_limit_bytes() < 4 * layer
    x = torch.randn(2, 1024, dtype=torch.bfloat16)
    model(x)
    states = layer_state_bytes(model)
    assert 0 < pool.resident_bytes <= 3.5 * layer, states  # some dequantized copies, not all six
    # plenty of RAM: every layer resident
    monkeypatch.setenv("LOWVRAM_RAM_AVAILABLE_GB", "64")
    pool.replan()
    model(x)
    assert pool.resident_bytes == 6 * layer


def test_bf16_masters_on_the_cpu_are_their_own_resident_copies(monkeypatch):
    monkeypatch.setenv("LOWVRAM_RAM_AVAILABLE_GB", "1.01")  # barely above the margin
    model = enable_vram_management(_model(), vram_config=vram_config_for(False, False, "cpu"), vram_limit=None)
    assert runtime_of(model).resident_is_master()
    model(torch.randn(2, 1024, dtype=torch.bfloat16))
    assert vram_budget(model).resident_bytes == 6 * 1024 * 1024 * 2  # costs no RAM: all resident


CHILD = textwrap.dedent(
    """
    import json, sys, threading, time, torch
    from transformers import Qwen3Model
    from engine.generation.settings import vram_config_for, settings_for
    from engine.generation.types import GenerateRequest, HardwareInfo
    from engine.loading.loader import load_model

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    peak = {"v": 0}
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak["v"] = max(peak["v"], anon()); time.sleep(0.02)
    folder, auto = sys.argv[1], sys.argv[2] == "auto"
    limit = settings_for(GenerateRequest("x", disk_offload=True), HardwareInfo(False, None, None, None, 24.0), "cpu").vram_limit if auto else None
    model = load_model(Qwen3Model, folder, vram_config=vram_config_for(False, True, "cpu"), vram_limit=limit)
    base = anon()
    t = threading.Thread(target=sample, daemon=True); t.start()
    with torch.no_grad():
        for _ in range(2):
            out = model(input_ids=torch.arange(64).view(1, 64)).last_hidden_state
    stop.set(); t.join()
    print(json.dumps({"base": base, "peak": max(peak["v"], anon()), "limit": limit, "shape": list(out.shape)}))
    """
)


@pytest.fixture(scope="module")
def real_width_model(tmp_path_factory) -> Path:
    from model_registry.sizes import load_component_configs
    from tools import replica

    config = dict(load_component_configs()["qwen3-4b"], num_hidden_layers=8, architectures=["Qwen3Model"])
    model = replica.meta_model("transformers", "Qwen3Model", config)
    specs = replica.checkpoint_specs(model, "transformers", "BF16")
    folder = tmp_path_factory.mktemp("qwen3_real_width")
    replica.write_component(folder, specs, 2, "transformers", config)
    return folder


@pytest.mark.parametrize("limit", ["auto", "none"])
def test_disk_offload_keeps_anonymous_ram_within_the_largest_layer(real_width_model, limit):
    """Auto (limit 0) and, through the RAM room, even vram_limit=None: the 2.4 GB model never becomes
    resident; a forward adds at most its largest layer (the 0.78 GB embedding) + activations + 1 GB,
    and with Auto well under the model's size."""
    env = {"LOWVRAM_RAM_AVAILABLE_GB": "1.6"} if limit == "none" else {}
    import os

    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(real_width_model), limit],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1], env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    largest = 151936 * 2560 * 2
    grew = r["peak"] - r["base"]
    assert grew <= largest + 0.3 * GiB + 1 * GiB, r
    assert r["peak"] < 2.0 * GiB, r  # the whole model is 2.4 GB in bf16


def test_the_studio_refuses_a_load_that_would_exhaust_ram(tmp_path, monkeypatch):
    """A real-size Z-Image-Turbo replica (19 GiB of bf16 weights) on a host with 12 GiB available:
    the estimate says it does not fit and which setting does, and generate refuses before loading."""
    from engine.generation.studio import Studio
    from engine.generation.types import UserFacingError
    from tools import replica

    monkeypatch.setenv("LOWVRAM_RAM_AVAILABLE_GB", "12")
    replica.write_replica("z-image-turbo", tmp_path / "models")
    studio = Studio(tmp_path / "models", tmp_path / "out", device="cpu")
    studio._hardware = CPU_HOST
    request = GenerateRequest("a cat", model="z-image-turbo", width=256, height=256, steps=1, seed=1)
    est = studio.estimate(request)
    assert not est.fits and 19 < est.ram_gb < 21
    assert any("Use FP8 or disk offload" in w for w in est.warnings), est.warnings
    assert studio.estimate(dataclasses.replace(request, weights="fp8")).fits  # 9.6 GiB of FP8 masters
    with pytest.raises(UserFacingError, match="Not loading: .*Use FP8 or disk offload"):
        list(studio.generate(request))
    assert studio.builds == 0 and studio.pipeline is None
