"""Event handlers: turn control values into engine requests and engine answers into page updates.

The engine does all tensor work; this module only moves plain values around. The one function
that touches the GPU (`engine_events`) is decorated with `spaces.GPU` when the `spaces` package
is importable (Hugging Face ZeroGPU, ui.zerogpu: its duration sized per request from the
estimate, the masters loaded in the main process first); elsewhere it runs as it is.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from engine.generation.types import (
    GenerateRequest,
    GenerationEvent,
    GenerationResult,
    ModelChoice,
    UserFacingError,
)
from engine.storage.forms import FP8, StorageForm, offered_forms

from . import formatting, inputs, zerogpu
from .formatting import image_mode, image_note_markdown, takes_images
from .runs import RunTracker

log = logging.getLogger("lowvram_studio.ui")

PLOT_COLUMNS = ["seconds", "GB", "memory"]


def history_frame(samples) -> pd.DataFrame:
    """The chart's data, typed (numbers are quantitative axes even when there are no rows yet)."""
    frame = pd.DataFrame(formatting.history_rows(samples), columns=PLOT_COLUMNS)
    return frame.astype({"seconds": "float64", "GB": "float64", "memory": "string"})

# Hugging Face ZeroGPU (ui.zerogpu): a GPU is attached only while a decorated function runs
ZERO_GPU = zerogpu.zero_gpu()


def _current_event_id() -> str | None:
    try:
        from gradio.context import LocalContext

        return LocalContext.event_id.get(None)
    except Exception:  # pragma: no cover - another Gradio layout
        return None


_STUDIO: Any = None  # set by Handlers; a module global so a ZeroGPU worker process finds it


def _engine_events(request: GenerateRequest, cancel: threading.Event | None) -> Iterator[GenerationEvent | GenerationResult]:
    """The GPU part of a generation: the engine's event stream. On ZeroGPU it runs in a worker
    that has the real card: the hardware is detected again there first."""
    if ZERO_GPU:
        _STUDIO.redetect_hardware()
    yield from _STUDIO.generate(request, cancel)


def _engine_seconds(request: GenerateRequest, cancel: threading.Event | None = None) -> int:
    return zerogpu.gpu_seconds(_STUDIO, request)


engine_events = zerogpu.on_gpu(_engine_events, _engine_seconds)


def doctor_report(model_dir: Any) -> str:
    """The page's "System check": engine.generation.doctor measures (it, not the UI, moves the tensors); on
    ZeroGPU it runs where the GPU is attached."""
    from engine.generation.doctor import render_text, run_doctor

    return render_text(run_doctor(model_dir))


doctor_report = zerogpu.on_gpu(doctor_report, lambda model_dir: 60)


#: how often a waiting handler looks whether its client is still there (seconds)
WATCH_INTERVAL_S = 0.25
#: how often the streaming endpoint looks for new events (seconds)
STREAM_POLL_S = 0.1
GPU_QUEUE = "gpu"  # the concurrency group of every generation (page and API)

def quantize_forms() -> tuple[StorageForm, ...]:
    """The forms the page's "Quantize" dropdown offers: every quantized form the registry offers
    but FP8, which has its own checkbox (engine.storage.forms: int8, nf4, ...)."""
    return tuple(f for f in offered_forms() if f.quantized and f.name != FP8)


def quantize_choices() -> tuple[str, ...]:
    """The "Quantize" dropdown's choices -> GenerateRequest.weights ("off": the FP8 toggle decides)."""
    return ("off",) + tuple(f.name for f in quantize_forms())


def quantize_to_weights(value: str | None) -> str:
    choice = (value or "off").strip().lower()
    return "auto" if choice == "off" else choice


def weights_to_controls(weights: str) -> tuple[bool, str]:
    """A storage form (SuggestedSettings.weights) -> the page's (FP8 checkbox, Quantize choice):
    a Quantize form ("int8", "nf4", ...) -> (off, that), "fp8" -> (on, "off"), "bf16" and a GGUF
    entry's "gguf" (its file decides) -> (off, "off")."""
    if weights in quantize_choices()[1:]:
        return False, weights
    return weights == FP8, "off"


