"""One generation at a time: run it on a worker thread, stream its events, save its PNG.

    runner.stream(r, cancel) -> Iterator[GenerationEvent | GenerationResult]

The worker takes the session's pipeline for the request (engine.generation.session), runs it
with the live preview, and saves the image as PNG with its A1111 "parameters" text under a
temporary name, renamed into place once it is on disk (`PARTIAL_SUFFIX`; `remove_partial_outputs`
deletes what a crash left). Events: "downloading"/"loading" when needed, "encoding", "denoising"
(once per step: seconds per step, time left, the preview), "decoding", "done", then the
GenerationResult. A cancel stops between steps ("cancelled", nothing is decoded or saved); a
failure yields "error" and then raises.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.compilation import is_compile_failure
from engine.generation.compiling import CompileRun, CompileSwitch
from engine.generation.pipelines import GenerationCancelled, ManagedPipeline, StepStats
from engine.generation.preview import Previewer
from engine.generation.request import ResolvedRequest, infotext
from engine.generation.session import Session
from engine.generation.types import GenerationEvent, GenerationResult, UserFacingError
from engine.runtime.oom import VramExhaustedError
from model_registry.families.latent_rgb import for_model as latent_rgb_for

log = logging.getLogger(__name__)

#: a new generation waits this long for the previous one to stop before it is refused
BUSY_WAIT_S = 60.0
#: the temporary name a PNG is written under before it is renamed into place
PARTIAL_SUFFIX = ".partial"
#: the ETA averages the seconds of this many most recent steps (the first step warms up)
ETA_WINDOW = 5
COMPILING_NOTE = "Compiling the denoiser's blocks: the first run of a size compiles, later runs reuse it"
_PHASES = {"encode": "encoding", "denoise": "denoising", "decode": "decoding"}


def eta_seconds(durations: list[float], steps_left: int) -> float:
    """Time left: the mean of the last ETA_WINDOW measured steps times the steps still to run
    (the first step, slower with its warm-up, counts only while it is the only one)."""
    if steps_left <= 0 or not durations:
        return 0.0
    recent = durations[1:][-ETA_WINDOW:] or durations
    return steps_left * sum(recent) / len(recent)


def is_vram_exhausted(exc: BaseException) -> bool:
    from engine.runtime.oom import is_oom

    return isinstance(exc, VramExhaustedError) or is_oom(exc)


def remove_partial_outputs(outputs_dir: Path) -> list[Path]:
    """Delete PNGs a crash left half-written (their temporary names); returns what went."""
    removed: list[Path] = []
    try:
        leftovers = list(outputs_dir.glob(f".*.png{PARTIAL_SUFFIX}"))
    except OSError:
        return removed
    for path in leftovers:
        try:
            path.unlink()
            removed.append(path)
        except OSError:  # pragma: no cover - another process, permissions
            log.warning("could not remove the partial output %s", path)
    if removed:
        log.info("removed %d partial output(s) left by an earlier crash", len(removed))
    return removed


class Runner:
    """Runs generations one at a time on the session's pipeline and saves them in `outputs_dir`."""

    def __init__(self, session: Session, outputs_dir: Path):
        self.session = session
        self.outputs_dir = Path(outputs_dir)
        self._busy = threading.Lock()  # held for a whole generation
        self.last_previewer: Previewer | None = None  # the last run's (its preview count and cost)
        self.compile_switch = CompileSwitch()
        self.last_compile: CompileRun | None = None

    def stream(self, r: ResolvedRequest, cancel: threading.Event | None) -> Iterator[GenerationEvent | GenerationResult]:
        # the previous run may still be on its way to the next step boundary (cancelled): wait for it
        if not self._busy.acquire(timeout=BUSY_WAIT_S):
            raise UserFacingError("A generation is already running: wait for it to finish or cancel it.")
        items: queue.Queue = queue.Queue()
        stop = threading.Event()

        def should_stop() -> bool:
            return stop.is_set() or (cancel is not None and cancel.is_set())

        worker = threading.Thread(target=self._work, args=(r, items.put, should_stop), name="studio-generate", daemon=True)
        try:
            worker.start()
            while True:
                kind, item = items.get()
                if kind == "item":
                    yield item
                elif kind == "error":
                    yield GenerationEvent("error", message=str(item), telemetry=self.session.telemetry())
                    raise item
                else:  # "end"
                    return
        finally:
            stop.set()  # the consumer went away: stop at the next step
            worker.join()
            self._busy.release()

    def _work(self, r: ResolvedRequest, put: Callable[[tuple[str, Any]], None], should_stop: Callable[[], bool]) -> None:
        emit = lambda ev: put(("item", ev))
        telemetry = self.session.telemetry
        try:
            if should_stop():
                raise GenerationCancelled()
            pipe, loras = self.session.prepare(r, emit, should_stop)
            r = self.session.live_settings(r)  # Auto as measured when the pipeline was built
            run = self.last_compile = self.compile_switch.apply(pipe, r.request.compile, (r.width, r.height))
            if run.reason:
                emit(GenerationEvent("compiling", message=run.reason, telemetry=telemetry()))
            try:
                image = self._run(pipe, r, emit, should_stop, run)
            except Exception as exc:
                if not (run.active and is_compile_failure(exc)):
                    raise
                # never a crash: the same run again, eagerly, and the panel says why
                self.compile_switch.fail(pipe, run, exc)
                emit(GenerationEvent("compiling", message=run.reason or "", telemetry=telemetry()))
                image = self._run(pipe, r, emit, should_stop, run)
            if should_stop():  # cancelled during the last step or the decode: nothing is saved
                raise GenerationCancelled()
            note = run.describe() if run.requested else None
            path, text = self.save(image, r, pipe.family.sampler, loras, compile_note=note)
            saved = f"Saved {path.name}" + (f" · {run.reason}" if run.reason else "")
            emit(GenerationEvent("done", step=r.steps, total_steps=r.steps, message=saved, telemetry=telemetry()))
            emit(GenerationResult(image=image, path=path, parameters=text, settings=_settings_record(r, pipe, loras, run)))
        except GenerationCancelled:
            emit(GenerationEvent("cancelled", message="Cancelled: nothing was decoded.", telemetry=telemetry()))
        except UserFacingError as exc:
            put(("error", exc))
        except Exception as exc:
            log.exception("generation failed")
            if is_vram_exhausted(exc):  # the engine already retried once with less residency
                message = str(exc) if isinstance(exc, VramExhaustedError) else ""
                exc = UserFacingError(
                    message or "Out of memory: lower the VRAM limit (or set it to 0), tick FP8 or disk offload, or make the image smaller."
                )
            put(("error", exc))
        finally:
            put(("end", None))

    def _run(
        self, pipe: ManagedPipeline, r: ResolvedRequest, emit: Callable[[GenerationEvent], None], should_stop: Callable[[], bool],
        compile_run: CompileRun | None = None,
    ) -> Any:
        telemetry = self.session.telemetry
        clock = {"t": time.perf_counter()}
        durations: list[float] = []
        previewer = Previewer(latent_rgb_for(pipe.path, pipe.family.latent_rgb), r.width, r.height) if r.request.preview else None
        made: dict[str, Any] = {"image": None}
        self.last_previewer = previewer

        def on_stage(stage: str) -> None:
            clock["t"] = time.perf_counter()
            if stage == "denoise" and previewer is not None:
                previewer.start()
            emit(GenerationEvent(_PHASES[stage], step=0, total_steps=r.steps, telemetry=telemetry()))
            if stage == "denoise" and compile_run is not None and compile_run.active and compile_run.compiles_now:
                emit(GenerationEvent("compiling", total_steps=r.steps, message=COMPILING_NOTE, telemetry=telemetry()))

        def on_latents(i: int, n: int, latents: Any) -> None:
            if previewer is not None:
                made["image"] = previewer(latents, i, n)

        def on_step(i: int, n: int, stats: StepStats) -> None:
            now = time.perf_counter()
            seconds, clock["t"] = now - clock["t"], now
            durations.append(seconds)
            self.session.last_step = stats
            if i == 1:
                self.session.recheck_auto()  # Auto on a GPU: is the VRAM left free what was planned?
            if i == 1 and compile_run is not None and compile_run.active and compile_run.compiles_now:
                emit(GenerationEvent("compiling", step=i, total_steps=n, message=compile_run.first_step_note(seconds), telemetry=telemetry()))
            image, made["image"] = made["image"], None
            emit(
                GenerationEvent(
                    "denoising", step=i, total_steps=n, seconds_per_step=seconds, telemetry=telemetry(),
                    eta_seconds=eta_seconds(durations, n - i), preview=image,
                    preview_index=previewer.count if previewer is not None else 0,
                )
            )

        return pipe.generate(
            r.prompt, r.negative_prompt, width=r.width, height=r.height, steps=r.steps, guidance=r.guidance, seed=r.seed,
            on_step=on_step, should_stop=should_stop, on_latents=on_latents if previewer is not None else None,
            images=r.images, strength=r.strength, on_stage=on_stage,
        )

    def save(
        self, image: Any, r: ResolvedRequest, sampler: str, loras: tuple[tuple[str, float, str], ...] = (), compile_note: str | None = None
    ) -> tuple[Path, str]:
        """Write `image` as PNG with its infotext into the outputs folder; (its path, the text)."""
        from PIL.PngImagePlugin import PngInfo

        text = infotext(r, sampler, loras, compile_note)
        info = PngInfo()
        info.add_text("parameters", text)
        partial: Path | None = None
        try:
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            n = 0
            while True:
                path = self.outputs_dir / f"{stamp}-{r.model_id}-{r.seed}{f'-{n}' if n else ''}.png"
                if not path.exists():
                    break
                n += 1
            # written under a hidden temporary name in the same folder, flushed to disk, then
            # renamed: a crash leaves no file under the final name (the leftover goes at start)
            partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
            with open(partial, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
            partial = None
        except OSError as exc:
            raise UserFacingError(f"Could not save the image into {self.outputs_dir}: {exc}. Free some disk space or choose another folder.") from exc
        finally:
            if partial is not None:
                partial.unlink(missing_ok=True)
        return path, text


def _settings_record(r: ResolvedRequest, pipe: ManagedPipeline, loras: tuple[tuple[str, float, str], ...], run: CompileRun | None = None) -> dict[str, Any]:
    """GenerationResult.settings: what the run used."""
    return {
        "compile": run.describe() if run is not None else "off",
        "compile_seconds": run.seconds if run is not None else None,
        "model": r.model_id,
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "width": r.width,
        "height": r.height,
        "steps": r.steps,
        "guidance": r.guidance,
        "seed": r.seed,
        "vram_limit": r.settings.vram_limit,
        "fp8": r.settings.fp8,
        "weights": r.settings.storage_name,
        "compute_dtype": r.settings.compute_dtype_name,
        "disk_offload": r.settings.disk_offload,
        "vae_tiling": pipe.vae_tiling,
        "loras": [(name, strength) for name, strength, _ in loras],
        "strength": r.strength,
        "input_images": [im.describe() for im in r.inputs.images] if r.inputs is not None else [],
        "input_notes": list(r.inputs.notes) if r.inputs is not None else [],
    }
