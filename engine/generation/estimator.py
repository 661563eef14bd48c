"""What a request needs, before anything loads: one `Estimator`, one entry point for every machine.

    estimator = Estimator(resolver, lora_library, live_floor=session.measured_floor)
    estimator.estimate(r, hardware=None) -> MemoryEstimate     # r: a ResolvedRequest
    estimator.step_work(r) -> StepWork                          # what a step computes (suggest's cost model)
    estimator.suggest(request, machine) -> SuggestedSettings    # the fastest settings that fit

`estimate` answers for this host (`hardware=None`) or for any other machine (suggest's grid), on
a GPU or a CPU alike. Its figures (`Footprint`) come from the planner: on a GPU the plans of each
stage over meta-built components (engine.generation.vram_estimate: VRAM peak, smallest feasible
limit, bytes streamed per step, RAM); where the computation runs on the CPU the RAM from the
planner's costs against the RAM available (engine.generation.estimate), which also decides
whether it fits. An entry whose components have no config (the demo) falls back to a size
formula (the registry's bf16 sizes times the form's factor). Once the requested build has run
every stage, the smallest feasible limit is the live pipeline's own record (`live_floor`).

`suggest_settings(request, machine=None, ...)` is the same without a Studio (`from engine import
suggest_settings`).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from engine.generation.estimate import RamVerdict
from engine.generation.lora_library import factor_bytes
from engine.generation.pipelines import activation_bytes, cfg_batch
from engine.generation.request import ResolvedRequest, Resolver, for_estimate
from engine.generation.suggest import StepWork, fastest_fit
from engine.generation.types import GenerateRequest, HardwareInfo, Machine, MemoryEstimate, SuggestedSettings, UserFacingError

log = logging.getLogger(__name__)

GB = 1024**3


@dataclass(frozen=True)
class Footprint:
    """What a request takes, in bytes: the planner's figures (or the size formula's)."""

    vram: int  # peak on the computation device
    smallest_limit: int  # the smallest vram_limit every stage runs within
    streamed_per_step: int
    ram: int
    notes: tuple[str, ...] = ()  # what the figures cannot know
    ram_verdict: RamVerdict | None = None  # computation on the CPU: the planner's RAM against the RAM there


# --- what the figures are made of ---------------------------------------------------------------
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


def catalogued_sizes(entry: Any, fam: Any) -> dict[str, int]:
    """bf16 bytes of each catalogued component (a GGUF denoiser: its file's bytes); the demo's
    tiny sizes when none are catalogued. The download figure, and the size formula's input."""
    sizes = {name: (c.bytes_bf16 or 0) for name, c in entry.components.items() if c.bytes_bf16 is not None}
    if getattr(entry, "gguf", None) is not None and fam.denoiser in sizes:  # the file's blocks, as stored
        sizes[fam.denoiser] = entry.gguf.bytes
    if not sizes:  # the demo: tiny, sizes not catalogued
        sizes = {"text_encoder": 2 * 1024**2, fam.denoiser: 2 * 1024**2, "vae": 1024**2}
    return sizes


def denoiser_forwards(fam: Any, r: ResolvedRequest, unbatched_cfg: bool) -> int:
    """Denoiser forwards per step: two where classifier-free guidance runs as two passes. A
    pipeline that encodes its own prompts is handed the negative prompt only when there is one
    (ManagedPipeline.generate), and without it Qwen-Image-Edit's true CFG does not run."""
    if not unbatched_cfg:
        return 1
    return 2 if fam.encode_prompts is not None or r.negative_prompt.strip() else 1


def image_activation_args(fam: Any, r: ResolvedRequest) -> tuple[int, int]:
    """(reference pixels, largest input pixels) of the request's input images, for activation_bytes."""
    if not r.images:
        return 0, 0
    from engine.generation.pipelines.images import reference_pixels, vae_input_pixels

    return reference_pixels(fam, r.images), vae_input_pixels(fam, r.images)


#: attention heads of a denoiser whose config the catalogue does not list (Qwen-Image's and FLUX's 24)
DEFAULT_ATTENTION_HEADS = 24


def math_attention_bytes(r: ResolvedRequest, batch: int) -> int:
    """The score matrix (batch x heads x tokens x tokens, in the computation dtype) one attention
    call builds where scaled_dot_product_attention has no fused kernel for the GPU and dtype
    (engine.runtime.cuda_facts.fused_attention: bf16 below capability 8.0); 0 where it has one,
    or on the CPU. Qwen-Image at 1024x1024 on such a card: 24 x 4096^2 x 2 bytes, about 0.8 GB."""
    s = r.settings
    if s.device.type != "cuda" or s.compute_capability is None:
        return 0
    from engine.runtime.cuda_facts import fused_attention

    if fused_attention(s.compute_capability, s.compute_dtype):
        return 0
    tokens = (r.width // 16) * (r.height // 16)
    heads = DEFAULT_ATTENTION_HEADS
    comp = r.entry.components.get(r.family.denoiser)
    if comp is not None and getattr(comp, "config_id", None):
        try:
            from engine.generation.estimate import config_of

            heads = int(config_of(comp.config_id).get("num_attention_heads") or heads)
        except Exception:  # pragma: no cover - estimate only
            pass
    element = 4 if s.compute_dtype.itemsize >= 4 else 2
    return batch * heads * tokens * tokens * element


def _limit_bytes(r: ResolvedRequest) -> int | None:
    limit = r.settings.vram_limit
    return None if limit is None else int(limit * GB)


def _ram_bytes(hardware: HardwareInfo | None) -> int | None:
    """Another machine's RAM (suggest's grid); None: this host, whose RAM available now counts."""
    return int(hardware.ram_total_gb * GB) if hardware is not None and hardware.ram_total_gb else None


class Estimator:
    """Memory figures and verdicts of resolved requests, for this host or any machine."""

    def __init__(self, resolver: Resolver, lora_library: Any = None, live_floor: Callable[[tuple[Any, ...], int], int | None] | None = None):
        """`resolver`: the requests' registry, models folder and this host; `lora_library`: where
        the requests' LoRA ids are found (their factors are VRAM too; None: no LoRA counted);
        `live_floor(build_key, activations)`: the live pipeline's recorded smallest feasible limit
        without its LoRAs, when it is that build and has run every stage (else None)."""
        self.resolver = resolver
        self.lora_library = lora_library
        self.live_floor = live_floor or (lambda build_key, activations: None)

    # --- the entry point --------------------------------------------------------------------------
    def estimate(self, r: ResolvedRequest, hardware: HardwareInfo | None = None) -> MemoryEstimate:
        """What `r` needs on `hardware` (None: this host; `r` resolved for that machine), and
        whether it fits, with the warnings that say why not and what to change."""
        hw = hardware or self.resolver.hardware()
        s = r.settings
        lora = self.lora_bytes(r.request)
        fp = self.footprint(r, lora, hardware)
        budget = _limit_bytes(r)
        sizes = catalogued_sizes(r.entry, r.family)
        warnings: list[str] = []
        fits = True
        # Auto on a CPU with disk offload is limit 0 by design (vram_limit.resolve_vram_limit): not the user's too-small limit
        if budget is not None and budget < fp.smallest_limit and (hw.has_gpu or not s.limit_is_auto):
            fits = False
            warnings.append(
                f"A VRAM limit of {s.vram_limit:g} GB is below the smallest that works for this size "
                f"(about {math.ceil(fp.smallest_limit / GB * 10) / 10:g} GB): activations and the streaming reserve would not fit."
            )
        # what other programs hold is not ours: a GPU detected with less free than its total fits less
        free = hw.vram_free_gb if hw.vram_free_gb is not None else hw.vram_total_gb
        if hw.has_gpu and free is not None and fp.vram > free * GB:
            fits = False
            if free < (hw.vram_total_gb or free):
                warnings.append(
                    f"Needs about {fp.vram / GB:.1f} GB of VRAM but {free:.1f} GB of the GPU's {hw.vram_total_gb:.1f} GB is free "
                    "(other programs hold the rest): lower the VRAM limit, or close them."
                )
            else:
                warnings.append(f"Needs about {fp.vram / GB:.1f} GB of VRAM but the GPU has {hw.vram_total_gb:.1f} GB: lower the VRAM limit.")
        verdict = fp.ram_verdict
        if verdict is not None:
            if not verdict.fits:
                fits = False
                warnings.append(verdict.message)
            warnings.extend(verdict.estimate.notes)
        elif fp.ram > 0.9 * hw.ram_total_gb * GB:
            fits = False
            tip = "" if s.disk_offload else " Tick disk offload" + ("" if s.fp8 else " or FP8") + "."
            warnings.append(f"Needs about {fp.ram / GB:.1f} GB of RAM, this machine has {hw.ram_total_gb:.1f} GB.{tip}")
        if fp.streamed_per_step:
            warnings.append(f"Streams about {fp.streamed_per_step / GB:.1f} GB of weights per step: steps will be slower than with a higher limit.")
        warnings.extend(fp.notes)
        disk = sum(sizes.values())
        if not self.downloaded(r.model_id):
            warnings.append(f"{r.entry.name} is not downloaded yet: the first run downloads about {disk / 1e9:.1f} GB.")
        return MemoryEstimate(
            storage=s.storage_label,
            vram_gb=round(fp.vram / GB, 3),
            ram_gb=round(fp.ram / GB, 3),
            disk_gb=round(disk / 1e9, 3),  # decimal GB, like ModelChoice.size_gb
            streamed_gb_per_step=round(fp.streamed_per_step / GB, 3),
            fits=fits,
            warnings=tuple(warnings),
            smallest_feasible_vram_limit_gb=math.ceil(fp.smallest_limit / GB * 10) / 10,
            lora_bytes=lora,
            compute_dtype=s.compute_dtype_name,
        )

    def footprint(self, r: ResolvedRequest, lora_bytes: int = 0, hardware: HardwareInfo | None = None) -> Footprint:
        """The bytes behind `estimate`: the planner's plans on a GPU (the size formula where a
        component has no config), and where the computation runs on the CPU the planner's RAM
        against the RAM there (`hardware`'s; None: this host's available now)."""
        s, fam = r.settings, r.family
        act = self.activations(r)
        on_cpu = s.device.type == "cpu"
        planned = None if on_cpu else self._planned(r, act, lora_bytes, hardware)
        if planned is not None:
            vram, smallest, streamed, ram = planned.vram_bytes, planned.smallest_feasible_bytes, planned.streamed_bytes_per_step, planned.ram_bytes
            floor = self.live_floor(r.build_key, act)
            if floor is not None:  # this build already ran every stage: the pipeline's record, with the wanted LoRAs
                smallest = floor + lora_bytes
            notes = planned.notes
        else:
            vram, smallest, streamed, ram = self._formula_figures(r, catalogued_sizes(r.entry, fam), act, lora_bytes, _limit_bytes(r))
            notes = ()
        verdict = self.ram_verdict(r, _ram_bytes(hardware)) if on_cpu else None
        if verdict is not None:  # the planner's own costs, against that RAM
            ram = verdict.estimate.total_bytes
        return Footprint(vram, smallest, streamed, ram, tuple(notes), verdict)

    def activations(self, r: ResolvedRequest) -> int:
        """Peak activation bytes of a step or the decode at `r`'s size (its input images included),
        plus the full attention score matrix where the GPU's attention takes the math path
        (`math_attention_bytes`)."""
        fam = r.family
        batch = cfg_batch(fam, r.guidance, r.negative_prompt)
        vae_element = 4 if r.settings.device.type == "cuda" and r.settings.compute_dtype == torch.float16 else 2  # fp32 VAE then
        return activation_bytes(r.width, r.height, batch, *image_activation_args(fam, r), vae_element) + math_attention_bytes(r, batch)

    def lora_bytes(self, request: GenerateRequest) -> int:
        """Bytes of the request's LoRA factors on the computation device (local files only)."""
        total = 0
        for lora_id, _ in request.loras if self.lora_library is not None else ():
            try:
                if lora_id.startswith("hf:"):
                    continue  # not downloaded yet: counted once it is
                total += factor_bytes(self.lora_library.resolve(lora_id))
            except (UserFacingError, OSError, ValueError):
                continue  # the generation reports it
        return total

    def downloaded(self, model_id: str) -> bool:
        try:
            return bool(self.resolver.registry.is_downloaded(model_id, self.resolver.models_dir))
        except Exception:  # pragma: no cover - estimate only
            return True

    # --- the planner's figures ----------------------------------------------------------------
    def _local_path(self, r: ResolvedRequest) -> Path | None:
        """The model's folder when it is on disk (not the demo, which would be written now):
        its config files stand in for configs the catalogue does not list (None when it lists
        them all: no file system look-up in suggest's loops)."""
        components = r.entry.components
        listed = all(components.get(n) is not None and components[n].config_id for n in r.family.weighted)
        if r.entry.is_demo or listed:
            return None
        try:
            registry, models_dir = self.resolver.registry, self.resolver.models_dir
            if not registry.is_downloaded(r.model_id, models_dir):
                return None
            path = registry.local_path(r.model_id, models_dir)
        except Exception:  # pragma: no cover - estimate only
            return None
        return Path(path) if path is not None else None

    def _planned(self, r: ResolvedRequest, act: int, lora: int, hardware: HardwareInfo | None) -> Any:
        """engine.generation.vram_estimate's plans for `r` on a GPU (None: a component without a
        config, or a meta build that failed; the formula stands in)."""
        try:
            from engine.generation.vram_estimate import gpu_estimate

            fam, s = r.family, r.settings
            unbatched_cfg = fam.does_cfg(r.guidance, r.negative_prompt) and cfg_batch(fam, r.guidance, r.negative_prompt) == 1
            return gpu_estimate(
                r.entry, fam, storage=s.storage_name, disk=s.disk_offload, limit_bytes=_limit_bytes(r), activation_bytes=act,
                lora_bytes=lora, forwards_per_step=denoiser_forwards(fam, r, unbatched_cfg), ram_total_bytes=_ram_bytes(hardware),
                local_path=self._local_path(r),
            )
        except Exception:  # pragma: no cover - estimate only
            log.debug("GPU estimate failed", exc_info=True)
            return None

    def ram_verdict(self, r: ResolvedRequest, available_bytes: int | None = None) -> RamVerdict | None:
        """Where the computation runs on the CPU: does `r` fit `available_bytes` of RAM (None:
        what this host has available now), and if not which setting does (engine.generation.
        estimate). The session asks it before loading. None when a component has no config."""
        try:
            from engine.generation.estimate import cpu_ram_verdict

            fam, s = r.family, r.settings
            reference, inputs = image_activation_args(fam, r)
            return cpu_ram_verdict(
                r.entry, fam, storage=s.storage_name, disk=s.disk_offload, limit_bytes=_limit_bytes(r),
                width=r.width, height=r.height, batch=cfg_batch(fam, r.guidance, r.negative_prompt), available_bytes=available_bytes,
                reference_pixels=reference, input_pixels=inputs, local_path=self._local_path(r),
            )
        except Exception:  # pragma: no cover - estimate only
            log.debug("RAM estimate failed", exc_info=True)
            return None

    def _formula_figures(self, r: ResolvedRequest, sizes: dict[str, int], act: int, lora: int, budget: int | None) -> tuple[int, int, int, int]:
        """(VRAM, smallest feasible limit, streamed bytes per step, RAM) from the registry's sizes:
        the fallback for entries without configs (the demo) and the resident bound on a CPU host.
        Stored bytes are the bf16 sizes times the form's factor; the smallest limit is the
        activations, a streamed layer (source + computation form) and on a GPU the scheduler's two
        slots of the largest block; what the limit cannot hold of the denoiser streams."""
        entry, s, fam = r.entry, r.settings, r.family
        factor = s.size_factor
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
        floor = self.live_floor(r.build_key, act)
        if floor is not None:  # this build already ran every stage: the planner's own figure
            smallest = floor
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

    # --- what suggest needs ---------------------------------------------------------------------
    def step_work(self, r: ResolvedRequest) -> StepWork:
        """What one denoising step of `r` computes (suggest's cost model)."""
        fam = r.family
        comp = r.entry.components.get(fam.denoiser)
        size = (comp.bytes_bf16 if comp is not None else None) or 2 * 1024**2
        gguf = getattr(r.entry, "gguf", None)
        tokens = max(1, (r.width // 16) * (r.height // 16))
        return StepWork(int(size), tokens, cfg_batch(fam, r.guidance, r.negative_prompt), gguf.bytes if gguf is not None else None)

    def suggest(self, request: GenerateRequest, machine: Machine) -> SuggestedSettings:
        """The fastest storage form / disk offload / VRAM limit whose estimate fits `machine`, for
        the request's model and size (engine.generation.suggest); no loading."""
        request = for_estimate(request)
        r = self.resolver(request, estimate=True)

        def estimate(candidate: GenerateRequest, hardware: HardwareInfo) -> MemoryEstimate:
            return self.estimate(self.resolver(candidate, estimate=True, hardware=hardware), hardware)

        return fastest_fit(request, machine, estimate, self.step_work(r), self.downloaded(r.model_id))


def host_machine(hardware: HardwareInfo, where: Path | None) -> Machine:
    """This host for suggest: its VRAM (None without a GPU), RAM and the free disk of `where`
    (the nearest existing folder of it; None: not known)."""
    free = None
    for folder in (where, *where.parents) if where is not None else ():
        if folder.exists():
            try:
                free = shutil.disk_usage(folder).free / 1e9  # decimal GB, like MemoryEstimate.disk_gb
            except OSError:  # pragma: no cover
                pass
            break
    return Machine(hardware.vram_total_gb if hardware.has_gpu else None, hardware.ram_total_gb, free, hardware.gpu_name)


def suggest_settings(
    request: GenerateRequest,
    machine: Machine | None = None,
    *,
    models_dir: Path | str | None = None,
    registry: Any = None,
    lora_dir: Path | str | None = None,
) -> SuggestedSettings:
    """The fastest settings that fit `machine` (default: this host, the free disk where models go)
    for the request's model and size, without a Studio (`from engine import suggest_settings`).
    `models_dir`: where the app keeps models (None: the hubs' standard caches), which decides
    whether the download must fit the disk; `registry`: model_registry or an object with its
    verbs; `lora_dir`: the folder the request's LoRA ids name (their factors count as VRAM)."""
    if registry is None:
        import model_registry as registry
    resolver = Resolver(registry, Path(models_dir) if models_dir is not None else None)
    library = None
    if lora_dir is not None:
        from engine.generation.lora_library import LoraLibrary

        library = LoraLibrary(lora_dir)
    if machine is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        machine = host_machine(resolver.hardware(), resolver.models_dir or Path(HF_HUB_CACHE))
    return Estimator(resolver, library).suggest(request, machine)
