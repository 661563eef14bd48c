"""The storage choice end to end in the app's layers: `weights` -> settings -> vram_config, the
estimate, the live panel, the PNG infotext, the API parameter; a generation in nf4 and int8."""

from __future__ import annotations

import pytest
import torch

from engine.config import VramConfig
from engine.generation.settings import WEIGHTS, resolve_storage, settings_for, vram_config_for
from engine.generation.studio import Studio, parse_infotext
from engine.generation.types import GenerateRequest, GenerationResult, TelemetrySnapshot, UserFacingError
from ui import formatting
from ui.handlers import quantize_to_weights


def test_weights_choices_resolve_and_fp8_stays():
    assert WEIGHTS == ("auto", "bf16", "fp8", "int8", "nf4")
    assert resolve_storage("auto", fp8=False) == "bf16" and resolve_storage(None, fp8=True) == "fp8"
    assert resolve_storage("nf4", fp8=True) == "nf4"  # an explicit choice wins over the toggle
    assert resolve_storage("int8", fp8=False, gguf=True) == "gguf"
    with pytest.raises(UserFacingError, match="auto, bf16, fp8, int8, nf4"):
        resolve_storage("int4", fp8=False)
    for name in ("int8", "nf4"):
        cfg = VramConfig.from_dict(vram_config_for(False, False, "cpu", name))
        # on a CPU a resident copy is RAM too: it takes the computation form (dequantized once)
        assert cfg.offload_dtype == cfg.onload_dtype == name and cfg.preparing_dtype == torch.bfloat16
        gpu = vram_config_for(False, False, "cuda", name)  # (a dict: this host has no CUDA to validate it)
        assert gpu["offload_dtype"] == gpu["onload_dtype"] == gpu["preparing_dtype"] == name
        assert cfg.computation_dtype == torch.bfloat16
        disk = VramConfig.from_dict(vram_config_for(False, True, "cpu", name))
        assert disk.uses_disk and disk.preparing_dtype == torch.bfloat16  # a CPU: the computation form
    assert vram_config_for(True, False, "cpu")["offload_dtype"] == torch.float8_e4m3fn  # unchanged
    s = settings_for(GenerateRequest("x", weights="nf4", vram_limit=1), device="cpu")
    assert s.storage_name == "nf4" and s.build_key != settings_for(GenerateRequest("x", vram_limit=1), device="cpu").build_key
    assert quantize_to_weights("off") == "auto" and quantize_to_weights("int8") == "int8"


def test_estimate_names_the_storage_and_shrinks_with_it(tmp_path):
    studio = Studio(tmp_path / "m", tmp_path / "o", device="cpu")
    # limit 0: on a CPU the limit bounds the bf16 copies kept resident in RAM beside quantized
    # masters (engine.runtime.ram); with none kept, RAM is the stored form's own bytes
    ests = {w: studio.estimate(GenerateRequest("x", model="qwen-image", vram_limit=0, weights=w)) for w in ("bf16", "fp8", "int8", "nf4")}
    assert ests["nf4"].ram_gb < ests["int8"].ram_gb < ests["bf16"].ram_gb
    assert ests["nf4"].ram_gb < 0.35 * ests["bf16"].ram_gb + 1
    assert ests["nf4"].storage.startswith("nf4") and ests["int8"].storage.startswith("int8")
    assert "Weights stored as nf4" in formatting.estimate_markdown(ests["nf4"])


def test_live_panel_names_the_storage():
    snap = TelemetrySnapshot(None, None, 1.0, 2.0, storage="nf4")
    assert '<span data-k="storage">nf4</span>' in formatting.live_panel_html(snap, None, "")
    assert '<span data-k="storage">–</span>' in formatting.live_panel_html(None, None, "")


@pytest.mark.parametrize("weights", ["int8", "nf4"])
def test_demo_generates_in_int8_and_nf4_and_the_png_says_so(tmp_path, weights):
    studio = Studio(tmp_path / "models", tmp_path / "outputs", device="cpu")
    result, snapshots = None, []
    for item in studio.generate(GenerateRequest("a fox", seed=3, vram_limit=0, weights=weights)):
        if isinstance(item, GenerationResult):
            result = item
        elif item.telemetry is not None:
            snapshots.append(item.telemetry)
    assert result is not None
    fields = parse_infotext(result.parameters)
    assert fields["Weights"] == weights and fields["FP8"] == "off"
    assert result.settings["weights"] == weights
    assert snapshots[-1].storage == weights
    pipe = studio.pipeline
    assert pipe is not None


def test_fp8_ticked_with_int8_chosen_reuses_the_live_pipeline_and_the_png_says_int8(tmp_path):
    """The FP8 switch and the weights choice are one storage decision, folded at the UI's boundary
    (ui.inputs): "auto" with FP8 is "fp8", an explicit form wins. Ticking FP8 while int8 is chosen
    changes nothing below the UI: the live pipeline is reused (it used to be rebuilt from disk, the
    FP8 switch being part of the build key) and the PNG says int8 throughout (it used to say
    "FP8: on, Weights: int8")."""
    import numpy as np

    from ui import inputs

    def request(fp8: bool, weights: str) -> GenerateRequest:
        return GenerateRequest(**inputs.request_fields("a fox", "", None, None, None, 2, None, 3, 0, fp8, False, "", weights))

    assert request(True, "auto").weights == "fp8" and request(False, "auto").weights == "auto"
    assert request(True, "int8").weights == request(False, "int8").weights == "int8"

    def run(fp8: bool) -> GenerationResult:
        return [i for i in studio.generate(request(fp8, "int8")) if isinstance(i, GenerationResult)][0]

    studio = Studio(tmp_path / "models", tmp_path / "outputs", device="cpu")
    first = run(False)
    builds, pipe = studio.builds, studio.pipeline
    second = run(True)
    assert studio.builds == builds and studio.pipeline is pipe
    for result in (first, second):
        fields = parse_infotext(result.parameters)
        assert fields["Weights"] == "int8" and fields["FP8"] == "off", result.parameters
        assert result.settings["weights"] == "int8" and result.settings["fp8"] is False
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
