"""The planner's costs of meta-built components, and the pre-flight RAM estimate where the
computation device is the CPU (the GPU estimate, engine.generation.vram_estimate, plans the same
costs built for a CUDA device).

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

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from engine.config import VramConfig
from engine.planning import planner
from engine.storage.forms import default_form, get_form, offered_forms

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
    unmanaged_bytes: int  # parameters the map leaves out and buffers: fixed, on the computation device
    resident_is_master: bool  # a resident copy is the master itself (costs no RAM)
    largest_layer_bytes: int  # computation form of the largest layer
    # layer key -> bytes its group sends through a slot per forward when it streams (its stored
    # form's pieces, each 256-byte aligned, as `build_groups` lays them out)
    stream_bytes: dict[int, int] = field(default_factory=dict, compare=False)
    staging_bytes: int = 0  # one staging buffer: the largest group as its masters are stored
    group_keys: tuple[str, ...] = field(default=(), compare=False)  # each layer's group (block), in planning order


#: planner keys of meta-built layers: unique in the process (ids of dropped meta models are reused)
_KEYS = itertools.count(1)


def _meta_master(param: torch.Tensor, comp_dtype: torch.dtype, encoded: tuple[str, int] | None = None) -> Any:
    """A meta master of the parameter's own shape and (logical) dtype: the runtime sizes every
    stored form from that (engine.runtime.component.bytes_at: stored_layout of the place), so one
    kind of meta master serves every form alike. `encoded`: (form, bytes) of the blocks this
    tensor would read from a checkpoint file in that form (GGUF: what the runtime sizes a "gguf"
    place by; `StoredTensor.encoded`)."""
    from engine.storage.stored import PlainStored

    dtype = param.dtype if param.dtype != torch.float32 else comp_dtype
    master = PlainStored(torch.empty(param.shape, dtype=dtype, device="meta"))
    if encoded is not None:
        master.encoded = encoded  # read by VramRuntime.shapes
    return master


def config_of(config_id: str) -> dict[str, Any]:
    """A component config: a key of model_registry/component_configs.json, or "file:<path>" for
    the config.json of a model on disk (entries without catalogued configs)."""
    import json
    from pathlib import Path

    from model_registry.sizes import load_component_configs

    if config_id.startswith("file:"):
        return json.loads(Path(config_id[len("file:") :]).read_text(encoding="utf-8"))
    return load_component_configs()[config_id]


@lru_cache(maxsize=256)
def component_cost(
    library: str, class_name: str, config_id: str, storage: str, disk: bool, device: str, gguf_bytes: int | None = None
) -> ComponentCost:
    """Build a catalogued component on meta and cost it under the app's config for (storage,
    disk, device); `storage` is a storage form's name (engine.storage.forms), `device`
    "cpu" or "cuda" (never touched: a meta build only plans). `gguf_bytes`: a GGUF denoiser's
    file size (its blocks are its stored form). Cached: the first Qwen-Image estimate builds
    its 20B transformer, its 8B text encoder and its VAE on meta (see engine.generation.vram_estimate)."""
    from model_registry.sizes import build_on_meta

    model = build_on_meta(library, class_name, config_of(config_id))
    return model_cost(model, storage, disk, device, gguf_bytes)


def _gguf_bytes_per_tensor(model: torch.nn.Module, file_bytes: int) -> dict[str, int]:
    """A documented fallback: the estimate does not read a .gguf header (the file may not be
    downloaded yet), so the file's bytes are spread over the weight matrices in proportion to
    their size, after the vectors (kept in bf16); the total is the file's."""
    matrices = {n: p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and p.is_floating_point()}
    vectors = sum(2 * p.numel() for n, p in model.named_parameters() if n not in matrices)
    per_value = max(0, file_bytes - vectors) / max(1, sum(matrices.values()))
    return {n: int(numel * per_value) for n, numel in matrices.items()}


def _cached_form_bytes(model: torch.nn.Module, form: str, comp_dtype: torch.dtype) -> dict[str, int]:
    """Disk offload in a quantized form streams the stored-form cache (engine.storage.form_cache):
    each weight matrix is read as its bytes in the form, scales included (the vectors as bf16)."""
    from engine.config import form_value
    from engine.storage.stored import layout_nbytes, stored_layout

    value = form_value(get_form(form))
    return {
        n: layout_nbytes(stored_layout(tuple(p.shape), comp_dtype, value, comp_dtype))
        for n, p in model.named_parameters()
        if p.ndim >= 2 and p.is_floating_point() and all(p.shape)
    }


