"""The UI's pieces without a browser: formatting, the run tracker, handlers over a fake Studio, the layout."""

from __future__ import annotations

import asyncio

import threading
import time
from types import SimpleNamespace

import gradio as gr
import pytest

from engine.generation.types import GenerationEvent, MemoryEstimate, ModelChoice, TelemetrySnapshot
from tests.browser.fake_studio import FakeStudio
from ui import build_demo, formatting
from ui.handlers import Handlers, history_frame
from ui.runs import RunTracker


pytestmark = pytest.mark.filterwarnings("ignore:Generation cancelled")


class NoProgress:
    def __call__(self, *args, **kwargs):
        pass


@pytest.fixture
def handlers(tmp_path):
    return Handlers(FakeStudio(tmp_path / "m", tmp_path / "o", step_seconds=0.01))


def req(session="tab-1"):
    return SimpleNamespace(session_hash=session)


# ---------------------------------------------------------------- formatting
def test_model_label_says_size_and_whether_downloaded():
    big = ModelChoice(id="x", name="X", size_gb=20.5, downloaded=False)
    assert formatting.model_label(big) == "X · 20.5 GB · not downloaded: downloads on first use"
    assert "downloaded" in formatting.model_label(ModelChoice(id="y", name="Y", size_gb=6.9, downloaded=True))
    assert "1.5 MB · built in" in formatting.model_label(ModelChoice(id="d", name="D", size_gb=0.0015, downloaded=True, is_demo=True))


def test_estimate_markdown_lists_needs_and_warnings():
    est = MemoryEstimate(vram_gb=7.5, ram_gb=30.2, disk_gb=41.0, streamed_gb_per_step=3.25, fits=False,
                         warnings=("Needs 30 GB of RAM.",), smallest_feasible_vram_limit_gb=1.2)
    text = formatting.estimate_markdown(est)
    for piece in ("Does not fit", "7.50 GB", "30.20 GB", "41.00 GB", "3.25 GB", "Needs 30 GB of RAM.", "1.20 GB"):
        assert piece in text


def test_live_panel_shows_memory_phase_step_speed_and_layer_states():
    snap = TelemetrySnapshot(vram_used_gb=3.0, vram_total_gb=8.0, ram_used_gb=10.0, ram_total_gb=32.0,
                             layer_states={"transformer": {"offload": 40, "onload": 0, "preparing": 17, "computation": 1}})
    ev = GenerationEvent(phase="denoising", step=3, total_steps=20, seconds_per_step=1.5)
    html = formatting.live_panel_html(snap, ev, "this tab")
    for piece in ("Denoising (this tab)", "3/20", "1.50 s", "3.00 GB / 8.00 GB", "10.00 GB / 32.00 GB",
                  'data-k="layers:transformer:preparing">17<'):
        assert piece in html, piece
    idle = formatting.live_panel_html(None, None, "")
    assert "Idle" in idle and "No model loaded yet" in idle


def test_history_frame_is_typed_for_the_chart():
    frame = history_frame([(0.0, None, 1.0), (0.5, 2.0, 1.5)])
    assert list(frame["memory"]) == ["RAM used", "VRAM used", "RAM used"]
    assert str(frame["seconds"].dtype) == "float64" and str(frame["GB"].dtype) == "float64"
    assert str(history_frame([])["GB"].dtype) == "float64"


# ---------------------------------------------------------------- tracker
def test_tracker_cancel_is_per_tab_and_fresh_after_arm():
    t = RunTracker()
    first = t.arm("a")
    assert not t.cancel("b")
    assert t.cancel("a") and first.is_set()
    assert not t.cancel("a")  # already asked
    second = t.arm("a")
    assert not second.is_set() and t.cancel_event("a") is second


def test_tracker_history_is_rate_limited_and_kept_after_the_run():
    t = RunTracker()
    run = t.start("a")
    snap = TelemetrySnapshot(vram_used_gb=None, vram_total_gb=None, ram_used_gb=1.0, ram_total_gb=2.0)
    for _ in range(5):
        t.sample(snap)
    assert len(t.view()[4]) == 1
    t.update(run, GenerationEvent(phase="denoising", step=1, total_steps=2, seconds_per_step=0.5))
    t.finish(run, GenerationEvent(phase="done", step=2, total_steps=2))
    run_id, owner, event, finished, samples = t.view()
    assert (run_id, owner, finished, len(samples)) == (run, "a", True, 1)
    assert event.seconds_per_step == 0.5  # the last known speed stays on the panel


