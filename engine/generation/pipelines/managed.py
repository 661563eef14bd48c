"""A diffusers pipeline whose every weighted component is managed by the engine.

* One `VramBudget` shared by all components; `set_vram_limit` re-plans it (no file reads).
* Stage switching as in DiffSynth: the text encoders are onloaded for encoding, then the
  denoiser, then the VAE; the rest is offloaded. Explicit switches (before encoding, after the
  last step) plus `budget.on_demand` (a layer of an offloaded component runs: switch to its
  stage), which also catches the VAE, called through `.decode()` rather than `forward`.
* Latents, scheduler state and text embeddings live on the computation device even while the
  weights sit offloaded (their placeholders may be on 'meta' or the CPU): the pipeline class is
  subclassed so `_execution_device` / `device` answer the computation device.
* Classifier-free guidance runs one batched denoiser forward per step (see `cfg`).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import VramConfig
from engine.layers.hooks import ModelHook, register_hook
from engine.management import (
    layer_state_counts,
    offload_model,
    onload_model,
    runtime_of,
    set_vram_limit,
)
from engine.runtime import ram
from engine.runtime.component import VramRuntime
from engine.runtime.pool import MemoryPool
from engine.generation.pipelines.cfg import CfgPairBatcher, cfg_batch
from engine.generation.pipelines import images as image_inputs
from engine.generation.pipelines.families import DECODE, DENOISE, ENCODE, Family, family_for
from engine.generation.pipelines.components import (
    component_classes,
    is_weighted,
    load_aux_component,
    load_component,
    pipeline_config_kwargs,
    read_model_index,
)

log = logging.getLogger(__name__)

_SUBCLASSES: dict[type, type] = {}


def execution_device_subclass(base: type) -> type:
    """`base` with `_execution_device` and `device` pinned to the engine's computation device."""
    if base in _SUBCLASSES:
        return _SUBCLASSES[base]

    def _execution_device(self: Any) -> torch.device:
        return self.__dict__["_engine_device"]

    sub = type(
        base.__name__,
        (base,),
        {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "_execution_device": property(_execution_device),
            "device": property(_execution_device),
        },
    )
    _SUBCLASSES[base] = sub
    return sub


class GenerationCancelled(Exception):
    """Raised inside the denoising loop when the user cancels (no decode follows)."""


@dataclass
class StepStats:
    """Streaming counters of one denoising step (summed over components)."""

    streamed_bytes: int = 0
    copy_seconds: float = 0.0
    compute_seconds: float = 0.0


# VAE tiling: decoding activations grow with the image; tile large images, and medium ones when
# the budget is small. Small images never tile, so the tiny test models give identical images
# at every vram_limit.
TILE_ALWAYS_PIXELS = 1536 * 1536
TILE_MIN_PIXELS = 768 * 768
DECODE_BYTES_PER_PIXEL = 1536  # rough peak activation bytes per output pixel of an SD-style VAE in bf16


def vae_memory_plan(width: int, height: int, vram_limit_gb: float | None) -> tuple[bool, bool]:
    """(tiling, slicing) for a decode of width x height under vram_limit_gb."""
    pixels = width * height
    tiling = pixels >= TILE_ALWAYS_PIXELS
    if not tiling and vram_limit_gb is not None and pixels >= TILE_MIN_PIXELS:
        tiling = pixels * DECODE_BYTES_PER_PIXEL > 0.25 * vram_limit_gb * 1024**3
    return tiling, True


