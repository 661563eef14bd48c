"""The demo model draws what it is told: the judge, the shipped weights, and the demo through the Studio.

The judge (tests/judge.py) is tested first on drawn pictures, noise and wrong captions, so that
the tests after it, which judge what the demo generates, can fail. The captions the demo is
judged on are held out of its training (tools/demo_shapes.is_held_out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import model_registry
from engine.generation.studio import Studio
from engine.generation.types import GenerateRequest, GenerationResult
from model_registry.demo import MARKER, ensure_demo
from model_registry.demo.repo import WEIGHTS_DIR, shipped_loras
from tests.judge import judge, rate
from tools.demo_shapes import COLOURS, POSITIONS, SHAPES, Scene, draw, held_out_scenes, is_held_out, random_scene

HELD_OUT = 20  # captions per judged rate (each one generation of a few tens of ms)


# --- the judge --------------------------------------------------------------------------------------
def test_judge_reads_every_drawn_picture_and_refuses_noise_and_wrong_captions() -> None:
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(200)] + held_out_scenes(30)
    assert all(judge(draw(s), s).ok for s in scenes)
    assert not any(judge(draw(s), s).outlined for s in scenes)
    noise = [judge(rng.integers(0, 256, (64, 64, 3)), s) for s in scenes[:50]]
    assert not any(v.ok for v in noise)
    flat = judge(np.full((64, 64, 3), 128, np.uint8), scenes[0])
    assert not flat.ok and flat.shape is None
    s = Scene("red", "circle", "blue", "left")
    for wrong in (Scene("green", "circle", "blue", "left"), Scene("red", "square", "blue", "left"),
                  Scene("red", "circle", "white", "left"), Scene("red", "circle", "blue", "right")):
        assert not judge(draw(s), wrong).ok, wrong
    assert judge(draw(s).repeat(4, 0).repeat(4, 1), s).ok  # any size: read at 64x64
    outlined = [Scene(**{**random_scene(rng).__dict__, "outlined": True}) for _ in range(50)]
    assert all(judge(draw(o), o).outlined for o in outlined)


def test_held_out_captions_are_never_drawn_for_training_but_their_parts_are() -> None:
    rng = np.random.default_rng(1)
    seen = {(s.colour, s.shape, s.position) for s in (random_scene(rng) for _ in range(5000))}
    held = {(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS if is_held_out(c, s, p)}
    assert held and not (held & seen)
    assert 0.05 < len(held) / (len(COLOURS) * len(SHAPES) * len(POSITIONS)) < 0.2
    for c, s, p in held:  # every pair of a held-out triple is drawn in training
        assert any(t[:2] == (c, s) for t in seen) and any(t[1:] == (s, p) for t in seen) and any((t[0], t[2]) == (c, p) for t in seen)
    assert all(is_held_out(s.colour, s.shape, s.position) for s in held_out_scenes(HELD_OUT))


# --- the shipped weights --------------------------------------------------------------------------
def test_shipped_weights_are_small_and_record_their_training() -> None:
    files = [*WEIGHTS_DIR.glob("*.safetensors")]
    assert {f.name for f in files} >= {"text_encoder.safetensors", "transformer.safetensors", "vae.safetensors", "outlined_shapes_lora.safetensors"}
    assert sum(f.stat().st_size for f in files) <= 25_000_000
    record = json.loads((WEIGHTS_DIR / "training.json").read_text())
    assert record["total_seconds"] > 0 and record["dit_loss"] > 0 and record["seed"] == 0
    assert set(shipped_loras()) == {"demo/outlined-shapes"}


def test_a_demo_folder_of_other_weights_is_rewritten(tmp_path: Path) -> None:
    entry = model_registry.get_model("demo")
    path = ensure_demo(entry, tmp_path)
    assert (path / MARKER).is_file() and (path / "transformer" / "config.json").is_file()
    (path / MARKER).write_text("00000000\n")  # a folder written from older (random) weights
    stale = (path / "transformer" / "config.json").stat().st_mtime_ns
    assert ensure_demo(entry, tmp_path) == path
    assert (path / MARKER).read_text().strip() != "00000000"
    assert (path / "transformer" / "config.json").stat().st_mtime_ns != stale


# --- the demo through the Studio --------------------------------------------------------------------
@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> Studio:
    root = tmp_path_factory.mktemp("demo-studio")
    return Studio(root / "models", root / "outputs", device="cpu", lora_dir=root / "loras")


def run(studio: Studio, request: GenerateRequest) -> tuple[list, GenerationResult]:
    events, result = [], None
    for item in studio.generate(request):
        if isinstance(item, GenerationResult):
            result = item
        else:
            events.append(item)
    assert result is not None
    return events, result


def test_the_demo_draws_held_out_captions(studio: Studio) -> None:
    """bf16, the catalogue's defaults, captions it never saw: the shape's colour, the background's
    and the position right on at least 90%. (The shape's class is not asserted: the shipped weights
    draw rounded blobs, and the judge reads the class right on about 1 in 5 (README).)"""
    scenes = held_out_scenes(HELD_OUT)
    verdicts = [judge(run(studio, GenerateRequest(s.caption(), seed=0, preview=False))[1].image, s) for s in scenes]
    assert rate(verdicts, "colours_and_place_ok") >= 0.9, "\n".join(map(str, verdicts))
    noise = [judge(np.random.default_rng(i).integers(0, 256, (64, 64, 3)), s) for i, s in enumerate(scenes)]
    assert rate(noise, "colours_and_place_ok") == 0


def test_the_shipped_lora_changes_the_drawing_at_strength_1_and_not_at_0(studio: Studio) -> None:
    """The LoRA was trained on outlined shapes; what it learned in the time given (300 steps) is to
    change the shape's colour and fill, not yet outlines (README). Strength 0 is the plain model,
    bitwise; strength 1 changes what the judge sees on most captions."""
    assert any(c.id == "demo/outlined-shapes" and c.family == "z-image" for c in studio.list_loras("demo"))
    scenes = held_out_scenes(8, seed=3)
    changed = 0
    for s in scenes:
        plain = run(studio, GenerateRequest(s.caption(), seed=0, preview=False))[1]
        on = run(studio, GenerateRequest(s.caption(), seed=0, preview=False, loras=(("demo/outlined-shapes", 1.0),)))[1]
        off = run(studio, GenerateRequest(s.caption(), seed=0, preview=False, loras=(("demo/outlined-shapes", 0.0),)))[1]
        assert np.array_equal(np.asarray(off.image), np.asarray(plain.image))
        a, b = judge(on.image, s), judge(off.image, s)
        changed += (a.colour, a.background, a.shape, a.filled > 0.9) != (b.colour, b.background, b.shape, b.filled > 0.9)
    assert changed >= 6, changed


def test_image_to_image_keeps_an_input_its_prompt_describes_and_follows_another_at_0_9(studio: Studio) -> None:
    """A drawn input with its own caption at strength 0.3 stays the picture it was (the input's
    latents reach the denoiser at the right scale); with another picture's caption at 0.9 the
    prompt wins. (Not met, README: with another caption the prompt already wins at 0.1-0.3.)"""
    pairs = [(Scene("yellow", "square", "purple", "left", "large"), Scene("red", "circle", "white", "right")),
             (Scene("white", "triangle", "green", "top", "large"), Scene("blue", "diamond", "orange", "bottom")),
             (Scene("pink", "star", "black", "centre", "large"), Scene("green", "cross", "yellow", "left"))]
    for drawn, asked in pairs:
        source = Image.fromarray(draw(drawn))
        kept = run(studio, GenerateRequest(drawn.caption(), seed=0, preview=False, images=(source,), strength=0.3))[1]
        won = run(studio, GenerateRequest(asked.caption(), seed=0, preview=False, images=(source,), strength=0.9))[1]
        assert judge(kept.image, drawn).colours_and_place_ok, judge(kept.image, drawn)
        assert np.abs(np.asarray(kept.image, np.float32) - draw(drawn)).mean() < 20
        assert judge(won.image, asked).colours_and_place_ok, judge(won.image, asked)


def test_the_live_preview_shows_the_shape_forming(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    """Previews every step (the latents seen without the VAE, through the demo's own fitted
    factors): the last one puts the shape where the caption says and is nearer the final picture
    than the first one is."""
    import engine.generation.preview as preview

    monkeypatch.setattr(preview, "PREVIEW_INTERVAL_S", 0.0)  # a preview every step (the demo's steps take milliseconds)
    monkeypatch.setattr(preview, "PREVIEW_MAX_INTERVAL_S", 0.0)
    scenes = held_out_scenes(6, seed=5)
    placed = 0
    for s in scenes:
        events, result = run(studio, GenerateRequest(s.caption(), seed=0, preview=True))
        previews = [e.preview for e in events if e.preview is not None]
        assert len(previews) >= 4, "a preview every step"
        small = np.asarray(result.image.resize(previews[-1].size, Image.Resampling.BOX), np.float32)
        first, last = (np.abs(np.asarray(p, np.float32) - small).mean() for p in (previews[0], previews[-1]))
        assert last < first, (first, last)
        placed += judge(previews[-1], s).position == s.position
    assert placed >= 5, placed
