"""LoRA files: reading (.safetensors only), format conversion, per-layer factors and scales.

Conversion is diffusers' own: the family's LoRA loader mixin (`lora_state_dict`, e.g.
`FluxLoraLoaderMixin`, named by the denoiser class's registered tables, engine.model_tables; the
app's model families declare theirs in their spec files) turns kohya/sd-scripts, xlabs, ComfyUI,
... layouts into diffusers' layout, and the same steps `load_lora_adapter` (denoisers) and `_load_lora_into_text_encoder`
(text encoders) take next give peft-style keys (`<module>.lora_A.weight`, `.lora_B.weight`) and
the rank/alpha patterns (`get_peft_kwargs`, or the file's `lora_adapter_metadata`). The scale of
each layer is then peft's: alpha / rank (alpha / sqrt(rank) for rsLoRA), alpha and rank looked up
in those patterns with peft's own matching rule. peft itself is not needed at run time.

Nothing here touches a model's weights: `parse_component` only reads the module tree (names,
classes, shapes) to check that the LoRA fits, and names the file and keys when it does not.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.model_tables import ModelTables, all_tables, tables_for

REFUSED_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_SHOWN_KEYS = 5


class LoraError(ValueError):
    """A LoRA that cannot be applied: names the file and what does not fit."""


def _first(keys: Any, n: int = _SHOWN_KEYS) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a LoRA .safetensors file and its peft metadata (`lora_adapter_metadata`).

    Pickled formats (.pt/.ckpt/.bin) are refused: loading them can run arbitrary code."""
    path = Path(path)
    if path.suffix.lower() in REFUSED_SUFFIXES:
        raise LoraError(
            f"LoRA {path.name}: {path.suffix} files are pickled and can run code when loaded; only .safetensors LoRAs are "
            "accepted (convert it once with a tool you trust, or download the .safetensors version)"
        )
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"LoRA {path.name}: only .safetensors files are accepted")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise LoraError(f"LoRA {path.name} is not a readable .safetensors file: {exc}") from exc
    if not tensors:
        raise LoraError(f"LoRA {path.name} holds no tensors")
    raw = meta.get("lora_adapter_metadata")
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        metadata = None
    return tensors, metadata


def addnet_hash(path: str | Path) -> str:
    """A1111's short LoRA hash ("Lora hashes" in infotext): sha256 of the tensor data after the
    header (kohya's addnet hash), first 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# --- conversion (diffusers) -------------------------------------------------------------------
def lora_format(model_class: type) -> ModelTables | None:
    """The registered tables of a denoiser class that has a LoRA format (loader and prefix)."""
    tables = tables_for(model_class)
    return tables if tables is not None and tables.lora_loader and tables.lora_prefix else None


def denoiser_prefixes() -> set[str]:
    """The component prefixes denoiser LoRA files use ("transformer", "unet"), over every
    registered LoRA format."""
    return {t.lora_prefix for t in all_tables().values() if t.lora_loader and t.lora_prefix}


def loader_for_class(model_class: type) -> Any | None:
    """The diffusers LoRA loader mixin of a denoiser class (None: no LoRA format registered)."""
    tables = lora_format(model_class)
    if tables is None:
        return None
    module = importlib.import_module("diffusers.loaders.lora_pipeline")
    return getattr(module, str(tables.lora_loader))


def convert(loader: Any | None, state_dict: dict[str, torch.Tensor], name: str, unet_config: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """diffusers' `lora_state_dict` for this family: (state dict in diffusers layout, network alphas).
    `unet_config` (SDXL) lets kohya files with SGM block numbers map, as `load_lora_weights` does."""
    if loader is None:
        alphas = {k: v for k, v in state_dict.items() if k.endswith(".alpha")}
        return {k: v for k, v in state_dict.items() if k not in alphas}, alphas or None
    kwargs: dict[str, Any] = {}
    if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    if unet_config is not None:
        kwargs["unet_config"] = unet_config
    try:
        out = loader.lora_state_dict(dict(state_dict), **kwargs)
    except Exception as exc:
        raise LoraError(
            f"LoRA {name} is not in a layout this model's family reads ({type(exc).__name__}: {exc}); "
            f"its first keys: {_first(state_dict)}"
        ) from exc
    if isinstance(out, tuple):
        converted, alphas = out[0], (out[1] if len(out) > 1 else None)
    else:
        converted, alphas = out, None
    converted = dict(converted)
    # some converters leave alpha entries in the state dict: they are alphas, not tensors to load
    extra = {k: converted.pop(k) for k in list(converted) if k.endswith(".alpha")}
    if extra:
        alphas = {**(alphas or {}), **extra}
    return converted, (dict(alphas) if alphas else None)


def split_by_component(state_dict: Mapping[str, torch.Tensor], components: Mapping[str, nn.Module], denoiser: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """Keys by component prefix (`transformer.`, `unet.`, `text_encoder.`, `text_encoder_2.`).
    A file without any component prefix is all the denoiser's (or the only component's)."""
    names = sorted(components, key=len, reverse=True)
    out: dict[str, dict[str, torch.Tensor]] = {}
    unprefixed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for name in names:
            if key.startswith(name + "."):
                out.setdefault(name, {})[key] = value
                break
        else:
            unprefixed[key] = value
    if unprefixed:
        target = denoiser if denoiser is not None else (next(iter(components)) if len(components) == 1 else None)
        if not out and target is not None:
            out[target] = {f"{target}.{k}": v for k, v in unprefixed.items()}
        else:
            out.setdefault("", {}).update(unprefixed)  # keys naming no component
    return out


# --- per-layer factors ---------------------------------------------------------------------------
@dataclass
class LayerFactors:
    """One layer's LoRA factors as read (file dtype, CPU), with its alpha and rank divisor."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    divisor: float
    b_bias: torch.Tensor | None = None


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's get_pattern_key: the first pattern that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _peft_kwargs_denoiser(sd: dict[str, torch.Tensor], alphas: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    from diffusers.utils.peft_utils import get_peft_kwargs

    rank = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    if alphas:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.startswith(f"{prefix}.")}
    return get_peft_kwargs(rank, alphas, sd, is_unet=True)