def model_cost(
    model: torch.nn.Module, storage: str, disk: bool, device: str = "cpu", gguf_bytes: int | None = None
) -> ComponentCost:
    """Manage a meta-device model under the app's config for (storage, disk, device), as the
    loader would, and return the planner's costs of it. `storage`: a storage form's name. On a GPU (`device` "cuda") every component
    streams through a transfer scheduler: its `group_bytes` (the slot the planner pays for) is
    laid out from the shapes at the place it streams from, as `max_group_bytes` would from real
    copies. Nothing touches CUDA: the config is not checked against this host and no scheduler
    is made."""
    from engine.generation.settings import vram_config_for
    from engine.management import enable_vram_management, runtime_of
    from engine.runtime.component import bytes_at
    from engine.runtime.pool import MemoryPool
    from engine.transfer.pinned import aligned
    from engine.transfer.scheduler import (
        group_key,
        planned_group_bytes,
        planned_piece_bytes,
    )

    name = storage
    config = VramConfig.from_dict(vram_config_for(False, disk, device, storage_name=name), check_present=False)
    place = config.place("offload")
    from_file = gguf_bytes is not None and get_form(name).from_file
    blocks = _gguf_bytes_per_tensor(model, gguf_bytes) if from_file else {}
    if disk and get_form(name).quantized and not get_form(name).from_file:
        blocks = _cached_form_bytes(model, name, config.computation_dtype)
    encoded_form = name
    model = enable_vram_management(
        model, vram_config=config, budget=MemoryPool(), onload=False, scheduler=False,
        master_factory=lambda n, p: _meta_master(p, config.computation_dtype, (encoded_form, blocks[n]) if n in blocks else None),
    )
    runtime = runtime_of(model)
    order = runtime.planning_order()
    keys = {id(layer): next(_KEYS) for layer in order}
    planned = runtime.costs()
    layers = tuple(dataclasses.replace(layer, key=keys[layer.key]) for layer in planned.layers)
    source = runtime.offload_place if runtime.onload_is_resident else runtime.onload_place  # what it streams from, onloaded
    gpu = config.computation_device.type != "cpu"
    member = planner.MemberCost(next(_KEYS), layers, planned_group_bytes(runtime, order, source) if gpu else None)
    stream_bytes = {keys[id(layer)]: sum(aligned(n) for n in planned_piece_bytes(runtime, layer, source)) for layer in order}
    masters = sum(bytes_at(runtime.shapes(layer), place, config.computation_dtype) for layer in runtime.layers)
    largest = max((runtime.computation_bytes(layer) for layer in runtime.layers), default=0)
    unmanaged = runtime.fixed_bytes  # buffers and parameters the map leaves out: on the computation device
    staging = planned_group_bytes(runtime, order, runtime.offload_place)
    groups = tuple(group_key(layer) for layer in order)
    return ComponentCost(member, masters, unmanaged, runtime.resident_is_master(), largest, stream_bytes, staging, groups)


