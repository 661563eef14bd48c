"""Issue #23's models on their tiny repos (tests/fixtures/tiny_repos.py, the real layout), through
the engine: text-to-image, reference images / image-to-image where the family has them, and the
same pixels whatever the memory strategy (RAM or disk offload, VRAM limit none / 0 / partial)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.generation.pipelines import FAMILIES, build_pipeline
from engine.generation.settings import vram_config_for
from model_registry import get_model, list_models
from tests.fixtures.tiny_repos import TINY_DEFAULTS, write_tiny_repo

#: the new families of issue #23 (the new models of existing families run on those families' tiny repos)
NEW_FAMILIES = ("flux2",)
#: every model the issue adds, and its family
NEW_MODELS = {
    "qwen-image-2512": "qwen-image",
    "qwen-image-edit-2511": "qwen-image-edit",
    "z-image": "z-image",
    "flux2-klein-9b": "flux2-klein",
    "flux2-dev": "flux2",
}

STRATEGIES = {  # name: (disk offload, VRAM limit in GB)
    "ram-unlimited": (False, None),
    "ram-0": (False, 0),
    "ram-partial": (False, 0.0001),
    "disk-0": (True, 0),
    "disk-unlimited": (True, None),
}


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("current")
    return {family: write_tiny_repo(family, root / family) for family in NEW_FAMILIES}


def generate(mp, family, **kw):
    d = TINY_DEFAULTS[family]
    return np.asarray(mp.generate("a red fox in the snow", "", width=d.width, height=d.height, steps=2, guidance=d.guidance, seed=3, **kw))


def test_every_new_model_is_catalogued_in_its_family():
    ids = {e.id for e in list_models()}
    assert set(NEW_MODELS) <= ids
    for model_id, family in NEW_MODELS.items():
        entry = get_model(model_id)
        assert entry.family == family and entry.hf_repo and not entry.verified, model_id
        assert entry.components[entry.adapter.denoiser].parameters, model_id


def test_flux2_dev_is_gated_non_commercial_and_about_110_gb():
    entry = get_model("flux2-dev")
    assert entry.gated and "non-commercial" in entry.licence
    assert 105e9 < entry.bytes_bf16 < 115e9  # the model card's "about 110 GB in bf16"
    assert 31e9 < entry.components["transformer"].parameters < 33e9
    assert 23e9 < entry.components["text_encoder"].parameters < 24.5e9


@pytest.mark.parametrize("model_id", ["flux2-dev", "flux2-klein-9b"])
def test_a_gated_download_without_a_token_says_what_to_do(monkeypatch, model_id):
    import model_registry
    from model_registry import hf_source
    from model_registry.types import UserFacingError

    monkeypatch.setattr(hf_source, "get_token", lambda: None)
    with pytest.raises(UserFacingError) as info:
        model_registry.download(model_id)
    message = str(info.value)
    assert f"https://huggingface.co/{get_model(model_id).hf_repo}" in message
    assert "HF_TOKEN" in message and "licence" in message


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_text_to_image_is_the_same_under_every_strategy(repos, family):
    images = {}
    for name, (disk, limit) in STRATEGIES.items():
        mp = build_pipeline(repos[family], vram_config_for(False, disk, "cpu"), limit)
        images[name] = generate(mp, family)
    first = images["ram-unlimited"]
    assert first.shape == (64, 64, 3) and first.std() > 0
    for name, image in images.items():
        assert np.array_equal(image, first), name


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_input_images_change_the_result_and_stay_bitwise_across_limits(repos, family):
    fam = FAMILIES[family]
    if fam.image_mode == "none":
        pytest.fail(f"{family} takes no input images: drop it from this test's list")
    reference = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 64, 3)))
    kw = {"images": [reference]} | ({"strength": 0.6} if fam.image_mode == "img2img" else {})
    plain = generate(build_pipeline(repos[family], vram_config_for(False, False, "cpu"), None), family)
    edits = [
        generate(build_pipeline(repos[family], vram_config_for(False, disk, "cpu"), limit), family, **kw)
        for disk, limit in ((False, None), (True, 0), (False, 0.0001))
    ]
    assert not np.array_equal(edits[0], plain)  # the reference reached the denoiser
    assert all(np.array_equal(e, edits[0]) for e in edits[1:])