def _peft_kwargs_text_encoder(sd: dict[str, torch.Tensor], alphas: dict[str, Any] | None, prefix: str, model: nn.Module) -> dict[str, Any]:
    from diffusers.utils.peft_utils import get_peft_kwargs

    rank = {}
    for name, _ in model.named_modules():
        if name.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")):
            key = f"{name}.lora_B.weight"
            if key in sd:
                rank[key] = sd[key].shape[1]
    if not rank:  # diffusers looks at CLIP's projection names only; any lora_B gives the rank
        rank = {k: v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    if alphas:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.startswith(prefix) and k.split(".")[0] == prefix}
    return get_peft_kwargs(rank, alphas, sd, is_unet=False)


def to_peft_keys(sd: dict[str, torch.Tensor], prefix: str, is_denoiser: bool, model: nn.Module) -> dict[str, torch.Tensor]:
    """The component's keys without its prefix, in peft layout (diffusers' own converters)."""
    sd = {k.removeprefix(f"{prefix}."): v for k, v in sd.items()}
    if is_denoiser:
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        if sd and "lora_A" not in next(iter(sd)):
            sd = convert_unet_state_dict_to_peft(sd)
        return sd
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    if not hasattr(model, "text_model"):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return sd


def parse_component(
    name: str,
    sd: dict[str, torch.Tensor],
    alphas: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
    prefix: str,
    model: nn.Module,
    is_denoiser: bool,
) -> list[LayerFactors]:
    """The layers of `model` this LoRA changes, with factors and scales; raises LoraError naming
    `name` (the file) when keys name no layer, a layer is not linear/conv, or shapes differ."""
    sd = to_peft_keys(sd, prefix, is_denoiser, model)
    if metadata:
        meta = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
        kwargs = meta or metadata
    else:
        kwargs = _peft_kwargs_denoiser(sd, alphas, prefix) if is_denoiser else _peft_kwargs_text_encoder(sd, alphas, prefix, model)
    if kwargs.get("use_dora"):
        raise LoraError(f"LoRA {name}: DoRA adapters (lora_magnitude_vector) are not supported")
    r_default, alpha_default = kwargs.get("r", 8), kwargs.get("lora_alpha", kwargs.get("r", 8))
    rank_pattern, alpha_pattern = kwargs.get("rank_pattern") or {}, kwargs.get("alpha_pattern") or {}
    rslora = bool(kwargs.get("use_rslora", False))

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        for part in ("lora_A.weight", "lora_B.weight", "lora_B.bias"):
            if key.endswith("." + part):
                grouped.setdefault(key[: -len(part) - 1], {})[part] = value
                break
        else:
            unknown.append(f"{prefix}.{key}")
    modules = dict(model.named_modules())
    missing = [m for m in grouped if m not in modules]
    if missing and len(missing) == len(grouped):
        raise LoraError(
            f"LoRA {name} does not fit this model ({type(model).__name__}, component {prefix!r}): none of its layers exist "
            f"there (it is probably for another model family); first keys: {_first(f'{prefix}.{m}' for m in missing)}"
        )
    unknown += [f"{prefix}.{m}" for m in missing]
    if unknown:
        raise LoraError(f"LoRA {name}: {len(unknown)} keys name no LoRA layer of {type(model).__name__}: {_first(unknown, 20)}")
    out: list[LayerFactors] = []
    bad: list[str] = []
    for module_name, parts in grouped.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            bad.append(f"{prefix}.{module_name} (lora_A or lora_B missing)")
            continue
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        module = modules[module_name]
        problem = _shape_problem(module, a, b)
        if problem:
            bad.append(f"{prefix}.{module_name} ({problem})")
            continue
        r = _pattern_value(rank_pattern, module_name, r_default)
        alpha = _pattern_value(alpha_pattern, module_name, alpha_default)
        out.append(LayerFactors(module_name, a, b, alpha, math.sqrt(r) if rslora else r, parts.get("lora_B.bias")))
    if bad:
        raise LoraError(f"LoRA {name} does not fit {type(model).__name__}: {_first(bad)}")
    return out


def _shape_problem(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> str | None:
    if isinstance(module, nn.Linear):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != module.in_features or b.shape[0] != module.out_features or b.shape[1] != a.shape[0]:
            return f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a linear layer {module.in_features} -> {module.out_features}"
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped convolutions take no LoRA"
        if a.ndim == 2:  # some files store 1x1 conv factors as matrices
            a = a[:, :, None, None]
        if b.ndim == 2:
            b = b[:, :, None, None]
        ok = (
            a.ndim == 4 and b.ndim == 4 and a.shape[1] == module.in_channels and tuple(a.shape[2:]) == tuple(module.kernel_size)
            and b.shape[0] == module.out_channels and b.shape[1] == a.shape[0] and tuple(b.shape[2:]) == (1, 1)
        )
        return None if ok else f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a convolution {module.in_channels} -> {module.out_channels}, kernel {tuple(module.kernel_size)}"
    return f"a {type(module).__name__} takes no LoRA (only linear and convolution layers)"
