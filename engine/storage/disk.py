"""Weights left in their .safetensors files: header parsing, positional reads, `DiskStored`.

The safetensors format (https://huggingface.co/docs/safetensors) is: 8 bytes little-endian u64 N,
then N bytes of JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
"__metadata__"}, then the data; offsets are relative to the first byte after the header. We parse
it ourselves so each tensor is known by (file, absolute offset, length) and never re-serialized.

Reading uses `os.preadv` straight into the memory of a freshly allocated tensor: no mmap, so the
process maps no file pages (RssFile stays flat however many forwards run) and the only anonymous
memory is the tensor the forward computes with, freed after the layer ran. The bytes pass through
the kernel page cache, which is reclaimable and not counted as anonymous RSS.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from engine.config import Place
from engine.storage.stored import StoredTensor, store

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
OWN_MAPPING_BYTES = 1024 * 1024


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be streamed (names the file and, where known, the tensor)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: `file` at absolute `offset`, `length` bytes. `form`: the
    storage form its bytes already are in (a GGUF tensor's blocks, engine.storage.gguf); None
    for a tensor of a plain dtype."""

    form: ClassVar[str | None] = None
    file: "SafetensorsFile"
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    length: int


class SafetensorsFile:
    """One shard: its parsed header and a file descriptor opened on first read (shared by threads;
    positional reads need no lock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._parse()

    def _parse(self) -> None:
        path = self.path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated or not a .safetensors file ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(
                        f"{path}: corrupted or truncated .safetensors file (header claims {n} bytes, file has {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupted .safetensors header ({e})") from None
        data_start = 8 + n
        data_size = size - data_start
        self.metadata = header.pop("__metadata__", None) or {}
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: corrupted header entry for tensor {key!r} ({e!r})") from None
            numel = 1
            for d in shape:
                numel *= d
            expected = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected or begin < 0:
                raise CheckpointError(
                    f"{path}: corrupted header entry for tensor {key!r}: {end - begin} bytes for shape {list(shape)} {info['dtype']}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{path}: truncated file: tensor {key!r} needs bytes up to {data_start + end}, file has {size}"
                )
            self.entries[key] = TensorEntry(self, key, dtype, shape, data_start + begin, end - begin)

    # --- reading ------------------------------------------------------------------------------
    def fd(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fd

    def read_into(self, entry: TensorEntry, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Fill `out` (a contiguous CPU tensor) with the entry's bytes from byte `start` on."""
        length = out.nbytes
        if start < 0 or start + length > entry.length:
            raise ValueError(f"{entry.key}: read of {length} bytes at {start} is outside its {entry.length} bytes")
        if length == 0:
            return out
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd, pos, done = self.fd(), entry.offset + start, 0
        while done < length:
            try:
                got = os.preadv(fd, [view[done:]], pos + done)
            except OSError as e:
                raise CheckpointError(f"{self.path}: reading tensor {entry.key!r} failed ({e})") from None
            if got <= 0:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {entry.key!r} ends at byte {entry.offset + entry.length}, "
                    f"read stopped at {pos + done} (the file changed after loading?)"
                )
            done += got
        return out

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """A fresh CPU tensor with the entry's bytes, in the file's dtype.

        Tensors of `OWN_MAPPING_BYTES` or more get their own anonymous mapping, unmapped as soon
        as the tensor dies. From the heap (torch.empty -> malloc), glibc's dynamic mmap threshold
        puts such sizes in arenas after the first large free, and the freed layers stay counted
        in RssAnon (measured: +45-90 MB flat on a 310 MB model streamed from disk, varying with
        the read-ahead thread's arena); with their own mapping RssAnon returns to the baseline
        after every layer."""
        if entry.length >= OWN_MAPPING_BYTES:
            buffer = mmap.mmap(-1, entry.length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            out = torch.frombuffer(buffer, dtype=entry.dtype, count=entry.length // _itemsize(entry.dtype)).view(entry.shape)
        else:
            out = torch.empty(entry.shape, dtype=entry.dtype)
        return self.read_into(entry, out)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.entries)} tensors)"


class DiskStored(StoredTensor):
    """A master copy that stays in its .safetensors file.

    `materialize` reads the bytes (positional read into a fresh tensor) and converts on the target
    device; `to_place` makes a RAM/VRAM copy (in the place's storage form).
    `nbytes` is the size in the file: what a streamed forward reads.
    """

    def __init__(self, entry: TensorEntry):
        self.entry = entry
        self.shape = torch.Size(entry.shape)

    @property
    def nbytes(self) -> int:
        return self.entry.length

    @property
    def device(self) -> str:
        return "disk"

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.entry.dtype

    @property
    def logical_dtype(self) -> torch.dtype:
        return self.entry.dtype

    @property
    def path(self) -> Path:
        return self.entry.file.path

    def read(self) -> torch.Tensor:
        """The bytes as a fresh CPU tensor in the file's dtype (what the prefetcher reads ahead)."""
        return self.entry.file.read(self.entry)

    def finish(self, host: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Turn what `read` returned into the computation tensor (conversion happens on `device`)."""
        target = dtype if host.is_floating_point() else host.dtype
        host = host.to(device=device)  # no-op on the CPU; FP32/BF16 bytes cross first, convert there
        return host if host.dtype == target else host.to(target)

    def materialize(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.finish(self.read(), device, dtype)

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """From the slot view of the file's bytes (part "file"), already on the device."""
        tensor = parts["file"]
        if tensor.is_floating_point() and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        if place.on_disk:
            return self
        return store(self.read(), place, compute_dtype)

    def __repr__(self) -> str:
        e = self.entry
        return f"DiskStored({str(e.file.path)!r}, {e.key!r}, {list(e.shape)}, {e.dtype}, offset={e.offset})"
