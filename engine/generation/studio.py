"""`Studio`: the one object the UI talks to.

    studio = Studio(models_dir, outputs_dir, source="hf")
    studio.list_models() -> list[ModelChoice]
    studio.default_model_id() -> str
    studio.hardware() -> HardwareInfo
    studio.estimate(request) -> MemoryEstimate          (no loading, no download)
    studio.telemetry() -> TelemetrySnapshot             (thread-safe, cheap)
    for item in studio.generate(request, cancel_event):  # GenerationEvent ..., then GenerationResult
        ...

`generate` validates the request when called (a bad request raises UserFacingError at once,
before anything heavy) and returns an iterator. Iterating runs the work on a worker thread and
yields its events as they happen: phase "downloading" (with download_fraction) and "loading"
when needed, then "encoding", "denoising" (once per step, with step i of n, seconds per step and a
telemetry snapshot), "decoding", "done", and finally the GenerationResult, whose PNG (with its
A1111-style "parameters" text chunk) is already on disk. Setting `cancel` stops between steps:
a "cancelled" event ends the stream and nothing is decoded. A failure yields an "error" event and
then raises (UserFacingError for problems the user can fix). The Studio stays usable afterwards.

One live pipeline, rebuilt lazily: another model, or another FP8/disk choice, rebuilds it at
generate time; another VRAM limit only re-plans the shared budget (no file is read).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from engine.generation.types import (
    GenerateRequest,
    GenerationEvent,
    GenerationResult,
    HardwareInfo,
    Machine,
    MemoryEstimate,
    ModelChoice,
    SuggestedSettings,
    TelemetrySnapshot,
    UserFacingError,
)
from engine.generation.pipelines import (
    FAMILIES,
    GenerationCancelled,
    ManagedPipeline,
    StepStats,
    activation_bytes,
    build_pipeline,
)
from engine.generation.settings import STORAGE_SIZE_FACTORS, EngineSettings, detect_hardware, settings_for
from engine.generation.lora_library import LoraChoice, LoraLibrary, check_loras, factor_bytes
from engine.generation.preview import Previewer
from engine.generation.suggest import StepWork, suggest_settings

log = logging.getLogger(__name__)

GB = 1024**3
#: a new generation waits this long for the previous one to stop before it is refused
BUSY_WAIT_S = 60.0
#: the temporary name a PNG is written under before it is renamed into place
PARTIAL_SUFFIX = ".partial"
SEED_MAX = 2**32 - 1
FP8_SIZE_FACTOR = 0.52  # FP8 weight matrices + per-row scales + the bf16 vectors, of the bf16 bytes


def _default_registry() -> Any:
    import model_registry

    return model_registry


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with every default filled in."""

    request: GenerateRequest
    entry: Any  # model_registry.ModelEntry
    model_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    settings: EngineSettings
    inputs: Any = None  # engine.generation.input_images.PreparedImages (None: no input image)
    strength: float | None = None

    @property
    def build_key(self) -> tuple[Any, ...]:
        return (self.model_id,) + self.settings.build_key


def _is_vram_exhausted(exc: BaseException) -> bool:
    try:
        from engine.runtime.oom import VramExhaustedError, is_oom
    except ImportError:  # pragma: no cover
        return isinstance(exc, torch.OutOfMemoryError)
    return isinstance(exc, VramExhaustedError) or is_oom(exc)


# --- infotext ---------------------------------------------------------------------------------
def _fmt_number(value: float) -> str:
    return f"{value:g}"


def describe_vram_limit(r: ResolvedRequest) -> str:
    """The limit the run used: Auto (and what it came to), unlimited, or N GB."""
    used = r.settings.vram_limit
    shown = "unlimited" if used is None else f"{_fmt_number(float(used))} GB"
    return f"Auto ({shown})" if r.settings.limit_is_auto else shown


def infotext(r: ResolvedRequest, sampler: str, loras: tuple[tuple[str, float, str], ...] = ()) -> str:
    """A1111 "parameters" text: prompt, negative prompt line, then "Key: value" pairs (the
    settings the run actually used). LoRAs (name, strength, short hash) follow A1111:
    `<lora:name:strength>` appended to the prompt and a quoted `Lora hashes: "name: hash, ..."`
    field."""
    limit = describe_vram_limit(r)
    pairs = [
        ("Steps", str(r.steps)),
        ("Sampler", sampler),
        ("CFG scale", _fmt_number(r.guidance)),
        ("Seed", str(r.seed)),
        ("Size", f"{r.width}x{r.height}"),
        ("Model", r.model_id),
        ("VRAM limit", limit),
        ("FP8", "on" if r.settings.fp8 else "off"),
        ("Weights", r.settings.storage_name),
        ("Disk offload", "on" if r.settings.disk_offload else "off"),
    ]
    pairs += image_infotext_pairs(r)
    clean = lambda s: s.replace("\r", " ").replace("\n", " ")
    prompt = clean(r.prompt)
    if loras:
        prompt += "".join(f" <lora:{name}:{_fmt_number(strength)}>" for name, strength, _ in loras)
        pairs.append(("Lora hashes", '"' + ", ".join(f"{name}: {h}" for name, _, h in loras) + '"'))
    return f"{prompt}\nNegative prompt: {clean(r.negative_prompt)}\n" + ", ".join(f"{k}: {v}" for k, v in pairs)


