"""The model catalogue, its true sizes, completeness checks, local folders and the demo model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

import model_registry
from engine.generation.types import ModelChoice, UserFacingError
from model_registry.catalog import DEFAULT_KEYS, LIMIT_KEYS
from model_registry.completeness import repo_problems
from tests.fixtures import tiny_components as tc
from model_registry.families import FAMILIES, FAMILY_MODULES, STAGES, Family, family_for_pipeline
from model_registry.sizes import load_component_configs, measure
from tests.fixtures.tiny_repos import write_tiny_repo

REQUIRED = {
    "qwen-image": ("Qwen/Qwen-Image", "Qwen/Qwen-Image", "apache-2.0", False),
    "z-image-turbo": ("Tongyi-MAI/Z-Image-Turbo", "Tongyi-MAI/Z-Image-Turbo", "apache-2.0", False),
    "flux1-schnell": ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell", "apache-2.0", False),
    "flux1-dev": (
        "black-forest-labs/FLUX.1-dev",
        "black-forest-labs/FLUX.1-dev",
        "flux-1-dev-non-commercial-license",
        True,
    ),
    "flux2-klein-4b": ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-4B", "apache-2.0", False),
    "sdxl-base-1.0": (
        "stabilityai/stable-diffusion-xl-base-1.0",
        "AI-ModelScope/stable-diffusion-xl-base-1.0",
        "openrail++",
        False,
    ),
}


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOWVRAM_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_z(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_repo("z-image", tmp_path_factory.mktemp("tiny") / "z-image")


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- catalogue content


def test_catalogue_has_every_required_model_with_its_facts() -> None:
    entries = {e.id: e for e in model_registry.list_models()}
    assert set(REQUIRED) | {"demo"} <= set(entries)
    for model_id, (hf_repo, ms_repo, licence, gated) in REQUIRED.items():
        entry = entries[model_id]
        assert (entry.hf_repo, entry.modelscope_repo, entry.licence, entry.gated) == (hf_repo, ms_repo, licence, gated)
        assert entry.name and entry.description and entry.licence_url and not entry.is_demo


@pytest.mark.parametrize("entry", model_registry.list_models(), ids=lambda e: e.id)
def test_entry_fields_are_sane(entry: model_registry.ModelEntry) -> None:
    family = FAMILIES[entry.family]
    assert entry.pipeline_class == family.pipeline_class
    assert set(entry.components) == set(family.components)
    assert set(entry.defaults) == set(DEFAULT_KEYS) and set(entry.limits) == set(LIMIT_KEYS)
    d, lim = entry.defaults, entry.limits
    # 16: an 8x VAE with 2x2 patches (or a 16x VAE); HunyuanImage-2.1's VAE compresses 32x
    assert lim["size_multiple"] == (32 if entry.family == "hunyuan-image" else 16)
    for side in ("width", "height"):
        assert lim[f"min_{side}"] % 16 == 0 and lim[f"max_{side}"] % 16 == 0 and d[side] % 16 == 0
        assert lim[f"min_{side}"] <= d[side] <= lim[f"max_{side}"]
    assert 1 <= lim["min_steps"] <= d["steps"] <= lim["max_steps"]
    assert lim["min_guidance"] <= d["guidance"] <= lim["max_guidance"]
    for name, component in entry.components.items():
        if name in family.weighted:
            assert component.parameters and component.parameters > 0
            assert component.bytes_bf16 >= 2 * component.parameters
        else:
            assert component.parameters is None
    assert entry.bytes_bf16 == sum(c.bytes_bf16 or 0 for c in entry.components.values())
    as_dict = entry.to_dict()
    json.dumps(as_dict)
    for key in ("id", "name", "hf_repo", "modelscope_repo", "components", "defaults", "limits", "licence", "gated"):
        assert key in as_dict


@pytest.mark.parametrize("family", FAMILIES.values(), ids=lambda f: f.name)
def test_family_roles_are_components_of_its_layout(family: Family) -> None:
    """One table holds the repo layout and the runtime roles, so the roles name weighted components."""
    assert family.denoiser in family.weighted
    assert set(family.text_encoders) <= set(family.weighted)
    assert "vae" in family.weighted
    assert {family.stage_of(name) for name in family.weighted} == set(STAGES)
    assert family_for_pipeline(family.pipeline_class) is family


def test_family_table_is_keyed_by_unique_names_and_classes() -> None:
    assert all(name == family.name for name, family in FAMILIES.items())
    assert len({family.pipeline_class for family in FAMILIES.values()}) == len(FAMILIES)
    assert family_for_pipeline("StableDiffusionPipeline") is None


def test_the_table_collects_every_family_file() -> None:
    import pkgutil

    import model_registry.families as families

    files = {info.name for info in pkgutil.iter_modules(families.__path__)} - {"spec", "latent_rgb"}  # shared: the spec and the preview factors
    assert files == {module.__name__.rpartition(".")[2] for module in FAMILY_MODULES}
    assert list(FAMILIES.values()) == [module.FAMILY for module in FAMILY_MODULES]


# The tiny stand-in of each family's denoiser (tiny_components).
_TINY_DENOISERS = {
    "qwen-image": tc.qwen_image_transformer,
    "z-image": tc.z_image_transformer,
    "flux1": tc.flux_transformer,
    "flux2-klein": tc.flux2_transformer,
    "sdxl": tc.sdxl_unet,
    "qwen-image-edit": tc.qwen_image_transformer,
    "flux1-kontext": tc.flux_transformer,
    "flux2": tc.flux2_dev_transformer,
    "krea2": tc.krea2_transformer,
    "hunyuan-image": lambda: tc.hunyuan_image_transformer(24),
    "qwen-image-21": tc.qwen_image_21_transformer,
}


@pytest.mark.parametrize("module", FAMILY_MODULES, ids=lambda m: m.__name__.rpartition(".")[2])
def test_each_family_file_defines_one_family_whose_layer_map_fits_its_denoiser(module) -> None:
    """One spec per file; its layer map names the denoiser class of every catalogue model of the
    family, its layer and managed classes import, its block lists exist, and the engine finds it."""
    from engine.layers.managed import ManagedModule
    from engine.layers.module_maps import block_paths_for, import_object, normalize_module_map, registered_map_for

    specs = [value for value in vars(module).values() if isinstance(value, Family)]
    assert specs == [module.FAMILY]
    family = module.FAMILY
    denoiser = _TINY_DENOISERS[family.name]()
    catalogue = {
        (entry.components[family.denoiser].library, entry.components[family.denoiser].class_name)
        for entry in model_registry.list_models()
        if entry.family == family.name
    }
    assert catalogue == {(type(denoiser).__module__.partition(".")[0], type(denoiser).__name__)}
    assert import_object(family.denoiser_class) is type(denoiser)
    layer_map = family.layer_map
    if layer_map is None:  # the engine's default rule, no blocks
        assert registered_map_for(denoiser) is None and block_paths_for(denoiser) == []
        return
    mapping = normalize_module_map(layer_map.layers)
    assert mapping and all(issubclass(wrapper, ManagedModule) for wrapper in mapping.values())
    assert registered_map_for(denoiser) == {"layers": dict(layer_map.layers), "blocks": list(layer_map.blocks)}
    assert block_paths_for(denoiser) == list(layer_map.blocks)
    for path in layer_map.blocks:
        assert len(denoiser.get_submodule(path)) >= 1, path


def test_a_role_outside_the_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="not among its weighted components"):
        dataclasses.replace(FAMILIES["flux1"], denoiser="unet")
    with pytest.raises(ValueError, match="not among its weighted components"):
        dataclasses.replace(FAMILIES["sdxl"], text_encoders=("text_encoder", "text_encoder_3"))


def test_demo_entry() -> None:
    demo = model_registry.get_model("demo")
    assert demo.is_demo and "shapes and colours, trained in this repository" in demo.name and "offline" in demo.name
    assert "noise" not in demo.name + demo.description
    # it was trained at 64x64 without guidance (tools/train_demo.py)
    assert (demo.defaults["width"], demo.defaults["height"], demo.defaults["guidance"]) == (64, 64, 0.0)


# --------------------------------------------------------------------------- true sizes


@pytest.mark.parametrize(
    ("model_id", "component"),
    [
        ("flux1-dev", "vae"),
        ("flux1-dev", "text_encoder"),
        ("sdxl-base-1.0", "vae"),
        ("flux2-klein-4b", "vae"),
        ("flux2-klein-4b", "transformer"),
    ],
)
def test_stored_sizes_match_a_meta_device_rebuild(model_id: str, component: str) -> None:
    c = model_registry.get_model(model_id).components[component]
    size = measure(c.library, c.class_name, load_component_configs()[c.config_id])
    assert (c.parameters, c.bytes_bf16) == (size.parameters, size.bytes_bf16)


@pytest.mark.parametrize(
    ("model_id", "component", "billions"),
    [
        ("qwen-image", "transformer", 20.43),
        ("qwen-image", "text_encoder", 8.29),
        ("z-image-turbo", "transformer", 6.15),
        ("z-image-turbo", "text_encoder", 4.02),
        ("flux1-dev", "transformer", 11.90),
        ("flux1-schnell", "transformer", 11.89),
        ("flux1-dev", "text_encoder_2", 4.76),
        ("flux2-klein-4b", "transformer", 3.88),
        ("sdxl-base-1.0", "unet", 2.57),
        ("sdxl-base-1.0", "text_encoder_2", 0.695),
    ],
)
def test_big_components_are_in_the_right_ballpark(model_id: str, component: str, billions: float) -> None:
    params = model_registry.get_model(model_id).components[component].parameters
    assert params == pytest.approx(billions * 1e9, rel=0.01)


def test_every_measured_component_names_a_stored_config() -> None:
    configs = load_component_configs()
    for entry in model_registry.list_models():
        for name, c in entry.components.items():
            if not entry.is_demo and name in entry.adapter.weighted:
                assert c.config_id in configs


# --------------------------------------------------------------------------- which files a download takes

QWEN_IMAGE_FILES = [
    ".gitattributes", "LICENSE", "README.md", "model_index.json", "assets/merge.jpg",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/generation_config.json", "text_encoder/model.safetensors.index.json",
    *[f"text_encoder/model-0000{i}-of-00004.safetensors" for i in range(1, 5)],
    "tokenizer/added_tokens.json", "tokenizer/chat_template.jinja", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
    *[f"transformer/diffusion_pytorch_model-0000{i}-of-00009.safetensors" for i in range(1, 10)],
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]  # fmt: skip

SDXL_FILES = [
    ".gitattributes", "LICENSE.md", "README.md", "model_index.json", "01.png",
    "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/flax_model.msgpack", "text_encoder/model.onnx", "text_encoder/openvino_model.xml",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors",
    "text_encoder_2/model.onnx", "text_encoder_2/model.onnx_data",
    *[f"{t}/{f}" for t in ("tokenizer", "tokenizer_2")
      for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")],
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_flax_model.msgpack", "unet/model.onnx", "unet/model.onnx_data", "unet/openvino_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_decoder/model.onnx", "vae_encoder/model.onnx",
]  # fmt: skip


def selected(family: str, files: list[str]) -> set[str]:
    f = FAMILIES[family]
    allow = f.allow_patterns(available=files)
    return set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=f.ignore_patterns()))


def test_qwen_image_download_takes_the_pipeline_files_only() -> None:
    chosen = selected("qwen-image", QWEN_IMAGE_FILES)
    assert chosen == {p for p in QWEN_IMAGE_FILES if "/" in p and not p.startswith("assets/")} | {"model_index.json"}


def test_sdxl_download_takes_one_fp16_copy_and_no_duplicates() -> None:
    chosen = selected("sdxl", SDXL_FILES)
    assert chosen == {
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
        *[p for p in SDXL_FILES if p.startswith("tokenizer")],
    }  # fmt: skip


def test_a_variant_family_falls_back_to_plain_weights_where_a_component_has_no_variant() -> None:
    files = [p for p in SDXL_FILES if p != "vae/diffusion_pytorch_model.fp16.safetensors"]
    chosen = selected("sdxl", files)
    assert "vae/diffusion_pytorch_model.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.safetensors" not in chosen


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_repos_are_complete_and_selected_without_duplicates(family: str, tmp_path: Path) -> None:
    root = write_tiny_repo(family, tmp_path / family)
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    chosen = selected(family, sorted(files))
    variant = FAMILIES[family].variant
    for skipped in files - chosen:  # only full-precision twins of variant weights stay behind
        assert variant and skipped.endswith(".safetensors")
        assert skipped.replace(".safetensors", f".{variant}.safetensors") in chosen
    assert repo_problems(root, FAMILIES[family]) == []


# --------------------------------------------------------------------------- completeness


def test_completeness_catches_missing_and_damaged_files(tiny_z: Path, tmp_path: Path) -> None:
    family = FAMILIES["z-image"]
    shard = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"

    def broken(change) -> list[str]:
        root = copy_repo(tiny_z, tmp_path / f"case{len(list(tmp_path.iterdir()))}")
        change(root)
        return repo_problems(root, family)

    assert broken(lambda r: None) == []
    assert any("missing" in p for p in broken(lambda r: (r / shard).unlink()))
    assert any("header says" in p for p in broken(lambda r: (r / shard).write_bytes((r / shard).read_bytes()[:-1])))
    assert any("vae/config.json" in p for p in broken(lambda r: (r / "vae/config.json").unlink()))
    assert any(
        "no safetensors" in p for p in broken(lambda r: (r / "vae/diffusion_pytorch_model.safetensors").unlink())
    )
    assert any("scheduler_config" in p for p in broken(lambda r: (r / "scheduler/scheduler_config.json").unlink()))
    assert any("tokenizer" in p for p in broken(lambda r: shutil.rmtree(r / "tokenizer")))
    assert broken(lambda r: (r / "model_index.json").unlink()) == ["model_index.json is missing"]

    def drop_vae(r: Path) -> None:
        index = json.loads((r / "model_index.json").read_text())
        del index["vae"]
        (r / "model_index.json").write_text(json.dumps(index))

    assert "model_index.json does not list vae" in broken(drop_vae)
    root = copy_repo(tiny_z, tmp_path / "sizes")
    assert any("the hub says" in p for p in repo_problems(root, family, {"vae/config.json": 1}))
    assert repo_problems(root, FAMILIES["flux1"])  # right layout, wrong family


# --------------------------------------------------------------------------- model directories, demo, local folders


def test_model_dirs_come_from_env_or_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_registry.model_dirs() == [(tmp_path / "models").resolve()]
    monkeypatch.setenv("LOWVRAM_MODEL_DIR", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert model_registry.model_dirs() == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert model_registry.model_dirs(tmp_path / "c") == [(tmp_path / "c").resolve()]
    monkeypatch.delenv("LOWVRAM_MODEL_DIR")
    assert model_registry.model_dirs() == [Path("models").resolve()]


def test_demo_is_written_on_first_use_and_is_the_default(tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert model_registry.default_model_id() == "demo"
    assert model_registry.is_downloaded("demo")
    calls: list[tuple[float, str]] = []
    path = model_registry.download("demo", progress=lambda f, m: calls.append((f, m)))
    assert path == models / "demo" and calls[-1][0] == 1.0
    assert repo_problems(path, FAMILIES["z-image"]) == []
    mtime = (path / "model_index.json").stat().st_mtime_ns
    assert model_registry.local_path("demo") == path  # not rewritten when whole
    assert (path / "model_index.json").stat().st_mtime_ns == mtime
    (path / "vae/config.json").unlink()
    assert model_registry.local_path("demo") == path and (path / "vae/config.json").is_file()  # repaired
    assert not [p for p in models.iterdir() if p.name.endswith(".partial")]


def test_model_choices_for_the_ui() -> None:
    choices = model_registry.model_choices()
    assert all(isinstance(c, ModelChoice) for c in choices)
    by_id = {c.id: c for c in choices}
    assert by_id["demo"].downloaded and by_id["demo"].is_demo
    assert not by_id["qwen-image"].downloaded and 55 < by_id["qwen-image"].size_gb < 60


def test_a_folder_named_after_the_model_in_the_model_dir_is_found(tiny_z: Path, tmp_path: Path) -> None:
    path = copy_repo(tiny_z, tmp_path / "models" / "z-image-turbo")
    assert model_registry.local_path("z-image-turbo") == path
    assert model_registry.default_model_id() == "z-image-turbo"
    assert model_registry.download("z-image-turbo") == path  # no network needed


def test_register_local_folder(tiny_z: Path, tmp_path: Path) -> None:
    folder = copy_repo(tiny_z, tmp_path / "models" / "my-zimage")
    assert model_registry.register_local(folder, "z-image-turbo") == "z-image-turbo"
    assert model_registry.local_path("z-image-turbo") == folder
    assert model_registry.is_downloaded("z-image-turbo")
    registrations = json.loads((tmp_path / "models" / "local_models.json").read_text())
    assert registrations == {"z-image-turbo": str(folder)}


def test_local_source_in_download(tiny_z: Path, tmp_path: Path) -> None:
    folder = copy_repo(tiny_z, tmp_path / "models" / "zi")
    assert model_registry.download("z-image-turbo", source=f"local:{folder}") == folder


def test_local_folder_outside_the_model_dirs_is_refused(tiny_z: Path, tmp_path: Path) -> None:
    outside = copy_repo(tiny_z, tmp_path / "elsewhere")
    (tmp_path / "models").mkdir()
    with pytest.raises(UserFacingError, match="outside the model directories"):
        model_registry.register_local(outside, "z-image-turbo")
    with pytest.raises(UserFacingError, match="outside the model directories"):
        model_registry.register_local(tmp_path / "models" / ".." / "elsewhere", "z-image-turbo")
    (tmp_path / "models" / "link").symlink_to(outside)
    with pytest.raises(UserFacingError, match="outside the model directories"):
        model_registry.register_local(tmp_path / "models" / "link", "z-image-turbo")
    with pytest.raises(UserFacingError, match="outside"):
        model_registry.download("z-image-turbo", source=f"local:{outside}")
    assert not model_registry.is_downloaded("z-image-turbo")


def test_local_folder_that_is_incomplete_or_another_model_is_refused(tiny_z: Path, tmp_path: Path) -> None:
    folder = copy_repo(tiny_z, tmp_path / "models" / "zi")
    with pytest.raises(UserFacingError, match="holds a ZImagePipeline, not FLUX.1"):
        model_registry.register_local(folder, "flux1-schnell")
    with pytest.raises(UserFacingError, match="do not identify one model"):
        model_registry.register_local(folder)  # tiny configs match no real model: ask which one
    (folder / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors").unlink()
    with pytest.raises(UserFacingError, match="incomplete.*missing"):
        model_registry.register_local(folder, "z-image-turbo")
    with pytest.raises(UserFacingError, match="not a supported"):
        model_registry.register_local(tmp_path / "models", "z-image-turbo")


def test_local_folder_is_matched_by_its_real_configs(tiny_z: Path, tmp_path: Path) -> None:
    """A folder whose configs are the real ones needs no model id (FLUX.1 dev vs schnell)."""
    folder = copy_repo(write_tiny_repo("flux1", tmp_path / "tiny-flux"), tmp_path / "models" / "flux")
    configs = load_component_configs()
    real = {
        "transformer": "flux1-dev-transformer",
        "vae": "flux1-vae",
        "text_encoder": "clip-vit-l-14-text",
        "text_encoder_2": "t5-v1_1-xxl-encoder",
    }
    for component, config_id in real.items():
        (folder / component / "config.json").write_text(json.dumps(configs[config_id]))
    assert model_registry.register_local(folder) == "flux1-dev"


def test_load_options_pick_the_fp16_variant_when_present(tmp_path: Path) -> None:
    root = write_tiny_repo("sdxl", tmp_path / "sdxl")
    for fp16 in root.rglob("*.fp16.safetensors"):
        fp16.unlink()
    assert repo_problems(root, FAMILIES["sdxl"]) == []
    assert model_registry.load_options("sdxl-base-1.0", root) == {}
    for component in ("unet", "vae"):
        weights = root / component / "diffusion_pytorch_model.safetensors"
        weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert repo_problems(root, FAMILIES["sdxl"]) == []
    assert model_registry.load_options("sdxl-base-1.0", root) == {"variant": "fp16"}


def test_light_submodules_do_not_pull_the_download_stack():
    """The GPU image has huggingface_hub 1.x and no httpx2: the engine's GPU tests import the tiny
    model configs and engine.generation.types, which must not import the download code."""
    import subprocess
    import sys

    code = (
        "import sys, engine, engine.generation.types, model_registry.demo.components\n"
        "import tests.fixtures.tiny_components, tests.fixtures.tiny_models\n"
        "print(sorted(m for m in ('httpx2', 'model_registry.hf_source', 'model_registry.registry', 'modelscope') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"


def _imported_top_packages(package: str) -> dict[str, set[str]]:
    """file -> the top-level packages its import statements name (relative imports excluded)."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted((Path(__file__).parents[1] / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
        found[path.relative_to(Path(__file__).parents[1]).as_posix()] = names
    return found


def test_the_product_never_imports_the_tests_and_the_registry_never_imports_the_engine() -> None:
    """Data flows ui -> engine -> model_registry; test fixtures and dev tools stay out of the
    product (the demo model's code ships in model_registry/demo/, the fixtures import it)."""
    bad = {
        path: sorted(names & forbidden)
        for package, forbidden in (
            ("model_registry", {"engine", "ui", "tests", "tools"}),
            ("engine", {"ui", "tests", "tools"}),
            ("ui", {"tests", "tools"}),
        )
        for path, names in _imported_top_packages(package).items()
        if names & forbidden
    }
    assert bad == {}
