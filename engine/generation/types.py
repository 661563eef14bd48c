"""Plain data types that cross the engine <-> UI boundary.

The UI builds a `GenerateRequest`, the engine answers with a stream of `GenerationEvent`s
and finally a `GenerationResult`. Nothing here holds a tensor or imports Gradio, so both
sides can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.storage.forms import FP8, default_form, weights_choices

# re-exported: model_registry defines them (data flows ui -> engine -> model_registry)
from model_registry.types import ModelChoice, UserFacingError  # noqa: F401


def __getattr__(name: str) -> Any:
    # WEIGHTS: the accepted values of GenerateRequest.weights (the API's `weights`), as registered
    # now: "auto" (the default form, bf16) and every form the UI offers (engine.storage.forms)
    if name == "WEIGHTS":
        return weights_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

Phase = Literal["queued", "downloading", "loading", "encoding", "compiling", "denoising", "decoding", "done", "cancelled", "error"]

LAYER_STATES: tuple[str, ...] = ("offload", "onload", "preparing", "computation")


@dataclass(frozen=True)
class GenerateRequest:
    """What the user asked for. `vram_limit` is request level (engine.generation.vram_limit):
    None = Auto (what this machine can hold: the detected VRAM minus a margin on a GPU), a
    number of GB >= 0, `math.inf` = unlimited."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = None  # registry id; None = the current default model
    width: int | None = None  # None = the model's default
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None or -1 = random
    vram_limit: float | None = None
    disk_offload: bool = False
    # LoRAs to apply, in order: (id, strength); ids as engine.generation.lora_library names them
    loras: tuple[tuple[str, float], ...] = ()
    # the one storage decision: "auto" (the default form, bf16) or a form the UI offers ("bf16",
    # "fp8", "int8", "nf4", ...: engine.storage.forms.weights_choices()); a GGUF model stores its
    # file's blocks whatever this says. (The UI's FP8 toggle is folded into it by the UI.)
    weights: str = "auto"
    preview: bool = True  # live preview images of the latents during denoising
    # input images (PIL images, bytes or file paths): image-to-image, or an edit model's references
    images: tuple[Any, ...] = ()
    strength: float | None = None  # image-to-image only: 0 keeps the input, 1 ignores it; None = 0.6
    # torch.compile the denoiser's repeated blocks (engine.generation.compiling); the first run of a
    # size compiles, later ones reuse it; a compile failure runs eagerly and says why
    compile: bool = False


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
    lora_bytes: int = 0  # LoRA factors on the computation device (counted in the VRAM ledger)
    storage: str = ""  # the live pipeline's weight storage (a form's name: "bf16", "fp8", "nf4", "gguf", ...); "" = none loaded
    # VRAM held outside this process's caching allocator: other programs (a desktop, a browser)
    # and this process's CUDA context; None without a GPU
    vram_other_gb: float | None = None
    compute_dtype: str = ""  # the live pipeline's computation dtype ("bf16", "fp16"); "" = none loaded
    # host RAM page-locked for streaming (arenas and staging buffers, all components), and the
    # pinned budget it is held to (None: nothing streams to a GPU, so nothing is pinned)
    pinned_bytes: int = 0
    pinned_limit_bytes: int | None = None

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
    eta_seconds: float | None = None  # denoising: time left for the steps still to run
    preview: Any = None  # denoising: a PIL image of the current latents (engine.generation.preview), when one was made
    preview_index: int = 0  # how many previews this run has made so far


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
    lora_bytes: int = 0  # the LoRAs' factors, included in vram_gb
    storage: str = ""  # how the weights are stored (the form's label: engine.storage.forms.StorageForm.label)
    compute_dtype: str = ""  # the dtype the computation runs in ("bf16"; "fp16" on a GPU below capability 8.0)


@dataclass(frozen=True)
class HardwareInfo:
    """What the host has; decides whether the VRAM slider is live."""

    has_gpu: bool
    gpu_name: str | None
    vram_total_gb: float | None
    auto_vram_limit_gb: float | None  # the VRAM free when detected, minus a margin
    ram_total_gb: float
    vram_free_gb: float | None = None  # free when detected (what other programs hold is not)
    compute_capability: tuple[int, int] | None = None  # the computation GPU's (None: no GPU)
    warnings: tuple[str, ...] = ()  # e.g. this torch has no kernels for the GPU, and what to install



@dataclass(frozen=True)
class Machine:
    """What `suggest_settings` sizes for: this host (`Studio.machine()`) or a hypothetical one.
    `vram_gb` None: no GPU (the computation runs on the CPU, within the RAM)."""

    vram_gb: float | None
    ram_gb: float
    disk_free_gb: float | None = None  # None: not known (no disk check)
    gpu_name: str | None = None


@dataclass(frozen=True)
class SuggestedSettings:
    """The fastest settings that fit a machine (engine.generation.suggest), and why in one line."""

    fits: bool
    fp8: bool
    disk_offload: bool
    vram_limit: float | None  # GB, engine level: None = unlimited (a host without a GPU)
    auto: bool  # the limit is what Auto comes to on this machine
    seconds_per_step: float | None  # the cost model's figure (None when nothing fits)
    reason: str
    estimate: MemoryEstimate | None = None
    candidates_tried: int = 0
    #: the storage form: a form the UI offers ("bf16", "fp8", "int8", "nf4", ...:
    #: GenerateRequest.weights) or "gguf" (a GGUF entry's file blocks); "" = from `fp8` (the UI's
    #: FP8 toggle, which this carries for the page's checkbox and the /suggest answer)
    weights: str = ""

    def __post_init__(self) -> None:
        if not self.weights:
            object.__setattr__(self, "weights", FP8 if self.fp8 else default_form().name)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON for the /suggest endpoint."""
        est = self.estimate
        return {
            "fits": self.fits,
            "weights": self.weights,
            "fp8": self.fp8,
            "disk_offload": self.disk_offload,
            "vram_limit": self.vram_limit,
            "auto": self.auto,
            "seconds_per_step": None if self.seconds_per_step is None else round(self.seconds_per_step, 3),
            "reason": self.reason,
            "estimate": None if est is None else {
                "vram_gb": est.vram_gb, "ram_gb": est.ram_gb, "disk_gb": est.disk_gb,
                "streamed_gb_per_step": est.streamed_gb_per_step, "fits": est.fits,
            },
        }
