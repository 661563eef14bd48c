"""The public LoRA API: load, re-weight, remove, list. Hot-swapped, never merged into masters.

    from engine import load_lora, set_lora_strength, remove_lora, active_loras
    handle = load_lora(pipe_or_model, "style.safetensors", strength=0.8)   # several may be active
    set_lora_strength(pipe_or_model, handle, 0.5)    # a float changes; no weight is read
    remove_lora(pipe_or_model, handle)

`target` is a managed pipeline (engine.generation's ManagedPipeline, or any object with a
`components` mapping of managed modules and, ideally, a diffusers pipeline whose LoRA loader
converts the family's formats) or one managed component (a denoiser: its converter is the one
its class's registered tables name, engine.model_tables). The factors go to each layer's
`ManagedLayer` (engine.layers.adapters) on the computation device, in the computation dtype,
through the component (`VramRuntime.attach_adapters`), which counts them among its fixed bytes
and tells its pool; the pool re-reads them and re-plans, so the planner leaves room for them.
This module never writes the ledger. The stored masters (bf16, FP8, disk)
are never touched, so every storage form and every vram_limit takes a LoRA the same way.

Loading is all or nothing: the file is read, converted and checked against every component
before any layer changes, so a bad LoRA (other family, wrong shapes, unknown keys, pickled,
missing) raises `LoraError` and leaves the previous set active.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from engine.layers.adapters import Adapter
from engine.lora.formats import (
    LayerFactors,
    LoraError,
    addnet_hash,
    convert,
    denoiser_prefixes,
    loader_for_class,
    lora_format,
    parse_component,
    read_lora_file,
    split_by_component,
)
from engine.runtime.component import VramRuntime

log = logging.getLogger(__name__)

_IDS = itertools.count(1)
_LOCK = threading.RLock()


@dataclass
class LoraHandle:
    """One loaded LoRA. `nbytes`: its factors on the computation device, all components."""

    id: int
    name: str
    path: Path
    strength: float
    nbytes: int = 0
    layers: int = 0
    components: tuple[str, ...] = ()
    short_hash: str = ""  # A1111's "Lora hashes" value (addnet hash, 12 hex digits)

    def __hash__(self) -> int:
        return self.id


@dataclass
class _Applied:
    handle: LoraHandle
    per_runtime: list[tuple[VramRuntime, list[Any], int]] = field(default_factory=list)  # runtime, layers, bytes


class LoraSet:
    """The LoRAs active on one pipeline (or one model), in load order."""

    def __init__(self) -> None:
        self.applied: dict[int, _Applied] = {}


_SETS: "weakref.WeakKeyDictionary[Any, LoraSet]" = weakref.WeakKeyDictionary()


# --- the target: which managed components, which converter ---------------------------------------
def _runtime(module: Any) -> VramRuntime | None:
    return getattr(module, "_vram_runtime", None)


def _model_class(module: nn.Module) -> type:
    """The model's own class (a root with parameters of its own is a managed subclass)."""
    return getattr(type(module), "_vram_original_class", type(module))


def _resolve(target: Any) -> tuple[dict[str, nn.Module], Any, str | None, Any]:
    """(managed components by name, diffusers loader (or None), denoiser name, key of its LoRA set)."""
    if isinstance(target, nn.Module):
        runtime = _runtime(target)
        if runtime is None:
            raise LoraError(f"{type(target).__name__} is not managed: LoRAs are applied by the engine's managed layers (engine.enable_vram_management first)")
        tables = lora_format(_model_class(target))
        if tables is not None:
            prefix = str(tables.lora_prefix)
            return {prefix: target}, loader_for_class(_model_class(target)), prefix, runtime.pool
        return {"text_encoder": target}, None, None, runtime.pool
    comps = getattr(target, "components", None)
    if not isinstance(comps, dict):
        raise LoraError(f"load_lora needs a managed pipeline or a managed model, not {type(target).__name__}")
    managed = {n: m for n, m in comps.items() if isinstance(m, nn.Module) and _runtime(m) is not None}
    if not managed:
        raise LoraError(f"{type(target).__name__} has no managed component")
    family = getattr(target, "family", None)
    denoiser = getattr(family, "denoiser", None) or next((n for n in sorted(denoiser_prefixes()) if n in managed), None)
    pipe = getattr(target, "pipe", target)
    loader = type(pipe) if hasattr(type(pipe), "lora_state_dict") else None
    if loader is None and denoiser in managed:
        loader = loader_for_class(_model_class(managed[denoiser]))
    return managed, loader, denoiser, _runtime(next(iter(managed.values()))).pool


def _set_of(key: Any) -> LoraSet:
    lora_set = _SETS.get(key)
    if lora_set is None:
        lora_set = _SETS[key] = LoraSet()
    # a component that left management (engine.disable_vram_management) took its layers along
    for hid, applied in list(lora_set.applied.items()):
        if any(runtime not in runtime.pool.members for runtime, _, _ in applied.per_runtime):
            del lora_set.applied[hid]
    return lora_set


