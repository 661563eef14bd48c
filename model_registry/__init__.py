"""Model registry: which models the app knows, where their files are, and how to get them.

list_models() -> list[ModelEntry]          catalogue (models.json), demo first
get_model(id) -> ModelEntry                one entry; UserFacingError if unknown
download(id, source="hf"|"modelscope"|"local:<dir>", progress=None, models_dir=None, token=None) -> Path
is_downloaded(id, models_dir=None) -> bool
local_path(id, models_dir=None) -> Path | None
register_local(path, model_id=None, models_dir=None) -> str
default_model_id(models_dir=None) -> str
model_choices(models_dir=None) -> list[ModelChoice]     (model_registry.types)
load_options(id, path) -> dict             extra from_pretrained kwargs (variant)
model_dirs(models_dir=None) -> list[Path]  LOWVRAM_MODEL_DIR or ./models
"""

import importlib
from typing import Any

# Resolved on first use (PEP 562), so importing one light submodule (model_registry.types,
# model_registry.demo.components) does not pull the download stack (huggingface_hub 2.x, httpx2,
# modelscope): the GPU image runs the engine's tests without those.
_EXPORTS = {
    "Component": ".catalog",
    "ModelEntry": ".catalog",
    "get_model": ".catalog",
    "list_models": ".catalog",
    "FAMILIES": ".families",
    "Family": ".families",
    "register_local": ".local",
    "model_dirs": ".paths",
    "default_model_id": ".registry",
    "download": ".registry",
    "is_downloaded": ".registry",
    "load_options": ".registry",
    "local_path": ".registry",
    "model_choices": ".registry",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "FAMILIES",
    "Component",
    "Family",
    "ModelEntry",
    "default_model_id",
    "download",
    "get_model",
    "is_downloaded",
    "list_models",
    "load_options",
    "local_path",
    "model_choices",
    "model_dirs",
    "register_local",
]
