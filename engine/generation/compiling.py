"""A request's `compile` switch: the denoiser's repeated blocks compiled, or eager, never a crash.

The denoiser is the only component that runs many times per image, so it is the one compiled
(engine.compilation.compile_model, regional: one graph per block class). Compilation happens at
the first denoising step of a new size; the runner reports that step as the "compiling" phase,
with its seconds. Inductor keeps its compiled code in an app-named folder
(`cache_dir()`), so a restart reuses it.

When compile cannot run (no C compiler, no Triton, an unsupported op, any compiler error) the run
goes on eagerly, and `CompileRun.reason` says why in one line for the panel and the API.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.compilation import compile_model, failure_reason, is_compiled, uncompile_model, use_cache_dir

log = logging.getLogger(__name__)

#: inductor compiles to C++ on a CPU and to Triton on a GPU; "aot_eager" for tests
BACKEND = os.environ.get("LOWVRAM_COMPILE_BACKEND", "inductor")


def cache_dir() -> Path:
    """Where compiled code is kept: TORCHINDUCTOR_CACHE_DIR when the user set it, else
    ~/.cache/lowvram-studio/inductor (LOWVRAM_STUDIO_CACHE moves the app's cache folder)."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    root = Path(os.environ.get("LOWVRAM_STUDIO_CACHE") or Path.home() / ".cache" / "lowvram-studio")
    return root / "inductor"


@dataclass
class CompileRun:
    """What compile did for one run (the runner fills `seconds` after the first step)."""

    requested: bool
    active: bool = False  # the denoiser runs compiled
    reason: str | None = None  # why it runs eagerly although compile was asked for
    compiles_now: bool = False  # this size was not compiled yet: the first step compiles
    seconds: float | None = None  # the first step's seconds when it compiled (compile included)
    graphs_before: int = 0  # Dynamo's graph count when the run began

    def first_step_note(self, seconds: float) -> str:
        """The compiling phase's last word: how long the first step took, and whether it compiled
        (another pipeline of the same model class reuses the graphs already made)."""
        self.seconds = seconds
        if compiled_graphs() > self.graphs_before:
            return f"Compiled in {seconds:.1f} s (first step included)"
        return f"Reused the compiled code (first step {seconds:.1f} s)"

    def describe(self) -> str:
        """The infotext's / API's value: "on", or "off (why)"."""
        if self.active:
            return "on"
        return f"off ({self.reason})" if self.reason else "off"


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileSwitch:
    """Compiles or un-compiles a pipeline's denoiser as each request asks."""

    def __init__(self, backend: str | None = None):
        self.backend = backend or BACKEND
        self._cache_set = False
        self._warm: set[tuple[int, Any]] = set()  # (id of the denoiser, size) compiled already

    def apply(self, pipe: Any, wanted: bool, size: tuple[int, int]) -> CompileRun:
        denoiser = pipe.components[pipe.family.denoiser]
        run = CompileRun(requested=wanted)
        if not wanted:
            if is_compiled(denoiser):
                uncompile_model(denoiser)
            return run
        try:
            if not self._cache_set:
                use_cache_dir(cache_dir())  # before the process's first compile
                self._cache_set = True
            compile_model(denoiser, backend=self.backend)
        except Exception as exc:  # torch.compile unsupported here (Windows without Triton, Python version, ...)
            return self.fail(pipe, run, exc)
        run.active = True
        run.graphs_before = compiled_graphs()
        key = (id(denoiser), size)
        run.compiles_now = key not in self._warm
        self._warm.add(key)
        return run

    def fail(self, pipe: Any, run: CompileRun, exc: BaseException) -> CompileRun:
        """Compile could not run: the denoiser goes back to eager; `run.reason` says why."""
        denoiser = pipe.components[pipe.family.denoiser]
        if is_compiled(denoiser):
            uncompile_model(denoiser)
        self._warm = {key for key in self._warm if key[0] != id(denoiser)}
        run.active = False
        run.compiles_now = False
        run.reason = "compile failed, ran eagerly: " + failure_reason(exc)
        log.warning("%s", run.reason)
        return run
