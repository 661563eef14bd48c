"""Is a pipeline folder whole? A partial download must never count as a model.

Checks, without loading any weights: model_index.json names the family's pipeline and
components; every component has its config; every weight shard an index lists exists;
every safetensors file is as long as its own header says (a cut-off file is caught even
when nobody told us its size); and where the hub told us file sizes, they match.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path

from .families import Family

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, or None if it is."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                return f"{path.name} is truncated (header says {header_len} bytes, file has {size})"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{path.name} is unreadable ({exc})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    if size != expected:
        return f"{path.name} has {size} bytes, its header says {expected}"
    return None


def gguf_problem(path: Path) -> str | None:
    """Why `path` is not a readable .gguf file (magic, version, non-empty); None if it looks whole."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        return f"{path.name} is unreadable ({exc})"
    if len(head) < 24 or head[:4] != b"GGUF":
        return f"{path.name} is not a GGUF file (or is truncated)"
    return None


def _weight_names(variant: str | None) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Regexes for (single/shard files, index files) of one diffusers weight variant."""
    if variant:
        v = re.escape(variant)
        return re.compile(rf"^[^.]+\.{v}\.safetensors$"), re.compile(rf"^[^.]+\.safetensors\.index\.{v}\.json$")
    return re.compile(r"^[^.]+\.safetensors$"), re.compile(r"^[^.]+\.safetensors\.index\.json$")


def _weights_problems(folder: Path, variant: str | None) -> list[str] | None:
    """Problems with the weights of one variant; None when that variant has no files at all."""
    file_re, index_re = _weight_names(variant)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    indexes = [n for n in names if index_re.match(n)]
    if indexes:
        problems: list[str] = []
        for index_name in indexes:
            try:
                weight_map = json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                problems.append(f"{folder.name}/{index_name} is unreadable ({exc})")
                continue
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / shard
                if not shard_path.is_file():
                    problems.append(f"{folder.name}/{shard} is missing")
                elif problem := safetensors_problem(shard_path):
                    problems.append(f"{folder.name}/{problem}")
        return problems
    singles = [n for n in names if file_re.match(n)]
    if not singles:
        return None
    return [f"{folder.name}/{p}" for n in singles if (p := safetensors_problem(folder / n))]


def _component_problems(root: Path, name: str, family: Family) -> list[str]:
    folder = root / name
    if not folder.is_dir():
        return [f"{name}/ is missing"]
    if name in family.schedulers:
        return [] if (folder / "scheduler_config.json").is_file() else [f"{name}/scheduler_config.json is missing"]
    if name in family.tokenizers:
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return []
        return [f"{name}/ has no tokenizer files"]
    if name not in family.weighted:  # a component this app does not know: it needs at least its config
        return [] if any(folder.glob("*.json")) else [f"{name}/ has no config"]
    problems = [] if (folder / "config.json").is_file() else [f"{name}/config.json is missing"]
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:  # a GGUF variant's denoiser: one .gguf file (engine.load_model reads it)
        if len(ggufs) > 1:
            return problems + [f"{name}/ has {len(ggufs)} .gguf files; keep one"]
        return problems + ([f"{name}/{p}"] if (p := gguf_problem(ggufs[0])) else [])
    variants = [family.variant, None] if family.variant else [None]
    found = [(v, p) for v in variants if (p := _weights_problems(folder, v)) is not None]
    if not found:
        return problems + [f"{name}/ has no safetensors weights"]
    best = min(found, key=lambda vp: len(vp[1]))[1]  # one whole variant is enough
    return problems + best


def repo_problems(root: Path, family: Family, known_sizes: Mapping[str, int] | None = None) -> list[str]:
    """Everything that keeps `root` from being a whole `family` pipeline; [] means complete.

    `known_sizes` maps repo-relative paths to sizes the hub reported; a present file of
    another size is a problem (a missing one is only a problem if the pipeline needs it).
    """
    index_path = root / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ["model_index.json is missing"]
    except (OSError, ValueError) as exc:
        return [f"model_index.json is unreadable ({exc})"]
    problems: list[str] = []
    if index.get("_class_name") != family.pipeline_class:
        problems.append(f"model_index.json names {index.get('_class_name')!r}, expected {family.pipeline_class!r}")
    declared = {
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    }
    problems += [f"model_index.json does not list {name}" for name in family.components if name not in declared]
    for name in sorted(declared):
        problems += _component_problems(root, name, family)
    for rel, size in sorted((known_sizes or {}).items()):
        path = root / rel
        if path.is_file() and path.stat().st_size != size:
            problems.append(f"{rel} has {path.stat().st_size} bytes, the hub says {size}")
    return problems


def is_complete(root: Path, family: Family, known_sizes: Mapping[str, int] | None = None) -> bool:
    """True when `repo_problems` finds nothing."""
    return root.is_dir() and not repo_problems(root, family, known_sizes)


def weight_variant(root: Path, family: Family) -> str | None:
    """The diffusers `variant=` to load `root` with: the family's, if its files are there."""
    if family.variant is None:
        return None
    for name in family.weighted:
        folder = root / name
        if folder.is_dir() and _weights_problems(folder, family.variant) is not None:
            return family.variant
    return None