# ---------------------------------------------------------------- handlers
def test_api_generate_returns_png_path_and_parameters(handlers):
    path, params = asyncio.run(handlers.generate("a cat", steps=2, seed=7, request=req("api"), progress=NoProgress()))
    assert path.endswith(".png") and "Seed: 7" in params


def test_bad_input_becomes_a_gradio_error_not_a_traceback(handlers):
    with pytest.raises(gr.Error) as exc:
        asyncio.run(handlers.generate("a cat", width=100, request=req(), progress=NoProgress()))
    assert "Width 100" in exc.value.message
    with pytest.raises(gr.Error) as exc:
        asyncio.run(handlers.generate("boom", request=req(), progress=NoProgress()))
    assert "RuntimeError: boom" in exc.value.message and "Traceback" not in exc.value.message
    # the next run works
    path, _ = asyncio.run(handlers.generate("a cat", steps=1, request=req(), progress=NoProgress()))
    assert path.endswith(".png")


def test_run_ui_adds_to_the_gallery_newest_first(handlers):
    r = req()
    handlers.arm(r)
    out = asyncio.run(handlers.run_ui("one", "", "demo", 64, 64, 1, 4.0, 5, True, 0, False, False, [], r, NoProgress()))
    gallery, params, png, results, seed = out
    assert seed == 5 and png.endswith(".png") and "one" in params and len(results) == 1
    handlers.arm(r)
    out = asyncio.run(handlers.run_ui("two", "", "demo", 64, 64, 1, 4.0, 6, True, 0, False, False, results, r, NoProgress()))
    assert [e["seed"] for e in out[3]] == [6, 5]


