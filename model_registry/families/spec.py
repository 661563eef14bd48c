"""What a family spec is: the `Family` dataclass every family file fills in, and its tables.

The catalogue (models.json) says *what* a model is; its family says how a pipeline of that
kind is laid out on disk, so downloads fetch only what `from_pretrained` reads and the
completeness check knows what "whole" means; which stage each component runs in and which
component plays which part, so the engine knows what to onload for each stage and how the
pipeline does guidance; and the tables the memory engine needs of its denoiser class (the layer
map, the LoRA loader, the GGUF names and architectures) and its dtype needs, and, where the
engine encodes the prompts itself, how.

Data flows ui -> engine -> model_registry, so the specs live here and the generation layer reads
them (engine.generation.family_tables registers each family's tables with the memory engine);
nothing here imports the engine, and nothing here names an engine class (a layer map says
LINEAR or MODULE).

A family is one file in this package (or in a directory on $LOWVRAM_FAMILY_PATH) that defines
`FAMILY`, plus its catalogue JSON (docs/pipelines.md, "Adding a family").
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

# The values of a layer map: which of the engine's managed classes a layer gets (the engine
# reads these words, engine.model_tables.LINEAR / MODULE; no engine class is named here).
LINEAR = "linear"  # an nn.Linear whose weights go straight into F.linear
MODULE = "module"  # any other layer: its own forward runs with the computation parameters


@dataclass(frozen=True)
class LayerMap:
    """Which managed class each layer class of a denoiser gets, and its block lists.

    `layers` maps layer classes (dotted paths) to LINEAR / MODULE, `blocks` names the block-list
    attributes that group layers for streaming. The engine looks the map up by the family's
    `denoiser_class`, along the model's MRO. tests/test_registry.py checks each map against the
    real classes.
    """

    layers: Mapping[str, str] = field(hash=False)
    blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoraSignature:
    """Layer names a LoRA file of this family contains (diffusers, kohya or original-code names),
    by which the app's LoRA library tags a file with its family from its header alone.

    Signatures are tried across every family in the order of their `rank`, lowest first (a name
    two families share goes to the lower rank: FLUX.2's `to_qkv_mlp_proj` before FLUX.1's
    `single_transformer_blocks`); a family may hold a second, weaker signature at a high rank."""

    rank: int
    names: tuple[str, ...]


#: a GGUF layout's table: diffusers name -> [(file tensor name, first row, end row or -1)]
SourceTable = dict[str, list[tuple[str, int, int]]]


@dataclass(frozen=True)
class GgufLayout:
    """The original tensor layout a family's published GGUFs keep instead of diffusers' names.

    `markers`: substrings of ".name" only that layout has (how a file is recognised);
    `sources(model)`: the table diffusers name -> [(file name, first row, end row or -1 for all
    rows)] for that model's config (a fused qkv becomes three row ranges of the same bytes; a
    target listed with several ranges is joined at load); `unused`: file tensors the diffusers
    model has no place for and diffusers' converter drops. engine.storage.gguf_names applies it."""

    description: str
    markers: tuple[str, ...]
    sources: Callable[[Any], SourceTable]
    unused: tuple[str, ...] = ()


@dataclass(frozen=True)
class GgufNames:
    """The `general.architecture` values of the family's GGUF files (a file of another one is
    refused before anything is read) and the original layout they may keep (None: diffusers'
    own names, a ComfyUI prefix at most)."""

    architectures: tuple[str, ...]
    layout: GgufLayout | None = None


