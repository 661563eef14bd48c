"""The catalogue's families as the memory engine's tables (engine.model_tables).

Each family spec (model_registry/families/<family>.py) declares what the engine needs of its
denoiser class: its layer map and block lists, its diffusers LoRA loader and the component prefix
of its LoRA files (the denoiser's name), its GGUF architectures and original layout. The memory
engine below this layer never reads the catalogue; this module turns each family into one
`ModelTables` record keyed by the denoiser class. The public facade (engine/__init__.py) adds
`shipped_tables` as a provider, so the records are there on the first lookup whoever calls: a
pipeline this layer builds, or a plain user's `engine.enable_vram_management(transformer)`.
"""

from __future__ import annotations

from engine.model_tables import ModelTables
from model_registry.families import FAMILIES, Family


def tables_of(family: Family) -> ModelTables:
    """The engine's record of `family`'s denoiser class."""
    layer_map, gguf = family.layer_map, family.gguf
    return ModelTables(
        model_class=family.denoiser_class,
        layers=dict(layer_map.layers) if layer_map is not None else None,
        blocks=tuple(layer_map.blocks) if layer_map is not None else (),
        lora_loader=family.lora_loader,
        lora_prefix=family.denoiser if family.lora_loader else None,
        gguf_architectures=tuple(gguf.architectures) if gguf is not None else (),
        gguf_layout=gguf.layout if gguf is not None else None,
    )


def shipped_tables() -> list[ModelTables]:
    """One record per denoiser class of the family table (families that share a class, such as
    Qwen-Image and Qwen-Image-Edit, declare the same tables; engine.model_tables refuses two
    different ones)."""
    return [tables_of(family) for family in FAMILIES.values()]