def image_infotext_pairs(r: ResolvedRequest) -> list[tuple[str, str]]:
    """The inputs, for the infotext: strength (image-to-image), then each image's original size,
    the size it was used at and a hash of its file."""
    if r.inputs is None or not r.inputs.images:
        return []
    pairs = [("Denoising strength", _fmt_number(r.strength))] if r.strength is not None else []
    pairs.append(("Input images", str(len(r.inputs.images))))
    pairs += [(f"Input image {i + 1}", im.describe()) for i, im in enumerate(r.inputs.images)]
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """Inverse of `infotext` (for tests and "load parameters from PNG")."""
    lines = text.split("\n")
    out = {"prompt": lines[0]}
    rest = lines[1:]
    if rest and rest[0].startswith("Negative prompt:"):
        out["negative_prompt"] = rest[0][len("Negative prompt:") :].strip()
        rest = rest[1:]
    # values in double quotes (A1111's "Lora hashes") may contain ", "
    for m in re.finditer(r'\s*([^:,]+): ("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', ", ".join(rest)):
        k, v = m.group(1).strip(), m.group(2).strip()
        out[k] = v[1:-1] if v.startswith('"') and v.endswith('"') else v
    return out


#: the ETA averages the seconds of this many most recent steps (the first step warms up)
ETA_WINDOW = 5


def eta_seconds(durations: list[float], steps_left: int) -> float:
    """Time left: the mean of the last ETA_WINDOW measured steps times the steps still to run
    (the first step, slower with its warm-up, counts only while it is the only one)."""
    if steps_left <= 0 or not durations:
        return 0.0
    recent = durations[1:][-ETA_WINDOW:] or durations
    return steps_left * sum(recent) / len(recent)