def test_cancel_stops_the_run_and_the_next_one_works(handlers):
    handlers.studio.step_seconds = 0.05
    r = req("tab-x")
    handlers.arm(r)
    box = {}

    def run():
        box["out"] = asyncio.run(handlers.run_ui("long", "", "demo", 64, 64, 100, 4.0, -1, True, 0, False, False, [], r, NoProgress()))

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 10
    while (handlers.tracker.view()[2] is None or handlers.tracker.view()[2].step < 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    handlers.cancel(r)
    th.join(10)
    assert not th.is_alive()
    assert all(isinstance(x, type(gr.skip())) for x in box["out"])
    assert handlers.tracker.view()[2].phase == "cancelled"
    handlers.arm(r)
    out = asyncio.run(handlers.run_ui("short", "", "demo", 64, 64, 1, 4.0, -1, True, 0, False, False, [], r, NoProgress()))
    assert out[2].endswith(".png")


def test_cancel_while_waiting_in_the_queue_skips_the_run(handlers):
    r = req("tab-q")
    handlers.arm(r)
    handlers.cancel(r)  # clicked while another tab's run was going
    out = asyncio.run(handlers.run_ui("x", "", "demo", 64, 64, 1, 4.0, -1, True, 0, False, False, [], r, NoProgress()))
    assert all(isinstance(x, type(gr.skip())) for x in out)


def test_vram_limit_is_auto_on_a_cpu_host(handlers):
    assert handlers.vram_limit_value(False, 3.0) is None
    handlers.hardware = handlers.hardware.__class__(True, "GPU", 8.0, 7.0, 32.0)
    assert handlers.vram_limit_value(False, 3.0) == 3.0
    assert handlers.vram_limit_value(True, 3.0) is None


def test_estimate_shows_the_message_of_invalid_settings(handlers):
    assert "Fits" in handlers.estimate("demo", 64, 64, 2, 4.0, True, 0, False, False)
    assert "Width 100" in handlers.estimate("demo", 100, 64, 2, 4.0, True, 0, False, False)
    assert "Does not fit" in handlers.estimate("big", None, None, None, None, True, 0, False, False)


def test_model_change_fills_defaults_only_when_the_model_changes(handlers):
    out = handlers.on_model_change("big", "demo")
    assert out[0]["value"] == 1024 and out[2]["value"] == 30 and out[4] == "big"
    assert all(isinstance(x, type(gr.skip())) for x in handlers.on_model_change("big", "big"))


def test_tick_sends_the_chart_only_when_it_has_new_samples(handlers):
    panel, plot, key = handlers.tick(None, None, 0, req())[:3]
    assert "Idle" in panel and isinstance(plot, type(gr.skip())) and key is None
    run = handlers.tracker.start("tab-1")
    handlers.tracker.update(run, GenerationEvent(phase="denoising", step=1, total_steps=4, telemetry=handlers.studio.telemetry()))
    panel, plot, key = handlers.tick(None, None, 0, req("tab-1"))[:3]
    assert "Denoising (this tab)" in panel and len(plot) >= 1 and key[0] == run
    panel, plot2, key2 = handlers.tick(key, None, 0, req("tab-2"))[:3]
    assert "another tab" in panel and isinstance(plot2, type(gr.skip())) and key2 == key


def test_tick_refreshes_the_model_list_after_a_download(handlers):
    *_, models, version = handlers.tick(None, "demo", handlers.models_version, req())
    assert isinstance(models, type(gr.skip())) and version == handlers.models_version
    handlers.models_version += 1  # a run in some tab downloaded a model
    *_, models, version = handlers.tick(None, "demo", version, req())
    assert models["choices"] and models["value"] == "demo" and version == handlers.models_version


# ---------------------------------------------------------------- layout
def test_layout_has_the_named_api_endpoint_and_labelled_controls(tmp_path):
    demo = build_demo(FakeStudio(tmp_path / "m", tmp_path / "o"))
    info = demo.get_api_info()
    endpoint = info["named_endpoints"]["/generate"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == [
        "prompt", "negative_prompt", "model", "width", "height", "steps",
        "guidance", "seed", "vram_limit", "fp8", "disk_offload", "loras", "weights", "image", "strength", "compile",
    ]
    # the page's internal events stay private
    assert sorted(info["named_endpoints"]) == ["/free_disk_space", "/generate", "/generate_stream", "/suggest"]
    stream = info["named_endpoints"]["/generate_stream"]
    assert [p["parameter_name"] for p in stream["parameters"]] == [p["parameter_name"] for p in endpoint["parameters"]]
    suggest = info["named_endpoints"]["/suggest"]
    assert [p["parameter_name"] for p in suggest["parameters"]] == ["model", "width", "height", "steps", "guidance"]
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    for label in ("Model", "Prompt", "Negative prompt", "Width", "Height", "Steps", "Guidance", "Seed",
                  "VRAM limit (GB)", "Auto", "FP8", "Quantize", "Disk offload", "Results", "Parameters", "Preview", "Live preview",
                  "Input image(s)", "Strength", "Compile"):
        assert label in labels, label
    timers = [b for b in demo.blocks.values() if isinstance(b, gr.Timer)]
    assert timers and timers[0].value <= 0.5
    gpu_fns = [f for f in demo.fns.values() if f.concurrency_id == "gpu"]
    # the page, /generate, /generate_stream, and the System check (it measures the GPU too)
    assert len(gpu_fns) == 4 and all(f.concurrency_limit == 1 for f in gpu_fns)
    tick = [f for f in demo.fns.values() if f.concurrency_id == "telemetry"]
    assert tick and tick[0].concurrency_limit is None


class RecordingProgress:
    def __init__(self):
        self.calls = []

    def __call__(self, progress, desc=None, total=None, unit="steps"):
        self.calls.append((progress, desc, unit))


def test_progress_bar_follows_downloads_and_steps(handlers, monkeypatch):
    from engine.generation.types import GenerationResult

    events = [
        GenerationEvent(phase="downloading", download_fraction=0.0),
        GenerationEvent(phase="downloading", download_fraction=0.5),
        GenerationEvent(phase="loading", message="Loading X"),
        GenerationEvent(phase="denoising", step=1, total_steps=2),
        GenerationEvent(phase="denoising", step=2, total_steps=2),
        GenerationEvent(phase="done", step=2, total_steps=2),
        GenerationResult(image=None, path=handlers.studio.outputs_dir / "x.png", parameters="p", settings={"seed": 1}),
    ]
    monkeypatch.setattr(handlers.studio, "generate", lambda request, cancel=None: iter(events))
    progress = RecordingProgress()
    path, params = asyncio.run(handlers.generate("x", request=req(), progress=progress))
    assert path.endswith("x.png") and params == "p"
    assert (0.5, "Downloading the model", "steps") in progress.calls
    assert ((1, 2), "Denoising", "steps") in progress.calls and ((2, 2), "Denoising", "steps") in progress.calls
    assert (None, "Loading X", "steps") in progress.calls


# ---------------------------------------------------------------- LoRA picker
def test_lora_slots_make_the_spec_and_the_request_takes_it(handlers):
    assert Handlers.lora_spec("ink", 0.8, None, 1.0, "hf:owner/repo", 0.5) == "ink:0.8, hf:owner/repo:0.5"
    assert Handlers.lora_spec(None, 1.0, None, 1.0) == ""
    r = handlers.build_request("a cat", "", "demo", 64, 64, 2, 4.0, 1, None, False, False, "ink:0.8, grain")
    assert r.loras == (("ink", 0.8), ("grain", 1.0))
    with pytest.raises(Exception, match="strength"):
        handlers.build_request("a cat", "", "demo", 64, 64, 2, 4.0, 1, None, False, False, "ink:9")
    assert handlers.lora_choices("demo") == []  # a Studio without LoRAs: the picker stays empty, the page works


def test_estimate_and_live_panel_show_lora_bytes():
    est = MemoryEstimate(vram_gb=1.0, ram_gb=2.0, disk_gb=3.0, streamed_gb_per_step=0.0, fits=True, lora_bytes=3 * 2**20)
    assert "LoRAs: 3.0 MiB" in formatting.estimate_markdown(est)
    snap = TelemetrySnapshot(vram_used_gb=None, vram_total_gb=None, ram_used_gb=1.0, ram_total_gb=2.0, lora_bytes=2**20)
    assert 'data-k="lora">1.0 MiB' in formatting.live_panel_html(snap, None, "")


def test_layout_has_the_lora_picker(tmp_path):
    demo = build_demo(FakeStudio(tmp_path / "m", tmp_path / "o"))
    labels = [getattr(b, "label", None) for b in demo.blocks.values()]
    assert "LoRA 1" in labels and "LoRAs" in labels and "Strength" in labels


def test_the_page_estimate_counts_the_input_images(handlers, monkeypatch, tmp_path):
    """The estimate box hands the page's input images to the Studio's estimate (which counts their
    encodes and reference latents as activations: tests/test_studio_images.py)."""
    from PIL import Image

    from ui import inputs

    monkeypatch.setattr(inputs, "upload_folder", lambda: tmp_path.resolve())  # the gallery's files are Gradio uploads
    path = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "white").save(path)
    seen = []
    real = handlers.studio.estimate
    monkeypatch.setattr(handlers.studio, "estimate", lambda request, *a, **k: (seen.append(request), real(request, *a, **k))[1])
    handlers.estimate("demo", 64, 64, 2, 0.0, True, 0, False, False, images=[(str(path), None)])
    handlers.estimate("demo", 64, 64, 2, 0.0, True, 0, False, False)
    assert len(seen[0].images) == 1 and seen[1].images == ()


def test_a_model_that_takes_no_image_sets_the_input_aside_and_gives_it_back(handlers):
    """"big" (FakeStudio) takes no input image: the input and its button are hidden, the images
    in it are set aside (the note counts them), and a model that takes images gets them back."""
    strength, note, gallery, button, aside = handlers.on_model_images("big", [("/up/a.png", None), ("/up/b.png", None)], None)
    assert gallery["visible"] is False and gallery["value"] == [] and button["visible"] is False and not strength["visible"]
    assert aside == ["/up/a.png", "/up/b.png"]
    assert "takes no input image" in note and "<b>2</b> input images are set aside" in note
    # another model that takes none: still aside (the hidden input is empty)
    _, note, gallery, _, aside = handlers.on_model_images("big", [], aside)
    assert aside == ["/up/a.png", "/up/b.png"] and "value" not in gallery and "<b>2</b>" in note
    strength, note, gallery, button, aside = handlers.on_model_images("demo", [], aside)
    assert gallery["visible"] is True and gallery["value"] == ["/up/a.png", "/up/b.png"] and button["visible"] is True
    assert aside is None and strength["visible"] and "Image-to-image" in note
    # nothing aside, or images already in the input: the input is left as it is
    _, _, gallery, _, _ = handlers.on_model_images("demo", [("/up/c.png", None)], ["/up/a.png"])
    assert "value" not in gallery and gallery["visible"] is True
    _, note, gallery, _, aside = handlers.on_model_images("big", [], None)
    assert aside is None and "value" not in gallery and "set aside" not in note
