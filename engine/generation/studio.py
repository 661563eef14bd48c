"""`Studio`: the one object the UI talks to, a facade over four parts with one job each.

    studio = Studio(models_dir, outputs_dir, source="hf")
    studio.list_models() -> list[ModelChoice]
    studio.default_model_id() -> str
    studio.hardware() -> HardwareInfo
    studio.estimate(request) -> MemoryEstimate          (no loading, no download)
    studio.suggest_settings(request) -> SuggestedSettings
    studio.telemetry() -> TelemetrySnapshot             (thread-safe, cheap)
    for item in studio.generate(request, cancel_event):  # GenerationEvent ..., then GenerationResult
        ...

The parts (engine/generation/):

* `request.Resolver` (`studio.resolve`): checks a request and fills in the model's defaults; the
  parameters text of its image (`infotext`, `parse_infotext`).
* `estimator.Estimator` (`studio.estimator`): what a resolved request needs on this host or any
  machine (`estimate`), and the settings that fit one (`suggest`).
* `session.Session` (`studio.session`): the live pipeline (rebuilt for another model, storage or
  disk choice; another VRAM limit only re-plans it) and its LoRAs.
* `runner.Runner`: one generation at a time on a worker thread, its events, its PNG.

`generate` validates the request when called (a bad request raises UserFacingError at once,
before anything heavy) and returns an iterator of the run's events (engine.generation.runner).
The Studio stays usable after a failure or a cancel.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.generation.estimator import Estimator, host_machine
from engine.generation.lora_library import LoraChoice, LoraLibrary
from engine.generation.pipelines import ManagedPipeline
from engine.generation.preview import Previewer
from engine.generation.request import ResolvedRequest, Resolver, for_estimate
from engine.generation.runner import Runner, remove_partial_outputs
from engine.generation.session import Session
from engine.generation.settings import detect_hardware
from engine.generation.suggest import StepWork
from engine.storage.form_cache import CachedForm, list_cached, remove_cached
from engine.generation.types import (
    GenerateRequest,
    GenerationEvent,
    GenerationResult,
    HardwareInfo,
    Machine,
    MemoryEstimate,
    ModelChoice,
    SuggestedSettings,
    TelemetrySnapshot,
    UserFacingError,
)

# moved to the parts; importable from here as before
from engine.generation.request import describe_vram_limit, infotext, parse_infotext  # noqa: F401
from engine.generation.runner import BUSY_WAIT_S, PARTIAL_SUFFIX, eta_seconds  # noqa: F401


def _default_registry() -> Any:
    import model_registry

    return model_registry


class Studio:
    """Engine facade for the UI. Never moves tensors for it; one generation at a time."""

    def __init__(
        self,
        models_dir: Path | str,
        outputs_dir: Path | str,
        source: str = "hf",
        *,
        device: str | torch.device | None = None,
        registry: Any = None,
        download_dir: Path | str | None = None,
        lora_dir: Path | str | None = None,
    ):
        """`device`: computation device (default CUDA if present, else CPU). `registry`: an object
        with model_registry's verbs (tests pass one with extra tiny models); default model_registry.
        `download_dir`: where hub downloads go (the hubs' cache layouts inside it); None = the
        standard Hugging Face / ModelScope caches."""
        self.registry = registry if registry is not None else _default_registry()
        self.download_dir = Path(download_dir) if download_dir is not None else None
        self.source = source
        self._hardware: HardwareInfo | None = None
        self.lora_library = LoraLibrary(lora_dir if lora_dir is not None else Path("loras"))
        self.requests = Resolver(self.registry, Path(models_dir), device, self.hardware)
        self.session = Session(
            self.registry, Path(models_dir), self.lora_library, download_dir=self.download_dir, source=source,
            ram_verdict=lambda r: self.estimator.ram_verdict(r),  # a load that would exhaust the RAM is refused
            device=device,
        )
        self.estimator = Estimator(self.requests, self.lora_library, live_floor=self.session.measured_floor)
        self._runner = Runner(self.session, Path(outputs_dir))
        self.remove_partial_outputs()

    @property
    def models_dir(self) -> Path:
        return self.requests.models_dir

    @property
    def outputs_dir(self) -> Path:
        return self._runner.outputs_dir

    def remove_partial_outputs(self) -> list[Path]:
        """Delete PNGs a crash left half-written (their temporary names); returns what went."""
        return remove_partial_outputs(self.outputs_dir)

    # --- catalogue ------------------------------------------------------------------------------
    def list_models(self) -> list[ModelChoice]:
        return self.registry.model_choices(self.models_dir)

    def default_model_id(self) -> str:
        return self.registry.default_model_id(self.models_dir)

    def list_loras(self, model_id: str | None = None) -> list[LoraChoice]:
        """LoRAs of the LoRA folder for `model_id`'s family (all when None or unknown)."""
        family = None
        if model_id:
            try:
                family = self.registry.get_model(model_id).family
            except Exception:
                family = None
        return self.lora_library.choices(family)

    def hardware(self) -> HardwareInfo:
        if self._hardware is None:
            self._hardware = detect_hardware(self.requests.device)
        return self._hardware

    def redetect_hardware(self) -> HardwareInfo:
        """Detect the hardware again (a ZeroGPU worker sees the real card where the main process
        saw a virtual one); requests resolve for it from now on."""
        self._hardware = None
        return self.hardware()

    # --- requests, estimates, suggestions ---------------------------------------------------------
    def resolve(self, request: GenerateRequest, *, estimate: bool = False, hardware: HardwareInfo | None = None) -> ResolvedRequest:
        """Validate `request` and fill in defaults (engine.generation.request.Resolver).
        UserFacingError says what to change. `estimate`: an edit model may be estimated before
        its images are given; `hardware`: resolve for that machine instead of this host."""
        return self.requests(request, estimate=estimate, hardware=hardware)

    def estimate(self, request: GenerateRequest, hardware: HardwareInfo | None = None) -> MemoryEstimate:
        """What `request` needs, before anything loads (engine.generation.estimator), on this host
        or on `hardware` (suggest_settings' machines)."""
        return self.estimator.estimate(self.resolve(for_estimate(request), estimate=True, hardware=hardware), hardware)

    def step_work(self, request: GenerateRequest) -> StepWork:
        """What one denoising step of `request` computes (suggest's cost model)."""
        return self.estimator.step_work(self.resolve(for_estimate(request), estimate=True))

    def machine(self) -> Machine:
        """This host for suggest_settings: its VRAM (None without a GPU), RAM and the free disk
        where models go."""
        return host_machine(self.hardware(), self.download_dir or self.models_dir)

    def suggest_settings(self, request: GenerateRequest, machine: Machine | None = None) -> SuggestedSettings:
        """The fastest storage form / disk offload / VRAM limit whose estimate fits `machine` (default:
        this host), for the request's model and size (engine.generation.suggest); no loading."""
        return self.estimator.suggest(request, machine or self.machine())

    # --- generation -----------------------------------------------------------------------------
    def generate(self, request: GenerateRequest, cancel: threading.Event | None = None) -> Iterator[GenerationEvent | GenerationResult]:
        """Validate now (UserFacingError for bad input), then stream the events of one generation."""
        return self._runner.stream(self.resolve(request), cancel)

    def preload(self, request: GenerateRequest) -> None:
        """Download and load `request`'s pipeline now, masters on the CPU, without generating:
        on ZeroGPU the main process does this, so the worker forked for the GPU call inherits the
        loaded masters instead of reading the files (ui.zerogpu). Nothing happens when that
        pipeline is already live."""
        self.session.preload(self.resolve(request))

    @property
    def last_previewer(self) -> Previewer | None:
        """The last run's previewer (its preview count and cost); None without previews."""
        return self._runner.last_previewer

    # --- the live pipeline ----------------------------------------------------------------------
    def telemetry(self) -> TelemetrySnapshot:
        """Memory and layer states now. Safe to call from another thread during a generation."""
        return self.session.telemetry()

    @property
    def pipeline(self) -> ManagedPipeline | None:
        return self.session.pipeline

    @property
    def builds(self) -> int:
        """Pipelines built so far (rebuild vs re-plan)."""
        return self.session.builds

    def unload(self) -> None:
        """Drop the live pipeline (frees its memory)."""
        self.session.unload()

    # --- the stored-form cache (engine.storage.form_cache) -----------------------------------------
    def cached_forms(self, model_id: str) -> list[CachedForm]:
        """The stored forms of a downloaded model kept in the cache (form, component, bytes)."""
        path = self._local_path(model_id)
        return list_cached(path) if path is not None else []

    def free_cache(self, model_id: str) -> int:
        """Remove every cached stored form of a model (its checkpoint stays); returns the bytes
        freed. A pipeline loaded from that model is unloaded first (it may stream from them)."""
        path = self._local_path(model_id)
        if path is None:
            return 0
        if self.session.model_path is not None and Path(self.session.model_path).resolve() == Path(path).resolve():
            self.unload()
        try:
            return remove_cached(path)
        except OSError as exc:
            raise UserFacingError(f"Could not remove the cached forms of {model_id}: {exc}") from exc

    def _local_path(self, model_id: str) -> Path | None:
        try:
            path = self.registry.local_path(model_id, self.models_dir)
        except Exception:  # an unknown id: nothing cached
            return None
        return Path(path) if path is not None else None
