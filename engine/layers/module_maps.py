"""Which layers get which managed class.

`module_map=None` wraps every module that holds parameters of its own (Linear, Conv*, Embedding,
norms with affine weights, RMSNorm variants, containers with direct parameters such as pad
tokens), so no parameter is left unmanaged. The per-model maps are declarative data in the
DiffSynth style (dotted class paths), plus the names of the block lists that group layers for
streaming; each family's spec (model_registry.families) holds its denoiser's map, and tests
check each map against the real classes.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Mapping

from torch import nn

from engine.layers.managed import ManagedLinear, ManagedModule, is_plain_linear


@functools.cache
def shipped_module_maps() -> dict[str, dict[str, Any]]:
    """Denoiser class (dotted path) -> {"layers": {layer class -> managed class}, "blocks": [block
    list attribute paths]}, read from the family specs (model_registry.families) on first use."""
    from model_registry.families import FAMILIES

    return {
        spec.model_class: {"layers": dict(spec.layers), "blocks": list(spec.blocks)}
        for spec in (family.layer_map for family in FAMILIES.values())
        if spec is not None
    }


def import_object(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"module_map: cannot import {path!r} ({exc})") from exc


def _as_class(value: Any, what: str) -> type:
    cls = import_object(value) if isinstance(value, str) else value
    if not isinstance(cls, type):
        raise ValueError(f"module_map {what} {value!r} is not a class")
    return cls


def normalize_module_map(module_map: Mapping[Any, Any]) -> dict[type, type[ManagedModule]]:
    """Accept classes or dotted paths on both sides; values must be managed classes."""
    if not isinstance(module_map, Mapping):
        raise ValueError(f"module_map must be a dict {{layer class: ManagedLinear | ManagedModule}}, got {type(module_map).__name__}")
    out: dict[type, type[ManagedModule]] = {}
    for key, value in module_map.items():
        layer_cls = _as_class(key, "key")
        wrapper = _as_class(value, "value")
        if not issubclass(wrapper, ManagedModule):
            raise ValueError(
                f"module_map[{layer_cls.__name__}] = {wrapper.__name__}: values must be engine.ManagedLinear, "
                "engine.ManagedModule or a subclass of them"
            )
        if issubclass(wrapper, ManagedLinear) and not issubclass(layer_cls, nn.Linear):
            raise ValueError(f"module_map[{layer_cls.__name__}] = ManagedLinear: ManagedLinear only wraps nn.Linear layers")
        out[layer_cls] = wrapper
    return out


def registered_map_for(model: nn.Module) -> dict[str, Any] | None:
    """The declarative map for this model's class, if we ship one."""
    cls = ManagedModule.unwrap_class(model)
    for klass in cls.__mro__:
        entry = shipped_module_maps().get(f"{klass.__module__}.{klass.__qualname__}")
        if entry is not None:
            return entry
    return None


def has_direct_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def default_wrapper_for(module: nn.Module) -> type[ManagedModule] | None:
    """The default rule: every module with parameters of its own is managed."""
    if not has_direct_parameters(module):
        return None
    return ManagedLinear if is_plain_linear(module) else ManagedModule


def wrapper_from_map(module: nn.Module, module_map: dict[type, type[ManagedModule]]) -> type[ManagedModule] | None:
    """Most specific class in the module's MRO that the map names."""
    for klass in type(module).__mro__:
        wrapper = module_map.get(klass)
        if wrapper is not None:
            if wrapper is ManagedLinear and not is_plain_linear(module):
                return ManagedModule  # a Linear subclass with its own forward must keep it
            return wrapper
    return None


def block_paths_for(model: nn.Module) -> list[str]:
    entry = registered_map_for(model)
    return list(entry["blocks"]) if entry else []
