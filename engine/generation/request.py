"""A request, checked and completed (`Resolver`), and the parameters text of its image.

    resolver = Resolver(registry, models_dir, device, hardware=detect_hardware)
    r = resolver(request)                       # ResolvedRequest; UserFacingError says what to change
    r = resolver(for_estimate(request), estimate=True, hardware=other_machine)
    infotext(r, sampler, loras) -> str          # the PNG's A1111 "parameters" text
    parse_infotext(text) -> dict[str, str]

Everything a request holds is checked here, once, before anything heavy: the model, the prompt,
the size against the model's range and multiple, steps, guidance, seed, the LoRA list, the
storage and VRAM limit (settings_for: the request's Auto becomes the engine's limit there) and
the input images (engine.generation.input_images).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.generation.lora_library import check_loras
from engine.generation.pipelines import FAMILIES
from engine.config import normalize_device
from engine.generation.settings import EngineSettings, detect_hardware, settings_for
from engine.generation.types import GenerateRequest, HardwareInfo, UserFacingError

SEED_MAX = 2**32 - 1
#: the prompt an estimate runs with when none is given (an estimate does not depend on it)
ESTIMATE_PROMPT = "estimate"


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

    @property
    def family(self) -> Any:
        return FAMILIES[self.entry.family]

    @property
    def images(self) -> list[Any]:
        """The input images (PIL), at the size the pipeline takes them."""
        return [im.image for im in self.inputs.images] if self.inputs is not None else []


def for_estimate(request: GenerateRequest) -> GenerateRequest:
    """An estimate (or a suggestion) does not depend on the prompt: a blank one is filled in."""
    return request if (request.prompt or "").strip() else replace(request, prompt=ESTIMATE_PROMPT)


def size_hint(v: int, multiple: int, lo: int, hi: int) -> str:
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


def _whole(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise UserFacingError(f"{name} must be {what}, got {value!r}.")
    return int(value)


class Resolver:
    """Checks requests against a registry and fills in the model's defaults (`__call__`)."""

    def __init__(
        self,
        registry: Any,
        models_dir: Any = None,
        device: torch.device | str | None = None,
        hardware: Callable[[], HardwareInfo] | None = None,
    ):
        """`registry`: model_registry or an object with its verbs; `models_dir`: where models are
        (the default model is the first one there); `device`: the computation device (None: CUDA
        when present); `hardware`: this host's HardwareInfo (what Auto is resolved for)."""
        self.registry = registry
        self.models_dir = models_dir
        self.device = normalize_device(device) if device is not None else None
        self.hardware = hardware or detect_hardware

    def __call__(self, request: GenerateRequest, *, estimate: bool = False, hardware: HardwareInfo | None = None) -> ResolvedRequest:
        """Validate `request` and fill in defaults. UserFacingError says what to change.
        `estimate`: an edit model may be estimated before its images are given. `hardware`:
        resolve for that machine (its device kind, its Auto) instead of this host."""
        if not isinstance(request, GenerateRequest):
            raise UserFacingError("Internal error: generate() needs a GenerateRequest.")
        model_id = request.model or self.registry.default_model_id(self.models_dir)
        try:
            entry = self.registry.get_model(model_id)
        except UserFacingError:
            raise
        except Exception as exc:  # registry raising something else for an unknown id
            raise UserFacingError(f"Unknown model '{model_id}'.") from exc
        if entry.family not in FAMILIES:
            raise UserFacingError(f"{entry.name}: its family '{entry.family}' is not supported by this engine.")
        family = FAMILIES[entry.family]
        prompt = (request.prompt or "").strip()
        if not prompt:
            raise UserFacingError("The prompt is empty: describe the image you want.")
        d, lim = entry.defaults, entry.limits
        multiple = int(lim.get("size_multiple", 16) or 16)

        def size(name: str, value: int | None) -> int:
            v = _whole(name.capitalize(), d.get(name) if value is None else value, "a whole number of pixels")
            lo, hi = int(lim.get(f"min_{name}", multiple)), int(lim.get(f"max_{name}", 4096))
            if v % multiple:
                raise UserFacingError(f"{name.capitalize()} {v} is not a multiple of {multiple}. {size_hint(v, multiple, lo, hi)}")
            if not lo <= v <= hi:
                raise UserFacingError(f"{name.capitalize()} {v} is outside what {entry.name} supports ({lo}..{hi} pixels).")
            return v

        inputs, strength, image_size = _resolve_images(request, entry, family, lim, estimate)
        if image_size is not None:  # no size asked for: the input image's, fitted to the model
            request = replace(request, width=request.width or image_size[0], height=request.height or image_size[1])
        width, height = size("width", request.width), size("height", request.height)
        steps = _whole("Steps", d.get("steps") if request.steps is None else request.steps, "a whole number")
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
        gguf = getattr(entry, "gguf", None) is not None
        if hardware is None:
            settings = settings_for(request, self.hardware(), self.device, gguf=gguf, steps=steps)
        else:  # another machine: its device kind and its Auto
            settings = settings_for(request, hardware, "cuda" if hardware.has_gpu else "cpu", gguf=gguf, steps=steps)
        if settings.disk_offload:
            from engine.generation.pipelines.components import engine_loader

            if engine_loader() is None:
                raise UserFacingError("Disk offload is not available in this build; untick it.")
        if inputs is not None:
            inputs = _fit_inputs(inputs, family, (width, height))
            if strength is not None:
                from engine.generation.pipelines.images import img2img_steps

                if img2img_steps(family, steps, strength) < 1:
                    raise UserFacingError(
                        f"Strength {strength:g} with {steps} steps runs no denoising step: raise the strength or the steps."
                    )
        negative = (request.negative_prompt or "").strip()
        return ResolvedRequest(request, entry, entry.id, prompt, negative, width, height, steps, guidance, seed, settings, inputs, strength)


def _resolve_images(
    request: GenerateRequest, entry: Any, family: Any, limits: dict[str, Any], estimate: bool = False
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


def _fit_inputs(prepared: Any, family: Any, size: tuple[int, int]) -> Any:
    """Image-to-image: the input is the output's starting point, so it takes the output's size."""
    from engine.generation import input_images as ii

    if family.image_mode != "img2img":
        return prepared
    return ii.resize_first(prepared, size)


# --- the parameters text ------------------------------------------------------------------------
def _fmt_number(value: float) -> str:
    return f"{value:g}"


def describe_vram_limit(r: ResolvedRequest) -> str:
    """The limit the run used: Auto (and what it came to), unlimited, or N GB."""
    used = r.settings.vram_limit
    shown = "unlimited" if used is None else f"{_fmt_number(float(used))} GB"
    return f"Auto ({shown})" if r.settings.limit_is_auto else shown


def infotext(r: ResolvedRequest, sampler: str, loras: tuple[tuple[str, float, str], ...] = (), compile_note: str | None = None) -> str:
    """A1111 "parameters" text: prompt, negative prompt line, then "Key: value" pairs (the
    settings the run actually used). LoRAs (name, strength, short hash) follow A1111:
    `<lora:name:strength>` appended to the prompt and a quoted `Lora hashes: "name: hash, ..."`
    field. `compile_note` ("on", "off (why)") is given when the request asked for compile."""
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
        ("Compute dtype", r.settings.compute_dtype_name),
        ("Disk offload", "on" if r.settings.disk_offload else "off"),
    ]
    if compile_note is not None:
        pairs.append(("Compile", compile_note.replace(",", ";")))
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
