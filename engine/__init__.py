"""Memory engine: layer-wise VRAM management (four states, honest budget, scaled FP8).

Never imports Gradio. Public API (names kept stable for users' scripts):

    from engine import enable_vram_management, layer_state_counts, layer_state_bytes, set_vram_limit
    from engine import ManagedLinear, ManagedModule
"""

from engine.planning.budget import VramBudget
from engine.config import DISK, STATES, VramConfig, parse_vram_limit
from engine.storage.disk import CheckpointError, DiskStored
from engine.layers.managed import ManagedLinear, ManagedModule
from engine.loading.loader import load_model
from engine.management import (
    enable_vram_management,
    is_managed,
    layer_state_bytes,
    layer_state_counts,
    offload_model,
    onload_model,
    runtime_of,
    set_vram_limit,
    vram_budget,
)

__all__ = [
    "DISK",
    "CheckpointError",
    "DiskStored",
    "STATES",
    "ManagedLinear",
    "ManagedModule",
    "VramBudget",
    "VramConfig",
    "enable_vram_management",
    "is_managed",
    "layer_state_bytes",
    "layer_state_counts",
    "load_model",
    "offload_model",
    "onload_model",
    "parse_vram_limit",
    "runtime_of",
    "set_vram_limit",
    "vram_budget",
]
