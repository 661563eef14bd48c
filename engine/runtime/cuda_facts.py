"""What the engine asks CUDA, in one place, always about one named device.

* `OOM_ERRORS`: the classes torch raises for a failed allocation, resolved portably
  (`torch.OutOfMemoryError` exists from torch 2.5 only; `torch.cuda.OutOfMemoryError` since 1.13).
* `free_and_total`, `reserved_bytes`, `capability`, `device_name`: each query names the
  computation device, so computing on cuda:1 never asks (or creates a context on) GPU 0.
* `missing_kernels_message`: torch's compiled architectures against the card's capability (an
  RTX 50xx, sm_120, with a torch built without sm_120 kernels), and what to install.
* `compute_dtypes`: the computation dtype per GPU generation (below capability 8.0, fp16).
"""

from __future__ import annotations

import re
from typing import Any

import torch


def oom_error_classes(torch_module: Any = torch) -> tuple[type[BaseException], ...]:
    """The out-of-memory exception classes this torch has: `torch.OutOfMemoryError` (2.5+) and
    `torch.cuda.OutOfMemoryError` (1.13+; the same class on 2.5+)."""
    found: list[type[BaseException]] = []
    for owner in (torch_module, getattr(torch_module, "cuda", None)):
        cls = getattr(owner, "OutOfMemoryError", None)
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


OOM_ERRORS: tuple[type[BaseException], ...] = oom_error_classes()


def _index(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{device} is not a CUDA device")
    return device.index if device.index is not None else torch.cuda.current_device()


def free_and_total(device: torch.device | str) -> tuple[int, int]:
    """(free, total) bytes of `device` as the driver sees them: free excludes what every process
    holds, this one's context and caching allocator included."""
    free, total = torch.cuda.mem_get_info(_index(device))
    return int(free), int(total)


def reserved_bytes(device: torch.device | str) -> int:
    """What this process's caching allocator holds on `device` (allocated or cached)."""
    return int(torch.cuda.memory_reserved(_index(device)))


def capability(device: torch.device | str) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(_index(device))
    return int(major), int(minor)


def device_name(device: torch.device | str) -> str:
    return str(torch.cuda.get_device_name(_index(device)))


def empty_cache(device: torch.device | str) -> None:
    """Return the caching allocator's free blocks to the driver (for `device`'s allocator)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(_index(device)):
            torch.cuda.empty_cache()


# --- architectures ----------------------------------------------------------------------------------
_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([a-z]?)$")


def has_kernels_for(cap: tuple[int, int], arch_list: list[str] | tuple[str, ...]) -> bool:
    """Can this torch run on a card of capability `cap`? A cubin for sm_XY runs on X.Z with Z >= Y
    (same major; an "a"/"f" variant only on its exact capability); PTX (compute_XY) is compiled
    by the driver for any capability >= X.Y."""
    for arch in arch_list:
        m = _ARCH.match(arch)
        if m is None:
            continue
        kind, major, minor, variant = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "compute" and (major, minor) <= cap:
            return True
        if kind == "sm" and major == cap[0] and (minor == cap[1] if variant else minor <= cap[1]):
            return True
    return False


def missing_kernels_message(
    cap: tuple[int, int], arch_list: list[str] | tuple[str, ...], name: str = "this GPU", version: str | None = None,
    cuda_version: str | None = None,
) -> str | None:
    """None when torch has kernels for `cap` (or reports no architectures); else what is wrong and
    what to install."""
    if not arch_list or has_kernels_for(cap, arch_list):
        return None
    version = torch.__version__ if version is None else version
    cuda_version = (getattr(torch.version, "cuda", None) or "?") if cuda_version is None else cuda_version
    sm = f"sm_{cap[0]}{cap[1]}"
    built = ", ".join(arch_list)
    head = (
        f"This PyTorch ({version}, CUDA {cuda_version}) has no GPU kernels for {name} (compute capability "
        f"{cap[0]}.{cap[1]}, {sm}); it was built for {built}. "
    )
    lowest = min((int(m.group(2)), int(m.group(3))) for a in arch_list if (m := _ARCH.match(a)))
    if cap < lowest:
        return head + (
            "Newer PyTorch builds dropped this GPU generation: install an older PyTorch whose CUDA build still lists "
            f"{sm} (https://pytorch.org/get-started/previous-versions/), or run on the CPU."
        )
    if cap >= (10, 0):  # Blackwell (RTX 50xx sm_120, B200 sm_100): kernels from CUDA 12.8 on
        return head + (
            "Install a PyTorch built with CUDA 12.8 or newer: "
            "pip install --upgrade torch torchvision --index-url https://download.pytorch.org/whl/cu128"
        )
    return head + f"Install a PyTorch build whose CUDA version supports {sm} (https://pytorch.org/get-started/locally/)."


def check_kernels(device: torch.device | str) -> str | None:
    """`missing_kernels_message` for `device` on this host (None: fine, or no CUDA)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        arch_list = list(torch.cuda.get_arch_list())
    except (RuntimeError, AssertionError):  # pragma: no cover - torch without CUDA
        return None
    return missing_kernels_message(capability(device), arch_list, device_name(device))


# --- computation dtype per GPU generation -------------------------------------------------------------
#: from compute capability 8.0 (Ampere) bf16 has tensor cores, fused (flash / memory-efficient)
#: attention and cuDNN convolutions; below it (T4 and RTX 20xx 7.5, V100 7.0) it has none of them
BF16_FROM_CAPABILITY = (8, 0)
#: the VAE's dtype where the rest computes in fp16: the SD/SDXL and FLUX-style VAEs overflow fp16
#: in their up-blocks (SDXL's VAE needs its separate fp16-fix weights), so fp32
VAE_DTYPE_BESIDE_FP16 = torch.float32


def compute_dtypes(cap: tuple[int, int] | None) -> tuple[torch.dtype, torch.dtype]:
    """(the denoiser's and text encoders' computation dtype, the VAE's) for a card of `cap`
    (None: the CPU, bf16 throughout). Below 8.0: fp16, and the VAE in fp32 (the SD/SDXL and
    FLUX-style VAEs overflow fp16 in their up-blocks: SDXL's VAE needs its fp16-fix weights)."""
    if cap is None or cap >= BF16_FROM_CAPABILITY:
        return torch.bfloat16, torch.bfloat16
    return torch.float16, VAE_DTYPE_BESIDE_FP16


def fused_attention(cap: tuple[int, int] | None, dtype: torch.dtype) -> bool:
    """Does scaled_dot_product_attention take a fused kernel (no full score matrix) here? Flash
    and memory-efficient attention need fp16 (any capability >= 7.0 for memory-efficient) or bf16
    from 8.0; a bf16 call on a pre-Ampere card falls back to the math path, which builds the
    batch x heads x queries x keys score matrix."""
    if cap is None:
        return False  # the CPU's attention materializes scores in blocks; counted by the CPU estimate
    if dtype == torch.bfloat16:
        return cap >= BF16_FROM_CAPABILITY
    return cap >= (7, 0)
