"""UI choices -> engine configuration, in one place.

The UI offers four memory controls: an FP8 toggle, a "quantize" choice (8-bit int or 4-bit
NF4 storage, on the fly), a disk-offload checkbox and a VRAM slider ("Auto" or a number of GB).
The UI folds the FP8 toggle into the storage choice at its boundary (`resolve_storage`'s `fp8`);
below it a request carries one storage decision, `GenerateRequest.weights`. This module turns
the choices into the eight-key `vram_config` and the `vram_limit` the engine takes, and detects
what the host has:

* Weights (`GenerateRequest.weights`, the API's `weights` parameter), one of
  `engine.storage.forms.weights_choices()`: "auto" (the default form, bf16), or a registered form
  the UI offers ("bf16", "fp8": scaled float8_e4m3fn, "int8": per-channel int8, "nf4": 4-bit
  NormalFloat, groups of 32, ...). A GGUF catalogue entry stores its file's blocks ("gguf")
  whatever is chosen. Offload, onload and, on a GPU, preparing copies use that form; computation
  runs in bfloat16 on the computation device. On a CPU the resident copies are bfloat16:
  dequantized once, as far as the RAM room allows, not at every forward.
* Disk offload on: the master copies stay in their .safetensors files ("disk").
* Slider: the request's `vram_limit` (None = Auto), turned into the engine's (None = unlimited)
  by `engine.generation.vram_limit.resolve_vram_limit`, the one place Auto is resolved: the
  detected VRAM minus a margin on a GPU. On a host without a GPU everything runs on the CPU
  (computation_device "cpu", bfloat16) and Auto means "what this machine can hold": the RAM
  really available bounds residency (engine.runtime.ram), and with disk offload nothing is kept
  resident (the weights stay out of anonymous RAM; the kernel's page cache, which it can
  reclaim, caches the files). A number still bounds the engine's ledger (what it would keep
  resident), within the RAM room too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.generation.types import GenerateRequest, HardwareInfo, UserFacingError
from engine.generation.vram_limit import auto_vram_limit_gb, is_auto, resolve_vram_limit
from engine.config import DISK, VramConfig, form_value, normalize_device, storage_name
from engine.storage.forms import FP8, default_form, file_form, get_form, weights_choices

log = logging.getLogger(__name__)

GB = 1024**3

COMPUTATION_DTYPE = torch.bfloat16


def __getattr__(name: str) -> Any:
    if name == "WEIGHTS":  # the accepted `weights`, as registered now (engine.storage.forms)
        return weights_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_storage(weights: str | None, fp8: bool = False, gguf: bool = False) -> str:
    """The storage form a request runs with (a registered form's name). `weights` is one of
    `weights_choices()`: "auto" is the default form (bf16). `fp8` is the UI's FP8 toggle, folded
    in at the UI's boundary: with "auto" it means "fp8"; an explicit form wins. `gguf`: the model
    is a GGUF catalogue entry, whose file's blocks are its storage whatever is asked."""
    if gguf:
        return file_form().name  # type: ignore[union-attr]
    choice = (weights or "auto").strip().lower()
    accepted = weights_choices()
    if choice not in accepted:
        raise UserFacingError(f"weights={weights!r} is not a storage choice. Use one of: {', '.join(accepted)}.")
    if choice == "auto":
        return FP8 if fp8 else default_form().name
    return choice


def computation_device() -> torch.device:
    """CUDA when present (the current device, with its index: engine.config.normalize_device),
    else the CPU."""
    return normalize_device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def detect_hardware(device: torch.device | str | None = None) -> HardwareInfo:
    """What this host has, asked of the computation device (`device`, default
    `computation_device()`) only: its name, capability, total and free VRAM. Auto is the VRAM
    free now minus a margin (engine.generation.vram_limit). `warnings` says when this torch has no
    kernels for the card, and what to install. Cheap; allocates nothing on the GPU."""
    import psutil

    from engine.runtime import cuda_facts

    ram_total = psutil.virtual_memory().total / GB
    dev = normalize_device(device) if device is not None else computation_device()
    if dev.type == "cuda" and torch.cuda.is_available():
        free, total = cuda_facts.free_and_total(dev)
        cap = cuda_facts.capability(dev)
        name = cuda_facts.device_name(dev)
        problem = cuda_facts.check_kernels(dev)
        if problem:
            log.warning("%s", problem)
        return HardwareInfo(
            True, name, round(total / GB, 2), auto_vram_limit_gb(total / GB, free / GB), round(ram_total, 2),
            vram_free_gb=round(free / GB, 2), compute_capability=cap, warnings=(problem,) if problem else (),
        )
    return HardwareInfo(False, None, None, None, round(ram_total, 2))


def measured_auto_limit_gb(device: torch.device | str) -> float | None:
    """What Auto comes to on `device` now: its free VRAM minus the margin (auto_vram_limit_gb);
    None on a device that is not a GPU. The session measures it when it builds a pipeline."""
    from engine.runtime import cuda_facts

    dev = normalize_device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = cuda_facts.free_and_total(dev)
    return auto_vram_limit_gb(total / GB, free / GB)


def vram_config_for(
    fp8: bool, disk_offload: bool, device: torch.device | str | None = None, storage_name: str | None = None,
    compute_dtype: torch.dtype = COMPUTATION_DTYPE,
) -> dict[str, Any]:
    """The eight-key vram_config for a storage form (`storage_name`, a registered form; None: the
    UI's FP8 toggle decides between "fp8" and the default form) and the disk checkbox. With disk
    offload the masters stay in their files and the resident copies take the storage form.
    `compute_dtype`: the GPU generation's (`compute_dtype_for`)."""
    device = normalize_device(device) if device is not None else computation_device()
    form = get_form(storage_name or resolve_storage("auto", fp8))
    storage = form_value(form)
    if disk_offload:
        offload_device = onload_device = offload_dtype = onload_dtype = DISK
    else:
        offload_device = onload_device = "cpu"
        offload_dtype = onload_dtype = storage
    return {
        "offload_dtype": offload_dtype,
        "offload_device": offload_device,
        "onload_dtype": onload_dtype,
        "onload_device": onload_device,
        # on a CPU a resident copy is RAM too: keep it in the computation form, so an FP8 layer is
        # dequantized once (within the RAM room) instead of at every forward (engine.runtime.ram)
        "preparing_dtype": storage if device.type != "cpu" else COMPUTATION_DTYPE,
        "preparing_device": device,
        "computation_dtype": compute_dtype if device.type != "cpu" else COMPUTATION_DTYPE,
        "computation_device": device,
    }


@dataclass(frozen=True)
class EngineSettings:
    """What one generation runs under: one storage decision (`storage`, a registered form's
    name), disk offload, the limit and the device. `build_key` decides whether the live pipeline
    can be reused (only the vram_limit changed: re-plan) or must be rebuilt."""

    disk_offload: bool
    vram_limit: float | None  # engine level: None = unlimited (engine.generation.vram_limit)
    device: torch.device
    storage: str  # resolve_storage's answer
    limit_is_auto: bool = False  # vram_limit is what the request's Auto came to
    compute_dtype: torch.dtype = COMPUTATION_DTYPE  # the GPU generation's (compute_dtype_for)
    compute_capability: tuple[int, int] | None = None  # the computation GPU's (None: the CPU, or unknown)

    @property
    def compute_dtype_name(self) -> str:
        """"bf16" or "fp16" (the estimate, the panel and the PNG's parameters say it)."""
        return storage_name(self.compute_dtype)

    @property
    def storage_name(self) -> str:
        return self.storage

    @property
    def fp8(self) -> bool:
        """The weights are stored in FP8 (for display: the infotext's "FP8" field)."""
        return self.storage == FP8

    @property
    def storage_label(self) -> str:
        return get_form(self.storage).label

    @property
    def size_factor(self) -> float:
        """Stored bytes per bf16 byte of the model (engine.storage.forms.StorageForm.size_factor)."""
        return get_form(self.storage).size_factor

    @property
    def vram_config(self) -> VramConfig:
        return VramConfig.from_dict(vram_config_for(False, self.disk_offload, self.device, self.storage, self.compute_dtype))

    @property
    def build_key(self) -> tuple[bool, str, str]:
        return (self.disk_offload, str(self.device), self.storage)

    def describe_limit(self) -> str:
        """"2 GB", "unlimited" ("RAM available" where the computation runs on the CPU: the RAM
        room bounds it), inside "Auto (...)" when Auto chose it."""
        if self.vram_limit is None:
            shown = "RAM available" if self.device.type == "cpu" else "unlimited"
        else:
            shown = f"{self.vram_limit:g} GB"
        return f"Auto ({shown})" if self.limit_is_auto else shown


def settings_for(
    request: GenerateRequest, hardware: HardwareInfo | None = None, device: torch.device | str | None = None, gguf: bool = False,
    steps: int | None = None,
) -> EngineSettings:
    """The engine settings of a request, its vram_limit and weights choice checked here
    (UserFacingError). `hardware`: what Auto is resolved for (default: this host). `gguf`: the
    model is a GGUF catalogue entry (its blocks are its storage). `steps`: the run's steps (Auto
    on a CPU makes copies of quantized masters only where they pay back; None: the request's)."""
    dev = normalize_device(device) if device is not None else computation_device()
    hardware = hardware if hardware is not None else detect_hardware(dev)
    storage = resolve_storage(request.weights, gguf=gguf)
    limit = resolve_vram_limit(
        request.vram_limit, hardware, device_type=dev.type, disk_offload=bool(request.disk_offload),
        steps=steps if steps is not None else request.steps, quantized=get_form(storage).quantized,
    )
    cap = hardware.compute_capability if dev.type == "cuda" else None
    return EngineSettings(
        bool(request.disk_offload), limit, dev, storage, limit_is_auto=is_auto(request.vram_limit),
        compute_dtype=compute_dtype_for(cap), compute_capability=cap,
    )


def compute_dtype_for(capability: tuple[int, int] | None) -> torch.dtype:
    """The computation dtype on a GPU of `capability`: bf16 from 8.0 (Ampere) on, fp16 below it
    (T4, RTX 20xx, V100: no bf16 tensor cores, fused attention or cuDNN convolutions there);
    bf16 on the CPU or an unknown GPU (engine.runtime.cuda_facts.compute_dtypes)."""
    from engine.runtime.cuda_facts import compute_dtypes

    return compute_dtypes(capability)[0]
