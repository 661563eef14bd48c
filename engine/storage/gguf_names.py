"""GGUF tensor names -> the diffusers model's names, without touching the file's bytes.

The published image-model GGUFs keep the names of the checkpoint they were converted from:
diffusers' own names (Qwen-Image), or a family's original layout (FLUX: BFL's; Z-Image: the
original Z-Image / ComfyUI Lumina2 NextDiT names), often behind a ComfyUI prefix. An original
layout is a table, derived from the model's config, of diffusers name -> row ranges of the file's
tensors (`OriginalLayout`): a fused qkv becomes three row ranges of the same bytes (GGUF blocks
never cross a row), so the parts still stream from the file; a target that is no single byte
range (FLUX's swapped final modulation) is `joined`: its row ranges are concatenated at load.
The tables themselves are data of the model class (engine.model_tables: `gguf_architectures`,
`gguf_layout`); the app's model families declare them in their spec files (FLUX.1's BFL table in
model_registry/families/flux1.py, Z-Image's in z_image.py), each following diffusers' converter for
that layout (named in its docstring), which the tests use as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from engine.model_tables import all_tables, tables_for
from engine.storage.disk import CheckpointError, TensorEntry
from engine.storage.gguf import GgufEntry, GgufFile

#: prefixes ComfyUI-style files put before the model's own names
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
#: diffusers name -> [(source name, first row, end row or -1 for all rows)]
SourceTable = dict[str, list[tuple[str, int, int]]]
Mapped = tuple[dict[str, TensorEntry], dict[str, list[TensorEntry]]]


def check_architecture(file: GgufFile, model_class: type) -> None:
    """A GGUF whose `general.architecture` names another model than `model_class` is refused
    before anything is read (the key check would catch it too, less clearly)."""
    arch = getattr(file, "architecture", None)
    tables = tables_for(model_class)
    wanted = tables.gguf_architectures if tables is not None else ()
    if arch is None or not wanted:
        return
    if arch.lower() not in wanted:
        owners = [t.short_name for t in all_tables().values() if arch.lower() in t.gguf_architectures]
        hint = f" (a {owners[0]} checkpoint)" if owners else ""
        raise CheckpointError(
            f"{file.path}: this GGUF is for architecture {arch!r}{hint}, not {model_class.__name__} "
            f"(expected general.architecture {' or '.join(map(repr, wanted))}): choose the GGUF file made for this model"
        )


def strip_prefix(key: str) -> str:
    """`key` without a ComfyUI-style prefix (the first of PREFIXES it starts with)."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def slice_rows(entry: TensorEntry, r0: int, r1: int) -> TensorEntry:
    """The entry of rows r0:r1 (first dimension) of `entry`: rows are contiguous in the file,
    and GGUF blocks never cross a row, so a row range is a byte range of the same type."""
    rows = entry.logical_shape[0] if isinstance(entry, GgufEntry) else entry.shape[0]
    if not 0 <= r0 < r1 <= rows:
        raise CheckpointError(f"{entry.file.path}: tensor {entry.key!r} has {rows} rows, cannot take rows {r0}:{r1}")
    if (r0, r1) == (0, rows):
        return entry
    row_bytes = entry.length // rows
    key = f"{entry.key}[{r0}:{r1}]"
    offset, length = entry.offset + r0 * row_bytes, (r1 - r0) * row_bytes
    if isinstance(entry, GgufEntry):
        return GgufEntry(entry.file, key, torch.uint8, (r1 - r0, row_bytes), offset, length, entry.qtype,
                         (r1 - r0,) + tuple(entry.logical_shape[1:]))
    return TensorEntry(entry.file, key, entry.dtype, (r1 - r0,) + tuple(entry.shape[1:]), offset, length)


@dataclass(frozen=True)
class OriginalLayout:
    """A model family's own tensor layout, which its published GGUFs keep.

    `markers`: substrings of ".name" found only in this layout (how a file is recognised);
    `sources(model)`: the table for that model's config; `unused`: source tensors the diffusers
    model has no place for and diffusers' converter drops (not reported as unexpected)."""

    description: str
    markers: tuple[str, ...]
    sources: Callable[[torch.nn.Module], SourceTable]
    unused: tuple[str, ...] = ()

    def matches(self, keys: Iterable[str]) -> bool:
        return any(m in "." + k for k in keys for m in self.markers)

    def map(self, entries: dict[str, TensorEntry], model: torch.nn.Module) -> Mapped:
        """File tensors -> diffusers names: `direct` (one entry each, a row range where the table
        says so) and `joined` (row ranges to concatenate at load). Source tensors no target uses
        stay under their own names (reported as unexpected), `unused` ones are dropped; targets
        whose sources are missing are left out (reported as missing)."""
        stripped = {strip_prefix(key): entry for key, entry in entries.items()}
        direct: dict[str, TensorEntry] = {}
        joined: dict[str, list[TensorEntry]] = {}
        used: set[str] = set(self.unused)
        for target, parts in self.sources(model).items():
            if not all(src in stripped for src, _, _ in parts):
                continue
            pieces = []
            for src, r0, r1 in parts:
                entry = stripped[src]
                rows = entry.logical_shape[0] if isinstance(entry, GgufEntry) else entry.shape[0]
                pieces.append(slice_rows(entry, r0, rows if r1 == -1 else r1))
                used.add(src)
            if len(pieces) == 1:
                direct[target] = pieces[0]
            else:
                joined[target] = pieces
        for name, entry in stripped.items():
            if name not in used:
                direct.setdefault(name, entry)
        return direct, joined

    def names_for(self, model: torch.nn.Module, targets: Iterable[str]) -> list[str]:
        """The file names the table reads `targets` from (for a missing-key message)."""
        table = self.sources(model)
        return sorted({src for t in targets for src, _, _ in table.get(t, ())})


def original_layout(model_class: type, keys: Iterable[str]) -> OriginalLayout | None:
    """The original layout `keys` (a file's tensor names) are in, for `model_class` (its
    registered tables' `gguf_layout`, engine.model_tables); None when they are diffusers' names
    (`map_gguf_keys`)."""
    tables = tables_for(model_class)
    spec = tables.gguf_layout if tables is not None else None
    if spec is None:
        return None
    layout = OriginalLayout(spec.description, tuple(spec.markers), spec.sources, tuple(spec.unused))
    return layout if layout.matches(keys) else None


def map_gguf_keys(entries: dict[str, TensorEntry], model_names: set[str]) -> dict[str, TensorEntry]:
    """GGUF tensor names -> the model's names. The published Qwen-Image GGUFs use diffusers' own
    module names (the original checkpoint is in diffusers format), some with a ComfyUI prefix
    (`model.diffusion_model.`): the prefix is dropped where that makes a model name. Names that
    match nothing are kept as they are (the loader reports them as unexpected keys). Files in an
    original layout (`original_layout`) go through `OriginalLayout.map` instead."""
    out: dict[str, TensorEntry] = {}
    for key, entry in entries.items():
        name = key
        if name not in model_names:
            for prefix in PREFIXES:
                if key.startswith(prefix) and key[len(prefix):] in model_names:
                    name = key[len(prefix):]
                    break
        if name in out:
            raise CheckpointError(f"{entry.file.path}: tensors {out[name].key!r} and {key!r} both map to {name!r}")
        out[name] = entry
    return out
