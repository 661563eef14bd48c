"""Parsing and validation of `vram_config` and `vram_limit`.

The eight keys and their meaning follow DiffSynth-Studio's VRAM management docs, so a config
written for DiffSynth works here. Everything is validated before a model is touched: a bad
config raises a ValueError that names the key and lists what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from engine.storage.forms import find_form, forms

DISK = "disk"

STATES: tuple[str, ...] = ("offload", "onload", "preparing", "computation")
CONFIG_KEYS: tuple[str, ...] = tuple(f"{state}_{what}" for state in STATES for what in ("dtype", "device"))

# torch dtypes by name; the storage forms' names ("bf16", "fp8", "int8", ...) come from the
# registry (engine.storage.forms)
_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "fp8_e5m2": torch.float8_e5m2,
}
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)
FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)

_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def quant_forms() -> tuple[str, ...]:
    """The storage forms that are names of their own in a vram_config, not torch dtypes ("int8",
    "nf4", "gguf", ...: engine.storage.forms). Like FP8 they are storage-only: the bytes cross as
    stored and are dequantized on the computation device."""
    return tuple(f.name for f in forms() if f.dtype is None)


def _accepted_dtypes(allow_disk: bool) -> str:
    dtype_names = set(_DTYPE_ALIASES) | {f.name for f in forms() if f.dtype is not None}
    names = sorted(dtype_names) + list(quant_forms())
    return ", ".join(([DISK] if allow_disk else []) + names) + " (or the torch.dtype itself)"


def form_value(form: Any) -> torch.dtype | str:
    """What a vram_config holds for a storage form (engine.storage.forms.StorageForm): its torch
    dtype, or its own name."""
    return getattr(torch, form.dtype) if form.dtype else form.name


def parse_dtype(key: str, value: Any, allow_disk: bool) -> torch.dtype | str:
    """Turn a dtype given as torch.dtype or name into a torch.dtype, a storage form's name
    ("int8", "nf4", "gguf", ...: engine.storage.forms) or the string "disk"."""
    if isinstance(value, torch.dtype):
        if value in SUPPORTED_DTYPES:
            return value
        form = find_form(value)  # torch.int8 names the int8 form
        if form is not None and form.dtype is None:
            return form.name
    elif isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name == DISK and allow_disk:
            return DISK
        if name in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[name]
        form = find_form(name)
        if form is not None:
            return form_value(form)
    where = "" if allow_disk else f' ("{DISK}" is only accepted for the offload_* and onload_* keys)'
    raise ValueError(f"vram_config[{key!r}] = {value!r} is not a supported dtype{where}. Accepted: {_accepted_dtypes(allow_disk)}.")


def parse_device(key: str, value: Any, allow_disk: bool, check_present: bool = True) -> torch.device | str:
    """Turn a device given as torch.device or string into a torch.device (or "disk").
    `check_present=False` accepts a CUDA device this host does not have (a config to plan for
    another machine, as the estimate does on meta builds: nothing is allocated on it)."""
    if isinstance(value, str) and value.strip().lower() == DISK and allow_disk:
        return DISK
    try:
        device = value if isinstance(value, torch.device) else torch.device(str(value).strip())
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in _DEVICE_TYPES:
        accepted = ", ".join(([DISK] if allow_disk else []) + ["cpu", "cuda", "cuda:N", "mps", "xpu"])
        raise ValueError(f"vram_config[{key!r}] = {value!r} is not a supported device. Accepted: {accepted}.")
    device = normalize_device(device)
    if not check_present:
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"vram_config[{key!r}] = {value!r} asks for CUDA, but this host has no usable CUDA device. "
            "Use 'cpu' here, or run on a machine with an NVIDIA GPU."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"vram_config[{key!r}] = {value!r}: only {torch.cuda.device_count()} CUDA device(s) exist.")
    return device


def normalize_device(device: torch.device | str) -> torch.device:
    """One device, one name: `torch.device("cuda") != torch.device("cuda:0")`, so a config that
    names the same GPU both ways (onload on "cuda:0", computation on "cuda") would not see its
    onloaded layers as resident. "cuda" becomes the current CUDA device with its index ("cuda:0"
    where CUDA is absent, as when planning for another machine). Asking for the current index
    creates no CUDA context (cudaGetDevice does not)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def default_computation_device() -> torch.device:
    return normalize_device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Place:
    """Where and in which dtype a copy of the weights lives."""

    device: torch.device | str  # "disk" for weights left in their .safetensors file
    dtype: torch.dtype | str

    @property
    def on_disk(self) -> bool:
        return self.device == DISK

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_DTYPES

    @property
    def is_quantized(self) -> bool:
        """A storage-only form (FP8, int8, nf4, gguf, ...: a registered form with a codec):
        dequantized on the computation device."""
        return is_storage_only(self.dtype)


