"""The page's side of issue 15 without a browser: the CPU estimate's columns, the ETA beside the
step counter, the tracker's previews, "Fit to this machine" and /suggest (real Studio, estimates
only), and the streaming handler's previews (real Studio, demo model)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import gradio as gr
import pytest

from engine.generation.studio import Studio
from engine.generation.types import GenerationEvent, HardwareInfo, MemoryEstimate, SuggestedSettings
from ui import formatting
from ui.handlers import Handlers
from ui.runs import RunTracker

CPU = HardwareInfo(False, None, None, None, 32.0)
GPU = HardwareInfo(True, "RTX", 12.0, 10.5, 32.0)


class NoProgress:
    def __call__(self, *a, **k):
        pass


def test_the_estimate_says_what_its_columns_mean_without_a_gpu():
    est = MemoryEstimate(vram_gb=7.5, ram_gb=30.2, disk_gb=41.0, streamed_gb_per_step=0.0, fits=True, smallest_feasible_vram_limit_gb=1.0)
    cpu = formatting.estimate_markdown(est, CPU)
    assert "VRAM" not in cpu and "RAM (weights + computation, CPU)" in cpu and "30.20 GB" in cpu and "Streamed" not in cpu
    assert "Read per step" in formatting.estimate_markdown(MemoryEstimate(1, 2, 3, 4.5, True), CPU)
    gpu = formatting.estimate_markdown(est, GPU)
    assert "| VRAM | RAM | Disk | Streamed per step |" in gpu


def test_eta_beside_the_step_counter():
    ev = GenerationEvent(phase="denoising", step=3, total_steps=10, seconds_per_step=1.5, eta_seconds=75.4)
    html = formatting.live_panel_html(None, ev, "this tab")
    assert 'data-k="step">3/10<' in html and 'data-k="eta">1 min 15 s left<' in html
    assert formatting.eta_text(4.4) == "4 s left" and formatting.eta_text(None) == "–"
    assert 'data-k="eta">–<' in formatting.live_panel_html(None, GenerationEvent(phase="decoding"), "")


def test_the_tracker_keeps_the_latest_preview_apart_from_the_event():
    t = RunTracker()
    run = t.start("tab")
    assert t.preview() == (run, 0, None)
    t.update(run, GenerationEvent(phase="denoising", step=1, total_steps=2, preview="image-1"))
    t.update(run, GenerationEvent(phase="denoising", step=2, total_steps=2))
    assert t.preview() == (run, 1, "image-1")
    assert t.view()[2].preview is None


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    return Handlers(Studio(root / "models", root / "outputs"))


def test_fit_applies_the_suggestion_and_says_why(handlers):
    auto, slider, fp8, disk, line, resident, quantize = handlers.fit("demo", 256, 256, 4, 4.0)
    assert fp8["value"] is False and disk["value"] is False and resident is None and quantize["value"] == "off"
    assert line.startswith("**Applied:** bf16")
    if handlers.hardware.has_gpu:
        assert auto["value"] is True
    _, _, _, _, bad, _, _ = handlers.fit("demo", 100, 256, 4, 4.0)
    assert "Cannot run" in bad and "multiple of" in bad


def test_fit_on_a_gpu_sets_the_slider(handlers, monkeypatch):
    got = SuggestedSettings(True, True, False, 9.5, False, 1.0, "FP8 + VRAM limit 9.5 GB: ...")
    monkeypatch.setattr(handlers, "hardware", GPU)
    monkeypatch.setattr(handlers.studio, "suggest_settings", lambda request: got)
    auto, slider, fp8, disk, line, resident, quantize = handlers.fit("demo", 256, 256, 4, 4.0)
    assert auto["value"] is False and slider["value"] == 9.5 and slider["interactive"] is True and fp8["value"] is True
    assert resident is None and quantize["value"] == "off"


@pytest.mark.parametrize("weights", ["int8", "nf4"])
def test_fit_applies_a_quantized_form_to_the_quantize_dropdown(handlers, monkeypatch, weights):
    got = SuggestedSettings(True, False, False, 6.5, False, 2.5, f"{weights} + VRAM limit 6.5 GB: ...", weights=weights)
    monkeypatch.setattr(handlers, "hardware", GPU)
    monkeypatch.setattr(handlers.studio, "suggest_settings", lambda request: got)
    auto, slider, fp8, disk, line, resident, quantize = handlers.fit("demo", 256, 256, 4, 4.0)
    assert quantize["value"] == weights and fp8["value"] is False and disk["value"] is False and slider["value"] == 6.5
    # what the page then runs and estimates with: that storage form
    from ui.handlers import quantize_to_weights

    assert quantize_to_weights(quantize["value"]) == weights


def test_fit_on_a_gguf_entry_leaves_its_blocks(handlers, monkeypatch):
    got = SuggestedSettings(True, False, True, 6.5, False, 2.5, "GGUF + disk offload + VRAM limit 6.5 GB: ...", weights="gguf")
    monkeypatch.setattr(handlers, "hardware", GPU)
    monkeypatch.setattr(handlers.studio, "suggest_settings", lambda request: got)
    _, _, fp8, disk, _, _, quantize = handlers.fit("demo", 256, 256, 4, 4.0)
    assert quantize["value"] == "off" and fp8["value"] is False and disk["value"] is True


def test_fit_on_a_cpu_host_bounds_what_disk_offload_keeps_in_ram(handlers, monkeypatch):
    got = SuggestedSettings(True, False, True, 23.0, False, 900.0, "bf16 + disk offload + resident limit 23 GB: ...")
    monkeypatch.setattr(handlers, "hardware", CPU)
    monkeypatch.setattr(handlers.studio, "suggest_settings", lambda request: got)
    auto, slider, fp8, disk, line, resident, quantize = handlers.fit("demo", 256, 256, 4, 4.0)
    assert disk["value"] is True and resident == 23.0 and auto is not None and quantize["value"] == "off"
    # the page's runs and estimates use it while disk offload is ticked, never the (disabled) slider
    assert handlers.vram_limit_value(True, 0, resident, True) == 23.0
    assert handlers.vram_limit_value(True, 0, resident, False) is None
    assert handlers.vram_limit_value(False, 5, None, True) is None
    text = handlers.estimate("demo", 256, 256, 4, 4.0, True, 0, False, True, resident_limit=resident)
    assert "at most 23 GB resident in RAM" in text and "VRAM" not in text


def test_suggest_endpoint_answers_plain_json(handlers):
    got = handlers.suggest("qwen-image", 1024, 1024, None, None)
    assert got["fits"] in (True, False) and got["reason"] and "estimate" in got
    assert got["weights"] in ("bf16", "fp8", "int8", "nf4") and got["fp8"] == (got["weights"] == "fp8")
    with pytest.raises(gr.Error):
        handlers.suggest("qwen-image", 1000, 1024)


def test_the_streaming_handler_yields_previews_then_the_png(handlers, monkeypatch):
    # the demo's steps take milliseconds, less than the previewer's interval: preview every step
    # here (what is under test is that the stream carries them; the pacing has its own tests)
    import engine.generation.preview as preview

    monkeypatch.setattr(preview, "PREVIEW_INTERVAL_S", 0.0)

    async def collect():
        out = []
        async for item in handlers.generate_stream("a cat", model="demo", width=128, height=128, steps=4, seed=2,
                                                   request=SimpleNamespace(session_hash="api"), progress=NoProgress()):
            out.append(item)
        return out

    out = asyncio.run(collect())
    path, parameters = out[-1]
    assert path.endswith(".png") and "Steps: 4" in parameters
    statuses = [s for _, s in out[:-1] if isinstance(s, str)]
    assert statuses and statuses[-1].startswith("step 4/4")
    assert any(hasattr(image, "size") for image, _ in out[:-1])  # at least one PIL preview