#: encode_prompts(pipe, prompt, negative_prompt, cfg, device) -> the pipeline call's embedding kwargs.
PromptEncoder = Callable[[Any, str, str, bool, Any], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Family:
    """One kind of diffusers pipeline: its repo layout and the part each component plays.

    Layout and stages: `stages` names every weighted component (a config.json and safetensors
    weights, single file or shards + index) and the stage it runs in (ENCODE, DENOISE, DECODE):
    the pipeline onloads a stage's components and offloads the rest, and a weighted component
    the family does not declare is refused when a pipeline is built. `tokenizers` are folders of
    tokenizer files, `schedulers` hold a scheduler_config.json, `configs` are components that
    are one config file (guiders). `variant` is diffusers'
    weight-file variant to fetch when the repo offers several precisions (SDXL: fp16 instead of
    fp32, half the download).

    Roles: `denoiser` (the transformer / UNet, of class `denoiser_class`) runs in DENOISE, the
    `text_encoders` in ENCODE; the rest says how the pipeline's __call__ does classifier-free
    guidance (CFG), who encodes the prompts (`encode_prompts`), and what the memory engine needs
    of the denoiser class: its layer map, LoRA loader and GGUF names (registered with the engine
    by engine.generation.family_tables), and which components pick their CPU dtype by timing a
    convolution (`cpu_conv_probes`).
    """

    name: str
    pipeline_class: str
    stages: Mapping[str, str] = field(hash=False)
    tokenizers: tuple[str, ...]
    schedulers: tuple[str, ...] = ("scheduler",)
    # Components that are a config file and nothing else (HunyuanImage's guiders: guider_config.json).
    configs: tuple[str, ...] = ()
    variant: str | None = None
    denoiser: str
    denoiser_class: str  # dotted path of the denoiser's class (the engine's tables are keyed by it)
    text_encoders: tuple[str, ...]
    guidance_arg: str = "guidance_scale"  # the __call__ argument the UI's "guidance" goes to
    # The pipeline itself runs cond + uncond as one batched forward (SDXL, Z-Image) ...
    native_batched_cfg: bool = False
    # ... or the engine batches its two passes per step (see engine.pipelines.cfg).
    pair_batched_cfg: bool = False
    # Does the family use the negative prompt at all (with the guidance given)?
    uses_negative_prompt: bool = True
    # The negative prompt the pipeline is given for "none" when it does CFG, for pipelines that
    # skip CFG without one (Qwen-Image-2.1: " ", as Qwen's pipelines document); None: nothing.
    empty_negative_prompt: str | None = None
    # Guidance at or below this does no classifier-free guidance (one pass per step).
    cfg_threshold: float = 1.0
    sampler: str = "Euler (flow matching)"  # the name written into the image's infotext
    # The denoiser's layer map (None: the engine's default rule, every module with parameters
    # of its own is managed, and no block lists).
    layer_map: LayerMap | None = None
    # The diffusers LoRA loader mixin (diffusers.loaders.lora_pipeline) that converts the
    # family's LoRA files, whose denoiser keys carry the `denoiser` prefix; None: no LoRAs.
    lora_loader: str | None = None
    # How the app's LoRA library tells this family's LoRA files by their layer names (none: it
    # never tags a file with this family).
    lora_signatures: tuple[LoraSignature, ...] = ()
    # The family's GGUF files: their architectures and original layout (None: no GGUF support
    # beyond diffusers' names, and no architecture check).
    gguf: GgufNames | None = None
    # Components whose computation dtype on a CPU is chosen by timing a convolution of this kind
    # ("Conv2d", "Conv3d") in bf16 and float32 (engine.runtime.cpu_dtype): the all-convolution VAE.
    cpu_conv_probes: Mapping[str, str] = field(default_factory=lambda: {"vae": "Conv2d"}, hash=False)
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
        """Every weighted component runs in a known stage, and a role names a component in the
        stage it plays in, or stage switching would miss it."""
        if bad := {c: s for c, s in self.stages.items() if s not in STAGES}:
            raise ValueError(f"family {self.name!r}: stages {bad} are not among {STAGES}")
        roles = (self.denoiser, *self.text_encoders)
        if missing := [r for r in roles if r not in self.weighted]:
            raise ValueError(f"family {self.name!r}: {missing} are not among its weighted components {self.weighted}")
        expected = {self.denoiser: DENOISE, **{name: ENCODE for name in self.text_encoders}}
        if wrong := {c: self.stages[c] for c, s in expected.items() if self.stages[c] != s}:
            raise ValueError(f"family {self.name!r}: {wrong}: the denoiser runs in {DENOISE!r}, text encoders in {ENCODE!r}")
        if stray := set(self.cpu_conv_probes) - set(self.weighted):
            raise ValueError(f"family {self.name!r}: cpu_conv_probes names {sorted(stray)}, not among its weighted components")

    @property
    def weighted(self) -> tuple[str, ...]:
        """The components with weights (config.json + safetensors): those `stages` declares."""
        return tuple(self.stages)

    @property
    def components(self) -> tuple[str, ...]:
        """Every component folder the pipeline loads, sorted."""
        return tuple(sorted(self.weighted + self.tokenizers + self.schedulers + self.configs))

    def stage_of(self, component: str) -> str:
        """The stage during which `component` must be onloaded, as the family declares it; a
        component it does not declare is an error (a pipeline built with one is refused)."""
        stage = self.stages.get(component)
        if stage is None:
            raise ValueError(self.no_stage(component))
        return stage

    def no_stage(self, component: str) -> str:
        """What to do about a component the family declares no stage for."""
        return (
            f"family {self.name!r} declares no stage for component {component!r} (its weighted components: "
            f"{', '.join(self.weighted)}); add it to the family's `stages` in its spec file "
            f"(model_registry/families/), with the stage it runs in: {', '.join(STAGES)}"
        )

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
        patterns += [f"{name}/*.json" for name in self.configs]
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