@dataclass(frozen=True)
class VramConfig:
    """The eight-key vram_config, parsed. Use `VramConfig.from_dict` to build one from user input."""

    offload_dtype: torch.dtype | str
    offload_device: torch.device | str
    onload_dtype: torch.dtype | str
    onload_device: torch.device | str
    preparing_dtype: torch.dtype
    preparing_device: torch.device
    computation_dtype: torch.dtype
    computation_device: torch.device

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | "VramConfig" | None, *, check_present: bool = True) -> "VramConfig":
        """Validate a user's dict. Missing keys get DiffSynth's usual defaults:
        computation on CUDA if present (else CPU) in bfloat16, preparing = computation,
        offload on the CPU in the computation dtype, onload = offload. `check_present=False`:
        the devices need not exist on this host (planning for another machine, never run)."""
        if isinstance(config, VramConfig):
            return config
        config = dict(config or {})
        if not isinstance(config, dict):
            raise ValueError(f"vram_config must be a dict with the keys {', '.join(CONFIG_KEYS)}; got {type(config).__name__}.")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"vram_config has unknown key(s) {unknown}. Accepted keys: {', '.join(CONFIG_KEYS)}.")

        def get(key: str, default: Any) -> Any:
            value = config.get(key)
            return default if value is None else value

        given = config.get("computation_device")  # the default asks CUDA for its current device: only when needed
        comp_device = parse_device("computation_device", default_computation_device() if given is None else given, False, check_present)
        comp_dtype = parse_dtype("computation_dtype", get("computation_dtype", torch.bfloat16), False)
        if is_storage_only(comp_dtype):
            named = [f"{f.title} ({', '.join((f.dtype,) + f.also_dtypes)})" if f.dtype else f.name for f in forms() if f.quantized]
            storage_only = ", ".join(named[:-1]) + " and " + named[-1]
            raise ValueError(
                f"vram_config['computation_dtype'] = {config.get('computation_dtype')!r}: {storage_only} are "
                "storage dtypes here, computation runs in bfloat16/float16/float32. "
                "Put the storage dtype in offload/onload/preparing_dtype."
            )
        prep_device = parse_device("preparing_device", get("preparing_device", comp_device), False, check_present)
        prep_dtype = parse_dtype("preparing_dtype", get("preparing_dtype", comp_dtype), False)
        off_device = parse_device("offload_device", get("offload_device", "cpu"), True, check_present)
        off_dtype = parse_dtype("offload_dtype", get("offload_dtype", comp_dtype), True)
        on_device = parse_device("onload_device", get("onload_device", off_device), True, check_present)
        on_dtype = parse_dtype("onload_dtype", get("onload_dtype", off_dtype), True)

        for state, device, dtype in (("offload", off_device, off_dtype), ("onload", on_device, on_dtype)):
            if (device == DISK) != (dtype == DISK):
                raise ValueError(
                    f"vram_config: {state}_device={device!s} but {state}_dtype={dtype!s}. Disk offload needs both "
                    f"{state}_device and {state}_dtype set to \"disk\"."
                )
        if on_device == DISK and off_device != DISK:
            raise ValueError("vram_config: onload on \"disk\" needs offload on \"disk\" too (weights cannot go back to a file).")
        if isinstance(on_device, torch.device) and on_device == comp_device and comp_device.type != "cpu":
            if (on_device, on_dtype) != (prep_device, prep_dtype):
                raise ValueError(
                    "vram_config: onload_device is the computation device, so onloaded layers are resident there and "
                    f"must use the preparing dtype ({prep_dtype}); got onload_dtype={on_dtype}."
                )
        return cls(off_dtype, off_device, on_dtype, on_device, prep_dtype, prep_device, comp_dtype, comp_device)

    def place(self, state: str) -> Place:
        return Place(getattr(self, f"{state}_device"), getattr(self, f"{state}_dtype"))

    @property
    def uses_disk(self) -> bool:
        return self.offload_device == DISK

    @property
    def stores_fp8(self) -> bool:
        return any(self.place(s).is_fp8 for s in ("offload", "onload", "preparing"))

    @property
    def storage_name(self) -> str:
        """The storage form of the weights as the UI and the infotext name it: the preparing
        (resident) form when it is quantized, else the offload form ("disk" names its file's)."""
        return storage_name(self.preparing_dtype if self.place("preparing").is_quantized else self.offload_dtype)

    def as_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in CONFIG_KEYS}


def is_storage_only(dtype: torch.dtype | str) -> bool:
    """Is a vram_config dtype a storage-only form (one with a codec: scaled FP8, int8, nf4, gguf,
    ...)? Plain float dtypes and "disk" are not."""
    form = find_form(dtype)
    return form is not None and form.quantized


def storage_name(dtype: torch.dtype | str) -> str:
    """A short name for a storage dtype or form: "bf16", "fp8_e4m3fn", "int8", "nf4", "gguf", "disk"."""
    if isinstance(dtype, str):
        return dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype).removeprefix("torch.").replace("float8", "fp8"))


GB = 1024**3


def parse_vram_limit(value: Any) -> float | None:
    """vram_limit in GB: None (or +inf) = unlimited, 0 = keep nothing resident, N = budget."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"vram_limit={value!r}: give a number of GB (0 or more) or None for unlimited, not a bool.")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "auto", "unlimited"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"vram_limit={value!r} is not a number. Give GB as a number >= 0, or None for unlimited.") from None
    try:
        limit = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"vram_limit={value!r} is not a number. Give GB as a number >= 0, or None for unlimited.") from None
    if math.isnan(limit) or limit < 0:
        raise ValueError(f"vram_limit={value!r} must be >= 0 GB (0 keeps nothing resident), or None for unlimited.")
    if math.isinf(limit):
        return None
    return limit


def limit_to_bytes(limit_gb: float | None) -> int | None:
    return None if limit_gb is None else int(limit_gb * GB)
