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

from .catalog import Component, ModelEntry, get_model, list_models
from .families import FAMILIES, Family
from .local import register_local
from .paths import model_dirs
from .registry import default_model_id, download, is_downloaded, load_options, local_path, model_choices

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
