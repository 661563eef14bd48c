"""Memory engine: layer-wise VRAM management (four states, honest budget, scaled FP8).

Never imports Gradio. Public API (names kept stable for users' scripts):

    from engine import enable_vram_management, layer_state_counts, layer_state_bytes, set_vram_limit
    from engine import ManagedLinear, ManagedModule, load_model, disable_vram_management
    from engine import load_lora, set_lora_strength, remove_lora, active_loras
    from engine import ModelTables, register_model_tables   # a model class's layer map, LoRA loader, GGUF names
    from engine import StorageForm, register_form, get_form   (the storage forms' registry)
    from engine import compile_model, uncompile_model   # regional torch.compile of a managed model
    from engine import suggest_settings      # the settings that fit a machine (no Studio needed)

Names resolve on first use (PEP 562), so a light sub-module (engine.generation.types, which the
UI needs) imports without torch. The sub-packages and their one-way import order are described
in docs/engine.md and checked by tests/test_layering.py.

What the engine knows of particular model classes is data (engine.model_tables): this facade adds
the app's model families as its provider, so a plain diffusers transformer managed through
`enable_vram_management` gets its family's layer map and `load_lora` its family's converter.
"""

import importlib
from collections.abc import Iterable
from typing import Any

from engine import model_tables as _model_tables
from engine.runtime.alloc_conf import configure_allocator as _configure_allocator

_configure_allocator()  # before CUDA starts: expandable segments, unless the user set a config


def _shipped_tables() -> Iterable[Any]:
    """The app's model families' tables (layer maps, LoRA loaders, GGUF names), registered on the
    first table lookup: the memory engine takes them as data and never reads the catalogue itself
    (engine.model_tables). Without the catalogue (the engine used on its own) there are none."""
    try:
        from engine.generation.family_tables import shipped_tables
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "model_registry":
            raise
        return []
    return shipped_tables()


_model_tables.add_provider(_shipped_tables)

_EXPORTS = {
    "DISK": "engine.config",
    "VramConfig": "engine.config",
    "parse_vram_limit": "engine.config",
    "STATES": "engine.layers.state",
    "LayerState": "engine.layers.state",
    "StorageForm": "engine.storage.forms",
    "register_form": "engine.storage.forms",
    "get_form": "engine.storage.forms",
    "CheckpointError": "engine.storage.disk",
    "DiskStored": "engine.storage.disk",
    "Int8Stored": "engine.storage.int8",
    "Nf4Stored": "engine.storage.nf4",
    "GgufStored": "engine.storage.gguf",
    "GgufDiskStored": "engine.storage.gguf",
    "ManagedLinear": "engine.layers.managed",
    "ManagedModule": "engine.layers.managed",
    "MemoryPool": "engine.runtime.pool",
    "ModelTables": "engine.model_tables",
    "register_model_tables": "engine.model_tables",
    "load_model": "engine.loading.loader",
    "LoraError": "engine.lora.formats",
    "LoraHandle": "engine.lora.loras",
    "active_loras": "engine.lora.loras",
    "load_lora": "engine.lora.loras",
    "remove_lora": "engine.lora.loras",
    "set_lora_strength": "engine.lora.loras",
    "compile_model": "engine.compilation",
    "uncompile_model": "engine.compilation",
    "VramBudget": "engine.management",
    "disable_vram_management": "engine.management",
    "enable_vram_management": "engine.management",
    "is_managed": "engine.management",
    "layer_state_bytes": "engine.management",
    "layer_state_counts": "engine.management",
    "offload_model": "engine.management",
    "onload_model": "engine.management",
    "runtime_of": "engine.management",
    "set_vram_limit": "engine.management",
    "vram_budget": "engine.management",
    "suggest_settings": "engine.generation.estimator",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
