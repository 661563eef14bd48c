"""Writing the demo repo: a tiny Tongyi-MAI/Z-Image-Turbo, file for file, with seeded random weights.

The real classes are built with the tiny configs of `components` and saved with their own
``save_pretrained`` (shard names, index files and checkpoint keys are what the libraries write
for the real models); the tokenizer is trained locally (`tokenizer`). A repo is byte-identical
for a given seed, so a demo folder written by an earlier version stays valid. The tests' tiny
repos of the other families (tests/fixtures/tiny_repos.py) are written with these helpers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..families import FAMILIES
from . import components as tc
from .tokenizer import qwen_vocab, write_json, write_qwen3_tokenizer

__all__ = [
    "Z_IMAGE_COMPONENTS",
    "Z_IMAGE_SCHEDULER",
    "build",
    "quiet_libraries",
    "save",
    "write_demo_repo",
    "write_index_and_scheduler",
    "write_repo",
    "write_trained_z_image",
    "shipped_loras",
    "write_z_image",
]

Writer = Callable[[Path, int], None]


def write_repo(writer: Writer, target_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny pipeline repo with ``writer(root, seed)`` into ``target_dir``.

    An existing pipeline repo there is replaced, so a second call with the
    same seed leaves byte-identical files; any other non-empty directory is
    refused rather than wiped.  Returns the repo path.
    """
    root = Path(target_dir)
    if root.exists():
        if any(root.iterdir()) and not (root / "model_index.json").is_file():
            raise FileExistsError(f"{root} is not empty and holds no pipeline repo; refusing to overwrite it")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with quiet_libraries():
        writer(root, seed)
    return root


def write_demo_repo(target_dir: str | Path, seed: int = 0) -> Path:
    """The demo model: a tiny Z-Image repo with the shipped trained weights (see write_repo)."""
    return write_repo(write_trained_z_image, target_dir, seed)


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Seed torch for one component without disturbing the caller's RNG state.

    Each component gets its own seed so that resizing one component does not
    change the weights of the others.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(component.encode())) % 2**63)
        yield


