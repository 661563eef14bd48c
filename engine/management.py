"""Public entry points: enable / disable_vram_management, set_vram_limit, state counts and bytes.

The shape follows DiffSynth's `enable_vram_management(model, module_map, vram_config,
vram_limit)`, so scripts written for it work here.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from engine.config import VramConfig
from engine.layers import opaque
from engine.layers.hooks import register_hook, remove_hook
from engine.layers.managed import ManagedModule
from engine.layers.state import STATES, ManagedLayer
from engine.layers.module_maps import (
    block_paths_for,
    default_wrapper_for,
    has_direct_parameters,
    normalize_module_map,
    registered_map_for,
    wrapper_from_map,
)
from engine.runtime.component import VramRuntime
from engine.runtime.entry import ENTRY_HOOK, StepEntryHook
from engine.runtime.pool import MemoryPool
from engine.storage.stored import PlainStored, StoredTensor, store
from engine.transfer.devices import backend_for
from engine.transfer.host_arena import HostArena

VramBudget = MemoryPool  # the public name users' scripts share between components

log = logging.getLogger(__name__)

MasterFactory = Callable[[str, torch.Tensor], StoredTensor]


def runtime_of(model: nn.Module) -> VramRuntime:
    runtime = getattr(model, "_vram_runtime", None)
    if runtime is None:
        raise ValueError(f"{type(model).__name__} is not managed: call engine.enable_vram_management(model, ...) first")
    return runtime


def is_managed(model: nn.Module) -> bool:
    return getattr(model, "_vram_runtime", None) is not None


def _plan_wrappers(model: nn.Module, module_map: Mapping[Any, Any] | None) -> list[tuple[str, nn.Module, type[ManagedModule]]]:
    if module_map is None:
        entry = registered_map_for(model)
        mapping = normalize_module_map(entry["layers"]) if entry else None
    else:
        mapping = normalize_module_map(module_map)
    plan = []
    for name, module in model.named_modules():
        if isinstance(module, ManagedModule):
            raise ValueError(f"layer {name or '<root>'} is already managed; use engine.set_vram_limit to change the budget")
        if not has_direct_parameters(module):
            continue
        wrapper = wrapper_from_map(module, mapping) if mapping is not None else default_wrapper_for(module)
        if wrapper is None and mapping is not None and module_map is None:
            wrapper = default_wrapper_for(module)  # shipped maps never leave a parameter unmanaged
        if wrapper is not None:
            plan.append((name, module, wrapper))
    return plan


def _placeholder(stored: StoredTensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """What a parameter slot holds while the layer is not resident: the master itself when it is
    already in computation form (state_dict keeps working), else a meta tensor that still reports
    the computation dtype and shape to model code that inspects `weight.dtype`."""
    if isinstance(stored, PlainStored):
        t = stored.tensor
        if not t.is_floating_point():
            return t
        if t.dtype == compute_dtype:
            return nn.Parameter(t, requires_grad=False)
    return nn.Parameter(torch.empty(stored.shape, dtype=compute_dtype, device="meta"), requires_grad=False)


def _block_of(name: str, block_paths: list[str]) -> str | None:
    for path in block_paths:
        prefix = path + "."
        if name.startswith(prefix):
            index = name[len(prefix) :].split(".", 1)[0]
            return f"{path}.{index}"
    return None


def enable_vram_management(
    model: nn.Module,
    module_map: Mapping[Any, Any] | None = None,
    vram_config: Mapping[str, Any] | VramConfig | None = None,
    vram_limit: float | None = None,
    *,
    budget: MemoryPool | None = None,
    name: str | None = None,
    onload: bool = True,
    master_factory: MasterFactory | None = None,
    host_arena: HostArena | None = None,
    scheduler: bool | None = None,
) -> nn.Module:
    """Manage every weight-holding layer of `model` under `vram_config` within `vram_limit` GB.

    `budget` (a MemoryPool, public name VramBudget) lets several components (a pipeline's) share
    one VRAM budget; `onload=False` leaves the component offloaded for a pipeline to onload when
    its stage comes. `master_factory` is the loader's hook: it supplies each parameter's master
    copy (e.g. left in its .safetensors file); `host_arena` is the loader's buffer those masters
    are views of (pinned in place on CUDA). `scheduler`: stream through a TransferScheduler (None:
    when the computation device is CUDA; False for a meta build that only plans, such as the
    pre-flight estimate for a GPU, which must not touch CUDA). The config, limit and map are
    validated before anything on the model changes. `disable_vram_management(model)` undoes it.
    """
    config = VramConfig.from_dict(vram_config)
    if budget is not None and vram_limit is not None:
        raise ValueError("pass either vram_limit or a shared budget (whose limit applies), not both")
    pool = budget if budget is not None else MemoryPool(limit_gb=vram_limit)  # the pool checks the limit
    if is_managed(model):
        raise ValueError(f"{type(model).__name__} is already managed; use engine.set_vram_limit(model, gb) to change the budget")
    if config.uses_disk and master_factory is None:
        raise ValueError(
            "vram_config asks for disk offload (\"disk\"), which needs the weights to stay in their .safetensors files: "
            "build the model with engine.load_model(ModelClass, path, vram_config=...) instead of enable_vram_management."
        )
    plan = _plan_wrappers(model, module_map)

    runtime = VramRuntime(model, config, pool, name or type(model).__name__)
    runtime.host_arena = host_arena
    offload_place = config.place("offload")
    comp_dtype = config.computation_dtype
    block_paths = block_paths_for(model)
    masters_by_param: dict[int, StoredTensor] = {}
    placeholders_by_param: dict[int, torch.Tensor] = {}
    undo: list[tuple[ManagedLayer, dict[str, Any]]] = []
    try:
        for layer_name, module, wrapper in plan:
            masters: dict[str, StoredTensor] = {}
            owned: set[str] = set()
            placeholders: dict[str, torch.Tensor] = {}
            for pname, param in module._parameters.items():
                if param is None:
                    continue
                key = id(param)
                if key not in masters_by_param:
                    full_name = f"{layer_name}.{pname}" if layer_name else pname
                    stored = master_factory(full_name, param) if master_factory else store(param.detach(), offload_place, comp_dtype)
                    masters_by_param[key] = stored
                    placeholders_by_param[key] = _placeholder(stored, comp_dtype)
                    owned.add(pname)
                masters[pname] = masters_by_param[key]
                placeholders[pname] = placeholders_by_param[key]
            layer = ManagedLayer(layer_name, module, runtime, masters, owned, placeholders, _block_of(layer_name, block_paths))
            runtime.layers.append(layer)
            undo.append((layer, layer.install()))
            wrapper.wrap(module)
            module._vram = layer
            opaque.register(layer)
        runtime.unmanaged_bytes = _place_unmanaged(model, config)
    except BaseException:
        for layer, originals in reversed(undo):
            layer.uninstall(originals)
            opaque.unregister(layer)
            ManagedModule.unwrap(layer.module)
        raise
    del undo  # the original parameters must not outlive enable (their memory may move)

    pool.join(runtime)
    model._vram_runtime = runtime
    register_hook(model, StepEntryHook(runtime))
    if (config.computation_device.type == "cuda") if scheduler is None else scheduler:
        runtime.use_scheduler(backend_for(config.computation_device))
    if onload:
        runtime.onload()
    else:
        pool.replan()
    return model


def disable_vram_management(model: nn.Module) -> nn.Module:
    """Give back the plain model: every managed layer gets its own class and real parameters
    again, the engine's hooks come off, its streams, slots and pinned memory are released and the
    component leaves its budget. A plain master (not FP8, not on disk) becomes the parameter as it
    is stored (its offload dtype: the very tensor when nothing converted it); FP8 and disk masters
    are rebuilt in the computation dtype on the offload device (the CPU for disk offload), so a
    20B disk-offloaded model needs its size in RAM here."""
    runtime = runtime_of(model)
    runtime.offload()
    runtime.close()
    remove_hook(model, ENTRY_HOOK)
    device = runtime.offload_place.device if not runtime.offload_place.on_disk else torch.device("cpu")
    for layer in runtime.layers:
        layer.uninstall({name: _plain(stored, device, runtime.comp_dtype) for name, stored in layer.masters.items()})
        opaque.unregister(layer)
        ManagedModule.unwrap(layer.module)
    runtime.pool.leave(runtime)
    del model._vram_runtime
    return model


def _plain(stored: StoredTensor, device: torch.device, comp_dtype: torch.dtype) -> torch.Tensor:
    """A parameter rebuilt from its master: the master's own tensor when it is a plain copy."""
    if isinstance(stored, PlainStored):
        return stored.tensor
    return stored.materialize(device, comp_dtype)


def _place_unmanaged(model: nn.Module, config: VramConfig) -> int:
    """Buffers (and parameters a user's map left out) live on the computation device; their bytes
    are fixed costs in the budget."""
    device = config.computation_device
    fixed = 0
    leftovers = []
    for mod_name, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is None:
                continue
            if buf.device != device and buf.device.type != "meta":
                module._buffers[bname] = buf.to(device)
            fixed += buf.nbytes
        if isinstance(module, ManagedModule):
            continue
        for pname, param in module._parameters.items():
            if param is None:
                continue
            leftovers.append(f"{mod_name}.{pname}" if mod_name else pname)
            dtype = config.computation_dtype if param.is_floating_point() else param.dtype
            moved = param.detach().to(device=device, dtype=dtype)
            module._parameters[pname] = nn.Parameter(moved, requires_grad=False) if moved.is_floating_point() else moved
            fixed += moved.nbytes
    if leftovers:
        log.warning(
            "module_map leaves %d parameter(s) unmanaged; they stay on %s: %s",
            len(leftovers),
            device,
            ", ".join(leftovers[:8]) + (" ..." if len(leftovers) > 8 else ""),
        )
    return fixed


def _pool_of(target: nn.Module | MemoryPool) -> MemoryPool:
    return target if isinstance(target, MemoryPool) else runtime_of(target).pool


def set_vram_limit(target: nn.Module | MemoryPool, vram_limit: float | None) -> None:
    """Re-plan residency on a live model (or a pipeline's shared budget) under a new limit in GB.
    Copies that lose residency are dropped at once; new resident copies are filled at their
    layer's next forward from the copy it streams anyway, so nothing is read again."""
    pool = _pool_of(target)
    pool.set_limit(vram_limit)
    pool.replan()


def onload_model(model: nn.Module) -> None:
    """Pipeline switch: this component runs soon."""
    runtime_of(model).onload()


def offload_model(model: nn.Module) -> None:
    """Pipeline switch: this component is done for now."""
    runtime_of(model).offload()


def layer_state_counts(model: nn.Module) -> dict[str, int]:
    """{"offload": n, "onload": n, "preparing": n, "computation": n} over the managed layers."""
    return runtime_of(model).state_counts()


def layer_state_bytes(model: nn.Module) -> dict[str, int]:
    """Same keys: bytes of weights as stored in each state (master bytes for offload, the onload
    copy for onload, the resident copy for preparing, the computation copy for computation)."""
    return runtime_of(model).state_bytes()


def vram_budget(model: nn.Module) -> MemoryPool:
    """The memory pool (public name VramBudget) the model's component draws on."""
    return runtime_of(model).pool


__all__ = [
    "STATES",
    "VramBudget",
    "disable_vram_management",
    "enable_vram_management",
    "set_vram_limit",
    "layer_state_counts",
    "layer_state_bytes",
    "onload_model",
    "offload_model",
    "runtime_of",
    "is_managed",
    "vram_budget",
]