def component_specs(entry: Any, family: Any, local_path: Any = None) -> dict[str, tuple[str, str, str]] | None:
    """(library, class name, config id) of each weighted component: the catalogue's config ids,
    else, for a model on disk (`local_path`), its own model_index.json and config.json ("file:"
    ids); None when a component has neither (the demo before it is written)."""
    import json
    from pathlib import Path

    specs: dict[str, tuple[str, str, str]] = {}
    index: dict[str, Any] | None = None
    for name in family.weighted:
        comp = entry.components.get(name)
        if comp is not None and comp.config_id:
            specs[name] = (comp.library, comp.class_name, comp.config_id)
            continue
        if local_path is None:
            return None
        try:
            index = index if index is not None else json.loads((Path(local_path) / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        config = Path(local_path) / name / "config.json"
        listed = index.get(name)
        if not (isinstance(listed, list) and len(listed) == 2 and config.is_file()):
            return None
        specs[name] = (str(listed[0]), str(listed[1]), f"file:{config.resolve()}")
    return specs


def component_costs(
    entry: Any, family: Any, storage: str, disk: bool, device: str, local_path: Any = None
) -> dict[str, ComponentCost] | None:
    """Every weighted component of a catalogue entry, built on meta and costed (None when one has
    no config, or its meta build fails). A GGUF entry's denoiser is sized by its file's blocks."""
    specs = component_specs(entry, family, local_path)
    if specs is None:
        return None
    gguf = getattr(entry, "gguf", None)
    from_file = get_form(storage).from_file
    costs: dict[str, ComponentCost] = {}
    for name, (library, class_name, config_id) in specs.items():
        blocks = int(gguf.bytes) if gguf is not None and name == family.denoiser and from_file else None
        # a GGUF entry: only the denoiser comes from the .gguf; the others are the base repo's
        # .safetensors, plain bf16 like any bf16 load
        form = default_form().name if from_file and name != family.denoiser else storage
        try:
            costs[name] = component_cost(library, class_name, config_id, form, disk, device, blocks)
        except Exception:  # pragma: no cover - estimate only
            log.debug("meta build of %s failed", class_name, exc_info=True)
            return None
    return costs


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
    local_path: Any = None,
) -> RamEstimate | None:
    """The CPU-host RAM estimate of one catalogue entry (None when a component has no config;
    `local_path`: the model's folder, whose config files stand in for missing catalogue configs)."""
    from engine.runtime.ram import reserve_bytes

    costs = component_costs(entry, family, storage, disk, "cpu", local_path)
    if costs is None:
        return None
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
        # the pool's RAM room keeps this process's margin and the machine's headroom (engine.runtime.ram)
        room = max(0, available_bytes - PROCESS_BASELINE_BYTES - masters + held - act - reserve_bytes())
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
        cache = sum(int(getattr(entry.components.get(n), "bytes_bf16", 0) or 0) for n in costs)
        notes.append("disk offload: the kernel's page cache may hold up to the model's files; it is reclaimable, not counted")
    return RamEstimate(total, masters, stages, resident, cache, tuple(notes), PROCESS_BASELINE_BYTES + masters + minimum)


# --- the verdict the Studio gives before it loads -------------------------------------------------
def setting_name(storage: str, disk: bool) -> str:
    """A setting as the refusal message names it: "FP8", "NF4 + disk offload", "bf16 in RAM",
    "the GGUF file's blocks in RAM", "disk offload" (the default form or a file's blocks on disk)."""
    form = get_form(storage)
    if form.name == default_form().name or form.from_file:
        if disk:
            return "disk offload"
        return f"the {form.title} file's blocks in RAM" if form.from_file else f"{form.title} in RAM"
    return form.title + (" + disk offload" if disk else "")


def alternatives(storage: str) -> tuple[tuple[str, bool], ...]:
    """What the refusal message offers instead, in this order (least precision lost first): the
    most precise quantized form the UI offers (FP8), disk offload, the smallest form (NF4), the
    first again with disk offload. A GGUF entry keeps its file's blocks: only disk offload."""
    if get_form(storage).from_file:
        return ((storage, True),)
    quantized = [f for f in offered_forms() if f.quantized]
    if not quantized:
        return ((default_form().name, True),)
    first, smallest = quantized[0].name, min(quantized, key=lambda f: f.size_factor).name
    return ((first, False), (default_form().name, True), (smallest, False), (first, True))


@dataclass(frozen=True)
class RamVerdict:
    estimate: RamEstimate
    available_bytes: int
    fits: bool
    message: str  # why not, and which setting fits ("" when it fits)


def cpu_ram_verdict(
    entry: Any, family: Any, *, storage: str, disk: bool, limit_bytes: int | None, width: int, height: int, batch: int,
    available_bytes: int | None = None, reference_pixels: int = 0, input_pixels: int = 0, local_path: Any = None,
) -> RamVerdict | None:
    """Does this setting fit the RAM available now (CPU host)? If not, which setting does.
    `reference_pixels` / `input_pixels`: the request's input images (`stage_activations`)."""
    from engine.runtime.ram import available_ram_bytes, machine_headroom_bytes

    free = available_ram_bytes() if available_bytes is None else available_bytes
    headroom = machine_headroom_bytes()  # "fits" leaves the rest of the machine what the RAM room leaves it
    act = stage_activations(width, height, batch, reference_pixels, input_pixels)
    est = estimate_ram(
        entry, family, storage=storage, disk=disk, limit_bytes=limit_bytes, activations=act, available_bytes=free, local_path=local_path
    )
    if est is None:
        return None
    fits = est.minimum_bytes + headroom <= free  # copies beyond the masters adapt to the RAM room
    if fits:
        return RamVerdict(est, free, True, "")
    fitting = []
    # a GGUF entry keeps its file's blocks whatever the storage choice says: only disk offload changes it
    for alt_storage, alt_disk in alternatives(storage):
        if (alt_storage, alt_disk) == (storage, disk) or (alt_disk and disk and alt_storage == default_form().name):
            continue
        alt_limit = 0 if alt_disk else None
        alt = estimate_ram(
            entry, family, storage=alt_storage, disk=alt_disk, limit_bytes=alt_limit, activations=act, available_bytes=free,
            local_path=local_path,
        )
        if alt is not None and alt.minimum_bytes + headroom <= free:
            fitting.append(setting_name(alt_storage, alt_disk))
    name = getattr(entry, "name", "this model")
    tip = f" Use {' or '.join(fitting[:2])}." if fitting else " No setting fits: free some RAM or use a smaller model."
    message = (
        f"{name} with {setting_name(storage, disk)} needs about {est.minimum_bytes / GiB:.1f} GiB of RAM "
        f"({est.masters_bytes / GiB:.1f} GiB of weights in RAM) and leaves {headroom / GiB:.1f} GiB to the rest of the "
        f"machine; {free / GiB:.1f} GiB is available.{tip}"
    )
    return RamVerdict(est, free, False, message)
