"""The pipeline families: one spec per family, collected into one table.

Each family file (qwen_image.py, z_image.py, flux1.py, flux2_klein.py, sdxl.py) defines one
`Family` (spec.py): its repo layout for the registry, its runtime roles, layer map and prompt
encoding for the engine. The catalogue (models.json) lists the models of each family.
"""

from __future__ import annotations

from . import flux1, flux1_kontext, flux2_klein, qwen_image, qwen_image_edit, sdxl, z_image
from .spec import DECODE, DENOISE, ENCODE, STAGES, Family, LayerMap

__all__ = ["DECODE", "DENOISE", "ENCODE", "FAMILIES", "FAMILY_MODULES", "STAGES", "Family", "LayerMap", "family_for_pipeline"]

#: The family files, in the table's order.
FAMILY_MODULES = (qwen_image, z_image, flux1, flux2_klein, sdxl, qwen_image_edit, flux1_kontext)

#: Every supported family, keyed by name (the "family" of a models.json entry).
FAMILIES: dict[str, Family] = {module.FAMILY.name: module.FAMILY for module in FAMILY_MODULES}


def family_for_pipeline(pipeline_class: str) -> Family | None:
    """The family whose pipeline class a model_index.json names, if any."""
    for family in FAMILIES.values():
        if family.pipeline_class == pipeline_class:
            return family
    return None
