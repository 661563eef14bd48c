"""Adding a family is one spec file plus its JSON (issue #28).

A family the product does not ship (diffusers' Lumina2Pipeline, tests/fixtures/new_family.py) is
written as `lumina2_test.py` + `lumina2_test.json` into a directory of its own, which joins the
families package through $LOWVRAM_FAMILY_PATH; nothing else names it. In a fresh process the
product lists its model, lays it out for download, stages its components as the spec declares
(and refuses a component the spec does not declare), applies LoRAs through its diffusers loader,
tags its LoRA files by its signature, and checks its GGUF architecture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import new_family as nf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def added(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("new_family")
    families = folder / "families"
    families.mkdir()
    (families / f"{nf.MODULE}.py").write_text(nf.SPEC)
    (families / f"{nf.MODULE}.json").write_text(json.dumps(nf.CATALOGUE))
    env = {**os.environ, "LOWVRAM_FAMILY_PATH": str(families), "LOWVRAM_CPU_CONV_DTYPE": "bfloat16"}
    run = subprocess.run([sys.executable, "-m", "tests.fixtures.new_family", str(folder)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1]) | {"folder": str(families)}


def test_it_is_listed(added):
    assert Path(added["family_file"]).parent == Path(added["folder"])
    assert nf.MODEL_ID in added["models"] and added["models"][0] == "demo"  # after models.json's, the demo first
    assert added["entry_family"] == nf.FAMILY
    assert nf.MODEL_ID in added["choices"]
    assert added["config"] == nf.TRANSFORMER  # its JSON's component configs join component_configs.json's


def test_it_is_laid_out_for_download(added):
    assert added["allow_patterns"] == [
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
        "text_encoder/*.json", "text_encoder/*.safetensors", "transformer/*.json", "transformer/*.safetensors",
        "vae/*.json", "vae/*.safetensors",
    ]
    assert added["repo_problems"] == []
    assert any("transformer" in p for p in added["broken_problems"])


def test_its_components_run_in_the_stages_it_declares(added):
    assert added["stages"] == {"encode": ["text_encoder"], "denoise": ["transformer"], "decode": ["vae"]}
    assert added["active_while_denoising"] and all(a == ["transformer"] for a in added["active_while_denoising"])
    error = added["undeclared_error"]
    assert error is not None and "'controlnet'" in error and "declares no stage" in error and "stages" in error


def test_its_loras_map_through_its_own_loader(added):
    assert added["lora_loader"] == "Lumina2LoraLoaderMixin"
    assert added["lora_family"] == nf.FAMILY  # rank 45 wins over Z-Image's `feed_forward` (50)
    assert added["layer_map"]["blocks"] == ["noise_refiner", "context_refiner", "layers"] == added["blocks"]
    assert added["layer_map"]["layers"]["torch.nn.Linear"] == "linear"
    lora = added["lora"]
    assert lora["components"] == ["transformer"] and lora["layers"] == 3
    assert lora["fixed_grew_by"] == lora["nbytes"] > 0  # the component reports its factors; the pool counts them
    assert added["lora_changes_image"] and added["removed_gives_base"]
    assert added["plain_lora"] == {"components": ["transformer"], "layers": 3, "fixed": True}


def test_its_gguf_architecture_is_checked(added):
    assert added["gguf"]["lumina2"] is None
    assert "FluxTransformer2DModel" in added["gguf"]["flux"] and "Lumina2Transformer2DModel" in added["gguf"]["flux"]


def test_nothing_else_names_the_family():
    """The family exists only in its two files: no product or test file besides the fixture names it."""
    hits = []
    for path in list((ROOT / "engine").rglob("*.py")) + list((ROOT / "model_registry").rglob("*")) + list((ROOT / "ui").rglob("*.py")):
        if path.is_file() and path.suffix in (".py", ".json") and nf.FAMILY in path.read_text(errors="ignore"):
            hits.append(str(path.relative_to(ROOT)))
    assert hits == []
