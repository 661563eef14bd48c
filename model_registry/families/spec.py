"""What a family spec is: the `Family` dataclass every family file fills in, and its layer map.

The catalogue (models.json) says *what* a model is; its family says how a pipeline of that
kind is laid out on disk, so downloads fetch only what `from_pretrained` reads and the
completeness check knows what "whole" means, which component plays which part at run time,
so the engine knows what to onload for each stage and how the pipeline does guidance, which
managed class each layer of its denoiser gets, and, where the engine encodes the prompts
itself, how.

Data flows ui -> engine -> model_registry, so the specs live here and the engine reads them;
nothing here imports the engine (the layer maps name its classes by dotted path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any

from .latent_rgb import LatentRGB

# Files no diffusers pipeline in this app reads: duplicate PyTorch/Flax/ONNX/OpenVINO
# exports of the same weights, and GGUF/ckpt single files.
_NEVER = ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.gguf")
# Weight variants diffusers repos ship next to the full-precision files; only a family's own is fetched.
_OTHER_VARIANTS = ("fp16", "bf16", "fp32")

# The stages a generation runs through (DiffSynth-style stage switching): only the components
# of the running stage are onloaded.
ENCODE, DENOISE, DECODE = "encode", "denoise", "decode"
STAGES: tuple[str, ...] = (ENCODE, DENOISE, DECODE)

# The engine's managed layer classes, the values of a layer map (DiffSynth-style dotted paths).
MANAGED_LINEAR = "engine.layers.managed.ManagedLinear"
MANAGED_MODULE = "engine.layers.managed.ManagedModule"


@dataclass(frozen=True)
class LayerMap:
    """Which managed class each layer class of a denoiser gets, and its block lists.

    `model_class` is the denoiser class's dotted path (the engine looks maps up by it, along
    the model's MRO), `layers` maps layer classes to MANAGED_LINEAR / MANAGED_MODULE (dotted
    paths on both sides), `blocks` names the block-list attributes that group layers for
    streaming. tests/test_registry.py checks each map against the real classes.
    """

    model_class: str
    layers: Mapping[str, str] = field(hash=False)
    blocks: tuple[str, ...] = ()


#: encode_prompts(pipe, prompt, negative_prompt, cfg, device) -> the pipeline call's embedding kwargs.
PromptEncoder = Callable[[Any, str, str, bool, Any], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Family:
    """One kind of diffusers pipeline: its repo layout and the part each component plays.

    Layout: `weighted` components have a config.json and safetensors weights (single file or
    shards + index), `tokenizers` a folder of tokenizer files, `schedulers` a
    scheduler_config.json. `variant` is diffusers' weight-file variant to fetch when the
    repo offers several precisions (SDXL: fp16 instead of fp32, half the download).

    Roles: `denoiser` (the transformer / UNet) and `text_encoders` are weighted components;
    the rest says how the pipeline's __call__ does classifier-free guidance (CFG), how the
    denoiser's layers are managed (`layer_map`) and who encodes the prompts (`encode_prompts`).
    """

    name: str
    pipeline_class: str
    weighted: tuple[str, ...]
    tokenizers: tuple[str, ...]
    schedulers: tuple[str, ...] = ("scheduler",)
    variant: str | None = None
    denoiser: str
    text_encoders: tuple[str, ...]
    guidance_arg: str = "guidance_scale"  # the __call__ argument the UI's "guidance" goes to
    # The pipeline itself runs cond + uncond as one batched forward (SDXL, Z-Image) ...
    native_batched_cfg: bool = False
    # ... or the engine batches its two passes per step (see engine.pipelines.cfg).
    pair_batched_cfg: bool = False
    # Does the family use the negative prompt at all (with the guidance given)?
    uses_negative_prompt: bool = True
    # Guidance at or below this does no classifier-free guidance (one pass per step).
    cfg_threshold: float = 1.0
    sampler: str = "Euler (flow matching)"  # the name written into the image's infotext
    # The denoiser's layer map (None: the engine's default rule, every module with parameters
    # of its own is managed, and no block lists).
    layer_map: LayerMap | None = None
    # Prompt encoding the engine runs itself in the encode stage (None: the pipeline encodes
    # the prompt in its own __call__). A family whose CFG pair the engine batches returns
    # prompt_embeds, prompt_embeds_mask and, with CFG, negative_prompt_embeds and
    # negative_prompt_embeds_mask, which prime the batcher.
    encode_prompts: PromptEncoder | None = None
    # The live preview's latent-to-RGB projection (latent_rgb.py; None: a generic one from the
    # first latent channels). Packed latents (FLUX/Qwen/FLUX.2 sequences of 2x2 patches) are
    # unpacked first (engine.generation.preview).
    latent_rgb: LatentRGB | None = None

    # --- images in (engine.generation.pipelines.images) ---------------------------------------
    # The diffusers image-to-image pipeline built from the same components (None: none), which
    # takes one input image and a `strength` (0 = keep the image, 1 = ignore it).
    img2img_pipeline: str | None = None
    # Reference images the family's own pipeline takes as `image=` (edit models: Qwen-Image-Edit,
    # FLUX.1 Kontext, FLUX.2 [klein]); 0 = its pipeline takes none.
    max_reference_images: int = 0
    # Does the family's own pipeline need at least one reference image (Qwen-Image-Edit)?
    requires_image: bool = False
    # Pixels the pipeline resizes every reference to for its VAE, whatever the reference's size
    # (Qwen-Image-Edit-2509's VAE_IMAGE_SIZE: about 1024²); None: references keep their size,
    # only larger ones are reduced (FLUX.2 klein; Kontext, called with _auto_resize=False).
    reference_area: int | None = None

    @property
    def image_mode(self) -> str:
        """"reference" (images condition an edit), "img2img" (one image and a strength), or "none"."""
        if self.max_reference_images:
            return "reference"
        return "img2img" if self.img2img_pipeline else "none"

    @property
    def max_images(self) -> int:
        """How many input images a request may carry."""
        return self.max_reference_images or (1 if self.img2img_pipeline else 0)

    def __post_init__(self) -> None:
        """A role must name a component the repo has, or stage switching would miss it."""
        roles = (self.denoiser, *self.text_encoders)
        if missing := [r for r in roles if r not in self.weighted]:
            raise ValueError(f"family {self.name!r}: {missing} are not among its weighted components {self.weighted}")

    @property
    def components(self) -> tuple[str, ...]:
        """Every component folder the pipeline loads, sorted."""
        return tuple(sorted(self.weighted + self.tokenizers + self.schedulers))

    def stage_of(self, component: str) -> str:
        """The stage during which `component` must be onloaded (anything unknown: encode)."""
        if component == self.denoiser:
            return DENOISE
        if component in self.text_encoders:
            return ENCODE
        if component == "vae":
            return DECODE
        return ENCODE

    def does_cfg(self, guidance: float, negative_prompt: str = "") -> bool:
        """Classifier-free guidance at this guidance? (Qwen-Image: with an empty negative prompt
        we pass " ", as its pipeline documents, so CFG does not depend on the negative prompt.)"""
        return self.uses_negative_prompt and guidance > self.cfg_threshold

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
