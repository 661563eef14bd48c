"""The tiny offline repos mirror the real Hugging Face repos and run as pipelines."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_repos import (
    TINY_DEFAULTS,
    TINY_FAMILIES,
    TINY_SOURCE_REPOS,
    write_tiny_repo,
)

# What the real repos hold: model_index.json entries, which weighted components
# are sharded (index + >= 2 shards) or single files, and each tokenizer's files.
REAL_LAYOUT: dict[str, dict] = {
    "qwen-image": {
        "pipeline": "QwenImagePipeline",
        "components": {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        },
        "sharded": {"text_encoder", "transformer"},
        "single": {"vae"},
        "tokenizers": {
            "tokenizer": {
                "added_tokens.json",
                "chat_template.jinja",
                "merges.txt",
                "special_tokens_map.json",
                "tokenizer_config.json",
                "vocab.json",
            }
        },
    },
    "z-image": {
        "pipeline": "ZImagePipeline",
        "components": {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "ZImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "sharded": {"text_encoder", "transformer"},
        "single": {"vae"},
        "tokenizers": {"tokenizer": {"merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"}},
    },
    "flux1": {
        "pipeline": "FluxPipeline",
        "components": {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "sharded": {"text_encoder_2", "transformer"},
        "single": {"text_encoder", "vae"},
        "tokenizers": {
            "tokenizer": {"merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"},
            "tokenizer_2": {"special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"},
        },
    },
    "flux2-klein": {
        "pipeline": "Flux2KleinPipeline",
        "components": {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3ForCausalLM"],
            "tokenizer": ["transformers", "Qwen2TokenizerFast"],
            "transformer": ["diffusers", "Flux2Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLFlux2"],
        },
        "sharded": {"text_encoder", "transformer"},
        "single": {"vae"},
        "tokenizers": {"tokenizer": {"merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"}},
    },
    "qwen-image-edit": {
        "pipeline": "QwenImageEditPlusPipeline",
        "components": {
            "processor": ["transformers", "Qwen2VLProcessor"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        },
        "sharded": {"text_encoder", "transformer"},
        "single": {"vae"},
        "tokenizers": {
            name: {
                "added_tokens.json",
                "chat_template.jinja",
                "merges.txt",
                "special_tokens_map.json",
                "tokenizer_config.json",
                "vocab.json",
                *(["preprocessor_config.json"] if name == "processor" else []),
            }
            for name in ("tokenizer", "processor")
        },
    },
    "flux1-kontext": {
        "pipeline": "FluxKontextPipeline",
        "components": {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "sharded": {"text_encoder_2", "transformer"},
        "single": {"text_encoder", "vae"},
        "tokenizers": {
            "tokenizer": {"merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"},
            "tokenizer_2": {"special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"},
        },
    },
    "flux2": {
        "pipeline": "Flux2Pipeline",
        "components": {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
            "tokenizer": ["transformers", "PixtralProcessor"],
            "transformer": ["diffusers", "Flux2Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLFlux2"],
        },
        "sharded": {"text_encoder", "transformer"},
        "single": {"vae"},
        "tokenizers": {
            "tokenizer": {
                "chat_template.jinja",
                "preprocessor_config.json",
                "processor_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
            }
        },
    },
    "krea2": {
        "pipeline": "Krea2Pipeline",
        "components": {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3VLModel"],
            "tokenizer": ["transformers", "Qwen2TokenizerFast"],
            "transformer": ["diffusers", "Krea2Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        },
        "sharded": {"text_encoder", "transformer"},
        "single": {"vae"},
        "tokenizers": {"tokenizer": {"merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"}},
    },
    "hunyuan-image": {
        "pipeline": "HunyuanImagePipeline",
        "components": {
            "guider": ["diffusers", "AdaptiveProjectedMixGuidance"],
            "ocr_guider": ["diffusers", "AdaptiveProjectedMixGuidance"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "tokenizer_2": ["transformers", "ByT5Tokenizer"],
            "transformer": ["diffusers", "HunyuanImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLHunyuanImage"],
        },
        "sharded": {"text_encoder", "transformer"},
        "single": {"text_encoder_2", "vae"},
        "tokenizers": {
            "tokenizer": {
                "added_tokens.json",
                "chat_template.jinja",
                "merges.txt",
                "special_tokens_map.json",
                "tokenizer_config.json",
                "vocab.json",
            },
            "tokenizer_2": {"added_tokens.json", "tokenizer_config.json"},
            "guider": {"guider_config.json"},
            "ocr_guider": {"guider_config.json"},
        },
    },
    "qwen-image-21": {
        "pipeline": "QwenImage21Pipeline",
        "components": {
            "processor": ["transformers", "Qwen3VLProcessor"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
            "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage21"],
        },
        "sharded": {"text_encoder", "transformer"},
        "single": {"vae"},
        "tokenizers": {
            "processor": {
                "added_tokens.json",
                "chat_template.jinja",
                "merges.txt",
                "preprocessor_config.json",
                "special_tokens_map.json",
                "tokenizer_config.json",
                "vocab.json",
            }
        },
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "components": {
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "sharded": set(),
        "single": {"text_encoder", "text_encoder_2", "unet", "vae"},
        "variants": {"fp16"},
        "tokenizers": {
            name: {"merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"}
            for name in ("tokenizer", "tokenizer_2")
        },
    },
}


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_repos")
    return {family: write_tiny_repo(family, root / family, seed=0) for family in TINY_FAMILIES}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode on, and any attempt to open a network connection fails the test."""
    import huggingface_hub.constants

    def refuse(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address!r} in an offline test")
        return real_connect(self, address)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def needs_torchvision(family: str) -> None:
    """Qwen2VLProcessor (Qwen-Image-Edit) loads a video processor that needs torchvision, and
    PixtralProcessor (FLUX.2 [dev]'s tokenizer folder) needs it whole: diffusers' own loading
    needs it (the engine's does not: engine.generation.pipelines.processors)."""
    classes = {c for _, c in REAL_LAYOUT[family]["components"].values()}
    if "processor" in REAL_LAYOUT[family]["components"] or "PixtralProcessor" in classes:
        pytest.importorskip("torchvision", reason="Qwen2VLProcessor's video processor and PixtralProcessor need torchvision")


