"""Plain types the registry hands out, shared with the engine and the UI (engine.api_types
re-exports them): the data flows ui -> engine -> model_registry, so they are defined here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class UserFacingError(ValueError):
    """An error whose message is written for the person using the app: it says what to do."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the UI's model dropdown."""

    id: str
    name: str
    size_gb: float  # bytes of all components in bf16, in GB
    downloaded: bool
    is_demo: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)  # steps, guidance, width, height
    limits: dict[str, Any] = field(default_factory=dict)  # min/max width/height/steps/guidance
    # images in: "none", "img2img" (one image + strength) or "reference" (edit models), and how many
    image_mode: str = "none"
    max_images: int = 0
    family: str = ""  # the picker groups models by it (the catalogue's family name)