# --- the API --------------------------------------------------------------------------------------
def load_lora(target: Any, path: str | Path, strength: float = 1.0, name: str | None = None) -> LoraHandle:
    """Apply the LoRA at `path` (.safetensors) at `strength`, after the ones already active.
    Raises LoraError (the file and the offending keys named) and changes nothing when it does not fit."""
    path = Path(path)
    label = name or path.stem
    components, loader, denoiser, key = _resolve(target)
    tensors, metadata = read_lora_file(path)
    unet = components.get("unet")
    converted, alphas = convert(loader, tensors, path.name, getattr(unet, "config", None) if unet is not None else None)
    if not any("lora" in k for k in converted):
        raise LoraError(f"LoRA {path.name} holds no LoRA factors (no key contains 'lora'); its first keys: {', '.join(list(tensors)[:5])}")
    parts = split_by_component(converted, components, denoiser)
    stray = parts.pop("", None)
    if stray:
        raise LoraError(
            f"LoRA {path.name}: {len(stray)} keys name no component of this pipeline ({', '.join(components)}): "
            f"{', '.join(list(stray)[:20])}"
        )
    plan: list[tuple[str, nn.Module, list[LayerFactors]]] = []
    for comp_name, sd in parts.items():
        model = components[comp_name]
        is_denoiser = comp_name == denoiser or comp_name in denoiser_prefixes()
        factors = parse_component(path.name, sd, alphas, metadata, comp_name, model, is_denoiser)
        if factors:
            plan.append((comp_name, model, factors))
    if not plan:
        raise LoraError(f"LoRA {path.name} changes no layer of this model")

    with _LOCK:
        handle = LoraHandle(next(_IDS), label, path, float(strength), short_hash=addnet_hash(path))
        applied = _Applied(handle)
        for comp_name, model, factors in plan:
            runtime = _runtime(model)
            assert runtime is not None
            modules = dict(model.named_modules())
            adapters = [(modules[f.module]._vram, _adapter(handle, f, modules[f.module], runtime)) for f in factors]
            nbytes = runtime.attach_adapters(adapters)  # the component counts them; the pool re-plans
            applied.per_runtime.append((runtime, [layer for layer, _ in adapters], nbytes))
            handle.nbytes += nbytes
            handle.layers += len(adapters)
        handle.components = tuple(c for c, _, _ in plan)
        _set_of(key).applied[handle.id] = applied
    log.info("LoRA %s: %d layers in %s, %.1f MiB of factors", label, handle.layers, ", ".join(handle.components), handle.nbytes / 2**20)
    return handle


def _adapter(handle: LoraHandle, f: LayerFactors, module: nn.Module, runtime: VramRuntime) -> Adapter:
    """One layer's factors on the component's computation device, in its computation dtype."""
    a, b = f.a, f.b
    if isinstance(module, nn.Conv2d):
        a = a if a.ndim == 4 else a[:, :, None, None]
        b = b if b.ndim == 4 else b[:, :, None, None]
    dev, dt = runtime.comp_device, runtime.comp_dtype
    return Adapter(
        handle.id,
        a.to(device=dev, dtype=dt).contiguous(),
        b.to(device=dev, dtype=dt).contiguous(),
        float(f.alpha),
        float(f.divisor),
        strength=handle.strength,
        b_bias=f.b_bias.to(device=dev, dtype=dt) if f.b_bias is not None else None,
    )


def _applied(target: Any, handle: LoraHandle | int) -> tuple[LoraSet, _Applied]:
    _, _, _, key = _resolve(target)
    lora_set = _set_of(key)
    hid = handle if isinstance(handle, int) else handle.id
    applied = lora_set.applied.get(hid)
    if applied is None:
        raise LoraError(f"LoRA {getattr(handle, 'name', handle)} is not active on this model")
    return lora_set, applied


def set_lora_strength(target: Any, handle: LoraHandle | int, strength: float) -> None:
    """Re-weight an active LoRA: one float per layer changes, no weight is read or moved."""
    _, applied = _applied(target, handle)
    with _LOCK:
        for _, layers, _ in applied.per_runtime:
            for layer in layers:
                for adapter in layer.lora.adapters if layer.lora is not None else ():
                    if adapter.key == applied.handle.id:
                        adapter.set_strength(strength)
        applied.handle.strength = float(strength)


def remove_lora(target: Any, handle: LoraHandle | int) -> None:
    """Take an active LoRA off: its factors leave the computation device and the ledger."""
    lora_set, applied = _applied(target, handle)
    with _LOCK:
        for runtime, _, _ in applied.per_runtime:
            runtime.detach_adapters(applied.handle.id)  # the component's fixed bytes shrink; the pool re-plans
        del lora_set.applied[applied.handle.id]


def active_loras(target: Any) -> list[LoraHandle]:
    """The active LoRAs, in load (= application) order."""
    _, _, _, key = _resolve(target)
    return [a.handle for a in _set_of(key).applied.values()]


def lora_bytes(target: Any) -> int:
    """Bytes of LoRA factors on the computation device (all active LoRAs)."""
    return sum(h.nbytes for h in active_loras(target))


def clear_loras(target: Any) -> None:
    for handle in active_loras(target):
        remove_lora(target, handle)


__all__ = ["LoraError", "LoraHandle", "active_loras", "clear_loras", "load_lora", "lora_bytes", "remove_lora", "set_lora_strength"]
