"""Which layers get which managed class.

`module_map=None` wraps every module that holds parameters of its own (Linear, Conv*, Embedding,
norms with affine weights, RMSNorm variants, containers with direct parameters such as pad
tokens), so no parameter is left unmanaged. The per-model maps are declarative data in the
DiffSynth style (dotted class paths), plus the names of the block lists that group layers for
streaming: the `layers` and `blocks` of a model class's registered tables (engine.model_tables;
the app's model families register theirs, and tests check each shipped map against the real
classes). Besides managed classes and their dotted paths, a map's values may be the words
"linear" and "module" (engine.model_tables.LINEAR / MODULE), so data that names no engine class
can still say which one a layer gets.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from torch import nn

from engine.layers.managed import ManagedLinear, ManagedModule, is_plain_linear
from engine.model_tables import LINEAR, MODULE, all_tables, tables_for

#: the managed class each word of a layer map stands for
_WORDS: dict[str, type[ManagedModule]] = {LINEAR: ManagedLinear, MODULE: ManagedModule}


def shipped_module_maps() -> dict[str, dict[str, Any]]:
    """Model class (dotted path) -> {"layers": {layer class -> managed class}, "blocks": [block
    list attribute paths]}, for every registered model class that has a layer map."""
    return {
        path: {"layers": dict(t.layers), "blocks": list(t.blocks)}
        for path, t in all_tables().items()
        if t.layers is not None
    }


def import_object(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"module_map: cannot import {path!r} ({exc})") from exc


def _as_class(value: Any, what: str) -> type:
    if isinstance(value, str) and value in _WORDS and what == "value":
        return _WORDS[value]
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
    """The declarative map registered for this model's class (engine.model_tables), if any."""
    tables = tables_for(ManagedModule.unwrap_class(model))
    if tables is None or tables.layers is None:
        return None
    return {"layers": dict(tables.layers), "blocks": list(tables.blocks)}


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
    """The block lists that group this model's layers for streaming (its registered tables')."""
    tables = tables_for(ManagedModule.unwrap_class(model))
    return list(tables.blocks) if tables is not None else []
