"""What the transfer path needs of the component it streams, and the counters it keeps.

The scheduler and the pinned arena see a managed component (engine.runtime.component.VramRuntime)
only through `StreamedComponent`, so the transfer path never imports the runtime above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.config import Place
from engine.layers.state import ManagedLayer
from engine.planning.ledger import VramLedger
from engine.storage.stored import StoredTensor
from engine.transfer.host_arena import HostArena


@dataclass
class StreamStats:
    """Counters of one component's streaming, which the telemetry panel reads."""

    streamed_bytes: int = 0
    streamed_layers: int = 0
    copy_seconds: float = 0.0
    compute_seconds: float = 0.0
    forwards: int = 0
    sync_fallbacks: int = 0  # streamed layers the traced schedule did not foresee
    oom_retries: int = 0


class StreamedComponent(Protocol):
    """What the transfer path needs of the component it streams (engine.runtime.component.VramRuntime)."""

    comp_dtype: torch.dtype
    onload_place: Place
    offload_place: Place
    onload_is_resident: bool
    stats: StreamStats
    execution_order: list[ManagedLayer] | None
    layers: list[ManagedLayer]
    host_arena: HostArena | None
    ledger: VramLedger
    # forwards the owner still expects, the running one included (None: unknown); at 1 the
    # scheduler does not prefetch into a next forward that will not come
    forwards_left: int | None

    def shapes(self, layer: ManagedLayer) -> dict[str, tuple]: ...  # (shape, dtype[, (form, bytes) of a file's blocks])

    def stream_source(self, layer: ManagedLayer) -> dict[str, StoredTensor]: ...

    def wants_resident(self, layer: ManagedLayer) -> bool: ...

    def planning_order(self) -> list[ManagedLayer]: ...
