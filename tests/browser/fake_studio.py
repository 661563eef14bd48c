"""A stand-in for engine.studio.Studio with the same interface, for developing the UI only.

The browser tests run against the real Studio; this fake exists so the UI can be exercised
while the engine facade is being written (LVS_FAKE_STUDIO=1) and for fast handler tests.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from engine.generation.types import (
    GenerateRequest,
    GenerationEvent,
    GenerationResult,
    HardwareInfo,
    MemoryEstimate,
    ModelChoice,
    SuggestedSettings,
    TelemetrySnapshot,
    UserFacingError,
)

DEMO = ModelChoice(
    id="demo", name="Demo (tiny, offline)", size_gb=0.01, downloaded=True, is_demo=True,
    image_mode="img2img", max_images=1,  # like the real demo; "big" takes no input image
    defaults={"steps": 8, "guidance": 4.0, "width": 256, "height": 256},
    limits={"min_width": 64, "max_width": 1024, "min_height": 64, "max_height": 1024, "min_steps": 1, "max_steps": 100,
            "min_guidance": 0.0, "max_guidance": 20.0},
)
BIG = ModelChoice(id="big", name="Big model", size_gb=40.9, downloaded=False,
                  defaults={"steps": 30, "guidance": 3.5, "width": 1024, "height": 1024},
                  limits={"min_steps": 1, "max_steps": 100})


class FakeStudio:
    def __init__(self, models_dir: Path, outputs_dir: Path, source: str = "hf", step_seconds: float = 0.25, **_: object):
        self.models_dir, self.outputs_dir, self.source = Path(models_dir), Path(outputs_dir), source
        self.step_seconds = step_seconds
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, int]] = {}
        self._ram = 1.0

    def list_models(self):
        return [DEMO, BIG]

    def default_model_id(self):
        return "demo"

    def hardware(self):
        return HardwareInfo(has_gpu=False, gpu_name=None, vram_total_gb=None, auto_vram_limit_gb=None, ram_total_gb=23.0)

    def _check(self, r: GenerateRequest):
        model = {m.id: m for m in self.list_models()}.get(r.model or "demo")
        if model is None:
            raise UserFacingError(f"Unknown model {r.model!r}.")
        for key in ("width", "height"):
            v = getattr(r, key)
            if v is not None and (v < 64 or v % 8):
                raise UserFacingError(f"{key.capitalize()} {v} is not supported: use a multiple of 8 from 64 to 1024.")
        return model

    def estimate(self, r: GenerateRequest):
        model = self._check(r)
        fits = model.is_demo
        return MemoryEstimate(vram_gb=0.0, ram_gb=model.size_gb * 1.2, disk_gb=model.size_gb, streamed_gb_per_step=model.size_gb / 2,
                              fits=fits, warnings=() if fits else ("Needs 48 GB of RAM; this host has 23 GB.",))

    def suggest_settings(self, r: GenerateRequest, machine=None):
        model = self._check(r)
        if model.is_demo:
            return SuggestedSettings(True, False, False, None, False, self.step_seconds, "bf16: nothing streamed", self.estimate(r))
        return SuggestedSettings(False, True, True, None, False, None, "Nothing fits this machine: bf16 does not fit in 23 GB RAM.")

    def telemetry(self):
        with self._lock:
            return TelemetrySnapshot(vram_used_gb=None, vram_total_gb=None, ram_used_gb=self._ram, ram_total_gb=23.0,
                                     layer_states={k: dict(v) for k, v in self._states.items()}, timestamp=time.time())

    def generate(self, r: GenerateRequest, cancel: threading.Event | None = None):
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        model = self._check(r)
        if r.prompt == "boom":
            raise RuntimeError("boom")
        steps = r.steps or model.defaults["steps"]
        w, h = r.width or model.defaults["width"], r.height or model.defaults["height"]
        seed = r.seed if r.seed not in (None, -1) else random.randint(0, 2**31 - 1)
        yield GenerationEvent(phase="loading", message="Loading demo", telemetry=self.telemetry())
        with self._lock:
            self._states = {"transformer": {"offload": 6, "onload": 0, "preparing": 0, "computation": 0},
                            "vae": {"offload": 2, "onload": 0, "preparing": 0, "computation": 0}}
        t0 = time.monotonic()
        for i in range(1, steps + 1):
            if cancel is not None and cancel.is_set():
                yield GenerationEvent(phase="cancelled", step=i - 1, total_steps=steps, telemetry=self.telemetry())
                return
            time.sleep(self.step_seconds)
            with self._lock:
                k = i % 6
                self._states["transformer"] = {"offload": 6 - k, "onload": 0, "preparing": k, "computation": 1 if k else 0}
                self._ram = 1.0 + 0.1 * i
            per_step = (time.monotonic() - t0) / i
            preview = Image.effect_noise((max(8, w // 8), max(8, h // 8)), 64).convert("RGB") if r.preview else None
            yield GenerationEvent(phase="denoising", step=i, total_steps=steps, seconds_per_step=per_step,
                                  telemetry=self.telemetry(), eta_seconds=per_step * (steps - i), preview=preview,
                                  preview_index=i if r.preview else 0)
        img = Image.effect_noise((w, h), 64).convert("RGB")
        params = f"{r.prompt}\nSteps: {steps}, Seed: {seed}, Size: {w}x{h}, Model: {model.id}"
        info = PngInfo()
        info.add_text("parameters", params)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        path = self.outputs_dir / f"{int(time.time() * 1000)}-{seed}.png"
        img.save(path, pnginfo=info)
        with self._lock:
            self._ram = 1.0
        yield GenerationResult(image=img, path=path, parameters=params,
                               settings={"model": model.id, "width": w, "height": h, "steps": steps, "seed": seed})
