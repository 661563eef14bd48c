"""Memory engine: layer-wise VRAM management (four states, honest budget, scaled FP8).

Never imports Gradio. Public API (names kept stable for users' scripts):

    from engine import enable_vram_management, layer_state_counts, layer_state_bytes, set_vram_limit
    from engine import ManagedLinear, ManagedModule, load_model, disable_vram_management
    from engine import load_lora, set_lora_strength, remove_lora, active_loras
    from engine import suggest_settings      # the settings that fit a machine (no Studio needed)

Names resolve on first use (PEP 562), so a light sub-module (engine.generation.types, which the
UI needs) imports without torch. The sub-packages and their one-way import order are described
in docs/engine.md and checked by tests/test_layering.py.
"""

import importlib
from typing import Any

_EXPORTS = {
    "DISK": "engine.config",
    "VramConfig": "engine.config",
    "parse_vram_limit": "engine.config",
    "STATES": "engine.layers.state",
    "LayerState": "engine.layers.state",
    "CheckpointError": "engine.storage.disk",
    "DiskStored": "engine.storage.disk",
    "Int8Stored": "engine.storage.int8",
    "Nf4Stored": "engine.storage.nf4",
    "GgufStored": "engine.storage.gguf",
    "GgufDiskStored": "engine.storage.gguf",
    "ManagedLinear": "engine.layers.managed",
    "ManagedModule": "engine.layers.managed",
    "MemoryPool": "engine.runtime.pool",
    "load_model": "engine.loading.loader",
    "LoraError": "engine.lora.formats",
    "LoraHandle": "engine.lora.loras",
    "active_loras": "engine.lora.loras",
    "load_lora": "engine.lora.loras",
    "remove_lora": "engine.lora.loras",
    "set_lora_strength": "engine.lora.loras",
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