def activation_bytes(
    width: int, height: int, batch: int = 1, reference_pixels: int = 0, input_pixels: int = 0, vae_element_bytes: int = 2
) -> int:
    """Rough peak activation bytes of one denoiser step (batch 2 with batched CFG) or of the
    decode at width x height (bf16). Reference-image latents join the denoiser's sequence
    (`reference_pixels`, edit models); an input image is VAE-encoded (`input_pixels`, its
    largest), which costs about what a decode of that size does. `vae_element_bytes`: 4 where
    the VAE computes in fp32 (beside fp16, below capability 8.0), which doubles the decode's."""
    pixels = width * height
    denoise = int(0.3 * 1024**3 + batch * (pixels + reference_pixels) * 1200)
    vae_pixels = max(pixels, input_pixels)
    tiling = vae_pixels >= TILE_ALWAYS_PIXELS
    decode = int(0.5 * 1024**3) if tiling else vae_pixels * DECODE_BYTES_PER_PIXEL
    return max(denoise, decode * vae_element_bytes // 2)


class ManagedPipeline:
    """One live pipeline: the diffusers object plus its budget, stage switch and statistics."""

    def __init__(
        self,
        pipe: Any,
        family: Family,
        components: dict[str, nn.Module],
        budget: MemoryPool,
        config: VramConfig,
        path: Path,
    ):
        self.pipe = pipe
        self.family = family
        self.components = components
        self.budget = budget
        self.config = config
        self.path = Path(path)
        self.device = config.computation_device
        self.stage: str | None = None
        self._on_stage: Callable[[str], None] | None = None  # the running generation's (generate's on_stage)
        self._runtime_names = {id(runtime_of(m)): name for name, m in components.items()}
        self._lock = threading.RLock()
        self.batcher: CfgPairBatcher | None = None
        if family.pair_batched_cfg:
            self.batcher = CfgPairBatcher.install(components[family.denoiser])
        budget.on_demand = self._on_demand
        # the denoiser streams every step: it gets the pinned RAM first (engine.runtime.pool)
        runtime_of(components[family.denoiser]).pin_priority = 0
        pipe.set_progress_bar_config(disable=True)
        self.vae_tiling = False
        self._step_mark = StepStats()
        self.stage_floor_bytes: dict[str, int] = {}
        self.last_step = StepStats()
        # set by build_pipeline: what the diffusers object was built from (image-to-image reuses it)
        self.parts: dict[str, Any] = dict(getattr(pipe, "components", {}) or {})
        self.pipe_config: dict[str, Any] = {}
        self._img2img: Any = None
        self._encoding_inputs = False  # the VAE runs before the denoiser: it encodes input images

    def img2img_pipe(self) -> Any:
        """The family's image-to-image pipeline over the same managed components (built once)."""
        if self._img2img is None:
            self._img2img = image_inputs.build_img2img(self.pipe, self.family, self.parts, self.pipe_config, execution_device_subclass)
        return self._img2img

    # --- stages -------------------------------------------------------------------------------
    def switch(self, stage: str) -> None:
        """Onload the components of `stage`, offload the rest (offloads first: the ledger frees first)."""
        with self._lock:
            if stage == self.stage:
                return
            names = [n for n in self.components if self.family.stage_of(n) == stage]
            for name, model in self.components.items():
                if name not in names:
                    offload_model(model)
            if self.device.type == "cpu":  # what the offloads freed must show in MemAvailable before the onloads plan
                ram.return_freed_memory()
            for name in names:
                onload_model(self.components[name])
            # the planner's own floor for this stage, activations aside (they follow the resolution)
            self.stage_floor_bytes[stage] = self.budget.smallest_feasible_limit() - self.budget.activation_reserve_bytes
            self.stage = stage
            if stage == DENOISE:
                self._step_mark = self.stream_totals()
                self._encoding_inputs = False
        if self._on_stage is not None:
            # the VAE before the denoiser encodes input images: still the encoding phase
            self._on_stage(ENCODE if stage == DECODE and self._encoding_inputs else stage)

    def _on_demand(self, runtime: VramRuntime) -> None:
        name = self._runtime_names.get(id(runtime))
        if name is None:
            runtime.onload()
            return
        self.switch(self.family.stage_of(name))

    def offload_all(self) -> None:
        with self._lock:
            for model in self.components.values():
                offload_model(model)
            self.stage = None

    # --- budget -------------------------------------------------------------------------------
    def set_vram_limit(self, vram_limit_gb: float | None) -> None:
        """Re-plan residency under a new limit: no file is read, no component rebuilt."""
        set_vram_limit(self.budget, vram_limit_gb)

    @property
    def vram_limit(self) -> float | None:
        return self.budget.limit_gb

    # --- statistics -----------------------------------------------------------------------------
    def layer_states(self) -> dict[str, dict[str, int]]:
        return {name: layer_state_counts(model) for name, model in self.components.items()}

    def stream_totals(self) -> StepStats:
        out = StepStats()
        for model in self.components.values():
            runtime = runtime_of(model)
            runtime.collect_timings()
            s = runtime.stats
            out.streamed_bytes += s.streamed_bytes
            out.copy_seconds += s.copy_seconds
            out.compute_seconds += s.compute_seconds
        return out

    def _mark_step(self) -> StepStats:
        now = self.stream_totals()
        mark = self._step_mark
        self.last_step = StepStats(
            now.streamed_bytes - mark.streamed_bytes, now.copy_seconds - mark.copy_seconds, now.compute_seconds - mark.compute_seconds
        )
        self._step_mark = now
        return self.last_step

    def slots_in_flight(self) -> int:
        """Device slots the engine's transfer schedulers hold right now (0 without one)."""
        total = 0
        for model in self.components.values():
            scheduler = getattr(runtime_of(model), "scheduler", None)
            count = getattr(scheduler, "slots_in_flight", None)
            if callable(count):
                try:
                    total += int(count())
                except Exception:  # pragma: no cover - telemetry must never fail
                    pass
        return total

    def denoiser_forwards(self) -> int:
        return runtime_of(self.components[self.family.denoiser]).stats.forwards

    def smallest_feasible_limit_bytes(self, activation_bytes: int) -> int | None:
        """The smallest vram_limit every stage runs within, from the planner's reserves measured
        when each stage was onloaded, plus `activation_bytes`; None until every stage has run."""
        stages = {self.family.stage_of(name) for name in self.components}
        if not stages <= self.stage_floor_bytes.keys():
            return None
        return max(self.stage_floor_bytes[stage] for stage in stages) + activation_bytes

    def reserve_activations(self, width: int, height: int, batch: int = 1, reference_pixels: int = 0, input_pixels: int = 0) -> None:
        """On a GPU the VRAM limit covers activations too: the planner keeps room for them. On the
        CPU an explicit limit bounds the engine's ledger of weights (nothing reserved in it), and
        the activations come off the RAM room instead (engine.runtime.ram)."""
        fp16 = self.config.computation_dtype == torch.float16 and self.device.type == "cuda"  # the VAE computes in fp32 then
        act = activation_bytes(width, height, batch, reference_pixels, input_pixels, 4 if fp16 else 2)
        on_cpu = self.device.type == "cpu"
        self.budget.set_activations(0 if on_cpu else act, act if on_cpu else 0)

    # --- VAE ------------------------------------------------------------------------------------
    def configure_vae(self, width: int, height: int, input_pixels: int = 0) -> None:
        """Tiling/slicing for the decode and for encoding input images (the larger decides)."""
        vae = self.components.get("vae")
        if vae is None:
            return
        tiling, slicing = vae_memory_plan(width, height, self.budget.limit_gb)
        if input_pixels > width * height:
            tiling = vae_memory_plan(input_pixels, 1, self.budget.limit_gb)[0]
        if tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        elif hasattr(vae, "disable_tiling"):
            vae.disable_tiling()
        if slicing and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
        self.vae_tiling = tiling

    # --- one image ----------------------------------------------------------------------------
    def does_cfg(self, guidance: float, negative_prompt: str) -> bool:
        return self.family.does_cfg(guidance, negative_prompt)

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        seed: int,
        on_step: Callable[[int, int, StepStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_latents: Callable[[int, int, Any], None] | None = None,
        images: Any = (),
        strength: float | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> Any:
        """Run text (+ input images) -> PIL image. `on_step(i, n, stats)` after each step (n: the
        steps that run, fewer than `steps` in image-to-image); `should_stop()` True between steps
        raises GenerationCancelled (nothing is decoded). `on_latents(i, n, latents)` just before
        `on_step`, with the latents after step i (the live preview). `images`: PIL RGB images,
        already of a valid size: the input of image-to-image (with `strength`) or an edit model's
        references. `on_stage(stage)` at each stage switch of this generation ("encode",
        "denoise", "decode"; a VAE encoding input images reports "encode"); every generation
        starts with its own switch to "encode", whatever stage the last one ended in."""
        fam = self.family
        images = list(images or ())
        pipe = self.img2img_pipe() if images and fam.image_mode == "img2img" else self.pipe
        self.reserve_activations(
            width, height, cfg_batch(fam, guidance, negative_prompt),
            image_inputs.reference_pixels(fam, images), image_inputs.vae_input_pixels(fam, images),
        )
        # tiling follows the images as given (small ones never tile: the tiny edit pipelines give
        # the same image at every limit), though an edit pipeline encodes them at ~1024²
        self.configure_vae(width, height, max((im.width * im.height for im in images), default=0))
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        forwards_mark = [self.denoiser_forwards()]

        def step_end(_pipe: Any, i: int, _t: Any, _kw: dict[str, Any]) -> dict[str, Any]:
            n = int(getattr(_pipe, "_num_timesteps", None) or steps)
            if i + 2 == n:  # the next step is the last: as many forwards as this one ran
                self._expect_last_step(self.denoiser_forwards() - forwards_mark[0])
            forwards_mark[0] = self.denoiser_forwards()
            stats = self._mark_step()
            if on_latents is not None:
                on_latents(i + 1, steps, _kw.get("latents"))
            if on_step is not None:
                on_step(i + 1, n, stats)
            if should_stop is not None and should_stop():
                raise GenerationCancelled()
            if i + 1 == n:
                self.switch(DECODE)
            return {}

        kwargs: dict[str, Any] = {
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "generator": generator,
            "output_type": "pil",
            "callback_on_step_end": step_end,
            fam.guidance_arg: guidance,
            **image_inputs.image_kwargs(fam, images, strength, type(pipe).__call__, width * height),
        }
        self._encoding_inputs = bool(images)
        if should_stop is not None and should_stop():
            raise GenerationCancelled()
        cfg = fam.does_cfg(guidance, negative_prompt)
        self._on_stage = on_stage
        try:
            with self._lock:
                self.stage = None  # every generation switches to encode (and reports it), wherever the last one stopped
            self.switch(ENCODE)
            if fam.encode_prompts is not None:
                embeds = fam.encode_prompts(pipe, prompt, negative_prompt, cfg, self.device)
                kwargs.update(embeds)
                self._prime_cfg_pair(embeds)
            else:
                kwargs["prompt"] = prompt
                if fam.uses_negative_prompt and negative_prompt.strip():
                    kwargs["negative_prompt"] = negative_prompt
                elif cfg and fam.empty_negative_prompt is not None:  # the pipeline skips CFG without one
                    kwargs["negative_prompt"] = fam.empty_negative_prompt
            out = pipe(**kwargs)
        finally:
            self._on_stage = None
            self._encoding_inputs = False
            self._expect_last_step(None)
            if self.batcher is not None:
                self.batcher.clear()
        return out.images[0]

    def _prime_cfg_pair(self, embeds: dict[str, Any]) -> None:
        """Hand the batcher the cond/uncond embeddings the family's hook encoded (encode stage)."""
        if self.batcher is not None and "negative_prompt_embeds" in embeds:
            self.batcher.prime(
                embeds["prompt_embeds"],
                embeds["prompt_embeds_mask"],
                embeds["negative_prompt_embeds"],
                embeds["negative_prompt_embeds_mask"],
            )

    def _expect_last_step(self, forwards: int | None) -> None:
        """Tell the denoiser that only `forwards` more forwards come (None: unknown), so its
        scheduler does not prefetch, and read from disk, a step after the last one."""
        runtime_of(self.components[self.family.denoiser]).forwards_left = None if forwards is None else max(1, forwards)

    def close(self) -> None:
        """Drop every copy the engine holds (the object is unusable afterwards)."""
        try:
            self.offload_all()
        finally:
            self.budget.on_demand = None
            for model in self.components.values():
                try:
                    runtime_of(model).close()
                except Exception:  # pragma: no cover - best effort
                    log.debug("closing a streamer failed", exc_info=True)


def component_config(name: str, conv_kind: str | None, path: Path, config: VramConfig) -> VramConfig:
    """The config one component runs under: the pipeline's, except that on a CPU a component its
    family names in `cpu_conv_probes` (the VAE, all convolutions of `conv_kind`) computes in
    float32 when that measures faster than the pipeline's dtype there (engine.runtime.cpu_dtype);
    and on a GPU that computes in float16 (below capability 8.0: engine.runtime.cuda_facts.
    compute_dtypes) the VAE computes in float32, as the SD/SDXL/FLUX-style VAEs overflow float16."""
    import dataclasses

    device = config.computation_device
    if isinstance(device, torch.device) and device.type == "cuda" and conv_kind and config.computation_dtype == torch.float16:
        from engine.runtime.cuda_facts import VAE_DTYPE_BESIDE_FP16 as vae_dtype
        prep = vae_dtype if config.preparing_dtype == config.computation_dtype else config.preparing_dtype
        return dataclasses.replace(config, computation_dtype=vae_dtype, preparing_dtype=prep)
    if not (isinstance(device, torch.device) and device.type == "cpu" and conv_kind):
        return config
    import json

    from engine.runtime.cpu_dtype import component_conv_dtype

    try:
        vae_config = json.loads((Path(path) / name / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return config
    dtype = component_conv_dtype(conv_kind, vae_config, config.computation_dtype)
    if dtype == config.computation_dtype:
        return config
    log.info("%s: computing in %s on the CPU (measured faster than %s)", name, dtype, config.computation_dtype)
    prep = dtype if config.preparing_dtype == config.computation_dtype else config.preparing_dtype
    return dataclasses.replace(config, computation_dtype=dtype, preparing_dtype=prep)


class VaeDtypeHook(ModelHook):
    """A VAE computing in another dtype than the pipeline (a CPU where float32 convolutions
    measure faster): its encode/decode take their input in the VAE's dtype (not every pipeline
    casts to `vae.dtype`, FLUX's does not), and encode hands its latents back in the pipeline's
    (image-to-image and edit latents go into the denoiser). A named hook, removable."""

    name = "lowvram.vae_dtype"
    methods = ("encode", "decode")

    def __init__(self, vae_dtype: torch.dtype, pipeline_dtype: torch.dtype):
        self.vae_dtype, self.pipeline_dtype = vae_dtype, pipeline_dtype

    def call(self, method: str, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
            args = (args[0].to(self.vae_dtype), *args[1:])
        out = inner(*args, **kwargs)
        return _latents_to(out, self.pipeline_dtype) if method == "encode" else out


def _latents_to(value: Any, dtype: torch.dtype) -> Any:
    """An encode's output (AutoencoderKLOutput, its latent distribution, a tuple, a tensor) in `dtype`."""
    dist = getattr(value, "latent_dist", None)
    if dist is not None:
        _latents_to(dist, dtype)
        return value
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_latents_to(v, dtype) for v in value)
    for attr in ("parameters", "mean", "logvar", "std", "var"):  # DiagonalGaussianDistribution
        tensor = getattr(value, attr, None)
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            setattr(value, attr, tensor.to(dtype))
    return value


def build_pipeline(
    path: str | Path,
    vram_config: dict[str, Any] | VramConfig | None = None,
    vram_limit: float | None = None,
    *,
    variant: str | None = None,
    stored_form: str | None = None,
) -> ManagedPipeline:
    """Build the pipeline in the diffusers repo at `path` with every weighted component managed
    under `vram_config`, all sharing one budget of `vram_limit` GB; everything starts offloaded.
    `stored_form`: with disk offload, the storage form the weights stream in (load_component)."""
    import diffusers

    path = Path(path)
    config = VramConfig.from_dict(vram_config)
    budget = MemoryPool(limit_gb=vram_limit)  # the pool checks the limit
    index = read_model_index(path)
    family = family_for(index["_class_name"])
    classes = component_classes(index)
    for name, cls in classes.items():  # a weighted component with no declared stage: refused before any load
        if is_weighted(cls) and name not in family.stages:
            raise ValueError(f"{path}: model_index.json lists the weighted component {name!r} ({cls.__name__}); {family.no_stage(name)}")
    components: dict[str, nn.Module] = {}
    parts: dict[str, Any] = {}
    for name, cls in classes.items():
        if is_weighted(cls):
            own = component_config(name, family.cpu_conv_probes.get(name), path, config)
            components[name] = load_component(name, cls, path, own, budget, variant, stored_form)
            if own.computation_dtype != config.computation_dtype:
                register_hook(components[name], VaeDtypeHook(own.computation_dtype, config.computation_dtype))
            parts[name] = components[name]
        else:
            parts[name] = load_aux_component(name, cls, path)
    if family.denoiser not in components:
        raise ValueError(f"{path}: no {family.denoiser!r} component in model_index.json")
    base = getattr(diffusers, index["_class_name"])
    cls = execution_device_subclass(base)
    params = inspect.signature(base.__init__).parameters
    extra = {k: v for k, v in pipeline_config_kwargs(index).items() if k in params}
    pipe = cls(**{k: v for k, v in parts.items() if k in params}, **extra)
    pipe.__dict__["_engine_device"] = config.computation_device
    managed = ManagedPipeline(pipe, family, components, budget, config, path)
    managed.parts, managed.pipe_config = parts, pipeline_config_kwargs(index)
    return managed
