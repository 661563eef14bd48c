"""The studio's `compile` switch on a tiny Flux: the "compiling" phase, "Compile: on" in the PNG,
the same image as eager, and the eager fallback when compile cannot run (never a crash)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import engine.compilation
from engine.generation.studio import Studio, parse_infotext
from engine.generation.types import GenerateRequest
from tests.test_studio import TinyRegistry, collect

MODEL = "tiny-flux1"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile-studio")
    registry = TinyRegistry(tmp_path_factory.mktemp("tiny-models"), families=("flux1",))
    studio = Studio(root / "models", root / "outputs", registry=registry)
    # Dynamo + AOTAutograd: the graph capture inductor gets, in seconds (inductor: test_compile.py)
    studio._runner.compile_switch.backend = "aot_eager"
    return studio


@pytest.fixture(autouse=True)
def app_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def request(**kw) -> GenerateRequest:
    return GenerateRequest("a red fox", model=MODEL, seed=3, **kw)


def test_compile_runs_a_compiling_phase_and_says_so_in_the_png(studio):
    _, eager = collect(studio, request())
    events, result = collect(studio, request(compile=True))
    phases = [e.phase for e in events]
    assert "compiling" in phases
    first = phases.index("compiling")
    assert phases[first - 1] == "denoising" and events[first - 1].step == 0  # the denoise stage began
    compiled = [e for e in events if e.phase == "compiling" and e.message.startswith("Compiled in ")]
    assert len(compiled) == 1 and compiled[0].step == 1
    assert result.settings["compile"] == "on" and result.settings["compile_seconds"] > 0
    with Image.open(result.path) as png:
        assert parse_infotext(png.text["parameters"])["Compile"] == "on"
    assert np.array_equal(np.asarray(result.image), np.asarray(eager.image))  # aot_eager: the eager kernels
    # the same size again: compiled already, no compiling phase; eager again: no "Compile" field
    events, again = collect(studio, request(compile=True))
    assert "compiling" not in [e.phase for e in events] and again.settings["compile"] == "on"
    assert np.array_equal(np.asarray(again.image), np.asarray(eager.image))
    _, off = collect(studio, request())
    assert "Compile" not in parse_infotext(off.parameters) and off.settings["compile"] == "off"


def test_when_torch_compile_cannot_run_the_run_goes_on_eagerly_and_says_why(studio, monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this platform\nsecond line")

    monkeypatch.setattr(engine.compilation.torch, "compile", unavailable)
    _, eager = collect(studio, request())
    events, result = collect(studio, request(compile=True))
    reason = result.settings["compile"]
    assert reason.startswith("off (compile failed, ran eagerly: RuntimeError: torch.compile is not supported") and "\n" not in reason
    assert any(e.phase == "compiling" and "not supported" in e.message for e in events)
    assert "not supported" in events[-1].message  # the panel's last word
    assert parse_infotext(result.parameters)["Compile"].startswith("off (compile failed")
    assert np.array_equal(np.asarray(result.image), np.asarray(eager.image))


def test_a_compiler_error_at_the_first_step_reruns_eagerly(studio):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("gcc: fatal error: no input files")

    _, eager = collect(studio, request())
    studio._runner.compile_switch.backend = broken_backend
    try:
        events, result = collect(studio, request(compile=True))
    finally:
        studio._runner.compile_switch.backend = "aot_eager"
    assert "gcc: fatal error" in result.settings["compile"] and result.settings["compile"].startswith("off (")
    assert [e.phase for e in events][-1] == "done"
    assert np.array_equal(np.asarray(result.image), np.asarray(eager.image))
    # the next compiled run compiles again (nothing of the failed compile is kept)
    _, ok = collect(studio, request(compile=True))
    assert ok.settings["compile"] == "on"


def test_compiled_code_is_kept_in_the_app_named_folder(monkeypatch, tmp_path):
    from engine.generation.compiling import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("LOWVRAM_STUDIO_CACHE", raising=False)
    assert cache_dir().parts[-2:] == ("lowvram-studio", "inductor")
    monkeypatch.setenv("LOWVRAM_STUDIO_CACHE", str(tmp_path / "app"))
    assert cache_dir() == tmp_path / "app" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice wins
    assert cache_dir() == tmp_path / "mine"
    engine.compilation.use_cache_dir(cache_dir())
    assert (tmp_path / "mine").is_dir()


def test_the_live_panel_names_the_compiling_phase_and_its_seconds():
    from engine.generation.types import GenerationEvent
    from ui.formatting import live_panel_html

    html = live_panel_html(None, GenerationEvent("compiling", step=1, total_steps=4, message="Compiled in 12.3 s (first step included)"), "")
    assert "Compiling" in html and "Compiled in 12.3 s" in html
