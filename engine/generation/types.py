"""Plain data types that cross the engine <-> UI boundary.

The UI builds a `GenerateRequest`, the engine answers with a stream of `GenerationEvent`s
and finally a `GenerationResult`. Nothing here holds a tensor or imports Gradio, so both
sides can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# re-exported: model_registry defines them (data flows ui -> engine -> model_registry)
from model_registry.types import ModelChoice, UserFacingError  # noqa: F401

Phase = Literal["queued", "downloading", "loading", "encoding", "denoising", "decoding", "done", "cancelled", "error"]

LAYER_STATES: tuple[str, ...] = ("offload", "onload", "preparing", "computation")


@dataclass(frozen=True)
class GenerateRequest:
    """What the user asked for. `vram_limit=None` means Auto (detected VRAM minus a margin)."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = None  # registry id; None = the current default model
    width: int | None = None  # None = the model's default
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None or -1 = random
    vram_limit: float | None = None
    fp8: bool = False
    disk_offload: bool = False
    # input images (PIL images, bytes or file paths): image-to-image, or an edit model's references
    images: tuple[Any, ...] = ()
    strength: float | None = None  # image-to-image only: 0 keeps the input, 1 ignores it; None = 0.6


@dataclass(frozen=True)
class TelemetrySnapshot:
    """Memory and layer-state picture at one instant, cheap enough to take several times a second."""

    vram_used_gb: float | None  # None on a host without a GPU
    vram_total_gb: float | None
    ram_used_gb: float
    ram_total_gb: float
    # component name -> {state -> number of layers}
    layer_states: dict[str, dict[str, int]] = field(default_factory=dict)
    # bytes copied to the computation device during the last step, and copy/compute seconds
    streamed_bytes_last_step: int = 0
    copy_seconds_last_step: float = 0.0
    compute_seconds_last_step: float = 0.0
    slots_in_flight: int = 0
    timestamp: float = 0.0

    def totals(self) -> dict[str, int]:
        """Layer counts per state summed over components."""
        out = {state: 0 for state in LAYER_STATES}
        for counts in self.layer_states.values():
            for state, n in counts.items():
                out[state] = out.get(state, 0) + n
        return out


@dataclass(frozen=True)
class GenerationEvent:
    """One progress report of a running generation."""

    phase: Phase
    step: int = 0
    total_steps: int = 0
    seconds_per_step: float | None = None
    message: str = ""
    download_fraction: float | None = None  # 0..1 while downloading
    telemetry: TelemetrySnapshot | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The finished image, already saved as PNG with its infotext."""

    image: Any  # PIL.Image.Image
    path: Path
    parameters: str  # "parameters" infotext, as written into the PNG
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a setting needs before it runs, and whether it fits."""

    vram_gb: float
    ram_gb: float
    disk_gb: float
    streamed_gb_per_step: float
    fits: bool
    warnings: tuple[str, ...] = ()
    smallest_feasible_vram_limit_gb: float | None = None


@dataclass(frozen=True)
class HardwareInfo:
    """What the host has; decides whether the VRAM slider is live."""

    has_gpu: bool
    gpu_name: str | None
    vram_total_gb: float | None
    auto_vram_limit_gb: float | None  # detected VRAM minus a margin
    ram_total_gb: float

