"""The registry's verbs: where is a model, is it whole, fetch it, which one to start with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import hf_source, modelscope_source
from .catalog import ModelEntry, get_model, list_models
from .completeness import weight_variant
from .demo import ensure_demo
from .local import local_copy, register_local
from .paths import hf_cache_dir, model_dirs, modelscope_cache_dir
from .progress import ProgressCallback, Reporter
from .types import ModelChoice, UserFacingError

SOURCES = ("hf", "modelscope")
LOCAL_PREFIX = "local:"


def _existing_copy(entry: ModelEntry, models_dir: str | os.PathLike[str] | None) -> Path | None:
    """A complete copy anywhere we look: local folders first, then the hub caches inside the
    model directories (where downloads go with a download folder), then the standard HF and
    ModelScope caches."""
    if found := local_copy(entry, models_dir):
        return found
    roots = model_dirs(models_dir)
    for cache in [hf_cache_dir(r) for r in roots] + [hf_cache_dir()]:
        if found := hf_source.cached_snapshot(entry, cache):
            return found
    for cache in [modelscope_cache_dir(r) for r in roots] + [modelscope_cache_dir()]:
        if found := modelscope_source.cached_snapshot(entry, cache):
            return found
    return None


def local_path(model_id: str, models_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder holding a complete copy of `model_id`, or None. No network.

    For the demo model this writes it on first use.
    """
    entry = get_model(model_id)
    if entry.is_demo:
        return ensure_demo(entry, models_dir)
    return _existing_copy(entry, models_dir)


def is_downloaded(model_id: str, models_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when a complete copy exists (always, for the demo: it is made offline on demand)."""
    entry = get_model(model_id)
    return entry.is_demo or _existing_copy(entry, models_dir) is not None


def default_model_id(models_dir: str | os.PathLike[str] | None = None) -> str:
    """The first downloaded real model in catalogue order, else the demo."""
    for entry in list_models():
        if not entry.is_demo and _existing_copy(entry, models_dir) is not None:
            return entry.id
    return next(e.id for e in list_models() if e.is_demo)


def download(
    model_id: str,
    source: str = "hf",
    progress: ProgressCallback | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    download_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Make `model_id` present and return its folder; reuse any complete copy first.

    `download_dir`: where a hub download goes (the hub's cache layout under
    <download_dir>/huggingface/hub or <download_dir>/modelscope); None = the standard caches.

    `source` is "hf", "modelscope" or "local:<folder>". `progress(fraction, message)` is
    called at least once per file (possibly from worker threads); raising from it aborts
    the download. `token` is the hub token (else HF_TOKEN / MODELSCOPE_API_TOKEN).
    Failures raise UserFacingError with what to do.
    """
    entry = get_model(model_id)
    report = Reporter(progress, entry.name)
    if source.startswith(LOCAL_PREFIX):
        register_local(source[len(LOCAL_PREFIX) :], model_id, models_dir)
        path = local_copy(entry, models_dir)
        assert path is not None  # register_local checked completeness
        report.say(1.0, f"{entry.name} is ready (local folder {path})")
        return path
    if source not in SOURCES:
        raise UserFacingError(f"Unknown download source '{source}': use 'hf', 'modelscope' or 'local:<folder>'.")
    if entry.is_demo:
        report.say(0.0, f"Writing {entry.name}")
        path = ensure_demo(entry, models_dir)
        report.say(1.0, f"{entry.name} is ready")
        return path
    if existing := _existing_copy(entry, models_dir):
        report.say(1.0, f"{entry.name} is already downloaded ({existing})")
        return existing
    if entry.gguf is not None:
        if source != "hf":
            raise UserFacingError(f"{entry.name} is a GGUF variant published on Hugging Face only: use source 'hf'.")
        from .paths import primary_model_dir

        cache = hf_cache_dir(download_dir) if download_dir is not None else None
        path = hf_source.download_gguf(entry, report, token, primary_model_dir(models_dir) / entry.id, cache)
        report.say(1.0, f"{entry.name} is ready")
        return path
    if source == "hf":
        cache = hf_cache_dir(download_dir) if download_dir is not None else None
        path = hf_source.download(entry, report, token, cache)  # checks completeness before it returns
    else:
        cache = modelscope_cache_dir(download_dir) if download_dir is not None else None
        path = modelscope_source.download(entry, report, token, cache)
    report.say(1.0, f"{entry.name} is ready")
    return path


def load_options(model_id: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Extra `DiffusionPipeline.from_pretrained` arguments for this copy (e.g. variant="fp16")."""
    variant = weight_variant(Path(path), get_model(model_id).adapter)
    return {"variant": variant} if variant else {}


def model_choices(models_dir: str | os.PathLike[str] | None = None) -> list[ModelChoice]:
    """The UI's model dropdown: every entry with its size and whether it is here, grouped by
    family (the demo first, then the families in the catalogue's order, models in theirs)."""
    entries = list_models()
    first_seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        first_seen.setdefault(entry.family, i)
    entries.sort(key=lambda e: (not e.is_demo, first_seen[e.family]))  # stable: catalogue order within a family
    return [
        ModelChoice(
            id=entry.id,
            name=entry.name,
            size_gb=entry.size_bytes / 1e9,
            downloaded=is_downloaded(entry.id, models_dir),
            is_demo=entry.is_demo,
            defaults=dict(entry.defaults),
            limits=dict(entry.limits),
            **_image_caps(entry.family),
            family=entry.family,
        )
        for entry in entries
    ]


def _image_caps(family_name: str) -> dict[str, Any]:
    """The family's input-image mode and count, for the page (image input, strength slider)."""
    from .families import FAMILIES

    family = FAMILIES.get(family_name)
    if family is None:
        return {}
    return {"image_mode": family.image_mode, "max_images": family.max_images}
