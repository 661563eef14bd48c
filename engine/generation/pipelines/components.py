"""Load a diffusers repo's components: weighted ones managed by the engine, the rest as usual.

Every nn.Module component (text encoders, transformer/UNet, VAE) is built under the request's
vram_config and joins the pipeline's ONE shared MemoryPool, offloaded (the stage switch onloads
it when its stage comes). With the engine's streaming loader (`engine.load_model`) weights go
straight from their files to their offload place (and disk offload leaves them there); without
it, components come from `from_pretrained` and are then managed with `enable_vram_management`.
Tokenizers and schedulers load with `from_pretrained`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.runtime.pool import MemoryPool
from engine.config import VramConfig
from engine.management import enable_vram_management

log = logging.getLogger(__name__)


def read_model_index(path: Path) -> dict[str, Any]:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    return json.loads(index.read_text(encoding="utf-8"))


def component_classes(index: dict[str, Any]) -> dict[str, type]:
    """name -> class for every component model_index.json lists (None entries skipped)."""
    out: dict[str, type] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if library is None or class_name is None:
            continue
        module = importlib.import_module(library)
        out[name] = getattr(module, class_name)
    return out


def pipeline_config_kwargs(index: dict[str, Any]) -> dict[str, Any]:
    """Plain config values of model_index.json (e.g. SDXL's force_zeros_for_empty_prompt)."""
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}


def is_weighted(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, nn.Module)


def engine_loader() -> Callable[..., nn.Module] | None:
    """The engine's streaming loader (a test may return None: then from_pretrained + management)."""
    from engine.loading.loader import load_model

    return load_model


def _variant(folder: Path) -> str | None:
    """diffusers weight variant when only variant files exist (SDXL repos fetched as fp16)."""
    plain = list(folder.glob("*.safetensors"))
    if plain and all(".fp16." not in p.name for p in plain):
        return None
    return "fp16" if any(".fp16." in p.name for p in plain) else None


def from_pretrained_component(cls: type, folder: Path, dtype: torch.dtype) -> nn.Module:
    """Load one weighted component with its library's from_pretrained, in `dtype`, on the CPU."""
    module_name = cls.__module__.split(".")[0]
    kwargs: dict[str, Any] = {}
    variant = _variant(folder)
    if variant:
        kwargs["variant"] = variant
    if module_name == "transformers":
        model = cls.from_pretrained(folder, dtype=dtype, **kwargs)
    else:
        model = cls.from_pretrained(folder, dtype=dtype, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model


def checkpoint_files(folder: Path, variant: str | None = None) -> Path | list[Path]:
    """What the streaming loader should read: the folder itself, or (when a folder holds the
    weights in several precisions, like SDXL's model.safetensors + model.fp16.safetensors) the
    files of one variant (`variant`, else the plain files, else the fp16 ones)."""
    files = sorted(folder.glob("*.safetensors"))
    tagged = [f for f in files if f.name.count(".") >= 2 and f.name.split(".")[-2] in ("fp16", "bf16", "fp32")]
    if not tagged:
        return folder
    if variant:
        chosen = [f for f in files if f.name.split(".")[-2] == variant]
    else:
        chosen = [f for f in files if f not in tagged] or [f for f in files if f.name.split(".")[-2] == "fp16"]
    index_suffix = f".safetensors.index.{variant}.json" if variant else ".safetensors.index.json"
    if any(folder.glob(f"*{index_suffix}")) and not variant:
        return folder
    return chosen or folder


_DEVICE_PINNED: dict[type, type] = {}


def pin_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Make `model.device` answer the computation device: pipelines move their inputs to
    `text_encoder.device`, which would otherwise be the device of a placeholder ('meta' while
    the weights sit offloaded in FP8 or on disk)."""
    base = type(model)
    if base not in _DEVICE_PINNED:
        _DEVICE_PINNED[base] = type(
            base.__name__,
            (base,),
            {"__module__": base.__module__, "__qualname__": base.__qualname__, "device": property(lambda self: self.__dict__["_engine_device"])},
        )
    model.__dict__["_engine_device"] = torch.device(device)
    model.__class__ = _DEVICE_PINNED[base]
    return model


def load_component(
    name: str, cls: type, root: Path, config: VramConfig, budget: MemoryPool, variant: str | None = None,
    stored_form: str | None = None,
) -> nn.Module:
    """One weighted component, managed under `config` in `budget`, left offloaded. With disk
    offload, `stored_form` (a storage form's name) is the form its masters stream in (from the
    stored-form cache, engine.storage.form_cache)."""
    folder = Path(root) / name
    loader = engine_loader()
    if loader is not None:
        extra = {"disk_form": stored_form} if stored_form is not None and config.uses_disk else {}
        model = loader(cls, checkpoint_files(folder, variant), vram_config=config, budget=budget, name=name, onload=False, **extra)
    elif config.uses_disk:
        raise RuntimeError("disk offload needs the engine's streaming loader (engine.load_model), which is not available")
    else:
        model = from_pretrained_component(cls, folder, config.computation_dtype)
        model = enable_vram_management(model, vram_config=config, budget=budget, name=name, onload=False)
    model.eval()
    return pin_device(model, config.computation_device)


def load_aux_component(name: str, cls: type, root: Path) -> Any:
    """Tokenizers, schedulers, processors."""
    try:
        return cls.from_pretrained(Path(root), subfolder=name)
    except ImportError:
        if "Processor" not in cls.__name__:
            raise
        from engine.generation.pipelines.processors import processor_without_video, tokenizer_as_processor

        if cls.__name__ == "PixtralProcessor":  # the whole class needs torchvision
            return tokenizer_as_processor(Path(root) / name)
        return processor_without_video(cls, Path(root) / name)  # no torchvision: no video processor
