"""Diffusers pipelines built on the memory engine (see engine.pipelines.managed)."""

from engine.generation.pipelines.cfg import CfgPairBatcher, cfg_batch
from engine.generation.pipelines.families import (
    DECODE,
    DENOISE,
    ENCODE,
    FAMILIES,
    STAGES,
    Family,
    family_for,
)
from engine.generation.pipelines.managed import (
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
    "cfg_batch",
    "execution_device_subclass",
    "family_for",
    "vae_memory_plan",
]