class Handlers:
    """All callbacks of the page, bound to one Studio."""

    def __init__(self, studio: Any) -> None:
        global _STUDIO
        _STUDIO = studio
        self.studio = studio
        self.tracker = RunTracker()
        self.hardware = studio.hardware()
        self.blocks: Any = None  # the Blocks, once built (its queue tells whether a client left)
        self.models_version = 0  # bumped after a run that downloaded: every tab refreshes its model list

    # --- models ---------------------------------------------------------------------------
    def models(self) -> list[ModelChoice]:
        return list(self.studio.list_models())

    def model(self, model_id: str | None) -> ModelChoice | None:
        for choice in self.models():
            if choice.id == model_id:
                return choice
        return None

    def model_choices(self) -> list[tuple[str, str]]:
        """The dropdown's (label, id) pairs, with each downloaded model's cached stored forms."""
        models = self.models()
        cached = {}
        for m in models:
            if m.downloaded and not m.is_demo:
                try:
                    cached[m.id] = self.studio.cached_forms(m.id)
                except Exception:  # the picker must never break the page
                    cached[m.id] = []
        return formatting.model_choices(models, cached)

    def refresh_models(self, current: str | None):
        """Dropdown choices again (a download changes 'not downloaded' to 'downloaded')."""
        return gr.update(choices=self.model_choices(), value=current)

    def free_disk_space(self, model_id: str | None):
        """Remove the chosen model's cached stored forms (FP8/int8/NF4, bf16 of F32 weights); the
        next load in such a form quantizes once again. The checkpoint itself stays."""
        if not model_id:
            raise gr.Error("Choose a model first.")
        try:
            freed = self.studio.free_cache(model_id)
        except UserFacingError as exc:
            raise gr.Error(str(exc)) from None
        gr.Info(f"Freed {freed / 1e9:.2f} GB of cached stored forms of {model_id}." if freed else f"{model_id} has no cached stored forms.")
        return gr.update(choices=self.model_choices(), value=model_id)

    def on_model_change(self, model_id: str | None, previous: str | None):
        """Put the model's defaults and limits into width, height, steps and guidance.

        Only when the model really changed: closing the dropdown on the same model keeps the
        user's values.
        """
        choice = self.model(model_id)
        if choice is None or model_id == previous:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        d, lim = choice.defaults, choice.limits
        multiple = lim.get("size_multiple", 16)
        return (
            gr.update(value=d.get("width"), step=multiple),
            gr.update(value=d.get("height"), step=multiple),
            gr.update(
                value=d.get("steps"),
                minimum=lim.get("min_steps", 1),
                maximum=lim.get("max_steps", 100),
            ),
            gr.update(
                value=d.get("guidance"),
                minimum=lim.get("min_guidance", 0.0),
                maximum=lim.get("max_guidance", 20.0),
            ),
            model_id,
        )

    # --- LoRAs ----------------------------------------------------------------------------
    def lora_choices(self, model_id: str | None):
        """(label, id) pairs of the LoRAs for this model's family."""
        try:
            return formatting.lora_choices(self.studio.list_loras(model_id))
        except Exception:  # the picker must never break the page
            log.exception("listing LoRAs failed")
            return []

    def on_lora_family(self, model_id: str | None, *values):
        """The picker slots offer the chosen model's family; a picked LoRA of another family is cleared."""
        choices = self.lora_choices(model_id)
        ids = {c[1] for c in choices}
        return [gr.update(choices=choices, value=v if (v in ids or str(v or "").startswith("hf:")) else None) for v in values]

    @staticmethod
    def lora_spec(*values) -> str:
        """Picker slots (id, strength, id, strength, ...) -> the `loras` string build_request reads."""
        parts = []
        for lora_id, strength in zip(values[0::2], values[1::2]):
            if lora_id:
                parts.append(f"{lora_id}:{float(strength if strength is not None else 1.0):g}")
        return ", ".join(parts)

    # --- VRAM controls --------------------------------------------------------------------
    def vram_limit_value(self, auto: bool, slider: float | None, resident_limit: float | None = None,
                         disk_offload: bool = False) -> float | None:
        """None (= Auto) unless a GPU is there and Auto is off. Without a GPU, the bound on what
        disk offload keeps resident in RAM that "Fit to this machine" chose (`resident_limit`,
        used only while disk offload is ticked)."""
        if not self.hardware.has_gpu:
            return float(resident_limit) if resident_limit is not None and disk_offload else None
        if auto or slider is None:
            return None
        return float(slider)

    def on_auto_change(self, auto: bool):
        return gr.update(interactive=bool(self.hardware.has_gpu and not auto))

    # --- estimate -------------------------------------------------------------------------
    def build_request(
        self,
        prompt: str,
        negative_prompt: str,
        model: str | None,
        width: Any,
        height: Any,
        steps: Any,
        guidance: Any,
        seed: Any,
        vram_limit: float | None,
        fp8: bool,
        disk_offload: bool,
        loras: str = "",
        weights: Any = "auto",
        preview: bool = True,
        image: Any = None,
        strength: Any = None,
        compile: Any = False,
    ) -> GenerateRequest:
        """Every value checked by its API name (ui.inputs); UserFacingError names a bad one."""
        return GenerateRequest(**inputs.request_fields(
            prompt, negative_prompt, model, width, height, steps, guidance, seed, vram_limit, fp8, disk_offload, loras, weights,
            image, strength, compile,
        ), preview=bool(preview))

    def estimate(self, model, width, height, steps, guidance, auto, slider, fp8, disk_offload, loras="", quantize="off",
                 resident_limit=None, images=None) -> str:
        """Markdown for the estimate box; invalid settings show their message instead. The page's
        input images count (their encodes and an edit model's reference latents are activations)."""
        try:
            files, _ = self.page_images(images, None, model)
            request = self.build_request(
                "", "", model, width, height, steps, guidance, None,
                self.vram_limit_value(auto, slider, resident_limit, disk_offload), fp8, disk_offload, loras, quantize_to_weights(quantize),
                image=files or None,
            )
            text = formatting.estimate_markdown(self.studio.estimate(request), self.hardware)
            if not self.hardware.has_gpu and request.vram_limit is not None:
                text += "\n\n" + formatting.cpu_limit_note(request.vram_limit)
            return text
        except UserFacingError as exc:
            return formatting.estimate_error_markdown(str(exc))
        except Exception as exc:  # the estimate must never break the page
            log.exception("estimate failed")
            return formatting.estimate_error_markdown(f"Could not estimate these settings ({exc}).")

    # --- fit to this machine ---------------------------------------------------------------
    def _suggest(self, model, width, height, steps, guidance):
        request = self.build_request("", "", model, width, height, steps, guidance, None, None, False, False)
        return self.studio.suggest_settings(request)

    def fit(self, model, width, height, steps, guidance):
        """"Fit to this machine": the fastest settings that fit, applied to the memory controls
        (Auto, the VRAM slider, FP8, disk offload, Quantize), and the reason in one line. Outputs:
        auto, slider, fp8, disk offload, the reason, the resident limit, quantize."""
        skip = gr.skip
        try:
            got = self._suggest(model, width, height, steps, guidance)
        except UserFacingError as exc:
            return skip(), skip(), skip(), skip(), formatting.estimate_error_markdown(str(exc)), skip(), skip()
        except Exception as exc:  # never break the page
            log.exception("suggest_settings failed")
            return (skip(), skip(), skip(), skip(),
                    formatting.estimate_error_markdown(f"Could not size the settings ({exc})."), skip(), skip())
        line = formatting.suggestion_markdown(got)
        if not got.fits:
            return skip(), skip(), skip(), skip(), line, skip(), skip()
        if self.hardware.has_gpu:
            auto = gr.update(value=bool(got.auto))
            slider = gr.update(value=got.vram_limit, interactive=not got.auto)
            resident = None
        else:  # no GPU: the slider stays off; a bound on what disk offload keeps in RAM rides along
            auto, slider, resident = skip(), skip(), got.vram_limit
        fp8, quantize = weights_to_controls(got.weights)
        return auto, slider, gr.update(value=fp8), gr.update(value=got.disk_offload), line, resident, gr.update(value=quantize)

    def suggest(self, model: str | None = None, width: int | None = None, height: int | None = None,
                steps: int | None = None, guidance: float | None = None) -> dict[str, Any]:
        """The fastest settings that fit this machine for a model and size: weights (the storage
        form: "bf16", "fp8", "int8", "nf4", or "gguf" for a GGUF entry; pass it as /generate's
        `weights`, "auto" for "gguf"), fp8 (weights == "fp8"), disk_offload, vram_limit (GB;
        null = unlimited, a host without a GPU), auto, seconds_per_step (the cost model's), the
        reason in one line, and the estimate of those settings."""
        try:
            return self._suggest(model, width, height, steps, guidance).as_dict()
        except UserFacingError as exc:
            raise gr.Error(str(exc), title="Cannot size these settings", print_exception=False) from None

    def system_check(self) -> str:
        """The "System check" button: GPU, VRAM, pinnable RAM, link and disk speed, a short
        streamed run and the settings recommended, as text (waits for a running generation)."""
        requests = getattr(self.studio, "requests", None)
        model_dir = getattr(requests, "models_dir", None) or "models"
        try:
            return doctor_report(model_dir)
        except Exception as exc:  # the page keeps serving; the message says what failed
            log.exception("system check failed")
            raise gr.Error(f"The system check failed: {type(exc).__name__}: {exc}", title="System check") from None

    # --- running --------------------------------------------------------------------------
    def _execute(self, request: GenerateRequest, owner: str, cancel: threading.Event, progress: gr.Progress,
                 on_event: Any = None) -> GenerationResult | None:
        """Run one generation, report it to the tracker and the progress bar.

        Returns None when cancelled; raises gr.Error with a readable message on failure.
        """
        run_id = self.tracker.start(owner)
        last: GenerationEvent | None = None
        downloaded = False
        try:
            if cancel.is_set():  # cancelled while waiting in the queue
                last = GenerationEvent(phase="cancelled", message="Cancelled before it started.")
                return None
            progress(None, desc="Starting")
            if ZERO_GPU:  # the main process loads the masters on the CPU; the GPU worker inherits them
                progress(None, desc="Loading the model")
                zerogpu.preload(_STUDIO, request)
            for item in engine_events(request, None if ZERO_GPU else cancel):
                if isinstance(item, GenerationResult):
                    if last is None or last.phase != "done":
                        last = GenerationEvent(phase="done", step=last.step if last else 0,
                                               total_steps=last.total_steps if last else 0)
                    return item
                last = item
                downloaded = downloaded or item.phase == "downloading"
                self.tracker.update(run_id, item)
                self._report(item, progress)
                if on_event is not None:
                    on_event(item)
                if item.phase == "cancelled":
                    return None
            if cancel.is_set():
                last = GenerationEvent(phase="cancelled")
                return None
            raise gr.Error("The engine stopped without an image. See the server log.", print_exception=False)
        except UserFacingError as exc:
            last = GenerationEvent(phase="error", message=str(exc))
            raise gr.Error(str(exc), title="Cannot generate", print_exception=False) from None
        except gr.Error:
            last = GenerationEvent(phase="error")
            raise
        except Exception as exc:
            log.exception("generation failed")
            last = GenerationEvent(phase="error", message=f"{type(exc).__name__}: {exc}")
            raise gr.Error(
                f"Generation failed ({type(exc).__name__}: {exc}). The details are in the server log; "
                "the next generation will start fresh.",
                title="Generation failed",
                print_exception=False,
            ) from None
        finally:
            self.tracker.finish(run_id, last)
            if downloaded:  # every tab's model list is refreshed by its timer
                self.models_version += 1

    @staticmethod
    def _report(event: GenerationEvent, progress: gr.Progress) -> None:
        label = formatting.PHASE_LABELS.get(event.phase, event.phase)
        if event.phase == "downloading" and event.download_fraction is not None:
            progress(float(event.download_fraction), desc=label)
        elif event.phase == "denoising" and event.total_steps:
            progress((event.step, event.total_steps), desc=label, unit="steps")
        else:
            progress(None, desc=event.message or label)

    # --- the run, watched from the event loop --------------------------------------------
    def _client_gone(self) -> bool:
        """True when the client of the event being handled left: its tab closed (Gradio marks the
        event closed) or its connection dropped (Gradio marks it not alive)."""
        queue = getattr(self.blocks, "_queue", None)
        event_id = _current_event_id()
        if queue is None or event_id is None:
            return False
        for job in list(getattr(queue, "active_jobs", None) or []):
            for event in job or []:
                if getattr(event, "_id", None) == event_id:
                    return not getattr(event, "alive", True) or bool(getattr(event, "closed", False))
        return False

    async def _run_watched(self, request: GenerateRequest, owner: str, cancel: threading.Event, progress: gr.Progress,
                           on_event: Any = None) -> GenerationResult | None:
        """`_execute` on a worker thread while the event loop watches the client.

        A cancelled task (the API's Job.cancel, Gradio's cancels) or a client that left sets
        `cancel`: the engine stops at the next step boundary. The handler returns (or re-raises
        the cancellation) only once the engine has stopped, so the queue slot is handed to the
        next request when the engine is free, never while it still runs.
        """
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # Gradio's progress and request context go along
        future = loop.run_in_executor(None, context.run, self._execute, request, owner, cancel, progress, on_event)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=WATCH_INTERVAL_S)
                if done:
                    return future.result()
                if not cancel.is_set() and self._client_gone():
                    log.info("the client of a running generation left: stopping it")
                    cancel.set()
        except asyncio.CancelledError:
            cancel.set()
            while not future.done():  # hold the slot until the engine has stopped
                try:
                    await asyncio.wait({future})
                except asyncio.CancelledError:
                    pass
            if not future.cancelled() and future.exception() is None and future.result() is not None:
                log.warning("a cancelled generation finished before it could stop")
            raise

    def arm(self, request: gr.Request):
        """Generate clicked: a fresh cancel event for this tab; lock the button until done."""
        self.tracker.arm(request.session_hash or "")
        return gr.update(interactive=False, value="Generating…"), gr.update(interactive=True)

    def disarm(self, request: gr.Request):
        self.tracker.disarm(request.session_hash or "")
        return gr.update(interactive=True, value="Generate"), gr.update(interactive=False)

    def cancel(self, request: gr.Request) -> None:
        if self.tracker.cancel(request.session_hash or ""):
            gr.Info("Cancelling: the generation stops after the current step.")
        else:
            gr.Info("Nothing to cancel.")

    def tab_closed(self, request: gr.Request) -> None:
        """demo.unload: the tab went away; its run (running or waiting) stops."""
        if request is not None and request.session_hash:
            self.tracker.cancel(request.session_hash)

    # --- input images -----------------------------------------------------------------------
    def on_model_images(self, model_id: str | None, current: Any = None, aside: list[str] | None = None):
        """The image controls for the chosen model: the strength slider (image-to-image only), the
        note on what it takes, and the input itself. A model that takes no image hides the input
        and "Use result as input"; images already there are set aside (kept in `aside`, said in the
        note, never sent) and come back when a model that takes images is chosen, so switching
        models neither loses an upload nor sends an image to a model that refuses it.
        Outputs: strength, note, input images, the button, the images set aside."""
        choice = self.model(model_id)
        strength = gr.update(visible=image_mode(choice) == "img2img")
        paths = self.gallery_paths(current)
        if choice is not None and not takes_images(choice):
            aside = paths or list(aside or [])
            hidden = gr.update(visible=False, value=[]) if paths else gr.update(visible=False)
            return strength, image_note_markdown(choice, len(aside)), hidden, gr.update(visible=False), aside or None
        shown = gr.update(visible=True, value=aside) if aside and not paths else gr.update(visible=True)
        return strength, image_note_markdown(choice), shown, gr.update(visible=True), None

    @staticmethod
    def gallery_paths(value: Any) -> list[str]:
        """File paths of an interactive gallery's value ((path, caption) pairs, or paths)."""
        paths = []
        for item in value or []:
            if isinstance(item, (list, tuple)) and item:
                item = item[0]
            if isinstance(item, dict):
                item = item.get("path") or (item.get("image") or {}).get("path")
            if isinstance(item, str) and item:
                paths.append(item)
        return paths

    def use_result_as_input(self, png_path: Any, current: Any, model_id: str | None):
        """Put the selected (or newest) result into the input images: appended for an edit model
        that takes several, else it replaces the input."""
        path = png_path.get("path") if isinstance(png_path, dict) else png_path
        if not path:
            gr.Info("Generate an image (or select one in the results) first.")
            return gr.skip()
        choice = self.model(model_id)
        limit = getattr(choice, "max_images", 0) if choice else 0
        if choice is not None and limit <= 0:  # its button is hidden; a click already on its way
            gr.Info(f"{choice.name} takes no input image: choose a model that takes images first.")
            return gr.skip()
        paths = self.gallery_paths(current)
        paths = (paths + [str(path)])[-limit:] if limit > 1 else [str(path)]
        return paths

    def size_from_images(self, value: Any, model_id: str | None):
        """Width and height from the first input image, fitted to the model's range and multiple."""
        paths = self.gallery_paths(value)
        choice = self.model(model_id)
        if not paths or choice is None:
            return gr.skip(), gr.skip()
        try:
            from PIL import Image

            from engine.generation.input_images import fit_size

            with Image.open(paths[0]) as im:
                w, h = fit_size(*im.size, choice.limits)
        except Exception:  # a broken file: Generate reports it
            return gr.skip(), gr.skip()
        return w, h

    def page_images(self, value: Any, strength: Any, model_id: str | None) -> tuple[list[dict[str, str]], Any]:
        """The page's input images as the API's (uploads Gradio already holds), and the strength
        only for an image-to-image model."""
        files = [{"path": p} for p in self.gallery_paths(value)]
        if not files or image_mode(self.model(model_id)) != "img2img":
            strength = None
        return files, strength

    async def run_ui(
        self,
        prompt, negative_prompt, model, width, height, steps, guidance, seed,
        auto, slider, fp8, disk_offload, results,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
        loras: str = "",
        quantize: str = "off",
        live_preview: bool = True,
        resident_limit: float | None = None,
        images=None, strength=None, compile_on: bool = False,
    ):
        """The Generate button: run, then add the image to this tab's gallery. The inputs after
        `results` come last (the LoRA picker's string, engine.generation.lora_library.parse_lora_spec;
        the Quantize choice; the live-preview switch; Fit's RAM bound; the input images and
        strength): Gradio puts the request and progress in their places."""
        session = request.session_hash or ""
        try:
            files, strength = self.page_images(images, strength, model)
            req = self.build_request(
                prompt, negative_prompt, model, width, height, steps, guidance, seed,
                self.vram_limit_value(auto, slider, resident_limit, disk_offload), fp8, disk_offload, loras, quantize_to_weights(quantize),
                live_preview, files or None, strength, compile_on,
            )
        except UserFacingError as exc:
            raise gr.Error(str(exc), title="Cannot generate", print_exception=False) from None
        result = await self._run_watched(req, session, self.tracker.cancel_event(session), progress)
        if result is None:
            gr.Warning("Generation cancelled.", title="Cancelled")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        for note in result.settings.get("input_notes") or []:
            gr.Info(note, title="Input image")
        entry = {
            "path": str(result.path),
            "caption": formatting.caption(result.settings),
            "parameters": result.parameters,
            "seed": result.settings.get("seed"),
        }
        results = [entry] + list(results or [])
        return (
            gr.update(value=[(r["path"], r["caption"]) for r in results], selected_index=0),
            result.parameters,
            str(result.path),
            results,
            entry["seed"],
        )

    def _api_request(self, request: gr.Request | None, *args: Any, **kwargs: Any) -> tuple[GenerateRequest, str]:
        """The API endpoints' request (build_request's arguments) and its owner (the session, or
        "api"); a bad value is the endpoint's gr.Error. Gradio reads each endpoint's parameters
        from its own signature, so /generate and /generate_stream spell them out and share this."""
        try:
            req = self.build_request(*args, **kwargs)
        except UserFacingError as exc:
            raise gr.Error(str(exc), title="Cannot generate", print_exception=False) from None
        return req, (request.session_hash if request is not None else None) or "api"

    async def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        model: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = -1,
        vram_limit: float | None = None,
        fp8: bool = False,
        disk_offload: bool = False,
        loras: str = "",
        weights: str = "auto",
        image: Any = None,
        strength: float | None = None,
        compile: bool = False,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, str]:
        """Generate one image. Returns the saved PNG's path and its parameters text.

        model: registry id (empty = the current default model); width/height/steps/guidance: empty =
        the model's defaults; seed: -1 = random; vram_limit: GB, empty = Auto.
        loras: comma-separated `id[:strength]` (strength 1 when left out), applied in that order,
        e.g. "ink:0.8, hf:owner/repo:0.5"; A1111's "<lora:ink:0.8>" works too. An id is a file in
        the LoRA folder (its path there without .safetensors) or hf:owner/repo[/file.safetensors].
        weights: how the weights are stored, "auto" (fp8 decides) or a storage form the app offers
        ("bf16", "fp8", "int8", "nf4", ...: engine.storage.forms; a GGUF model keeps its file's blocks).
        image: one uploaded image or a list (image-to-image, or an edit model's references; with an
        input image and no size, the output takes the image's, fitted); strength: 0..1,
        image-to-image only (empty = 0.6). compile: torch.compile the denoiser's blocks (the first
        run of a size compiles; if compile cannot run, the run goes on eagerly and the parameters'
        "Compile: off (why)" says why).
        """
        req, owner = self._api_request(request, prompt, negative_prompt, model, width, height, steps, guidance, seed,
                                       vram_limit, fp8, disk_offload, loras, weights, image=image, strength=strength,
                                       compile=compile)
        result = await self._run_watched(req, owner, threading.Event(), progress)
        if result is None:
            raise gr.Error("Generation cancelled.", print_exception=False)
        return str(result.path), result.parameters

    async def generate_stream(
        self,
        prompt: str,
        negative_prompt: str = "",
        model: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = -1,
        vram_limit: float | None = None,
        fp8: bool = False,
        disk_offload: bool = False,
        loras: str = "",
        weights: str = "auto",
        image: Any = None,
        strength: float | None = None,
        compile: bool = False,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),
    ):
        """Generate one image and stream it as it forms: while denoising, (the latest preview of
        the latents, "step i/n · ETA") whenever a step or a preview is new; at the end (the saved
        PNG's path, its parameters text). The parameters are those of /generate."""
        req, owner = self._api_request(request, prompt, negative_prompt, model, width, height, steps, guidance, seed,
                                       vram_limit, fp8, disk_offload, loras, weights, preview=True, image=image,
                                       strength=strength, compile=compile)
        cancel = threading.Event()
        events: queue.SimpleQueue = queue.SimpleQueue()
        task = asyncio.ensure_future(self._run_watched(req, owner, cancel, progress, on_event=events.put))
        last_image = None
        try:
            while True:
                finished = task.done()
                status, image = None, None
                while True:
                    try:
                        event = events.get_nowait()
                    except queue.Empty:
                        break
                    if event.phase == "denoising" and event.total_steps:
                        status = f"step {event.step}/{event.total_steps} · {formatting.eta_text(event.eta_seconds)}"
                    elif event.phase == "compiling" and event.message:  # compiling, its seconds, or why not
                        status = event.message
                    image = event.preview if event.preview is not None else image
                if status is not None or image is not None:
                    last_image = image if image is not None else last_image
                    yield (last_image if image is not None else gr.skip()), (status or gr.skip())
                if finished:
                    break
                await asyncio.sleep(STREAM_POLL_S)
            result = task.result()
        finally:
            if not task.done():  # the client went away: stop the engine at the next step
                cancel.set()
        if result is None:
            raise gr.Error("Generation cancelled.", print_exception=False)
        yield str(result.path), result.parameters

    # --- gallery --------------------------------------------------------------------------
    def select_result(self, results, evt: gr.SelectData):
        results = results or []
        if evt.index is None or not (0 <= int(evt.index) < len(results)):
            return gr.skip(), gr.skip()
        entry = results[int(evt.index)]
        return entry["parameters"], entry["path"]

    @staticmethod
    def reuse_seed(last_seed):
        return gr.skip() if last_seed is None else int(last_seed)

    @staticmethod
    def random_seed():
        return -1

    # --- live panel -----------------------------------------------------------------------
    def tick(self, shown, model, models_shown, request: gr.Request, preview_shown=None):
        """Timer: refresh the live panel (the chart when it has new samples, the preview when the
        run sent a new one, the model list after a download in any tab)."""
        if models_shown != self.models_version:
            models_update, models_shown = self.refresh_models(model), self.models_version
        else:
            models_update = gr.skip()
        panel, frame, shown = self._tick(shown, request)
        preview_update, preview_shown = self._preview(preview_shown)
        return panel, frame, shown, preview_update, preview_shown, models_update, models_shown

    def _preview(self, preview_shown):
        run_id, count, image = self.tracker.preview()
        key = [run_id, count]
        if key == preview_shown or (image is None and preview_shown is None):
            return gr.skip(), preview_shown
        return image, key  # None clears the last run's preview (a run without previews)

    def _tick(self, shown, request: gr.Request):
        session = request.session_hash if request is not None else None
        try:
            snapshot = self.studio.telemetry()
        except Exception:  # never let the panel die
            log.exception("telemetry failed")
            snapshot = None
        run_id, owner, event, finished, _ = self.tracker.view()
        if snapshot is not None and run_id is not None and not finished:
            self.tracker.sample(snapshot)
        run_id, owner, event, finished, samples = self.tracker.view()
        if owner is None or (finished and event is not None and event.phase in ("done", "cancelled", "error")):
            who = ""
        else:
            who = "this tab" if owner == session else "another tab"
        panel = formatting.live_panel_html(snapshot, event, who)
        key = [run_id, len(samples)]
        if key == shown or not samples:
            # an empty frame would leave the chart without its colour legend: keep the last one
            return panel, gr.skip(), shown
        return panel, history_frame(samples), key