def build(seed: int, component: str, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Instantiate a model with its library's seeded random init, in bf16 (as the real repos store it).

    The weights are initialised in float32 and rounded, so a bf16 repo holds
    the same values an fp32 build with the same seed would, to bf16 precision.
    """
    with _seeded(seed, component):
        model = factory()
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-only modules even when there are none.
    return torch.nn.Module.to(model, torch.bfloat16).eval()


def save(model: Any, directory: Path, *, sharded: bool = False, fp16_variant: bool = False) -> None:
    """save_pretrained; ``sharded`` components get a max_shard_size of half their weights.

    Half the total always yields at least two shards (more when tensor sizes do
    not split evenly), named and indexed exactly as for the real multi-GB models.
    ``fp16_variant`` also writes the ``*.fp16.safetensors`` copy that repos like
    SDXL ship next to the main weights.
    """
    kwargs: dict[str, Any] = {}
    if sharded:
        total = sum(t.nbytes for t in model.state_dict().values())
        kwargs["max_shard_size"] = math.ceil(total / 2)
    if fp16_variant:
        fp16 = torch.nn.Module.to(copy.deepcopy(model), torch.float16)
        fp16.save_pretrained(directory, variant="fp16", **kwargs)
    model.save_pretrained(directory, **kwargs)  # last: config.json records the main weights' dtype


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence save/load progress bars and warnings while writing, then restore them."""
    import diffusers.utils.logging as d_logging
    import transformers.utils.logging as t_logging

    t_bars, d_bars = t_logging.is_progress_bar_enabled(), d_logging.is_progress_bar_enabled()
    t_level, d_level = t_logging.get_verbosity(), d_logging.get_verbosity()
    t_logging.disable_progress_bar()
    d_logging.disable_progress_bar()
    t_logging.set_verbosity_error()
    d_logging.set_verbosity_error()
    try:
        yield
    finally:
        t_logging.set_verbosity(t_level)
        d_logging.set_verbosity(d_level)
        if t_bars:
            t_logging.enable_progress_bar()
        if d_bars:
            d_logging.enable_progress_bar()


# model_index.json and scheduler/ as in Tongyi-MAI/Z-Image-Turbo: component -> (library, class).
Z_IMAGE_COMPONENTS: dict[str, tuple[str, str]] = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "Qwen3Model"),
    "tokenizer": ("transformers", "Qwen2Tokenizer"),
    "transformer": ("diffusers", "ZImageTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}
Z_IMAGE_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def write_index_and_scheduler(
    root: Path,
    family: str,
    components: Mapping[str, tuple[str, str]],
    scheduler_config: Mapping[str, Any],
    pipeline_config: Mapping[str, Any] | None = None,
) -> None:
    """model_index.json (the family's pipeline class, its pipeline config entries, each
    component's library and class) and scheduler/ (configs only; no weights)."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": FAMILIES[family].pipeline_class,
        "_diffusers_version": diffusers.__version__,
        **(pipeline_config or {}),
    }
    index |= {name: list(library_and_class) for name, library_and_class in components.items()}
    write_json(root / "model_index.json", index)
    scheduler_class = getattr(diffusers, components["scheduler"][1])
    scheduler_class(**scheduler_config).save_pretrained(root / "scheduler")


def write_z_image(root: Path, seed: int) -> None:
    """Tongyi-MAI/Z-Image-Turbo: Qwen3 text encoder, single-stream DiT, FLUX.1's VAE."""
    write_index_and_scheduler(root, "z-image", Z_IMAGE_COMPONENTS, Z_IMAGE_SCHEDULER)
    qv = qwen_vocab(qwen3=True)
    write_qwen3_tokenizer(root / "tokenizer", qv)
    # The pipeline reads hidden_states[-2], so two layers are the minimum.
    text_encoder = build(seed, "text_encoder", lambda: tc.qwen3_text_encoder(len(qv), qv.added, layers=2))
    save(text_encoder, root / "text_encoder", sharded=True)
    save(build(seed, "transformer", tc.z_image_transformer), root / "transformer", sharded=True)
    save(build(seed, "vae", tc.flux_vae), root / "vae")


#: The demo's trained weights (tools/train_demo.py writes them; the app only reads them).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = ("text_encoder.safetensors", "transformer.safetensors", "vae.safetensors")


def weights_fingerprint() -> str:
    """crc32 of the shipped weight files: a demo folder written from other weights is rewritten."""
    crc = 0
    for name in (*WEIGHT_FILES, "training.json", "latent_rgb.json"):
        crc = zlib.crc32((WEIGHTS_DIR / name).read_bytes(), crc)
    return f"{crc:08x}"


def _trained(model: torch.nn.Module, file: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(WEIGHTS_DIR / file), strict=True)  # copies: tied weights stay tied
    return torch.nn.Module.to(model, torch.bfloat16).eval()


def write_trained_z_image(root: Path, seed: int) -> None:
    """The demo: the same Z-Image repo layout, its components of the demo's sizes
    (components.demo_*) carrying the weights trained on drawn shapes. `seed` is unused: the
    weights are what training wrote, so every demo folder holds the same bytes."""
    del seed
    record = json.loads((WEIGHTS_DIR / "training.json").read_text())
    write_index_and_scheduler(root, "z-image", Z_IMAGE_COMPONENTS, Z_IMAGE_SCHEDULER)
    qv = qwen_vocab(qwen3=True)
    write_qwen3_tokenizer(root / "tokenizer", qv)
    save(_trained(tc.qwen3_text_encoder(len(qv), qv.added, layers=2), "text_encoder.safetensors"), root / "text_encoder", sharded=True)
    save(_trained(tc.demo_transformer(), "transformer.safetensors"), root / "transformer", sharded=True)
    save(_trained(tc.demo_vae(**record["vae_config"]), "vae.safetensors"), root / "vae")
    shutil.copyfile(WEIGHTS_DIR / "latent_rgb.json", root / "latent_rgb.json")  # the live preview's factors


def shipped_loras() -> dict[str, Path]:
    """The demo's LoRA (trained with it: outlined instead of filled shapes), by LoRA id."""
    return {"demo/outlined-shapes": WEIGHTS_DIR / "outlined_shapes_lora.safetensors"}
