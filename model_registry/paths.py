"""Where models live: the app's model directories and the hubs' standard caches.

Everything is read from the environment at call time (not import time), so a test or a
settings change that sets LOWVRAM_MODEL_DIR, HF_HUB_CACHE or MODELSCOPE_CACHE takes effect
on the next call.
"""

from __future__ import annotations

import os
from pathlib import Path

from .types import UserFacingError

MODEL_DIR_ENV = "LOWVRAM_MODEL_DIR"
DEFAULT_MODEL_DIR = "./models"


def model_dirs(models_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The configured model directories, absolute; the first one is where the app writes.

    `models_dir` (an argument) wins over LOWVRAM_MODEL_DIR, which may list several
    directories separated by os.pathsep; the default is ./models.
    """
    if models_dir is not None:
        raw = [os.fspath(models_dir)]
    else:
        raw = [p for p in os.environ.get(MODEL_DIR_ENV, DEFAULT_MODEL_DIR).split(os.pathsep) if p]
    return [Path(p).expanduser().resolve() for p in raw or [DEFAULT_MODEL_DIR]]


def primary_model_dir(models_dir: str | os.PathLike[str] | None = None) -> Path:
    """The writable model directory (demo model, local-folder registrations)."""
    return model_dirs(models_dir)[0]


def resolve_inside_model_dirs(path: str | os.PathLike[str], models_dir: str | os.PathLike[str] | None = None) -> Path:
    """`path` with symlinks and '..' resolved, refused unless it lies inside a model directory.

    Loading a pipeline executes nothing, but it reads whatever the folder points at; keeping
    local sources inside configured directories stops the UI from being used to browse or
    load arbitrary paths on the host.
    """
    resolved = Path(path).expanduser().resolve()
    allowed = model_dirs(models_dir)
    for root in allowed:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    dirs = ", ".join(str(d) for d in allowed)
    raise UserFacingError(
        f"'{path}' is outside the model directories ({dirs}). Move or link the model folder into one "
        f"of them, or add its parent directory to {MODEL_DIR_ENV}."
    )


#: inside a model directory given for downloads (--model-dir): the two hubs' cache layouts
HF_SUBDIR = Path("huggingface") / "hub"
MODELSCOPE_SUBDIR = Path("modelscope")


def hf_cache_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """huggingface_hub's cache: <root>/huggingface/hub when a download folder is given,
    else the standard one (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if root is not None:
        return Path(root).expanduser().resolve() / HF_SUBDIR
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def modelscope_cache_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """modelscope's cache: <root>/modelscope when a download folder is given, else the
    standard one (MODELSCOPE_CACHE, else ~/.cache/modelscope)."""
    if root is not None:
        return Path(root).expanduser().resolve() / MODELSCOPE_SUBDIR
    if os.environ.get("MODELSCOPE_CACHE"):
        return Path(os.environ["MODELSCOPE_CACHE"]).expanduser()
    return Path.home() / ".cache" / "modelscope"
