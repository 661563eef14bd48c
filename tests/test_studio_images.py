"""The Studio with input images: the offline demo's image-to-image, edit models' references,
the infotext of the inputs, and every bad input refused with a clear message (CPU, offline)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from engine.generation.pipelines import FAMILIES
from engine.generation.studio import Studio, parse_infotext
from engine.generation.types import GenerateRequest, GenerationResult, UserFacingError
from tests.fixtures.bad_images import BAD_IMAGES, CONVERTED_IMAGES, good, noise, png
from tests.test_studio import TinyRegistry


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio-img")
    registry = TinyRegistry(root / "tiny", families=("flux1-kontext", "qwen-image-edit"))
    return Studio(root / "models", root / "outputs", registry=registry, device="cpu")


def result_of(studio, request):
    events, result = [], None
    for item in studio.generate(request):
        if isinstance(item, GenerationResult):
            result = item
        else:
            events.append(item)
    return events, result


def test_demo_image_to_image_png_out_with_the_inputs_in_its_infotext(studio):
    events, result = result_of(studio, GenerateRequest("a cat", seed=3, images=(png(noise(150, 100)),), strength=0.5))
    assert result.image.size == (144, 96)  # the input's size, fitted to multiples of 16
    info = parse_infotext(Image.open(result.path).text["parameters"])
    assert info["Size"] == "144x96" and info["Denoising strength"] == "0.5" and info["Input images"] == "1"
    assert info["Input image 1"].startswith("150x100 resized to 144x96 sha256 ")
    assert any("resized to 144x96" in n for n in result.settings["input_notes"])
    phases = [e.phase for e in events]
    assert phases.index("encoding") < phases.index("denoising") < phases.index("decoding")
    # same seed, same image; the strength matters
    _, again = result_of(studio, GenerateRequest("a cat", seed=3, images=(png(noise(150, 100)),), strength=0.5))
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))
    _, other = result_of(studio, GenerateRequest("a cat", seed=3, images=(png(noise(150, 100)),), strength=1.0))
    assert not np.array_equal(np.asarray(other.image), np.asarray(result.image))


def test_an_explicit_size_resizes_the_input_with_a_note(studio):
    _, result = result_of(studio, GenerateRequest("a cat", seed=1, width=64, height=64, images=(good(),)))
    assert result.image.size == (64, 64) and result.settings["strength"] == 0.6  # the default strength
    assert any("the output size" in n for n in result.settings["input_notes"])


def test_edit_model_takes_its_reference_and_no_strength(studio):
    _, result = result_of(studio, GenerateRequest("make it red", model="tiny-flux1-kontext", seed=1, images=(good(),), steps=2))
    assert result.image.size == (96, 80)
    info = parse_infotext(result.parameters)
    assert "Denoising strength" not in info and info["Input images"] == "1"
    with pytest.raises(UserFacingError, match="takes no strength"):
        studio.generate(GenerateRequest("x", model="tiny-flux1-kontext", images=(good(),), strength=0.5))
    with pytest.raises(UserFacingError, match="at most 1 input image; got 2"):
        studio.generate(GenerateRequest("x", model="tiny-flux1-kontext", images=(good(), good())))


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_refused_before_any_work(studio, name):
    data, message = BAD_IMAGES[name]
    with pytest.raises(UserFacingError, match=message):
        studio.generate(GenerateRequest("a cat", images=(data,)))


@pytest.mark.parametrize("name", sorted(CONVERTED_IMAGES))
def test_odd_modes_are_converted_with_a_note(studio, name):
    data, note = CONVERTED_IMAGES[name]
    r = studio.resolve(GenerateRequest("a cat", images=(data,)))
    assert r.inputs.images[0].image.mode == "RGB" and any(note in n for n in r.inputs.notes)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerateRequest("a cat", images=(good(),), strength=1.5), "from 0 to 1"),
        (GenerateRequest("a cat", images=(good(),), strength=-0.1), "from 0 to 1"),
        (GenerateRequest("a cat", images=(good(),), strength=float("nan")), "from 0 to 1"),
        (GenerateRequest("a cat", strength=0.5), "give an input image"),
        (GenerateRequest("a cat", images=(good(), good())), "at most 1 input image; got 2"),
        (GenerateRequest("a cat", images=(good(),), strength=0.0, steps=2), "runs no denoising step"),
        (GenerateRequest("a cat", images=(12345,)), "must be an image file"),
    ],
)
def test_bad_strength_and_counts(studio, request_, message):
    with pytest.raises(UserFacingError, match=message):
        studio.generate(request_)


def test_a_model_that_takes_no_image_says_so(studio, monkeypatch):
    import model_registry.families as families

    monkeypatch.setitem(families.FAMILIES, "z-image", dataclasses.replace(FAMILIES["z-image"], img2img_pipeline=None))
    with pytest.raises(UserFacingError, match="takes no input image"):
        studio.generate(GenerateRequest("a cat", images=(good(),)))


def test_studio_keeps_serving_after_bad_inputs(studio):
    for data, _ in BAD_IMAGES.values():
        with pytest.raises(UserFacingError):
            studio.generate(GenerateRequest("a cat", images=(data,)))
    _, result = result_of(studio, GenerateRequest("a cat", seed=1))
    assert result is not None and result.path.exists()


def test_qwen_image_edit_needs_one_to_three_references(studio):
    with pytest.raises(UserFacingError, match="edits images: give 1 to 3 input images"):
        studio.generate(GenerateRequest("make it red", model="tiny-qwen-image-edit"))
    with pytest.raises(UserFacingError, match="at most 3 input images; got 4"):
        studio.generate(GenerateRequest("make it red", model="tiny-qwen-image-edit", images=(good(),) * 4))
    _, result = result_of(studio, GenerateRequest("make it red", model="tiny-qwen-image-edit", seed=1, steps=2,
                                                  images=(good(), png(noise(64, 64, seed=2)))))
    info = parse_infotext(result.parameters)
    assert info["Input images"] == "2" and "Input image 2" in info and result.image.size == (96, 80)


def test_reference_images_count_in_the_estimate(studio, monkeypatch):
    """On a GPU host the estimate's activations grow with the references (their latents join the
    denoiser's sequence) and with a large input image's VAE encode."""
    from engine.generation import estimator as estimator_module
    from engine.generation.types import HardwareInfo

    monkeypatch.setattr(studio, "_hardware", HardwareInfo(True, "fake", 24.0, 22.0, 64.0))
    seen = []
    real = estimator_module.activation_bytes
    monkeypatch.setattr(estimator_module, "activation_bytes", lambda *a, **k: seen.append(a) or real(*a, **k))
    studio.estimate(GenerateRequest("x", model="qwen-image-edit-2509", width=1024, height=1024))
    studio.estimate(GenerateRequest("x", model="qwen-image-edit-2509", width=1024, height=1024, images=(png(noise(1024, 1024)),) * 2))
    assert seen[0][3:5] in ((), (0, 0)) and seen[1][3] == 2 * 1024 * 1024 and seen[1][4] == 1024 * 1024