def _size_hint(v: int, multiple: int, lo: int, hi: int) -> str:
    """The nearest valid sizes around `v`, inside lo..hi (multiples of `multiple`)."""
    first = -(-lo // multiple) * multiple  # smallest multiple >= lo
    last = hi // multiple * multiple
    if first > last:
        return f"No multiple of {multiple} lies in {lo}..{hi}."
    lower = min(max(v - v % multiple, first), last)
    upper = min(max(lower + multiple, first), last)
    if v < first or v > last or lower == upper:
        return f"Use {min(max(lower, first), last)} (sizes go from {first} to {last})."
    return f"Use {lower} or {upper}."


def _live_lora_bytes(pipe: Any) -> int:
    if pipe is None:
        return 0
    try:
        from engine.lora.loras import lora_bytes

        return lora_bytes(pipe)
    except Exception:  # telemetry only
        return 0


# --- size estimates -------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _stream_unit_bytes(library: str, class_name: str, config_id: str) -> tuple[int, int] | None:
    """Bytes (bf16) of the largest single managed layer and of the largest block (the unit the
    GPU scheduler streams per slot, by the shipped module map) of a component, built on meta."""
    try:
        from model_registry.sizes import build_on_meta, load_component_configs

        from engine.layers.module_maps import block_paths_for

        config = load_component_configs()[config_id]
        model = build_on_meta(library, class_name, config)
        paths = block_paths_for(model)
    except Exception:  # pragma: no cover - estimate only
        log.debug("meta build of %s failed", class_name, exc_info=True)
        return None
    largest = 0
    for module in model.modules():
        n = sum(p.numel() for p in module.parameters(recurse=False))
        largest = max(largest, 2 * n)
    block = largest
    for path in paths:
        for child in model.get_submodule(path).children():
            block = max(block, 2 * sum(p.numel() for p in child.parameters()))
    return largest, block


def _catalogued_sizes(entry: Any, fam: Any) -> dict[str, int]:
    """bf16 bytes of each catalogued component (a GGUF denoiser: its file's bytes); the demo's
    tiny sizes when none are catalogued. The download figure, and the size formula's input."""
    sizes = {name: (c.bytes_bf16 or 0) for name, c in entry.components.items() if c.bytes_bf16 is not None}
    if getattr(entry, "gguf", None) is not None and fam.denoiser in sizes:  # the file's blocks, as stored
        sizes[fam.denoiser] = entry.gguf.bytes
    if not sizes:  # the demo: tiny, sizes not catalogued
        sizes = {"text_encoder": 2 * 1024**2, fam.denoiser: 2 * 1024**2, "vae": 1024**2}
    return sizes


def _denoiser_forwards(fam: Any, r: ResolvedRequest, unbatched_cfg: bool) -> int:
    """Denoiser forwards per step: two where classifier-free guidance runs as two passes. A
    pipeline that encodes its own prompts is handed the negative prompt only when there is one
    (ManagedPipeline.generate), and without it Qwen-Image-Edit's true CFG does not run."""
    if not unbatched_cfg:
        return 1
    return 2 if fam.encode_prompts is not None or r.negative_prompt.strip() else 1


def _image_activation_args(fam: Any, r: ResolvedRequest) -> tuple[int, int]:
    """(reference pixels, largest input pixels) of the request's input images, for activation_bytes."""
    if r.inputs is None or not r.inputs.images:
        return 0, 0
    from engine.generation.pipelines.images import reference_pixels, vae_input_pixels

    images = [im.image for im in r.inputs.images]
    return reference_pixels(fam, images), vae_input_pixels(fam, images)


class Studio:
    """Engine facade for the UI. Never moves tensors for it; one generation at a time."""

    def __init__(
        self,
        models_dir: Path | str,
        outputs_dir: Path | str,
        source: str = "hf",
        *,
        device: str | torch.device | None = None,
        registry: Any = None,
        download_dir: Path | str | None = None,
        lora_dir: Path | str | None = None,
    ):
        """`device`: computation device (default CUDA if present, else CPU). `registry`: an object
        with model_registry's verbs (tests pass one with extra tiny models); default model_registry.
        `download_dir`: where hub downloads go (the hubs' cache layouts inside it); None = the
        standard Hugging Face / ModelScope caches."""
        self._registry_obj = registry
        self.models_dir = Path(models_dir)
        self.download_dir = Path(download_dir) if download_dir is not None else None
        self.outputs_dir = Path(outputs_dir)
        self.source = source
        self._device = torch.device(device) if device is not None else None
        self._hardware: HardwareInfo | None = None
        self._busy = threading.Lock()  # held for a whole generation
        self._pipe_lock = threading.Lock()  # guards the reference swap
        self._pipeline: ManagedPipeline | None = None
        self._pipeline_key: tuple[Any, ...] | None = None
        self._last_step = StepStats()
        self.last_previewer: Previewer | None = None  # the last run's (its preview count and cost)
        self.builds = 0  # pipelines built so far (tests: rebuild vs re-plan)
        self.lora_library = LoraLibrary(lora_dir if lora_dir is not None else Path("loras"))
        self.remove_partial_outputs()

    def remove_partial_outputs(self) -> list[Path]:
        """Delete PNGs a crash left half-written (their temporary names); returns what went."""
        removed: list[Path] = []
        try:
            leftovers = list(self.outputs_dir.glob(f".*.png{PARTIAL_SUFFIX}"))
        except OSError:
            return removed
        for path in leftovers:
            try:
                path.unlink()
                removed.append(path)
            except OSError:  # pragma: no cover - another process, permissions
                log.warning("could not remove the partial output %s", path)
        if removed:
            log.info("removed %d partial output(s) left by an earlier crash", len(removed))
        return removed

    def _reg(self) -> Any:
        return self._registry_obj if self._registry_obj is not None else _default_registry()

    # --- catalogue ------------------------------------------------------------------------------
    def list_models(self) -> list[ModelChoice]:
        return self._reg().model_choices(self.models_dir)

    def default_model_id(self) -> str:
        return self._reg().default_model_id(self.models_dir)

    def list_loras(self, model_id: str | None = None) -> list[LoraChoice]:
        """LoRAs of the LoRA folder for `model_id`'s family (all when None or unknown)."""
        family = None
        if model_id:
            try:
                family = self._reg().get_model(model_id).family
            except Exception:
                family = None
        return self.lora_library.choices(family)

    def hardware(self) -> HardwareInfo:
        if self._hardware is None:
            self._hardware = detect_hardware()
        return self._hardware

    # --- validation -------------------------------------------------------------------------------
    def resolve(self, request: GenerateRequest, *, estimate: bool = False) -> ResolvedRequest:
        """Validate `request` and fill in defaults. UserFacingError says what to change.
        (`estimate`: an edit model may be estimated before its images are given.)"""
        if not isinstance(request, GenerateRequest):
            raise UserFacingError("Internal error: generate() needs a GenerateRequest.")
        registry = self._reg()
        model_id = request.model or self.default_model_id()
        try:
            entry = registry.get_model(model_id)
        except UserFacingError:
            raise
        except Exception as exc:  # registry raising something else for an unknown id
            raise UserFacingError(f"Unknown model '{model_id}'.") from exc
        if entry.family not in FAMILIES:
            raise UserFacingError(f"{entry.name}: its family '{entry.family}' is not supported by this engine.")
        prompt = (request.prompt or "").strip()
        if not prompt:
            raise UserFacingError("The prompt is empty: describe the image you want.")
        negative = (request.negative_prompt or "").strip()
        d, lim = entry.defaults, entry.limits
        multiple = int(lim.get("size_multiple", 16) or 16)

        def size(name: str, value: int | None) -> int:
            v = d.get(name) if value is None else value
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
                raise UserFacingError(f"{name.capitalize()} must be a whole number of pixels, got {v!r}.")
            v = int(v)
            lo, hi = int(lim.get(f"min_{name}", multiple)), int(lim.get(f"max_{name}", 4096))
            if v % multiple:
                raise UserFacingError(f"{name.capitalize()} {v} is not a multiple of {multiple}. {_size_hint(v, multiple, lo, hi)}")
            if not lo <= v <= hi:
                raise UserFacingError(f"{name.capitalize()} {v} is outside what {entry.name} supports ({lo}..{hi} pixels).")
            return v

        inputs, strength, image_size = self._resolve_images(request, entry, FAMILIES[entry.family], lim, estimate)
        if image_size is not None:  # no size asked for: the input image's, fitted to the model
            request = replace(request, width=request.width or image_size[0], height=request.height or image_size[1])
        width, height = size("width", request.width), size("height", request.height)
        steps = d.get("steps") if request.steps is None else request.steps
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or (isinstance(steps, float) and not steps.is_integer()):
            raise UserFacingError(f"Steps must be a whole number, got {steps!r}.")
        steps = int(steps)
        lo_s, hi_s = int(lim.get("min_steps", 1)), int(lim.get("max_steps", 150))
        if not lo_s <= steps <= hi_s:
            raise UserFacingError(f"Steps {steps} is outside {lo_s}..{hi_s} for {entry.name}.")
        guidance = d.get("guidance") if request.guidance is None else request.guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(float(guidance)):
            raise UserFacingError(f"Guidance must be a number, got {guidance!r}.")
        guidance = float(guidance)
        lo_g, hi_g = float(lim.get("min_guidance", 0.0)), float(lim.get("max_guidance", 30.0))
        if not lo_g <= guidance <= hi_g:
            raise UserFacingError(f"Guidance {guidance:g} is outside {lo_g:g}..{hi_g:g} for {entry.name}.")
        seed = request.seed
        if seed is None or seed == -1:
            seed = random.SystemRandom().randrange(SEED_MAX + 1)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise UserFacingError(f"Seed must be a whole number from 0 to {SEED_MAX}, or -1 for a random seed; got {seed!r}.")
        check_loras(request.loras)
        settings = settings_for(request, self.hardware(), self._device, gguf=getattr(entry, "gguf", None) is not None)
        if settings.disk_offload:
            from engine.generation.pipelines.components import engine_loader

            if engine_loader() is None:
                raise UserFacingError("Disk offload is not available in this build; untick it.")
        if inputs is not None:
            inputs = self._fit_inputs(inputs, request, entry, FAMILIES[entry.family], lim, (width, height))
            if strength is not None:
                from engine.generation.pipelines.images import img2img_steps

                if img2img_steps(FAMILIES[entry.family], steps, strength) < 1:
                    raise UserFacingError(
                        f"Strength {strength:g} with {steps} steps runs no denoising step: raise the strength or the steps."
                    )
        return ResolvedRequest(request, entry, entry.id, prompt, negative, width, height, steps, guidance, seed, settings, inputs, strength)

    def _resolve_images(
        self, request: GenerateRequest, entry: Any, family: Any, limits: dict[str, Any], estimate: bool = False
    ) -> tuple[Any, float | None, tuple[int, int] | None]:
        """Check the images and strength against the model (engine.generation.input_images);
        (images read but not yet resized, strength, the size the first image suggests)."""
        from engine.generation import input_images as ii

        sources = request.images
        if sources is None:
            sources = ()
        elif not isinstance(sources, (list, tuple)):
            sources = (sources,)
        mode = family.image_mode
        if request.strength is not None:
            strength = ii.finite_strength(request.strength)
            if not sources:
                raise UserFacingError("Strength applies to image-to-image: give an input image, or leave strength empty.")
            if mode == "reference":
                raise UserFacingError(f"{entry.name} edits from reference images and takes no strength: leave strength empty.")
        else:
            strength = None
        if not sources:
            if family.requires_image and not estimate:
                n = family.max_images
                raise UserFacingError(f"{entry.name} edits images: give 1{f' to {n}' if n > 1 else ''} input image{'s' if n > 1 else ''}.")
            return None, None, None
        if mode == "img2img" and strength is None:
            from engine.generation.pipelines.images import DEFAULT_STRENGTH

            strength = DEFAULT_STRENGTH
        prepared = ii.prepare_images(list(sources), model_name=entry.name, max_images=family.max_images, limits=limits)
        return prepared, strength, prepared.size

    def _fit_inputs(self, prepared: Any, request: GenerateRequest, entry: Any, family: Any, limits: dict[str, Any], size: tuple[int, int]) -> Any:
        """Image-to-image: the input is the output's starting point, so it takes the output's size."""
        from engine.generation import input_images as ii

        if family.image_mode != "img2img":
            return prepared
        return ii.resize_first(prepared, size)

    # --- estimate ---------------------------------------------------------------------------------
    def _measured_floor(self, build_key: tuple[Any, ...], activations: int) -> int | None:
        """The current pipeline's smallest feasible limit, if it is the build `build_key` asks for."""
        pipe = self._pipeline
        if pipe is None or self._pipeline_key != build_key:
            return None
        return pipe.smallest_feasible_limit_bytes(activations)

    def estimate(self, request: GenerateRequest, hardware: HardwareInfo | None = None) -> MemoryEstimate:
        """What `request` needs, before anything loads. On a GPU (this host's, or `hardware`'s)
        the VRAM peak, the smallest feasible limit, the bytes streamed per step and the RAM come
        from the planner's plan of each stage over meta-built components (engine.generation.
        vram_estimate: the same costs and limits the memory pool would use); on a CPU host the RAM
        comes from the planner too (engine.generation.estimate) and the resident bound from the
        registry's sizes. An entry whose components have no config (the demo) falls back to the
        size formula (`_formula_figures`). Once the requested build has run every stage, the
        smallest feasible limit is the pipeline's own record (ManagedPipeline.
        smallest_feasible_limit_bytes). `hardware`: estimate for that machine instead of this one
        (suggest_settings' table tests)."""
        r = self.resolve(request if (request.prompt or "").strip() else replace(request, prompt="estimate"), estimate=True)
        if hardware is not None:  # another machine: its device kind and its Auto (a GGUF entry keeps its blocks)
            gguf = getattr(r.entry, "gguf", None) is not None
            r = replace(r, settings=settings_for(request, hardware, "cuda" if hardware.has_gpu else "cpu", gguf=gguf))
        entry, s, hw = r.entry, r.settings, hardware or self.hardware()
        fam = FAMILIES[entry.family]
        cfg = fam.does_cfg(r.guidance, r.negative_prompt)
        batched = (fam.pair_batched_cfg or fam.native_batched_cfg) and cfg
        act = activation_bytes(r.width, r.height, 2 if batched else 1, *_image_activation_args(fam, r))
        lora = self._lora_bytes_wanted(r.request)  # fixed bytes on the computation device
        limit = s.vram_limit
        budget = None if limit is None else int(limit * GB)
        sizes = _catalogued_sizes(entry, fam)
        warnings: list[str] = []
        planned = None
        if s.device.type != "cpu":
            planned = self._gpu_estimate(r, act, lora, _denoiser_forwards(fam, r, cfg and not batched), hardware)
        if planned is not None:
            vram, smallest, streamed, ram = planned.vram_bytes, planned.smallest_feasible_bytes, planned.streamed_bytes_per_step, planned.ram_bytes
            exact = self._measured_floor(r.build_key, act)
            if exact is not None:  # this build already ran every stage: the pipeline's record, with the wanted LoRAs
                smallest = exact - _live_lora_bytes(self._pipeline) + lora
        else:
            vram, smallest, streamed, ram = self._formula_figures(r, sizes, act, lora, budget)
        # Auto on a CPU with disk offload is limit 0 by design (settings_for): not the user's too-small limit
        explicit = hw.has_gpu or not s.limit_is_auto
        if budget is not None and budget < smallest and explicit:
            warnings.append(
                f"A VRAM limit of {limit:g} GB is below the smallest that works for this size "
                f"(about {math.ceil(smallest / GB * 10) / 10:g} GB): activations and the streaming reserve would not fit."
            )
        # another machine (suggest_settings' table): its RAM; this host: the RAM available now
        available = int(hardware.ram_total_gb * GB) if hardware is not None and hardware.ram_total_gb else None
        verdict = self._cpu_ram_verdict(r, available) if s.device.type == "cpu" else None
        if verdict is not None:  # the planner's own costs, against that RAM
            ram = verdict.estimate.total_bytes
        disk = sum(sizes.values())
        fits = True
        if hw.has_gpu and hw.vram_total_gb is not None and vram > hw.vram_total_gb * GB:
            fits = False
            warnings.append(f"Needs about {vram / GB:.1f} GB of VRAM but the GPU has {hw.vram_total_gb:.1f} GB: lower the VRAM limit.")
        if budget is not None and budget < smallest and explicit:
            fits = False
        if verdict is not None:
            if not verdict.fits:
                fits = False
                warnings.append(verdict.message)
            warnings.extend(verdict.estimate.notes)
        elif ram > 0.9 * hw.ram_total_gb * GB:
            fits = False
            tip = "" if s.disk_offload else " Tick disk offload" + ("" if s.fp8 else " or FP8") + "."
            warnings.append(f"Needs about {ram / GB:.1f} GB of RAM, this machine has {hw.ram_total_gb:.1f} GB.{tip}")
        if streamed:
            warnings.append(f"Streams about {streamed / GB:.1f} GB of weights per step: steps will be slower than with a higher limit.")
        if planned is not None:
            warnings.extend(planned.notes)
        try:
            downloaded = self._reg().is_downloaded(r.model_id, self.models_dir)
        except Exception:  # pragma: no cover - estimate only
            downloaded = True
        if not downloaded:
            warnings.append(f"{entry.name} is not downloaded yet: the first run downloads about {disk / 1e9:.1f} GB.")
        return MemoryEstimate(
            storage=s.storage_label,
            vram_gb=round(vram / GB, 3),
            ram_gb=round(ram / GB, 3),
            disk_gb=round(disk / 1e9, 3),  # decimal GB, like ModelChoice.size_gb
            streamed_gb_per_step=round(streamed / GB, 3),
            fits=fits,
            warnings=tuple(warnings),
            smallest_feasible_vram_limit_gb=math.ceil(smallest / GB * 10) / 10,
            lora_bytes=lora,
        )

    def _local_path(self, r: ResolvedRequest) -> Path | None:
        """The model's folder when it is on disk (not the demo, which would be written now):
        its config files stand in for configs the catalogue does not list (None when it lists
        them all: no file system look-up in suggest_settings' loops)."""
        components = r.entry.components
        listed = all(components.get(n) is not None and components[n].config_id for n in FAMILIES[r.entry.family].weighted)
        if r.entry.is_demo or listed:
            return None
        try:
            registry = self._reg()
            if not registry.is_downloaded(r.model_id, self.models_dir):
                return None
            path = registry.local_path(r.model_id, self.models_dir)
        except Exception:  # pragma: no cover - estimate only
            return None
        return Path(path) if path is not None else None

    def _gpu_estimate(self, r: ResolvedRequest, act: int, lora: int, forwards: int, hardware: HardwareInfo | None) -> Any:
        """engine.generation.vram_estimate's plans for `r` on a GPU (None: a component without a
        config, or a meta build that failed; the formula stands in)."""
        try:
            from engine.generation.vram_estimate import gpu_estimate

            s = r.settings
            ram_total = int(hardware.ram_total_gb * GB) if hardware is not None and hardware.ram_total_gb else None
            return gpu_estimate(
                r.entry, FAMILIES[r.entry.family], storage=s.storage_name, disk=s.disk_offload,
                limit_bytes=None if s.vram_limit is None else int(s.vram_limit * GB), activation_bytes=act, lora_bytes=lora,
                forwards_per_step=forwards, ram_total_bytes=ram_total, local_path=self._local_path(r),
            )
        except Exception:  # pragma: no cover - estimate only
            log.debug("GPU estimate failed", exc_info=True)
            return None

    def _formula_figures(self, r: ResolvedRequest, sizes: dict[str, int], act: int, lora: int, budget: int | None) -> tuple[int, int, int, int]:
        """(VRAM, smallest feasible limit, streamed bytes per step, RAM) from the registry's sizes:
        the fallback for entries without configs (the demo) and the resident bound on a CPU host.
        Stored bytes are the bf16 sizes times the form's factor; the smallest limit is the
        activations, a streamed layer (source + computation form) and on a GPU the scheduler's two
        slots of the largest block; what the limit cannot hold of the denoiser streams."""
        entry, s = r.entry, r.settings
        fam = FAMILIES[entry.family]
        factor = FP8_SIZE_FACTOR if s.storage_name == "fp8" else STORAGE_SIZE_FACTORS[s.storage_name]
        stored = {n: int(b * factor) for n, b in sizes.items()}
        stage_bytes: dict[str, int] = {}
        for name, b in stored.items():
            stage_bytes[fam.stage_of(name)] = stage_bytes.get(fam.stage_of(name), 0) + b
        weights_peak = max(stage_bytes.values())
        denoiser = stored.get(fam.denoiser, 0)
        comp = entry.components.get(fam.denoiser)
        units = _stream_unit_bytes(comp.library, comp.class_name, comp.config_id) if comp is not None and comp.config_id else None
        if units is None:  # no catalogued config: a layer (and a block) as ~3% of the denoiser
            units = (0.03 * sizes.get(fam.denoiser, 0),) * 2
        largest, block = int(units[0] * factor), int(units[1] * factor)
        slots = 2 * block if s.device.type != "cpu" else 0
        smallest = act + 2 * largest + slots
        exact = self._measured_floor(r.build_key, act)
        if exact is not None:  # this build already ran every stage: the planner's own figure
            smallest = exact - _live_lora_bytes(self._pipeline)
        smallest += lora
        weights_peak += lora
        if budget is None:
            vram, streamed = weights_peak + act, 0
        else:
            room = max(0, budget - smallest)
            vram = min(budget, weights_peak + act)
            streamed = max(0, denoiser - room) if budget < weights_peak + act else 0
        ram = (2 * largest if s.disk_offload else sum(stored.values())) + int(0.5 * GB)
        if s.device.type == "cpu":
            ram += act  # computation runs on the CPU
        return vram, smallest, streamed, ram

    # --- settings that fit ------------------------------------------------------------------------
    def machine(self) -> Machine:
        """This host for suggest_settings: its VRAM (None without a GPU), RAM and the free disk
        where models go."""
        import shutil

        hw = self.hardware()
        free = None
        where = self.download_dir or self.models_dir
        for folder in (where, *where.parents):
            if folder.exists():
                try:
                    free = shutil.disk_usage(folder).free / 1e9  # decimal GB, like MemoryEstimate.disk_gb
                except OSError:  # pragma: no cover
                    pass
                break
        return Machine(hw.vram_total_gb if hw.has_gpu else None, hw.ram_total_gb, free, hw.gpu_name)

    def step_work(self, request: GenerateRequest) -> StepWork:
        """What one denoising step of `request` computes (suggest's cost model)."""
        r = self.resolve(request if (request.prompt or "").strip() else replace(request, prompt="estimate"), estimate=True)
        fam = FAMILIES[r.entry.family]
        comp = r.entry.components.get(fam.denoiser)
        size = (comp.bytes_bf16 if comp is not None else None) or 2 * 1024**2
        batch = 2 if (fam.pair_batched_cfg or fam.native_batched_cfg) and fam.does_cfg(r.guidance, r.negative_prompt) else 1
        gguf = getattr(r.entry, "gguf", None)
        return StepWork(int(size), max(1, (r.width // 16) * (r.height // 16)), batch, gguf.bytes if gguf is not None else None)

    def suggest_settings(self, request: GenerateRequest, machine: Machine | None = None) -> SuggestedSettings:
        """The fastest storage form / disk offload / VRAM limit whose estimate fits `machine` (default: this
        host), for the request's model and size (engine.generation.suggest); no loading."""
        machine = machine or self.machine()
        req = request if (request.prompt or "").strip() else replace(request, prompt="estimate")
        model_id = self.resolve(req, estimate=True).model_id
        try:
            downloaded = bool(self._reg().is_downloaded(model_id, self.models_dir))
        except Exception:  # pragma: no cover - estimate only
            downloaded = True
        return suggest_settings(req, machine, self.estimate, self.step_work(req), downloaded)

    def _cpu_ram_verdict(self, r: ResolvedRequest, available_bytes: int | None = None) -> Any:
        """engine.generation.estimate's verdict for `r` on a CPU host with `available_bytes` of RAM
        free (None: this host, now); None when a component has no catalogued config."""
        try:
            from engine.generation.estimate import cpu_ram_verdict

            fam = FAMILIES[r.entry.family]
            batched = (fam.pair_batched_cfg or fam.native_batched_cfg) and fam.does_cfg(r.guidance, r.negative_prompt)
            limit = None if r.settings.vram_limit is None else int(r.settings.vram_limit * GB)
            reference, inputs = _image_activation_args(fam, r)
            return cpu_ram_verdict(
                r.entry, fam, storage=r.settings.storage_name, disk=r.settings.disk_offload, limit_bytes=limit,
                width=r.width, height=r.height, batch=2 if batched else 1, available_bytes=available_bytes,
                reference_pixels=reference, input_pixels=inputs, local_path=self._local_path(r),
            )
        except Exception:  # pragma: no cover - estimate only
            log.debug("RAM estimate failed", exc_info=True)
            return None

    # --- telemetry --------------------------------------------------------------------------------
    def telemetry(self) -> TelemetrySnapshot:
        """Memory and layer states now. Safe to call from another thread during a generation."""
        import psutil

        vram_used = vram_total = None
        if torch.cuda.is_available():
            try:
                free, total = torch.cuda.mem_get_info()
                vram_used, vram_total = (total - free) / GB, total / GB
            except RuntimeError:  # pragma: no cover
                pass
        vm = psutil.virtual_memory()
        pipe = self._pipeline
        states = pipe.layer_states() if pipe is not None else {}
        slots = pipe.slots_in_flight() if pipe is not None else 0
        last = self._last_step
        return TelemetrySnapshot(
            vram_used_gb=vram_used,
            vram_total_gb=vram_total,
            ram_used_gb=(vm.total - vm.available) / GB,
            ram_total_gb=vm.total / GB,
            layer_states=states,
            streamed_bytes_last_step=last.streamed_bytes,
            copy_seconds_last_step=last.copy_seconds,
            compute_seconds_last_step=last.compute_seconds,
            slots_in_flight=slots,
            timestamp=time.time(),
            lora_bytes=_live_lora_bytes(pipe),
            storage=self._pipeline_key[-1] if pipe is not None and self._pipeline_key else "",
        )

    # --- the live pipeline ----------------------------------------------------------------------
    @property
    def pipeline(self) -> ManagedPipeline | None:
        return self._pipeline

    def unload(self) -> None:
        """Drop the live pipeline (frees its memory)."""
        with self._pipe_lock:
            pipe, self._pipeline, self._pipeline_key = self._pipeline, None, None
        if pipe is not None:
            try:
                pipe.close()
            except Exception:  # pragma: no cover - best effort
                log.debug("closing the pipeline failed", exc_info=True)
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _model_path(self, r: ResolvedRequest, emit: Callable[[GenerationEvent], None], should_stop: Callable[[], bool]) -> Path:
        """The model's folder: a local copy (phase "loading" starts here, the demo is written on
        first use), else a download (phase "downloading" with its fraction)."""
        registry = self._reg()
        if registry.is_downloaded(r.model_id, self.models_dir):
            emit(GenerationEvent("loading", message=f"Loading {r.entry.name}", telemetry=self.telemetry()))
            path = registry.local_path(r.model_id, self.models_dir)
            if path is not None:
                return Path(path)

        def progress(fraction: float, message: str = "") -> None:
            if should_stop():
                raise GenerationCancelled()  # aborts the download
            emit(GenerationEvent("downloading", message=message, download_fraction=float(fraction), telemetry=self.telemetry()))

        emit(GenerationEvent("downloading", message=f"Downloading {r.entry.name}", download_fraction=0.0, telemetry=self.telemetry()))
        try:
            where = {"download_dir": self.download_dir} if self.download_dir is not None else {}
            path = Path(registry.download(r.model_id, self.source, progress=progress, models_dir=self.models_dir, **where))
        except OSError as exc:  # disk full etc. that the registry did not translate
            raise UserFacingError(f"Downloading {r.entry.name} failed: {exc}") from exc
        if should_stop():
            raise GenerationCancelled()
        emit(GenerationEvent("loading", message=f"Loading {r.entry.name}", telemetry=self.telemetry()))
        return path

    def _ensure_pipeline(self, r: ResolvedRequest, emit: Callable[[GenerationEvent], None], should_stop: Callable[[], bool]) -> ManagedPipeline:
        pipe = self._pipeline
        if pipe is not None and self._pipeline_key == r.build_key:
            if pipe.vram_limit != r.settings.vram_limit:
                pipe.set_vram_limit(r.settings.vram_limit)  # re-plan only: no file is read
            return pipe
        self.unload()  # free the old pipeline before anything new is read
        path = self._model_path(r, emit, should_stop)
        if r.settings.device.type == "cpu":  # refuse a load that would exhaust RAM (engine.generation.estimate)
            verdict = self._cpu_ram_verdict(r)
            if verdict is not None and not verdict.fits:
                raise UserFacingError(f"Not loading: {verdict.message}")
        variant = None
        try:
            variant = self._reg().load_options(r.model_id, path).get("variant")
        except Exception:  # pragma: no cover - a registry without load_options
            variant = None
        try:
            pipe = build_pipeline(path, r.settings.vram_config, r.settings.vram_limit, variant=variant)
        except UserFacingError:
            raise
        except MemoryError as exc:
            raise UserFacingError(f"Not enough RAM to load {r.entry.name}: tick disk offload or FP8.") from exc
        except (OSError, ValueError) as exc:
            raise UserFacingError(f"Loading {r.entry.name} from {path} failed: {exc}") from exc
        with self._pipe_lock:
            self._pipeline, self._pipeline_key = pipe, r.build_key
        self.builds += 1
        return pipe

    # --- LoRAs ------------------------------------------------------------------------------------
    def _apply_loras(self, pipe: ManagedPipeline, r: ResolvedRequest, emit: Callable[[GenerationEvent], None]) -> tuple[tuple[str, float, str], ...]:
        """Make the pipeline's active LoRAs the request's: new ones are loaded, changed strengths
        re-weighted, dropped ones removed. No base weight is read and the pipeline is not rebuilt
        (engine.lora). All or nothing: if one LoRA fails, the ones loaded here are taken off again
        and the previous set stays active. Returns (name, strength, short hash) for the infotext."""
        from engine.lora.formats import LoraError
        from engine.lora.loras import active_loras, load_lora, remove_lora, set_lora_strength

        def progress(fraction: float, message: str = "") -> None:
            emit(GenerationEvent("downloading", message=message, download_fraction=float(fraction), telemetry=self.telemetry()))

        wanted = [(lora_id, strength, self.lora_library.resolve(lora_id, progress).resolve()) for lora_id, strength in r.request.loras]
        active = {h.path.resolve(): h for h in active_loras(pipe)}
        keep = {path for _, _, path in wanted}
        loaded = []
        try:
            for lora_id, strength, path in wanted:
                if path not in active:
                    name = Path(lora_id.removeprefix("hf:")).name.removesuffix(".safetensors")
                    handle = load_lora(pipe, path, strength=strength, name=name)
                    loaded.append(handle)
                    active[path] = handle
        except LoraError as exc:
            for handle in loaded:
                remove_lora(pipe, handle)
            raise UserFacingError(f"{exc} (the previous LoRAs stay active)") from exc
        for path, handle in list(active.items()):
            if path not in keep:
                remove_lora(pipe, handle)
        out = []
        for lora_id, strength, path in wanted:
            handle = active[path]
            if handle.strength != strength:
                set_lora_strength(pipe, handle, strength)
            out.append((handle.name, strength, handle.short_hash))
        return tuple(out)

    def _lora_bytes_wanted(self, request: GenerateRequest) -> int:
        """Bytes of the request's LoRA factors on the computation device (local files only)."""
        total = 0
        for lora_id, _ in request.loras:
            try:
                if lora_id.startswith("hf:"):
                    continue  # not downloaded yet: counted once it is
                total += factor_bytes(self.lora_library.resolve(lora_id))
            except (UserFacingError, OSError, ValueError):
                continue  # the generation reports it
        return total

    # --- generation -----------------------------------------------------------------------------
    def generate(self, request: GenerateRequest, cancel: threading.Event | None = None) -> Iterator[GenerationEvent | GenerationResult]:
        """Validate now (UserFacingError for bad input), then stream the events of one generation."""
        resolved = self.resolve(request)
        return self._stream(resolved, cancel)

    def _stream(self, r: ResolvedRequest, cancel: threading.Event | None) -> Iterator[GenerationEvent | GenerationResult]:
        # the previous run may still be on its way to the next step boundary (cancelled): wait for it
        if not self._busy.acquire(timeout=BUSY_WAIT_S):
            raise UserFacingError("A generation is already running: wait for it to finish or cancel it.")
        items: queue.Queue = queue.Queue()
        stop = threading.Event()

        def should_stop() -> bool:
            return stop.is_set() or (cancel is not None and cancel.is_set())

        worker = threading.Thread(target=self._work, args=(r, items.put, should_stop), name="studio-generate", daemon=True)
        try:
            worker.start()
            while True:
                kind, item = items.get()
                if kind == "item":
                    yield item
                elif kind == "error":
                    yield GenerationEvent("error", message=str(item), telemetry=self.telemetry())
                    raise item
                else:  # "end"
                    return
        finally:
            stop.set()  # the consumer went away: stop at the next step
            worker.join()
            self._busy.release()

    def _work(self, r: ResolvedRequest, put: Callable[[tuple[str, Any]], None], should_stop: Callable[[], bool]) -> None:
        emit = lambda ev: put(("item", ev))
        try:
            if should_stop():
                raise GenerationCancelled()
            pipe = self._ensure_pipeline(r, emit, should_stop)
            loras = self._apply_loras(pipe, r, emit)
            image = self._run(pipe, r, emit, should_stop)
            if should_stop():  # cancelled during the last step or the decode: nothing is saved
                raise GenerationCancelled()
            path, text = self._save(image, r, pipe, loras)
            emit(GenerationEvent("done", step=r.steps, total_steps=r.steps, message=f"Saved {path.name}", telemetry=self.telemetry()))
            emit(
                GenerationResult(
                    image=image,
                    path=path,
                    parameters=text,
                    settings={
                        "model": r.model_id,
                        "prompt": r.prompt,
                        "negative_prompt": r.negative_prompt,
                        "width": r.width,
                        "height": r.height,
                        "steps": r.steps,
                        "guidance": r.guidance,
                        "seed": r.seed,
                        "vram_limit": r.settings.vram_limit,
                        "fp8": r.settings.fp8,
                        "weights": r.settings.storage_name,
                        "disk_offload": r.settings.disk_offload,
                        "vae_tiling": pipe.vae_tiling,
                        "loras": [(name, strength) for name, strength, _ in loras],
                        "strength": r.strength,
                        "input_images": [im.describe() for im in r.inputs.images] if r.inputs is not None else [],
                        "input_notes": list(r.inputs.notes) if r.inputs is not None else [],
                    },
                )
            )
        except GenerationCancelled:
            emit(GenerationEvent("cancelled", message="Cancelled: nothing was decoded.", telemetry=self.telemetry()))
        except UserFacingError as exc:
            put(("error", exc))
        except Exception as exc:
            log.exception("generation failed")
            if _is_vram_exhausted(exc):  # the engine already retried once with less residency
                message = str(exc) if not isinstance(exc, torch.OutOfMemoryError) else ""
                exc = UserFacingError(
                    message or "Out of memory: lower the VRAM limit (or set it to 0), tick FP8 or disk offload, or make the image smaller."
                )
            put(("error", exc))
        finally:
            put(("end", None))

    def _run(self, pipe: ManagedPipeline, r: ResolvedRequest, emit: Callable[[GenerationEvent], None], should_stop: Callable[[], bool]) -> Any:
        phases = {"encode": "encoding", "denoise": "denoising", "decode": "decoding"}
        clock = {"t": time.perf_counter()}
        durations: list[float] = []
        previewer = Previewer(pipe.family.latent_rgb, r.width, r.height) if r.request.preview else None
        made: dict[str, Any] = {"image": None}
        self.last_previewer = previewer

        def on_stage(stage: str) -> None:
            clock["t"] = time.perf_counter()
            if stage == "denoise" and previewer is not None:
                previewer.start()
            emit(GenerationEvent(phases[stage], step=0, total_steps=r.steps, telemetry=self.telemetry()))

        def on_latents(i: int, n: int, latents: Any) -> None:
            if previewer is not None:
                made["image"] = previewer(latents, i, n)

        def on_step(i: int, n: int, stats: StepStats) -> None:
            now = time.perf_counter()
            seconds, clock["t"] = now - clock["t"], now
            durations.append(seconds)
            self._last_step = stats
            image, made["image"] = made["image"], None
            emit(
                GenerationEvent(
                    "denoising", step=i, total_steps=n, seconds_per_step=seconds, telemetry=self.telemetry(),
                    eta_seconds=eta_seconds(durations, n - i), preview=image,
                    preview_index=previewer.count if previewer is not None else 0,
                )
            )

        pipe.on_stage = on_stage
        pipe.stage = None  # every generation starts with an explicit switch to encoding
        try:
            return pipe.generate(
                r.prompt,
                r.negative_prompt,
                width=r.width,
                height=r.height,
                steps=r.steps,
                guidance=r.guidance,
                seed=r.seed,
                on_step=on_step,
                should_stop=should_stop,
                on_latents=on_latents if previewer is not None else None,
                images=[im.image for im in r.inputs.images] if r.inputs is not None else (),
                strength=r.strength,
            )
        finally:
            pipe.on_stage = None

    def _save(self, image: Any, r: ResolvedRequest, pipe: ManagedPipeline, loras: tuple[tuple[str, float, str], ...] = ()) -> tuple[Path, str]:
        from PIL.PngImagePlugin import PngInfo

        text = infotext(r, pipe.family.sampler, loras)
        info = PngInfo()
        info.add_text("parameters", text)
        partial: Path | None = None
        try:
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            n = 0
            while True:
                path = self.outputs_dir / f"{stamp}-{r.model_id}-{r.seed}{f'-{n}' if n else ''}.png"
                if not path.exists():
                    break
                n += 1
            # written under a hidden temporary name in the same folder, flushed to disk, then
            # renamed: a crash leaves no file under the final name (the leftover goes at start)
            partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
            with open(partial, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
            partial = None
        except OSError as exc:
            raise UserFacingError(f"Could not save the image into {self.outputs_dir}: {exc}. Free some disk space or choose another folder.") from exc
        finally:
            if partial is not None:
                partial.unlink(missing_ok=True)
        return path, text
