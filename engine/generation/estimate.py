"""The pre-flight RAM estimate where the computation device is the CPU, from the planner itself.

One source of truth: every component is built on the meta device and managed exactly as the
loader would manage it (`enable_vram_management` with meta masters in the storage form), so its
`VramRuntime.costs()` is the very planner input a real load produces (the same layers, module
map, storage dtypes, FP8 scales and transients). Each stage is then planned with
`engine.planning.planner.plan` under the limit the pool would use (`engine.runtime.ram.ram_room`
of the RAM that would be available), and the RAM the stage adds is what that plan keeps
resident (copies that are not their master) plus the largest transient plus the activations.

    RAM = process baseline + masters in RAM + max over stages (resident copies + transient + activations)

What it cannot know it says: activations follow a rough per-pixel formula
(`pipelines.managed.activation_bytes`), checked only at the resolutions of bench/results; the
page cache (disk offload) is the kernel's and is reclaimable, so it is reported apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from engine.config import VramConfig
from engine.planning import planner

log = logging.getLogger(__name__)

GiB = 1024**3
#: RssAnon of the app's process before a model loads (torch, diffusers, transformers, tokenizers):
#: measured 0.30 GiB in bench/realsize (Z-Image-Turbo replica, this machine); rounded up.
PROCESS_BASELINE_BYTES = int(0.35 * GiB)


@dataclass(frozen=True)
class ComponentCost:
    """A component as the planner sees it, plus what it holds in RAM whatever the plan."""

    member: planner.MemberCost
    master_ram_bytes: int  # masters in RAM (0 with disk offload)
    unmanaged_bytes: int  # parameters the map leaves out and buffers: fixed, in RAM
    resident_is_master: bool  # a resident copy is the master itself (costs no RAM)
    largest_layer_bytes: int  # computation form of the largest layer


def _meta_master(param: torch.Tensor, comp_dtype: torch.dtype) -> Any:
    """A meta master of the parameter's own shape and (logical) dtype: the runtime sizes every
    stored form from that (engine.runtime.component.bytes_at: stored_layout of the place), so one
    kind of meta master serves bf16, FP8, int8 and NF4 alike."""
    from engine.storage.stored import PlainStored

    dtype = param.dtype if param.dtype != torch.float32 else comp_dtype
    return PlainStored(torch.empty(param.shape, dtype=dtype, device="meta"))


@lru_cache(maxsize=64)
def component_cost(library: str, class_name: str, config_id: str, storage: str, disk: bool, device: str) -> ComponentCost:
    """Build a catalogued component on meta and cost it under the app's config for (storage,
    disk, device); `storage` is a storage name ("bf16", "fp8", "int8", "nf4")."""
    from model_registry.sizes import build_on_meta, load_component_configs

    return model_cost(build_on_meta(library, class_name, load_component_configs()[config_id]), storage, disk, device)


def model_cost(model: torch.nn.Module, storage: str | bool, disk: bool, device: str = "cpu") -> ComponentCost:
    """Manage a meta-device model under the app's config for (storage, disk, device), as the
    loader would, and return the planner's costs of it. `storage`: a storage name, or a bool for
    the FP8 toggle (True: "fp8", False: "bf16")."""
    from engine.generation.settings import vram_config_for
    from engine.management import enable_vram_management, runtime_of
    from engine.runtime import ram
    from engine.runtime.component import bytes_at
    from engine.runtime.pool import MemoryPool

    name = ("fp8" if storage else "bf16") if isinstance(storage, bool) else storage
    config = VramConfig.from_dict(vram_config_for(False, False, device, storage_name=name))  # disk: the same layers, masters not in RAM
    place = config.place("offload")
    model = enable_vram_management(
        model, vram_config=config, budget=MemoryPool(), onload=False,
        master_factory=lambda _n, p: _meta_master(p, config.computation_dtype),
    )
    runtime = runtime_of(model)
    member = runtime.costs()
    masters = 0 if disk else sum(bytes_at(runtime.shapes(layer), place, config.computation_dtype) for layer in runtime.layers)
    largest = max((runtime.computation_bytes(layer) for layer in runtime.layers), default=0)
    unmanaged = runtime.fixed_bytes  # buffers and parameters the map leaves out: in RAM on a CPU
    return ComponentCost(member, masters, unmanaged, ram.resident_is_master(runtime) and not disk, largest)


def gguf_masters(cost: ComponentCost, file_bytes: int) -> ComponentCost:
    """A GGUF denoiser's masters are the file's blocks: the catalogue's file size, less what the
    component keeps unmanaged (its 1-D tensors, counted apart). The meta build sizes them at
    bf16, which counted a Q4_K FLUX.1 as 22 GiB instead of its 6.4 GB (the estimate refused it
    on a 24 GiB host). Resident copies on a CPU are bf16 (dequantized once), as planned."""
    from dataclasses import replace

    return replace(cost, master_ram_bytes=max(0, int(file_bytes) - cost.unmanaged_bytes))


@dataclass
class RamEstimate:
    """Bytes; `stages` maps stage -> RAM that stage adds over the masters."""

    total_bytes: int
    masters_bytes: int
    stages: dict[str, int] = field(default_factory=dict)
    resident_bytes: dict[str, int] = field(default_factory=dict)
    page_cache_bytes: int = 0
    notes: tuple[str, ...] = ()
    minimum_bytes: int = 0  # with no resident copies beyond the masters: what it needs to run at all


#: Resolutions at which bench/results/realsize-cpu.md checked the estimate against a real-size run.
MEASURED_SIZES = {(256, 256), (512, 512)}


def stage_activations(width: int, height: int, batch: int, reference_pixels: int = 0, input_pixels: int = 0) -> dict[str, Any]:
    """Rough activation bytes per stage (the same constants as `pipelines.managed.activation_bytes`;
    the text encoders' at prompt length are covered by its fixed 0.3 GiB). Input images are
    VAE-encoded before the first step (`input_pixels`: the largest, at the size the pipeline
    encodes it, `pipelines.images.vae_input_pixels`), and an edit model's reference latents join
    the denoiser's sequence (`reference_pixels`)."""
    from engine.generation.pipelines.managed import (
        DECODE_BYTES_PER_PIXEL,
        vae_memory_plan,
    )

    pixels = width * height
    tiling, _ = vae_memory_plan(width, height, None)
    encode = int(0.3 * GiB)
    if input_pixels:  # the VAE encode runs in the encoding phase, untiled below TILE_ALWAYS_PIXELS
        encode += int(0.5 * GiB) if vae_memory_plan(input_pixels, 1, None)[0] else input_pixels * DECODE_BYTES_PER_PIXEL
    return {
        "_size": (width, height),  # type: ignore[dict-item]
        "encode": encode,
        "denoise": int(0.3 * GiB + batch * (pixels + reference_pixels) * 1200),
        "decode": int(0.5 * GiB) if tiling else pixels * DECODE_BYTES_PER_PIXEL,
    }


def plan_stage(costs: list[ComponentCost], limit: int | None, activation_bytes: int) -> tuple[int, int]:
    """(RAM the stage adds, of which resident copies) under the planner with `limit`."""
    members = [c.member for c in costs]
    plan = planner.plan(members, planner.Limits(limit, 0, 0, None))
    resident = transient = 0
    for c in costs:
        for layer in c.member.layers:
            if layer.key in plan.resident:
                if not c.resident_is_master:
                    resident += layer.resident_bytes
                transient = max(transient, layer.transient_resident)
            else:
                transient = max(transient, layer.transient_streamed)
    return resident + transient + activation_bytes, resident


def estimate_ram(
    entry: Any,
    family: Any,
    *,
    storage: str,
    disk: bool,
    limit_bytes: int | None,
    activations: dict[str, int],
    available_bytes: int,
) -> RamEstimate | None:
    """The CPU-host RAM estimate of one catalogue entry (None when a component has no config)."""
    from engine.runtime.ram import RAM_MARGIN_BYTES

    costs: dict[str, ComponentCost] = {}
    gguf = getattr(entry, "gguf", None) if storage == "gguf" else None
    for name in family.weighted:
        comp = entry.components.get(name)
        if comp is None or not comp.config_id:
            return None
        # a GGUF entry: only the denoiser comes from the .gguf; the others are the base repo's
        # .safetensors, plain bf16 like any bf16 load
        form = storage if gguf is None or name == family.denoiser else "bf16"
        try:
            costs[name] = component_cost(comp.library, comp.class_name, comp.config_id, form, disk, "cpu")
        except Exception:  # pragma: no cover - estimate only
            log.debug("meta build of %s failed", comp.class_name, exc_info=True)
            return None
    if gguf is not None and family.denoiser in costs and not disk:
        costs[family.denoiser] = gguf_masters(costs[family.denoiser], gguf.bytes)
    masters = sum(c.master_ram_bytes + c.unmanaged_bytes for c in costs.values())
    stages: dict[str, int] = {}
    resident: dict[str, int] = {}
    minimum = 0
    for stage in ("encode", "denoise", "decode"):
        members = [c for n, c in costs.items() if family.stage_of(n) == stage]
        if not members:
            continue
        act = activations.get(stage, 0)
        # the pool's RAM room (engine.runtime.ram) with nothing of this stage resident yet
        held = sum(sum(l.resident_bytes for l in c.member.layers) for c in members if c.resident_is_master)
        room = max(0, available_bytes - PROCESS_BASELINE_BYTES - masters + held - act - RAM_MARGIN_BYTES)
        limit = room if limit_bytes is None else min(limit_bytes, room)
        stages[stage], resident[stage] = plan_stage(members, limit, act)
        # resident copies that are their masters cost nothing: only the others can be given up
        floor_extra = stages[stage] if all(c.resident_is_master for c in members) else plan_stage(members, 0, act)[0]
        minimum = max(minimum, floor_extra)
    total = PROCESS_BASELINE_BYTES + masters + max(stages.values(), default=0)
    notes = []
    if (width_height := activations.get("_size")) is not None and width_height not in MEASURED_SIZES:
        notes.append(
            f"activations at {width_height[0]}x{width_height[1]} are a per-pixel guess (the estimate was checked against "
            "real-size runs at 256x256 and 512x512 only)"
        )
    if any(resident.values()):
        notes.append(
            f"keeps up to {max(resident.values()) / GiB:.1f} GiB of dequantized/converted copies while the RAM available allows "
            f"(re-planned at each stage from the RAM free then); needs at least {(PROCESS_BASELINE_BYTES + masters + minimum) / GiB:.1f} GiB"
        )
    cache = 0
    if disk:
        cache = sum(int(entry.components[n].bytes_bf16 or 0) for n in costs)
        notes.append("disk offload: the kernel's page cache may hold up to the model's files; it is reclaimable, not counted")
    return RamEstimate(total, masters, stages, resident, cache, tuple(notes), PROCESS_BASELINE_BYTES + masters + minimum)


# --- the verdict the Studio gives before it loads -------------------------------------------------
SETTING_NAMES = {
    ("bf16", False): "bf16 in RAM", ("fp8", False): "FP8", ("int8", False): "int8", ("nf4", False): "NF4 (4-bit)",
    ("bf16", True): "disk offload", ("fp8", True): "FP8 + disk offload", ("int8", True): "int8 + disk offload",
    ("nf4", True): "NF4 + disk offload", ("gguf", False): "the GGUF file's blocks in RAM", ("gguf", True): "disk offload",
}
#: what the refusal message offers instead, in this order (least precision lost first)
ALTERNATIVES = (("fp8", False), ("bf16", True), ("nf4", False), ("fp8", True))


@dataclass(frozen=True)
class RamVerdict:
    estimate: RamEstimate
    available_bytes: int
    fits: bool
    message: str  # why not, and which setting fits ("" when it fits)


def cpu_ram_verdict(
    entry: Any, family: Any, *, storage: str, disk: bool, limit_bytes: int | None, width: int, height: int, batch: int,
    available_bytes: int | None = None, reference_pixels: int = 0, input_pixels: int = 0,
) -> RamVerdict | None:
    """Does this setting fit the RAM available now (CPU host)? If not, which setting does.
    `reference_pixels` / `input_pixels`: the request's input images (`stage_activations`)."""
    from engine.runtime.ram import available_ram_bytes

    free = available_ram_bytes() if available_bytes is None else available_bytes
    act = stage_activations(width, height, batch, reference_pixels, input_pixels)
    est = estimate_ram(entry, family, storage=storage, disk=disk, limit_bytes=limit_bytes, activations=act, available_bytes=free)
    if est is None:
        return None
    fits = est.minimum_bytes <= free  # copies beyond the masters adapt to the RAM room
    if fits:
        return RamVerdict(est, free, True, "")
    fitting = []
    # a GGUF entry keeps its file's blocks whatever the storage choice says: only disk offload changes it
    for alt_storage, alt_disk in ((("gguf", True),) if storage == "gguf" else ALTERNATIVES):
        if (alt_storage, alt_disk) == (storage, disk) or (alt_disk and disk and alt_storage == "bf16"):
            continue
        alt_limit = 0 if alt_disk else None
        alt = estimate_ram(entry, family, storage=alt_storage, disk=alt_disk, limit_bytes=alt_limit, activations=act, available_bytes=free)
        if alt is not None and alt.minimum_bytes <= free:
            fitting.append(SETTING_NAMES[(alt_storage, alt_disk)])
    name = getattr(entry, "name", "this model")
    tip = f" Use {' or '.join(fitting[:2])}." if fitting else " No setting fits: free some RAM or use a smaller model."
    message = (
        f"{name} with {SETTING_NAMES.get((storage, disk), storage)} needs about {est.minimum_bytes / GiB:.1f} GiB of RAM "
        f"({est.masters_bytes / GiB:.1f} GiB of weights in RAM), and {free / GiB:.1f} GiB is available.{tip}"
    )
    return RamVerdict(est, free, False, message)
