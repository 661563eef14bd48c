"""The engine's lookup into the family table (model_registry.families holds the one table).

A local repo path is enough to build a pipeline, so the engine finds a family by the diffusers
pipeline class that the repo's model_index.json names, and refuses one it does not support.
"""

from __future__ import annotations

from model_registry.families import (
    DECODE,
    DENOISE,
    ENCODE,
    FAMILIES,
    STAGES,
    Family,
    family_for_pipeline,
)

__all__ = ["DECODE", "DENOISE", "ENCODE", "FAMILIES", "STAGES", "Family", "family_for"]


def family_for(pipeline_class: str) -> Family:
    """The family of `pipeline_class`; ValueError naming the supported classes if there is none."""
    family = family_for_pipeline(pipeline_class)
    if family is None:
        known = ", ".join(sorted(f.pipeline_class for f in FAMILIES.values()))
        raise ValueError(f"pipeline class {pipeline_class!r} is not supported; supported: {known}")
    return family
