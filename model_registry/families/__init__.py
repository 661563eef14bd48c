"""The pipeline families: one spec file per family, found by looking, collected into one table.

A family is a module of this package (or of a directory on $LOWVRAM_FAMILY_PATH, which joins the
package's search path) that defines `FAMILY`, a `Family` (spec.py): its repo layout, the stage
each component runs in, its runtime roles, the memory engine's tables of its denoiser (layer
map, LoRA loader, GGUF names), its dtype needs and its prompt encoding. Modules without `FAMILY`
(spec.py, latent_rgb.py) are shared helpers. Nothing lists the families: adding one is its spec
file plus its catalogue JSON (the models in models.json, or a `<module>.json` next to the spec
file, read by model_registry.catalog and model_registry.sizes; docs/pipelines.md, "Adding a
family").
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from types import ModuleType

from .spec import DECODE, DENOISE, ENCODE, STAGES, Family, LayerMap

__all__ = [
    "DECODE",
    "DENOISE",
    "ENCODE",
    "FAMILIES",
    "FAMILY_MODULES",
    "FAMILY_PATH_ENV",
    "STAGES",
    "Family",
    "LayerMap",
    "catalogue_files",
    "family_for_pipeline",
]

#: more directories of family files, os.pathsep-separated (a user's own families)
FAMILY_PATH_ENV = "LOWVRAM_FAMILY_PATH"

__path__ = list(__path__) + [d for d in os.environ.get(FAMILY_PATH_ENV, "").split(os.pathsep) if d]


def _discover() -> tuple[ModuleType, ...]:
    """Every module on the package's path that defines FAMILY, in the order of their names."""
    names = sorted({info.name for info in pkgutil.iter_modules(__path__) if not info.ispkg})
    modules = [importlib.import_module(f"{__name__}.{name}") for name in names]
    return tuple(m for m in modules if isinstance(getattr(m, "FAMILY", None), Family))


#: The family files, in the order of their module names.
FAMILY_MODULES: tuple[ModuleType, ...] = _discover()

#: Every supported family, keyed by name (the "family" of a catalogue entry).
FAMILIES: dict[str, Family] = {}
_FILES: dict[str, str] = {}
for _module in FAMILY_MODULES:
    _name = _module.FAMILY.name
    if _name in FAMILIES:
        raise ValueError(f"two family files define the family {_name!r}: {_FILES[_name]} and {_module.__file__}")
    FAMILIES[_name], _FILES[_name] = _module.FAMILY, str(_module.__file__)
del _module, _name


def catalogue_files() -> list[Path]:
    """The catalogue JSON files that sit next to family files (`<module>.json`), in the family
    table's order: {"models": [catalogue entries], "component_configs": {config id: config}}."""
    files = [Path(str(m.__file__)).with_suffix(".json") for m in FAMILY_MODULES]
    return [f for f in files if f.is_file()]


def family_for_pipeline(pipeline_class: str) -> Family | None:
    """The family whose pipeline class a model_index.json names, if any."""
    for family in FAMILIES.values():
        if family.pipeline_class == pipeline_class:
            return family
    return None
