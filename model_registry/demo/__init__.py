"""The built-in demo model: a tiny Z-Image pipeline written on first use, no network.

It lets the app (and its tests) run end to end on a machine that has never downloaded
anything. It draws shapes and colours from captions ("a red circle on a blue background, on
the left"): its weights were trained in this repository (tools/train_demo.py) and ship in
`weights/` (a few MB of safetensors); on first use they are written out in the real Z-Image
repo layout, and the app loads that folder as it loads any model. Everything it needs ships
with the app: its configs (`components`), its locally trained tokenizer (`tokenizer`) and the
repo writing (`repo`); the tests' tiny repos of the other families reuse them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import errors
from ..catalog import ModelEntry
from ..completeness import is_complete
from ..paths import primary_model_dir

DEMO_ID = "demo"
DEMO_SEED = 0
MARKER = "demo_weights.txt"  # which shipped weights the folder was written from


def demo_path(models_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the demo model lives: <first model dir>/demo."""
    return primary_model_dir(models_dir) / DEMO_ID


def ensure_demo(entry: ModelEntry, models_dir: str | os.PathLike[str] | None = None) -> Path:
    """The demo folder, written first if it is missing or damaged.

    It is written beside its final place and renamed into it, so an interrupted write
    never leaves a half demo that looks whole.
    """
    from .repo import weights_fingerprint

    target = demo_path(models_dir)
    marker = target / MARKER
    fingerprint = weights_fingerprint()
    if is_complete(target, entry.adapter) and marker.is_file() and marker.read_text().strip() == fingerprint:
        return target
    if entry.family != "z-image":
        raise ValueError(f"the demo model is a tiny Z-Image; the catalogue's demo entry says {entry.family!r}")
    from .repo import write_demo_repo

    staging = target.with_name(f".{DEMO_ID}-{os.getpid()}.partial")
    try:
        write_demo_repo(staging, seed=DEMO_SEED)
        (staging / MARKER).write_text(fingerprint + "\n")  # a folder of older weights gets rewritten
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if errors.is_disk_full(exc):
            raise errors.disk_full(entry, str(target.parent)) from exc
        raise errors.not_writable(entry, str(target.parent), str(exc)) from exc
    return target
