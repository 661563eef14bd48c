"""LoRAs through the Studio (the facade the UI calls): picked by id from the LoRA folder, filtered
by family, recorded A1111-style in the PNG, hot-swapped between generations without a rebuild or
a base-weight read, bad ones refused with the previous set still active; the estimate and the
live telemetry count their bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.generation.lora_library import LoraLibrary, parse_lora_spec
from engine.generation.studio import Studio, parse_infotext
from engine.generation.types import GenerateRequest, UserFacingError
from engine.lora.loras import active_loras
from tests.fixtures.tiny_loras import peft_lora, save_diffusers, save_kohya
from tests.test_studio import TinyRegistry, collect


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    root = tmp_path_factory.mktemp("lora-studio")
    registry = TinyRegistry(root / "models-src")
    loras = root / "loras"
    loras.mkdir()
    flux = FluxTransformer2DModel.from_pretrained(registry.paths["tiny-flux1"] / "transformer", torch_dtype=torch.bfloat16)
    sd, meta = peft_lora(flux, ["to_q", "to_k", "to_v", "to_out.0", "proj_out"], scale=0.5)
    save_diffusers(sd, "transformer", loras / "ink.safetensors", meta)
    sd2, _ = peft_lora(flux, ["ff.net.2"], seed=5, scale=0.5)
    save_kohya({k: v for k, v in sd2.items() if k.startswith("transformer_blocks")}, "lora_unet", loras / "grain.safetensors", 4.0,
               rename=lambda m: m.replace("transformer_blocks.", "double_blocks_").replace(".ff.net.2", "_img_mlp_2"))
    qwen = QwenImageTransformer2DModel.from_pretrained(registry.paths["tiny-qwen-image"] / "transformer", torch_dtype=torch.bfloat16)
    sd3, meta3 = peft_lora(qwen, ["img_mlp.net.2"])
    save_diffusers(sd3, "transformer", loras / "qwen-style.safetensors", meta3)
    torch.save({"x": torch.zeros(1)}, loras / "old.pt")
    studio = Studio(root / "models", root / "outputs", registry=registry, lora_dir=loras)
    return studio, loras


def pixels(result):
    return np.asarray(Image.open(result.path))


def test_picker_lists_the_family_loras(setup):
    studio, _ = setup
    assert {c.id for c in studio.list_loras("tiny-flux1")} == {"ink", "grain"}
    assert {c.id for c in studio.list_loras("tiny-qwen-image")} == {"qwen-style"}


def test_spec_parsing():
    assert parse_lora_spec("ink:0.8, grain") == (("ink", 0.8), ("grain", 1.0))
    assert parse_lora_spec("<lora:ink:0.5> <lora:hf:owner/repo:1>") == (("ink", 0.5), ("hf:owner/repo", 1.0))
    assert parse_lora_spec("hf:owner/repo/file.safetensors:0.7") == (("hf:owner/repo/file.safetensors", 0.7),)
    assert parse_lora_spec("") == ()
    with pytest.raises(UserFacingError):
        parse_lora_spec("ink:9")


def test_generate_with_loras_hot_swaps_and_records_them(setup, monkeypatch):
    studio, loras = setup
    request = GenerateRequest("a bowl of fruit", model="tiny-flux1", seed=3)
    _, plain = collect(studio, request)
    builds, pipe = studio.builds, studio.pipeline

    import engine.generation.session as session_mod
    import engine.storage.disk
    from engine.generation.pipelines import components as loading

    def no_reads(*a, **k):
        raise AssertionError("LoRA changes must not read base weights or rebuild the pipeline")

    with monkeypatch.context() as m:
        m.setattr(engine.storage.disk.SafetensorsFile, "read", no_reads)
        m.setattr(engine.storage.disk.SafetensorsFile, "read_into", no_reads)
        m.setattr(loading, "load_component", no_reads)
        m.setattr(session_mod, "build_pipeline", no_reads)
        _, one = collect(studio, GenerateRequest("a bowl of fruit", model="tiny-flux1", seed=3, loras=(("ink", 0.8),)))
        assert not np.array_equal(pixels(one), pixels(plain))
        info = parse_infotext(one.parameters)
        assert info["prompt"] == "a bowl of fruit <lora:ink:0.8>"
        h = active_loras(pipe)[0].short_hash
        assert info["Lora hashes"] == f"ink: {h}" and len(h) == 12
        assert Image.open(one.path).info["parameters"] == one.parameters
        assert studio.telemetry().lora_bytes == active_loras(pipe)[0].nbytes > 0

        _, two = collect(studio, GenerateRequest("a bowl of fruit", model="tiny-flux1", seed=3, loras=(("ink", 0.8), ("grain", 0.5))))
        assert [x.name for x in active_loras(pipe)] == ["ink", "grain"]
        assert 'Lora hashes: "ink: ' in two.parameters and "<lora:grain:0.5>" in two.parameters
        _, again = collect(studio, GenerateRequest("a bowl of fruit", model="tiny-flux1", seed=3, loras=(("ink", 0.8),)))
        assert np.array_equal(pixels(again), pixels(one))  # grain removed: the same image as before
        _, back = collect(studio, request)
        assert np.array_equal(pixels(back), pixels(plain)) and active_loras(pipe) == []
    assert studio.builds == builds and studio.pipeline is pipe


@pytest.mark.parametrize(
    "lora_id,message",
    [
        ("qwen-style", r"qwen-style\.safetensors.*img_mlp"),
        ("old", r"pickled"),
        ("nowhere", r"not found"),
    ],
)
def test_bad_lora_is_refused_and_the_previous_set_stays(setup, lora_id, message):
    studio, _ = setup
    collect(studio, GenerateRequest("a bowl of fruit", model="tiny-flux1", seed=3, loras=(("ink", 0.8),)))
    pipe = studio.pipeline
    before = [h.id for h in active_loras(pipe)]
    with pytest.raises(UserFacingError, match=message):
        collect(studio, GenerateRequest("a bowl of fruit", model="tiny-flux1", seed=3, loras=(("ink", 0.5), (lora_id, 1.0))))
    assert [h.id for h in active_loras(pipe)] == before
    _, ok = collect(studio, GenerateRequest("a bowl of fruit", model="tiny-flux1", seed=3))  # keeps serving
    assert ok is not None


def test_estimate_counts_lora_bytes(setup):
    studio, loras = setup
    base = studio.estimate(GenerateRequest("x", model="tiny-flux1", vram_limit=1))
    with_lora = studio.estimate(GenerateRequest("x", model="tiny-flux1", vram_limit=1, loras=(("ink", 1.0),)))
    from engine.generation.lora_library import factor_bytes

    assert with_lora.lora_bytes == factor_bytes(loras / "ink.safetensors") > 0
    assert with_lora.vram_gb >= base.vram_gb


def test_library_refuses_paths_outside_its_folder(tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    with pytest.raises(UserFacingError):
        LoraLibrary(tmp_path / "loras").resolve("../secret")


def test_hf_lora_downloads_once_with_progress(tmp_path, monkeypatch):
    """hf:owner/repo: the repo's .safetensors file is fetched into <lora dir>/hf/owner/repo with
    byte progress, then found there without asking the hub again."""
    import huggingface_hub
    from types import SimpleNamespace

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    src = tmp_path / "src.safetensors"
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 4)}, str(src))
    size = src.stat().st_size
    calls = []

    class FakeApi:
        def __init__(self, *a, **k):
            pass

        def model_info(self, repo, files_metadata=False):
            calls.append(("info", repo))
            return SimpleNamespace(siblings=[SimpleNamespace(rfilename="README.md", size=10), SimpleNamespace(rfilename="lora.safetensors", size=size)])

    def fake_download(repo, filename, local_dir, endpoint=None, tqdm_class=None):
        calls.append(("get", repo, filename))
        bar = tqdm_class(total=size)
        bar.update(size // 2)
        bar.update(size - size // 2)
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read_bytes())
        return str(out)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("model_registry.hf_source.offline_mode", lambda: False)
    library = LoraLibrary(tmp_path / "loras")
    seen = []
    path = library.resolve("hf:owner/repo", lambda f, m: seen.append((f, m)))
    assert path == tmp_path / "loras" / "hf" / "owner" / "repo" / "lora.safetensors" and path.is_file()
    assert seen and seen[-1][0] >= 0.99 and any(0 < f < 0.99 for f, _ in seen)
    assert library.resolve("hf:owner/repo/lora.safetensors") == path == library.resolve("hf:owner/repo")
    assert [c for c in calls if c[0] == "get"] == [("get", "owner/repo", "lora.safetensors")]
    assert "hf:owner/repo/lora" in {c.id for c in library.choices()}


def test_bad_lora_pairs_are_refused_before_anything_loads(setup):
    studio, _ = setup
    for bad in ((("ink",),), (("ink", "x"),), (("", 1.0),), (("ink", 7.0),)):
        with pytest.raises(UserFacingError, match="LoRA"):
            studio.resolve(GenerateRequest("x", model="tiny-flux1", loras=bad))


def test_each_familys_signatures_tag_its_lora_files():
    """The families' spec files declare the layer names that give their LoRAs away
    (`Family.lora_signatures`); tried by rank they are the library's table as it always was."""
    from engine.generation.lora_library import family_of_keys, signatures

    assert [(family, names[0]) for _, family, names in signatures()] == [
        ("sdxl", "down_blocks"), ("flux2-klein", "double_stream_modulation"), ("flux1", "double_blocks"),
        ("krea2", "text_fusion"), ("qwen-image", "img_mlp"), ("z-image", "noise_refiner"), ("flux1", "ff_context"),
    ]
    assert family_of_keys(["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"]) == "flux2-klein"
    assert family_of_keys(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "flux1"
    assert family_of_keys(["transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight",
                           "transformer.transformer_blocks.0.attn.to_add_out.lora_A.weight"]) == "qwen-image"
    assert family_of_keys(["transformer.transformer_blocks.0.attn.to_add_out.lora_A.weight"]) == "flux1"
    assert family_of_keys(["transformer.layers.0.feed_forward.w1.lora_A.weight"]) == "z-image"
    assert family_of_keys(["something.else.lora_A.weight"]) is None
