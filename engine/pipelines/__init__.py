"""Diffusers pipelines built on the memory engine (see engine.pipelines.managed)."""

from .cfg import CfgPairBatcher
from .families import (
    DECODE,
    DENOISE,
    ENCODE,
    FAMILIES,
    STAGES,
    Family,
    family_for,
)
from .managed import (
    GenerationCancelled,
    ManagedPipeline,
    StepStats,
    activation_bytes,
    build_pipeline,
    execution_device_subclass,
    vae_memory_plan,
)

__all__ = [
    "DECODE",
    "DENOISE",
    "ENCODE",
    "FAMILIES",
    "STAGES",
    "CfgPairBatcher",
    "Family",
    "GenerationCancelled",
    "ManagedPipeline",
    "StepStats",
    "activation_bytes",
    "build_pipeline",
    "execution_device_subclass",
    "family_for",
    "vae_memory_plan",
]
