"""Local folders in the diffusers layout as a model source.

A folder counts if it lies inside a configured model directory (symlinks and '..'
resolved first), is a whole pipeline of a known family, and is matched to a catalogue
entry. Registrations are remembered in <model dir>/local_models.json; a folder named after
the model id directly in a model directory (e.g. models/flux1-schnell/) needs none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import errors
from .catalog import ModelEntry, get_model, list_models
from .completeness import is_complete, repo_problems
from .families import family_for_pipeline
from .paths import model_dirs, primary_model_dir, resolve_inside_model_dirs
from .sizes import load_component_configs
from .types import UserFacingError

REGISTRATIONS_FILE = "local_models.json"


def _registrations_path(models_dir: str | os.PathLike[str] | None) -> Path:
    return primary_model_dir(models_dir) / REGISTRATIONS_FILE


def _read_registrations(models_dir: str | os.PathLike[str] | None) -> dict[str, str]:
    try:
        data = json.loads(_registrations_path(models_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_registrations(models_dir: str | os.PathLike[str] | None, data: dict[str, str]) -> None:
    path = _registrations_path(models_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _config_matches(entry: ModelEntry, folder: Path) -> bool:
    """True when the folder's component configs agree with the entry's real configs."""
    configs = load_component_configs()
    for name, component in entry.components.items():
        if component.config_id is None:
            continue
        expected = configs[component.config_id]
        actual = _read_json(folder / name / "config.json")
        keys = [k for k in expected if not k.startswith("_") and k in actual and not isinstance(expected[k], dict)]
        if not keys or any(actual[k] != expected[k] for k in keys):
            return False
    return True


def _match_entry(folder: Path, family_name: str) -> ModelEntry:
    candidates = [e for e in list_models() if e.family == family_name and not e.is_demo]
    # a folder whose denoiser is a .gguf file is a GGUF variant, any other is not
    candidates = [e for e in candidates if (e.gguf is not None) == any((folder / e.adapter.denoiser).glob("*.gguf"))]
    matching = [e for e in candidates if _config_matches(e, folder)]
    if len(matching) > 1 and all(e.gguf is not None for e in matching):  # GGUF variants: by the file's name
        matching = [e for e in matching if (folder / e.adapter.denoiser / e.gguf.file).is_file()] or matching
    if len(matching) == 1:
        return matching[0]
    names = ", ".join(e.id for e in candidates)
    raise UserFacingError(
        f"'{folder}' is a {family_name} pipeline, but its configs do not identify one model. "
        f"Say which one it is (one of: {names})."
    )


def register_local(
    path: str | os.PathLike[str],
    model_id: str | None = None,
    models_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Use the pipeline folder `path` as the copy of `model_id` (guessed from its configs if None).

    Refuses folders outside the model directories, of an unknown or different family, or
    incomplete. Returns the model id it was registered as.
    """
    folder = resolve_inside_model_dirs(path, models_dir)
    if not folder.is_dir():
        raise UserFacingError(f"'{path}' is not a folder.")
    pipeline_class = _read_json(folder / "model_index.json").get("_class_name")
    family = family_for_pipeline(str(pipeline_class)) if pipeline_class else None
    if family is None:
        raise UserFacingError(
            f"'{path}' is not a supported diffusers pipeline folder (its model_index.json names "
            f"{pipeline_class!r}). Supported: the models in the model list."
        )
    entry = get_model(model_id) if model_id else _match_entry(folder, family.name)
    if entry.family != family.name or entry.is_demo:
        raise UserFacingError(f"'{path}' holds a {family.pipeline_class}, not {entry.name}.")
    if problems := repo_problems(folder, family):
        raise errors.incomplete(entry, str(folder), problems)
    data = _read_registrations(models_dir)
    data[entry.id] = str(folder)
    _write_registrations(models_dir, data)
    return entry.id


def local_copy(entry: ModelEntry, models_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """A complete local folder for `entry`: a registered one, else <model dir>/<id>."""
    candidates: list[str | Path] = []
    if registered := _read_registrations(models_dir).get(entry.id):
        candidates.append(registered)
    candidates += [d / entry.id for d in model_dirs(models_dir)]
    for candidate in candidates:
        try:
            folder = resolve_inside_model_dirs(candidate, models_dir)
        except UserFacingError:
            continue  # a registration that the current model directories no longer cover
        if is_complete(folder, entry.adapter):
            return folder
    return None
