"""The live pipeline: one at a time, kept between generations, its LoRAs synced to each request.

    session.prepare(r, emit, should_stop) -> (ManagedPipeline, loras)
    session.telemetry() -> TelemetrySnapshot    (thread-safe, cheap)
    session.unload()

A request is run by the live pipeline when its build key (model, storage, disk offload, device)
is the one it was built for; another VRAM limit only re-plans the shared budget (no file is
read). Another key frees the old pipeline first, then finds the model (a local copy, or a
download with its progress) and builds the new one, after checking, where the computation runs
on the CPU, that it fits the RAM available (`ram_verdict`). The request's LoRAs are then made the
pipeline's active set without touching a base weight (engine.lora).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.generation.lora_library import LoraLibrary
from engine.generation.pipelines import GenerationCancelled, ManagedPipeline, StepStats, build_pipeline
from engine.generation.request import ResolvedRequest
from engine.generation.settings import computation_device, measured_auto_limit_gb
from engine.generation.types import GenerationEvent, TelemetrySnapshot, UserFacingError
from engine.config import normalize_device, storage_name
from engine.runtime import cuda_facts
from engine.storage.form_cache import cache_enabled, list_cached
from engine.storage.forms import get_form

log = logging.getLogger(__name__)

GB = 1024**3
#: Auto keeps at least this much VRAM free after the first step (cuBLAS/cuDNN workspaces that
#: later kernels allocate, another program's growth); below it the limit is lowered (recheck_auto)
AUTO_MIN_FREE_GB = 0.5
Emit = Callable[[GenerationEvent], None]


def live_lora_bytes(pipe: ManagedPipeline | None) -> int:
    """Bytes of the LoRA factors the pipeline holds on its computation device (0 without one)."""
    if pipe is None:
        return 0
    try:
        from engine.lora.loras import lora_bytes

        return lora_bytes(pipe)
    except Exception:  # telemetry only
        return 0


class Session:
    """Holds the live pipeline and builds, re-plans or drops it for each request."""

    def __init__(
        self,
        registry: Any,
        models_dir: Path,
        lora_library: LoraLibrary,
        *,
        download_dir: Path | None = None,
        source: str = "hf",
        ram_verdict: Callable[[ResolvedRequest], Any] | None = None,
        device: torch.device | str | None = None,
    ):
        """`ram_verdict(r)`: engine.generation.estimate's verdict for `r` on this host (a load that
        would not fit the RAM is refused); None: no check. `device`: the computation device the
        telemetry asks about before a pipeline is built (None: `computation_device()`)."""
        self.registry = registry
        self.models_dir = models_dir
        self.download_dir = download_dir
        self.source = source
        self.lora_library = lora_library
        self.ram_verdict = ram_verdict
        self._lock = threading.Lock()  # guards the reference swap
        self._pipeline: ManagedPipeline | None = None
        self._key: tuple[Any, ...] | None = None
        self._storage = ""
        self._compute_dtype = ""
        self.model_path: Path | None = None  # the folder the live pipeline was loaded from
        self.last_step = StepStats()  # the last denoising step's streaming counters (the runner sets it)
        self.builds = 0  # pipelines built so far (tests: rebuild vs re-plan)
        self.device = normalize_device(device) if device is not None else None
        # Auto on a GPU: the limit measured when the live pipeline was built (free VRAM then minus
        # the margin), and whether it was checked after the first step (`recheck_auto`)
        self.auto_limit_gb: float | None = None
        self._auto_checked = False

    @property
    def pipeline(self) -> ManagedPipeline | None:
        return self._pipeline

    def measured_floor(self, build_key: tuple[Any, ...], activations: int) -> int | None:
        """The live pipeline's smallest feasible limit without its LoRAs, when it is the build
        `build_key` asks for and has run every stage (ManagedPipeline.smallest_feasible_limit_bytes)."""
        pipe = self._pipeline
        if pipe is None or self._key != build_key:
            return None
        floor = pipe.smallest_feasible_limit_bytes(activations)
        return None if floor is None else floor - live_lora_bytes(pipe)

    # --- telemetry --------------------------------------------------------------------------------
    def computation_device(self) -> torch.device:
        """The device the live pipeline computes on (before one is built: the session's)."""
        pipe = self._pipeline
        if pipe is not None and getattr(pipe, "device", None) is not None:
            return normalize_device(pipe.device)
        return self.device if self.device is not None else computation_device()

    def telemetry(self) -> TelemetrySnapshot:
        """Memory and layer states now. Safe to call from another thread during a generation.
        VRAM is asked of the computation device only; `vram_other_gb` is what other programs (and
        this process's CUDA context) hold beside this process's caching allocator."""
        import psutil

        vram_used = vram_total = vram_other = None
        device = self.computation_device()
        if device.type == "cuda" and torch.cuda.is_available():
            try:
                free, total = cuda_facts.free_and_total(device)
                reserved = cuda_facts.reserved_bytes(device)
                vram_used, vram_total = (total - free) / GB, total / GB
                vram_other = max(0, total - free - reserved) / GB
            except RuntimeError:  # pragma: no cover
                pass
        vm = psutil.virtual_memory()
        pipe = self._pipeline
        last = self.last_step
        return TelemetrySnapshot(
            vram_used_gb=vram_used,
            vram_total_gb=vram_total,
            ram_used_gb=(vm.total - vm.available) / GB,
            ram_total_gb=vm.total / GB,
            layer_states=pipe.layer_states() if pipe is not None else {},
            streamed_bytes_last_step=last.streamed_bytes,
            copy_seconds_last_step=last.copy_seconds,
            compute_seconds_last_step=last.compute_seconds,
            slots_in_flight=pipe.slots_in_flight() if pipe is not None else 0,
            timestamp=time.time(),
            lora_bytes=live_lora_bytes(pipe),
            storage=self._storage if pipe is not None else "",
            vram_other_gb=vram_other,
            compute_dtype=self._compute_dtype if pipe is not None else "",
            **_pinned_now(vram_total is not None),
        )

    # --- Auto on a GPU: measured when the pipeline is built, checked after its first step ---------
    def _measured_auto(self, r: ResolvedRequest) -> float | None:
        """What Auto comes to now on `r`'s GPU: its free VRAM minus the margin (after the old
        pipeline was freed); None where Auto does not apply (a number was asked, or the CPU)."""
        if not r.settings.limit_is_auto:
            return None
        return measured_auto_limit_gb(r.settings.device)

    def live_settings(self, r: ResolvedRequest) -> ResolvedRequest:
        """`r` with the limit the live pipeline runs under (Auto as measured at its build, and as
        lowered by `recheck_auto`), for the infotext and the result's record."""
        if r.settings.limit_is_auto and self.auto_limit_gb is not None and r.settings.device.type == "cuda":
            return replace(r, settings=replace(r.settings, vram_limit=self.auto_limit_gb))
        return r

    def recheck_auto(self) -> str | None:
        """Once per pipeline, after its first step: is the VRAM left free what Auto planned? The
        caching allocator keeps what the step reserved (`memory_reserved`), so the free VRAM now
        is the step's peak seen from the driver. When less than AUTO_MIN_FREE_GB is left
        (activations or fragmentation beyond the plan, another program grew), the Auto limit
        drops by the shortfall and the budget is re-planned (no file is read). Returns what was
        done, or None."""
        pipe = self._pipeline
        if pipe is None or self._auto_checked or self.auto_limit_gb is None:
            return None
        self._auto_checked = True
        device = self.computation_device()
        free, total = cuda_facts.free_and_total(device)
        reserved = cuda_facts.reserved_bytes(device)
        shortfall = AUTO_MIN_FREE_GB - free / GB
        if shortfall <= 0:
            return None
        lowered = max(0.0, math.floor((self.auto_limit_gb - shortfall) * 10) / 10)
        message = (
            f"Auto: after the first step {free / GB:.2f} GB of VRAM is left free on {device} (PyTorch reserved "
            f"{reserved / GB:.2f} GB against a limit of {self.auto_limit_gb:g} GB); lowering the limit to {lowered:g} GB."
        )
        log.warning("%s", message)
        self.auto_limit_gb = lowered
        pipe.set_vram_limit(lowered)
        cuda_facts.empty_cache(device)
        return message

    # --- the pipeline -----------------------------------------------------------------------------
    def prepare(self, r: ResolvedRequest, emit: Emit, should_stop: Callable[[], bool]) -> tuple[ManagedPipeline, tuple[tuple[str, float, str], ...]]:
        """The pipeline for `r` with `r`'s LoRAs active, and (name, strength, short hash) of
        each LoRA for the infotext."""
        pipe = self._pipeline_for(r, emit, should_stop)
        return pipe, self._apply_loras(pipe, r, emit)

    def preload(self, r: ResolvedRequest) -> ManagedPipeline:
        """The pipeline for `r`, built (downloaded, loaded) or reused, without its LoRAs and
        without generating: nothing of it moves to the computation device (Studio.preload)."""
        return self._pipeline_for(r, lambda event: None, lambda: False)

    def unload(self) -> None:
        """Drop the live pipeline (frees its memory)."""
        with self._lock:
            pipe, self._pipeline, self._key = self._pipeline, None, None
            self.model_path = None
        self.auto_limit_gb = None
        if pipe is not None:
            try:
                pipe.close()
            except Exception:  # pragma: no cover - best effort
                log.debug("closing the pipeline failed", exc_info=True)
        del pipe
        gc.collect()
        cuda_facts.empty_cache(self.computation_device())

    def _pipeline_for(self, r: ResolvedRequest, emit: Emit, should_stop: Callable[[], bool]) -> ManagedPipeline:
        pipe = self._pipeline
        if pipe is not None and self._key == r.build_key:
            limit = self.auto_limit_gb if r.settings.limit_is_auto and self.auto_limit_gb is not None else r.settings.vram_limit
            if pipe.vram_limit != limit:
                pipe.set_vram_limit(limit)  # re-plan only: no file is read
            return pipe
        self.unload()  # free the old pipeline before anything new is read
        auto = self._measured_auto(r)  # Auto: the VRAM free now, with the old pipeline gone
        limit = auto if auto is not None else r.settings.vram_limit
        path = self._model_path(r, emit, should_stop)
        if r.settings.device.type == "cpu" and self.ram_verdict is not None:  # refuse a load that would exhaust RAM
            verdict = self.ram_verdict(r)
            if verdict is not None and not verdict.fits:
                raise UserFacingError(f"Not loading: {verdict.message}")
        variant = None
        try:
            variant = self.registry.load_options(r.model_id, path).get("variant")
        except Exception:  # pragma: no cover - a registry without load_options
            variant = None
        try:
            stored = {"stored_form": r.settings.storage} if r.settings.disk_offload else {}
            note = first_load_note(path, r.settings.storage)
            if note:
                emit(GenerationEvent("loading", message=f"Loading {r.entry.name}: {note}", telemetry=self.telemetry()))
            pipe = build_pipeline(path, r.settings.vram_config, limit, variant=variant, **stored)
        except UserFacingError:
            raise
        except MemoryError as exc:
            raise UserFacingError(f"Not enough RAM to load {r.entry.name}: tick disk offload or FP8.") from exc
        except (OSError, ValueError) as exc:
            raise UserFacingError(f"Loading {r.entry.name} from {path} failed: {exc}") from exc
        with self._lock:
            self._pipeline, self._key, self._storage = pipe, r.build_key, r.settings.storage_name
            self._compute_dtype = storage_name(r.settings.vram_config.computation_dtype)
            self.auto_limit_gb, self._auto_checked = auto, False
            self.model_path = Path(path)
        self.builds += 1
        return pipe

    def _model_path(self, r: ResolvedRequest, emit: Emit, should_stop: Callable[[], bool]) -> Path:
        """The model's folder: a local copy (phase "loading" starts here, the demo is written on
        first use), else a download (phase "downloading" with its fraction)."""
        registry = self.registry
        if registry.is_downloaded(r.model_id, self.models_dir):
            emit(GenerationEvent("loading", message=f"Loading {r.entry.name}", telemetry=self.telemetry()))
            path = registry.local_path(r.model_id, self.models_dir)
            if path is not None:
                return Path(path)

        def progress(fraction: float, message: str = "") -> None:
            if should_stop():
                raise GenerationCancelled()  # aborts the download
            self._downloading(emit, fraction, message)

        self._downloading(emit, 0.0, f"Downloading {r.entry.name}")
        try:
            where = {"download_dir": self.download_dir} if self.download_dir is not None else {}
            path = Path(registry.download(r.model_id, self.source, progress=progress, models_dir=self.models_dir, **where))
        except OSError as exc:  # disk full etc. that the registry did not translate
            raise UserFacingError(f"Downloading {r.entry.name} failed: {exc}") from exc
        if should_stop():
            raise GenerationCancelled()
        emit(GenerationEvent("loading", message=f"Loading {r.entry.name}", telemetry=self.telemetry()))
        return path

    def _downloading(self, emit: Emit, fraction: float, message: str) -> None:
        emit(GenerationEvent("downloading", message=message, download_fraction=float(fraction), telemetry=self.telemetry()))

    # --- LoRAs ------------------------------------------------------------------------------------
    def _apply_loras(self, pipe: ManagedPipeline, r: ResolvedRequest, emit: Emit) -> tuple[tuple[str, float, str], ...]:
        """Make the pipeline's active LoRAs the request's: new ones are loaded, changed strengths
        re-weighted, dropped ones removed. No base weight is read and the pipeline is not rebuilt
        (engine.lora). All or nothing: if one LoRA fails, the ones loaded here are taken off again
        and the previous set stays active. Returns (name, strength, short hash) for the infotext."""
        from engine.lora.formats import LoraError
        from engine.lora.loras import active_loras, load_lora, remove_lora, set_lora_strength

        def progress(fraction: float, message: str = "") -> None:
            self._downloading(emit, fraction, message)

        wanted = [(lora_id, strength, self.lora_library.resolve(lora_id, progress).resolve()) for lora_id, strength in r.request.loras]
        active = {h.path.resolve(): h for h in active_loras(pipe)}
        keep = {path for _, _, path in wanted}
        loaded = []
        try:
            for lora_id, strength, path in wanted:
                if path not in active:
                    name = Path(lora_id.removeprefix("hf:")).name.removesuffix(".safetensors")
                    handle = load_lora(pipe, path, strength=strength, name=name)
                    loaded.append(handle)
                    active[path] = handle
        except LoraError as exc:
            for handle in loaded:
                remove_lora(pipe, handle)
            raise UserFacingError(f"{exc} (the previous LoRAs stay active)") from exc
        for path, handle in list(active.items()):
            if path not in keep:
                remove_lora(pipe, handle)
        out = []
        for lora_id, strength, path in wanted:
            handle = active[path]
            if handle.strength != strength:
                set_lora_strength(pipe, handle, strength)
            out.append((handle.name, strength, handle.short_hash))
        return tuple(out)


def _pinned_now(gpu: bool) -> dict[str, Any]:
    """The process's pinned host RAM and its budget, for the live panel (nothing without a GPU)."""
    if not gpu:
        return {}
    from engine.transfer.pinned import PROCESS_PINNED_BUDGET

    return {"pinned_bytes": PROCESS_PINNED_BUDGET.used, "pinned_limit_bytes": PROCESS_PINNED_BUDGET.planned_limit_bytes()}
def first_load_note(path: Path, storage: str) -> str:
    """What the page says while a model loads in a quantized form that is not cached yet
    (engine.storage.form_cache): "quantizing to FP8 (once), then cached"; "" otherwise."""
    form = get_form(storage)
    if not form.quantized or form.from_file or not cache_enabled():
        return ""
    if any(c.form == form.name for c in list_cached(path)):
        return ""
    return f"quantizing to {form.title} (once), then cached"
