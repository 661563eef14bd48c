"""GGUF checkpoints: their blocks kept as they are in the file, dequantized on the computation device.

The "gguf" storage form (engine.storage.forms; a file's own blocks: only a model whose checkpoint
is a .gguf file has it). A .gguf file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is parsed with the
`gguf` package's reader (header, metadata, tensor infos); every tensor is then known by (file,
absolute offset, length), like a .safetensors tensor (engine.storage.disk), and read with
positional reads into our own memory: the reader's memory map is dropped after parsing, so no
file pages stay mapped (RssFile flat) and disk offload streams straight from the .gguf file.

Quantized tensors (Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, ... `SUPPORTED`) keep their bytes as they are in
the file: in RAM as one uint8 tensor of shape [rows, bytes per row] (`GgufStored`, the "gguf"
storage form), or in the file (`GgufDiskStored`, disk offload). Those bytes cross to the
computation device (the scheduler's slots carry them as stored) and are dequantized there with
diffusers' torch ports of the GGUF dequantization (City96's, the code diffusers' own GGUF loader
runs), in float32, then cast to the computation dtype: bitwise the `gguf` package's reference
dequantization cast to that dtype (tests/test_gguf.py checks every supported type). Rows are
dequantized in chunks of ~`CHUNK_VALUES` values, so float32 temporaries stay small.

F32/F16/BF16 tensors of a GGUF file (biases, norms, some small matrices) are plain file tensors:
the loader treats them exactly like .safetensors tensors (cast or quantized per the place).
Which file tensor feeds which model name (prefixes, FLUX's and Z-Image's original layouts, the
architecture check) is engine.storage.gguf_names.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from engine.config import Place
from engine.storage.disk import CheckpointError, DiskStored, SafetensorsFile, TensorEntry
from engine.storage.forms import GGUF
from engine.storage.stored import FileBlocksCodec, Layout, QuantizedStored, StoredTensor

#: rows are dequantized in chunks of about this many values
CHUNK_VALUES = 1 << 22

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError("reading .gguf files needs the `gguf` package (pip install gguf)") from e
    return gguf


class _CachedConstants(types.ModuleType):
    """`torch` as diffusers' dequantizers see it, except that `torch.tensor(data, device=...)`
    returns a constant made once per (values, dtype, device).

    Each of those helpers builds its shift tables and codebooks with `torch.tensor([...],
    device=blocks.device)` on every call: on a GPU that is a pageable host-to-device copy, which
    blocks the host until the compute stream has caught up, several times per weight per step,
    so prefetch could never run ahead. The constants are tiny and read-only (shift operands,
    lookup tables); made once per device, they are plain device tensors from then on."""

    def __init__(self) -> None:
        super().__init__("torch")
        self._cache: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    def tensor(self, data: object, *, dtype: torch.dtype | None = None, device: object = None, **kwargs: object) -> torch.Tensor:
        if kwargs:  # requires_grad, pin_memory, ...: not a constant table
            return torch.tensor(data, dtype=dtype, device=device, **kwargs)
        key = (repr(data), dtype, str(torch.device(device)) if device is not None else None)
        found = self._cache.get(key)
        if found is None:
            with self._lock:
                found = self._cache.get(key)
                if found is None:
                    found = self._cache[key] = torch.tensor(data, dtype=dtype, device=device)
        return found


_CONSTANTS = _CachedConstants()


def _with_cached_constants(fn: Callable) -> Callable:
    """`fn` run against `_CONSTANTS` instead of `torch` (its own globals otherwise), so the
    diffusers module itself is left as it is for anyone else who imports it."""
    scope = dict(fn.__globals__)
    scope["torch"] = _CONSTANTS
    return types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)


@functools.cache
def _dequantizers() -> dict:
    from diffusers.quantizers.gguf.utils import dequantize_functions

    gguf = _gguf()
    return {
        gguf.GGMLQuantizationType(k).name: _with_cached_constants(fn)
        for k, fn in dequantize_functions.items()
        if gguf.GGMLQuantizationType(k).name != "BF16"
    }


def supported_types() -> list[str]:
    """Quantization types whose blocks are kept and dequantized on the computation device."""
    return sorted(_dequantizers())


@dataclass(frozen=True)
class GgufEntry(TensorEntry):
    """A quantized GGUF tensor: `dtype`/`shape` describe its bytes (uint8, [rows, bytes per
    row]); `qtype` and `logical_shape` what they stand for."""

    form: ClassVar[str | None] = GGUF
    qtype: str = ""
    logical_shape: tuple[int, ...] = ()


class GgufFile(SafetensorsFile):
    """One .gguf file: tensor entries with absolute offsets, metadata, positional reads."""

    def _parse(self) -> None:
        gguf = _gguf()
        path = self.path
        try:
            size = path.stat().st_size
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            reader = gguf.GGUFReader(path, "r")
        except Exception as e:  # the reader raises ValueError/IndexError/... on a cut-off header
            raise CheckpointError(f"{path}: corrupted or truncated GGUF file ({type(e).__name__}: {e})") from None
        try:
            self.metadata = {}
            self.architecture = None
            field = reader.fields.get("general.architecture")
            if field is not None:
                try:
                    self.architecture = str(field.contents())
                except Exception:
                    self.architecture = None
            for key in ("general.architecture", "general.name", "general.file_type"):
                f = reader.fields.get(key)
                if f is not None:
                    try:
                        self.metadata[key] = str(f.contents())
                    except Exception:
                        pass
            dequantizers = _dequantizers()
            unsupported: dict[str, list[str]] = {}
            for t in reader.tensors:
                name = t.name
                qtype = t.tensor_type.name
                # GGUF lists dimensions innermost first; torch's order is the reverse
                logical = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
                offset, length = int(t.data_offset), int(t.n_bytes)
                if offset + length > size:
                    raise CheckpointError(
                        f"{path}: truncated file: tensor {name!r} needs bytes up to {offset + length}, file has {size}"
                    )
                if qtype in _FLOAT_TYPES:
                    self.entries[name] = TensorEntry(self, name, _FLOAT_TYPES[qtype], logical, offset, length)
                    continue
                if qtype not in dequantizers:
                    unsupported.setdefault(qtype, []).append(name)
                    continue
                block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
                rows = math.prod(logical[:-1]) if len(logical) > 1 else 1
                if logical[-1] % block or length != rows * (logical[-1] // block) * type_size:
                    raise CheckpointError(
                        f"{path}: corrupted tensor info for {name!r}: {length} bytes for {qtype} of shape {list(logical)}"
                    )
                byte_shape = (rows, length // rows)
                self.entries[name] = GgufEntry(self, name, torch.uint8, byte_shape, offset, length, qtype, logical)
            if unsupported:
                listing = ", ".join(f"{q} ({len(v)} tensors, e.g. {v[0]!r})" for q, v in sorted(unsupported.items()))
                raise CheckpointError(
                    f"{path}: unsupported GGUF quantization type(s): {listing}. Supported: {', '.join(supported_types())}, "
                    "and F32/F16/BF16."
                )
        finally:
            # drop the reader's memory map: reads go through our own file descriptor
            mm = getattr(reader, "data", None)
            mmap_obj = getattr(mm, "_mmap", None)
            del reader
            if mmap_obj is not None:
                try:
                    mmap_obj.close()
                except (BufferError, ValueError):
                    pass

    def __repr__(self) -> str:
        return f"GgufFile({str(self.path)!r}, {len(self.entries)} tensors)"


def dequantize(blocks: torch.Tensor, qtype: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """GGUF blocks (uint8 [rows, bytes per row], on any device) -> the tensor of `shape` in
    `dtype` on the same device: float32 dequantization (diffusers' port), cast per chunk."""
    gguf = _gguf()
    fn = _dequantizers()[qtype]
    qt = gguf.GGMLQuantizationType[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    rows = blocks.shape[0]
    flat = blocks.reshape(rows, -1)
    per_row = flat.shape[1] // type_size * block
    out = torch.empty((rows, per_row), dtype=dtype, device=blocks.device)
    step = max(1, CHUNK_VALUES // max(1, per_row))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = flat[r0:r1].reshape(-1, type_size)
        values = fn(chunk, block, type_size, torch.float32)
        out[r0:r1] = values.reshape(r1 - r0, per_row)
    return out.view(tuple(shape))


class GgufStored(QuantizedStored):
    """A GGUF tensor's blocks, as in the file, in RAM or on the computation device."""

    form = GGUF

    def __init__(self, blocks: torch.Tensor, qtype: str, shape: tuple[int, ...] | torch.Size):
        self.blocks = blocks
        self.qtype = qtype
        self.shape = torch.Size(shape)

    @property
    def encoded(self) -> tuple[str, int]:
        return (GGUF, self.blocks.nbytes)

    @property
    def storage_dtype(self) -> str:
        return f"gguf:{self.qtype}"

    def keeps_form(self, place: Place) -> bool:
        return place.dtype == GGUF

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["blocks"], self.qtype, self.shape, dtype)

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("blocks", self.blocks)]

    def with_parts(self, tensors: Sequence[torch.Tensor]) -> StoredTensor:
        return GgufStored(tensors[0], self.qtype, self.shape)

    def __repr__(self) -> str:
        return f"GgufStored({self.qtype}, {list(self.shape)}, {self.blocks.device})"


class GgufDiskStored(DiskStored):
    """A quantized GGUF tensor left in its .gguf file (disk offload): its blocks are read as they
    are and dequantized on the computation device."""

    entry: GgufEntry

    def __init__(self, entry: GgufEntry):
        super().__init__(entry)
        self.shape = torch.Size(entry.logical_shape)

    @property
    def encoded(self) -> tuple[str, int]:
        return (GGUF, self.entry.length)

    @property
    def qtype(self) -> str:
        return self.entry.qtype

    @property
    def logical_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def finish(self, host: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(host.to(device), self.entry.qtype, self.shape, dtype)

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["file"], self.entry.qtype, self.shape, dtype)

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        if place.on_disk:
            return self
        return GgufStored(self.read(), self.qtype, self.shape).to_place(place, compute_dtype)

    def __repr__(self) -> str:
        e = self.entry
        return f"GgufDiskStored({str(e.file.path)!r}, {e.key!r}, {e.qtype}, {list(self.shape)}, offset={e.offset})"


class GgufCodec(FileBlocksCodec):
    """GGUF blocks are only ever read from a .gguf file (`GgufEntry`): at a "gguf" place they stay
    as they are; any other tensor there stays in the computation dtype."""

    def entry_layout(self, entry: TensorEntry) -> Layout:
        return [(entry.shape, torch.uint8)]

    def read_blocks(self, entry: TensorEntry, out: torch.Tensor) -> StoredTensor:
        entry.file.read_into(entry, out)
        return GgufStored(out, entry.qtype, entry.logical_shape)  # type: ignore[attr-defined]

    def decode(self, entry: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(entry.file.read(entry), entry.qtype, entry.logical_shape, dtype)  # type: ignore[attr-defined]

    def disk_master(self, entry: TensorEntry) -> StoredTensor:
        return GgufDiskStored(entry)  # type: ignore[arg-type]

    def join(self, parts: list[TensorEntry]) -> StoredTensor | None:
        qtypes = {getattr(e, "qtype", None) for e in parts}
        if len(qtypes) != 1 or not all(e.form == GGUF for e in parts):
            return None
        blocks = torch.cat([e.file.read(e) for e in parts])
        shape = (sum(e.logical_shape[0] for e in parts),) + tuple(parts[0].logical_shape[1:])  # type: ignore[attr-defined]
        return GgufStored(blocks, qtypes.pop(), shape)

    def workspace_bytes(self, shape: tuple[int, ...]) -> int:
        """`dequantize`'s float32 temporaries: one row chunk, ~16 bytes a value at most."""
        return min(math.prod(shape), CHUNK_VALUES) * 16


CODEC = GgufCodec()


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The .gguf file `path` names, or the single one in the folder `path` (None: not GGUF)."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{p}: {len(found)} .gguf files ({', '.join(f.name for f in found[:4])}); pass the one to load")
        return found[0] if found else None
    return None
