"""Per-family adapters: which diffusers pipeline, which components, which repo files.

The catalogue (models.json) says *what* a model is; a family says how a pipeline of that
kind is laid out on disk, so downloads fetch only what `from_pretrained` reads and the
completeness check knows what "whole" means.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatch

# Files no diffusers pipeline in this app reads: duplicate PyTorch/Flax/ONNX/OpenVINO
# exports of the same weights, and GGUF/ckpt single files.
_NEVER = ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.gguf")
# Weight variants diffusers repos ship next to the full-precision files; only a family's own is fetched.
_OTHER_VARIANTS = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Family:
    """How one kind of pipeline repo is laid out.

    `weighted` components have a config.json and safetensors weights (single file or
    shards + index), `tokenizers` a folder of tokenizer files, `schedulers` a
    scheduler_config.json. `variant` is diffusers' weight-file variant to fetch when the
    repo offers several precisions (SDXL: fp16 instead of fp32, half the download).
    """

    name: str
    pipeline_class: str
    weighted: tuple[str, ...]
    tokenizers: tuple[str, ...]
    schedulers: tuple[str, ...] = ("scheduler",)
    variant: str | None = None

    @property
    def components(self) -> tuple[str, ...]:
        """Every component folder the pipeline loads, sorted."""
        return tuple(sorted(self.weighted + self.tokenizers + self.schedulers))

    def allow_patterns(self, available: Iterable[str] | None = None) -> list[str]:
        """Repo paths to fetch: model_index.json plus each component's files, nothing at the root.

        With `available` (the repo's file list), a component that lacks the family's
        variant falls back to its plain weights instead of fetching none.
        """
        files = list(available) if available is not None else None
        patterns = ["model_index.json"]
        patterns += [f"{name}/scheduler_config.json" for name in self.schedulers]
        patterns += [f"{name}/*" for name in self.tokenizers]
        for name in self.weighted:
            variant_files = f"{name}/*.{self.variant}.safetensors"
            if self.variant and (files is None or any(fnmatch(f, variant_files) for f in files)):
                patterns += [f"{name}/config.json", variant_files, f"{name}/*.safetensors.index.{self.variant}.json"]
            else:
                patterns += [f"{name}/*.json", f"{name}/*.safetensors"]
        return patterns

    def ignore_patterns(self) -> list[str]:
        """Repo paths never to fetch, even when an allow pattern matches them."""
        others = [v for v in _OTHER_VARIANTS if v != self.variant]
        return list(_NEVER) + [f"*.{v}.safetensors" for v in others] + [f"*.safetensors.index.{v}.json" for v in others]


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="qwen-image",
            pipeline_class="QwenImagePipeline",
            weighted=("text_encoder", "transformer", "vae"),
            tokenizers=("tokenizer",),
        ),
        Family(
            name="z-image",
            pipeline_class="ZImagePipeline",
            weighted=("text_encoder", "transformer", "vae"),
            tokenizers=("tokenizer",),
        ),
        Family(
            name="flux1",
            pipeline_class="FluxPipeline",
            weighted=("text_encoder", "text_encoder_2", "transformer", "vae"),
            tokenizers=("tokenizer", "tokenizer_2"),
        ),
        Family(
            name="flux2-klein",
            pipeline_class="Flux2KleinPipeline",
            weighted=("text_encoder", "transformer", "vae"),
            tokenizers=("tokenizer",),
        ),
        Family(
            name="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            weighted=("text_encoder", "text_encoder_2", "unet", "vae"),
            tokenizers=("tokenizer", "tokenizer_2"),
            variant="fp16",
        ),
    )
}


def family_for_pipeline(pipeline_class: str) -> Family | None:
    """The family whose pipeline class a model_index.json names, if any."""
    for family in FAMILIES.values():
        if family.pipeline_class == pipeline_class:
            return family
    return None
