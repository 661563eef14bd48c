"""Public entry points: enable_vram_management, set_vram_limit, state counts and bytes.

The shape follows DiffSynth's `enable_vram_management(model, module_map, vram_config,
vram_limit)`, so scripts written for it work here.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from engine.planning.budget import VramBudget
from engine.config import STATES, VramConfig, parse_vram_limit
from engine.transfer.devices import backend_for
from engine.runtime.entry import install_entry_points
from engine.transfer.host_arena import HostArena
from engine.layers.managed import ManagedModule
from engine.layers.module_maps import (
    block_paths_for,
    default_wrapper_for,
    has_direct_parameters,
    normalize_module_map,
    registered_map_for,
    wrapper_from_map,
)
from engine.runtime.component import LayerRecord, VramRuntime
from engine.storage.stored import PlainStored, StoredTensor, store

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
    budget: VramBudget | None = None,
    name: str | None = None,
    onload: bool = True,
    master_factory: MasterFactory | None = None,
    host_arena: HostArena | None = None,
) -> nn.Module:
    """Manage every weight-holding layer of `model` under `vram_config` within `vram_limit` GB.

    `budget` lets several components (a pipeline's) share one VRAM budget; `onload=False` leaves
    the component offloaded for a pipeline to onload when its stage comes. `master_factory` is the
    loader's hook: it supplies each parameter's master copy (e.g. left in its .safetensors file);
    `host_arena` is the loader's buffer those masters are views of (pinned in place on CUDA).
    The config, limit and map are validated before anything on the model changes.
    """
    config = VramConfig.from_dict(vram_config)
    limit = parse_vram_limit(vram_limit)
    if is_managed(model):
        raise ValueError(f"{type(model).__name__} is already managed; use engine.set_vram_limit(model, gb) to change the budget")
    if config.uses_disk and master_factory is None:
        raise ValueError(
            "vram_config asks for disk offload (\"disk\"), which needs the weights to stay in their .safetensors files: "
            "build the model with engine.load_model(ModelClass, path, vram_config=...) instead of enable_vram_management."
        )
    if budget is not None and vram_limit is not None:
        raise ValueError("pass either vram_limit or a shared budget (whose limit applies), not both")
    plan = _plan_wrappers(model, module_map)

    budget = budget if budget is not None else VramBudget(limit_gb=limit)
    runtime = VramRuntime(model, config, budget, name or type(model).__name__)
    runtime.host_arena = host_arena
    offload_place = config.place("offload")
    comp_dtype, comp_device = config.computation_dtype, config.computation_device
    block_paths = block_paths_for(model)
    masters_by_param: dict[int, StoredTensor] = {}
    placeholders_by_param: dict[int, torch.Tensor] = {}
    undo: list[tuple[nn.Module, type, dict[str, Any]]] = []
    try:
        for layer_name, module, wrapper in plan:
            masters: dict[str, StoredTensor] = {}
            owned: set[str] = set()
            placeholders: dict[str, torch.Tensor] = {}
            original_params = dict(module._parameters)
            for pname, param in original_params.items():
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
            undo.append((module, type(module), original_params))
            record = LayerRecord(layer_name, module, runtime, masters, owned)
            record.placeholders = placeholders
            record.block = _block_of(layer_name, block_paths)
            module._parameters.update(placeholders)
            wrapper.wrap(module)
            module._vram = record
            runtime.layers.append(record)
        runtime.fixed_bytes = _place_unmanaged(model, config)
    except BaseException:
        for module, cls, params in reversed(undo):
            module.__class__ = cls
            module._parameters.update(params)
            module.__dict__.pop("_vram", None)
        raise

    budget.add_fixed(runtime.fixed_bytes)
    budget.members.append(runtime)
    model._vram_runtime = runtime
    install_entry_points(runtime)
    if comp_device.type == "cuda":
        runtime.use_scheduler(backend_for(comp_device))
    if onload:
        runtime.onload()
    else:
        for record in runtime.layers:
            record.set_rest_state("offload")
        budget.replan()
    return model


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


def _budget_of(target: nn.Module | VramBudget) -> VramBudget:
    return target if isinstance(target, VramBudget) else runtime_of(target).budget


def set_vram_limit(target: nn.Module | VramBudget, vram_limit: float | None) -> None:
    """Re-plan residency on a live model (or a pipeline's shared budget) under a new limit in GB.
    Copies that lose residency are dropped at once; new resident copies are filled at their
    layer's next forward from the copy it streams anyway, so nothing is read again."""
    budget = _budget_of(target)
    budget.set_limit(vram_limit)
    budget.replan()


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


def vram_budget(model: nn.Module) -> VramBudget:
    return runtime_of(model).budget


__all__ = [
    "STATES",
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