def safetensors_header(path: Path) -> dict:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_families_and_defaults_cover_each_other() -> None:
    assert set(TINY_FAMILIES) == set(REAL_LAYOUT) == set(TINY_DEFAULTS) == set(TINY_SOURCE_REPOS)


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny family"):
        write_tiny_repo("sd15", tmp_path / "x")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_model_index_lists_the_real_classes(repos: dict[str, Path], family: str) -> None:
    index = json.loads((repos[family] / "model_index.json").read_text())
    layout = REAL_LAYOUT[family]
    assert index["_class_name"] == layout["pipeline"]
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    assert components == layout["components"]
    assert sorted(p.name for p in repos[family].iterdir()) == sorted(["model_index.json", *components])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_component_files_match_the_real_layout(repos: dict[str, Path], family: str) -> None:
    root, layout = repos[family], REAL_LAYOUT[family]
    assert (
        json.loads((root / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == (layout["components"]["scheduler"][1])
    )
    for name, files in layout["tokenizers"].items():
        assert {p.name for p in (root / name).iterdir()} == files, name
    for name in layout["sharded"] | layout["single"]:
        folder = root / name
        assert (folder / "config.json").is_file()
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        weights = sorted(p.name for p in folder.glob("*.safetensors") if ".fp16." not in p.name)
        if name in layout["sharded"]:
            assert len(indexes) == 1 and len(weights) >= 2, (name, weights)
        else:
            assert indexes == [] and len(weights) == 1, (name, weights)
        for variant in layout.get("variants", ()):
            assert len(list(folder.glob(f"*.{variant}.safetensors"))) == 1, (name, variant)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shard_indexes_list_existing_shards_and_every_key(repos: dict[str, Path], family: str) -> None:
    indexes = sorted(repos[family].glob("*/*.safetensors.index.json"))
    assert len(indexes) == len(REAL_LAYOUT[family]["sharded"])
    for index_path in indexes:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        folder = index_path.parent
        shards = sorted(set(weight_map.values()))
        on_disk = sorted(p.name for p in folder.glob("*.safetensors"))
        assert shards == on_disk, folder.name
        total = len(shards)
        for i, shard in enumerate(shards, start=1):
            assert shard.endswith(f"-{i:05d}-of-{total:05d}.safetensors")
            keys = set(safetensors_header(folder / shard))
            assert keys == {k for k, v in weight_map.items() if v == shard}, shard


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_weights_are_bf16_and_the_repo_is_small(repos: dict[str, Path], family: str) -> None:
    root = repos[family]
    for path in root.rglob("*.safetensors"):
        wanted = "F16" if ".fp16." in path.name else "BF16"
        float_dtypes = {t["dtype"] for t in safetensors_header(path).values() if t["dtype"].startswith(("F", "BF"))}
        assert float_dtypes == {wanted}, path
    for config in root.glob("text_encoder*/config.json"):
        assert json.loads(config.read_text())["dtype"] == "bfloat16", config
    # HunyuanImage's glyph projection has a hidden width of 2048 fixed in its class (4.2M weights)
    limit = 12 if family == "hunyuan-image" else 5
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < limit * 1024 * 1024


def test_qwen2_5_vl_checkpoint_uses_the_original_key_names(repos: dict[str, Path]) -> None:
    """transformers v5 renames the modules (model.language_model.*, model.visual.*) but saves the old names."""
    index = repos["qwen-image"] / "text_encoder" / "model.safetensors.index.json"
    prefixes = {key.split(".")[0] for key in json.loads(index.read_text())["weight_map"]}
    assert prefixes == {"model", "visual", "lm_head"}


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
def test_qwen_image_template_prefix_is_dropped_exactly(repos: dict[str, Path], no_network: None) -> None:
    """The pipeline drops a fixed number of template tokens (34, counted with the real
    tokenizer); the tiny tokenizer splits the template the same way."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(repos["qwen-image"], torch_dtype=torch.bfloat16)
    head = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(head).input_ids) == pipe.prompt_template_encode_start_idx == 34


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pipeline_loads_offline_and_generates(repos: dict[str, Path], family: str, no_network: None) -> None:
    import diffusers

    needs_torchvision(family)

    pipe = diffusers.DiffusionPipeline.from_pretrained(repos[family], torch_dtype=torch.bfloat16)
    assert type(pipe).__name__ == REAL_LAYOUT[family]["pipeline"]
    pipe.set_progress_bar_config(disable=True)
    defaults = TINY_DEFAULTS[family]
    # Kontext scales the output up to max_area (1024² by default)
    extra = {"max_area": defaults.width * defaults.height} if family == "flux1-kontext" else {}
    image = pipe(
        prompt="a photo of a cat", generator=torch.Generator().manual_seed(0), **defaults.call_kwargs(), **extra
    ).images[0]
    assert image.size == (defaults.width, defaults.height)
    assert image.mode == "RGB"


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_specific_pipeline_class_loads_every_component(repos: dict[str, Path], family: str, no_network: None) -> None:
    import diffusers
    import transformers

    needs_torchvision(family)

    layout = REAL_LAYOUT[family]
    pipe = getattr(diffusers, layout["pipeline"]).from_pretrained(repos[family], torch_dtype=torch.bfloat16)
    for name, (library, class_name) in layout["components"].items():
        expected = getattr(diffusers if library == "diffusers" else transformers, class_name)
        component = getattr(pipe, name)
        assert isinstance(component, expected), name
        if isinstance(component, torch.nn.Module):
            assert {p.dtype for p in component.parameters()} <= {torch.bfloat16, torch.float32}


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
def test_sdxl_fp16_variant_loads(repos: dict[str, Path], no_network: None) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(repos["sdxl"], variant="fp16", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16


def test_same_seed_gives_identical_bytes(repos: dict[str, Path], tmp_path: Path) -> None:
    for family in TINY_FAMILIES:
        again = write_tiny_repo(family, tmp_path / family, seed=0)
        assert files_of(again) == files_of(repos[family]), family


def test_another_seed_changes_only_the_weights(repos: dict[str, Path], tmp_path: Path) -> None:
    other = files_of(write_tiny_repo("flux1", tmp_path / "flux1", seed=1))
    base = files_of(repos["flux1"])
    assert other.keys() == base.keys()
    changed = {name for name in base if base[name] != other[name]}
    assert changed == {name for name in base if name.endswith(".safetensors")}


def test_rewriting_replaces_a_repo_but_not_other_directories(tmp_path: Path) -> None:
    target = write_tiny_repo("z-image", tmp_path / "repo")
    (target / "stale.txt").write_text("old")
    write_tiny_repo("z-image", target)
    assert not (target / "stale.txt").exists()
    assert (target / "model_index.json").is_file()

    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"...")
    with pytest.raises(FileExistsError):
        write_tiny_repo("z-image", unrelated)
    assert (unrelated / "holiday.jpg").is_file()
