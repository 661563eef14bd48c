"""What the live panel reads: the run in progress (one at a time), its events and memory history.

The generation handler writes here; the timer handler of every open tab reads here. Both run in
different worker threads, so everything goes through one lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from engine.generation.types import GenerationEvent, TelemetrySnapshot

MAX_SAMPLES = 2400  # 20 minutes at 2 samples a second
MIN_SAMPLE_INTERVAL = 0.2  # seconds between two history samples


@dataclass
class Run:
    run_id: int
    owner: str  # session hash of the tab (or "api") that started it
    started: float
    event: GenerationEvent | None = None
    finished: bool = False
    samples: list[tuple[float, float | None, float]] = field(default_factory=list)
    preview: Any = None  # the latest live preview (a PIL image) of this run
    previews: int = 0  # how many the run has sent


def _carry(previous: GenerationEvent | None, event: GenerationEvent) -> GenerationEvent:
    """After the denoising loop, keep its last step and speed on the panel."""
    if previous is None or event.phase in ("downloading", "loading", "encoding", "denoising"):
        return event
    if event.seconds_per_step is None and previous.seconds_per_step is not None:
        event = replace(event, seconds_per_step=previous.seconds_per_step)
    if not event.step and previous.total_steps:
        event = replace(event, step=previous.step, total_steps=previous.total_steps)
    return event


class RunTracker:
    """Thread-safe registry of the current (or last) run and of pending cancel requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: Run | None = None
        self._next_id = 1
        self._cancels: dict[str, threading.Event] = {}

    # --- cancel events, one per tab -------------------------------------------------------
    def arm(self, session: str) -> threading.Event:
        """A fresh cancel event for the tab's next run (called when Generate is clicked)."""
        with self._lock:
            event = threading.Event()
            self._cancels[session] = event
            return event

    def cancel_event(self, session: str) -> threading.Event:
        """The tab's armed cancel event (a fresh one when none was armed)."""
        with self._lock:
            event = self._cancels.get(session)
            if event is None:
                event = self._cancels[session] = threading.Event()
            return event

    def cancel(self, session: str) -> bool:
        """Ask the tab's pending or running generation to stop. False when it has none."""
        with self._lock:
            event = self._cancels.get(session)
            if event is None or event.is_set():
                return False
            event.set()
            return True

    def disarm(self, session: str) -> None:
        with self._lock:
            self._cancels.pop(session, None)

    # --- the run --------------------------------------------------------------------------
    def start(self, owner: str) -> int:
        with self._lock:
            run_id = self._next_id
            self._next_id += 1
            self._run = Run(run_id=run_id, owner=owner, started=time.monotonic(),
                            event=GenerationEvent(phase="queued", message="Starting"))
            return run_id

    def update(self, run_id: int, event: GenerationEvent) -> None:
        with self._lock:
            if self._run is not None and self._run.run_id == run_id:
                if event.preview is not None:
                    self._run.preview, self._run.previews = event.preview, self._run.previews + 1
                    event = replace(event, preview=None)  # the panel's event need not hold the image
                self._run.event = _carry(self._run.event, event)
                if event.telemetry is not None:
                    self._sample_locked(event.telemetry)

    def finish(self, run_id: int, event: GenerationEvent | None = None) -> None:
        with self._lock:
            if self._run is not None and self._run.run_id == run_id:
                if event is not None:
                    self._run.event = _carry(self._run.event, event)
                self._run.finished = True

    def sample(self, snapshot: TelemetrySnapshot) -> None:
        """Add a memory sample to the running run's history (rate-limited)."""
        with self._lock:
            if self._run is not None and not self._run.finished:
                self._sample_locked(snapshot)

    def _sample_locked(self, snapshot: TelemetrySnapshot) -> None:
        run = self._run
        assert run is not None
        t = time.monotonic() - run.started
        if run.samples and t - run.samples[-1][0] < MIN_SAMPLE_INTERVAL:
            return
        run.samples.append((t, snapshot.vram_used_gb, snapshot.ram_used_gb))
        if len(run.samples) > MAX_SAMPLES:
            del run.samples[: len(run.samples) - MAX_SAMPLES]

    def view(self) -> tuple[int | None, str | None, GenerationEvent | None, bool, list[tuple[float, float | None, float]]]:
        """(run_id, owner, last event, finished, copy of samples) of the current or last run."""
        with self._lock:
            run = self._run
            if run is None:
                return None, None, None, True, []
            return run.run_id, run.owner, run.event, run.finished, list(run.samples)

    def preview(self) -> tuple[int | None, int, Any]:
        """(run_id, number of previews so far, the latest preview) of the current or last run."""
        with self._lock:
            run = self._run
            if run is None:
                return None, 0, None
            return run.run_id, run.previews, run.preview
