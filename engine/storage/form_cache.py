"""The stored-form cache: a component's weights in the form they are stored in (FP8, int8, NF4
data and scales; bf16 from an F32 checkpoint), kept on disk as one .safetensors file.

Why: quantizing a model is the slow part of loading it (Z-Image-Turbo in FP8: 34-54 s on this
CPU, NF4 90 s, issue #26), and disk offload would otherwise read the published shards at every
step (F32 for Z-Image-Turbo: twice the bf16 bytes it computes with). With the cache, the second
load reads the stored bytes as they are, and disk offload streams them.

Where: `cache_dir_for(model folder)`: `$LOWVRAM_CACHE_DIR/<model>/` (the app's `--cache-dir`
sets it), else `.lowvram-cache/<model>/` next to the model's folder. One file per component and
form: `<component>.<form>.<key>.safetensors`.

The file (format version `FORMAT_VERSION`, docs/engine.md "The stored-form cache"):
* a plain tensor (bf16 vectors, bf16 matrices of an F32 checkpoint) is a tensor of its dtype,
  named as the model's parameter;
* a quantized tensor is one U8 tensor holding its parts one after the other (`Codec.layout`
  order: data then scales), each part starting at a multiple of 8 bytes, so one read streams
  the whole stored tensor and its parts are views of it;
* `__metadata__` holds "lowvram.format", "lowvram.key", "lowvram.form" and "lowvram.layout"
  (JSON: per tensor its target form or dtype, logical shape, parts [shape, dtype, offset] and a
  CRC32 of its first and last `SAMPLE_BYTES` bytes).

The key (`cache_key`) hashes the source shards' identity (name, size, mtime, SHA-256 of the
header), the form and its parameters (target dtype, computation dtype, the codec's
`cache_params`), the tensors cached and `FORMAT_VERSION`: any change makes another file name,
and the old file is never read. A file is used only after `open_cache` checked its header, its
exact size, the key in its metadata and every tensor's sampled CRC; anything else is a note in
the log, the file is removed and rebuilt. Files are written tensor by tensor from the stored
tensors themselves (no second copy in RAM) into a temporary file, fsynced, then renamed; the free
disk space is checked first. A read-only or full folder is a note, and the run goes on without.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from engine.config import Place
from engine.storage.disk import SAFETENSORS_DTYPES, CheckpointError, DiskStored, SafetensorsFile, TensorEntry
from engine.storage.stored import Codec, PlainStored, StoredTensor, codec_for

log = logging.getLogger(__name__)

#: bump when the file's layout or a codec's bytes change: every older file is then ignored
FORMAT_VERSION = 1
CACHE_DIR_ENV = "LOWVRAM_CACHE_DIR"
CACHE_FOLDER = ".lowvram-cache"
#: bytes at each end of a tensor whose CRC32 is checked when a file is opened (cheap: two small
#: reads a tensor, a few ms for a 1000-tensor model), catching truncated, zeroed or rewritten data
SAMPLE_BYTES = 4096
#: free space kept beyond the file itself when writing
FREE_MARGIN_BYTES = 256 * 1024 * 1024
PART_ALIGN = 8
_NAME = re.compile(r"^(?P<component>[^.]+)\.(?P<form>[^.]+)\.(?P<key>[0-9a-f]{16})\.safetensors$")
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in SAFETENSORS_DTYPES.values()}


# --- where --------------------------------------------------------------------------------------
def model_root(weights_dir: Path) -> Path:
    """The model's folder for a component's folder: the nearest of it and its parent holding a
    model_index.json (a diffusers repo), else the component's folder itself."""
    weights_dir = Path(weights_dir)
    for candidate in (weights_dir, weights_dir.parent):
        if (candidate / "model_index.json").is_file():
            return candidate
    return weights_dir


def model_name(root: Path) -> str:
    """A folder name for a model's caches (a Hugging Face snapshot is named by its repo)."""
    root = Path(root).resolve()
    if root.parent.name == "snapshots":
        return root.parent.parent.name
    return root.name


def cache_enabled(cache_root: str | os.PathLike | bool | None = None) -> bool:
    """Is the cache on: `cache_root` False, or $LOWVRAM_CACHE_DIR set to "off", turns it off."""
    if cache_root is False:
        return False
    return cache_root is not None or os.environ.get(CACHE_DIR_ENV, "").strip().lower() != "off"


def cache_dir_for(weights_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """The folder a model's stored-form caches go in: `cache_root` (or $LOWVRAM_CACHE_DIR) /
    <model>, else `.lowvram-cache/<model>` next to the model's folder."""
    root = model_root(Path(weights_dir))
    base = cache_root or os.environ.get(CACHE_DIR_ENV)
    if base:
        return Path(base).expanduser() / model_name(root)
    return root.resolve().parent / CACHE_FOLDER / model_name(root)


def component_name(weights_dir: Path) -> str:
    """What a component's cache files are named by: its folder ("transformer") for a diffusers
    repo, else "model"."""
    weights_dir = Path(weights_dir)
    return weights_dir.name if model_root(weights_dir) != weights_dir else "model"


@dataclass(frozen=True)
class CachedForm:
    """One cache file of a model, for the page: which component and form, its size."""

    component: str
    form: str
    path: Path
    nbytes: int


def list_cached(weights_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> list[CachedForm]:
    """The complete cache files of a model (temporary files of a write in progress excluded)."""
    folder = cache_dir_for(weights_dir, cache_root)
    out = []
    try:
        files = sorted(folder.iterdir())
    except OSError:
        return []
    for f in files:
        m = _NAME.match(f.name)
        if m:
            try:
                out.append(CachedForm(m["component"], m["form"], f, f.stat().st_size))
            except OSError:
                continue
    return out


def remove_cached(weights_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> int:
    """Remove a model's cache folder (every form, temporary files too); returns the bytes freed.
    The source checkpoint is never touched. Raises OSError when the folder cannot be removed."""
    folder = cache_dir_for(weights_dir, cache_root)
    if not folder.is_dir():
        return 0
    freed = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    shutil.rmtree(folder)
    return freed


# --- what ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheItem:
    """One tensor of the cache: the model's parameter `name`, its source `entry`, the `target`
    dtype or form it is stored in and the (shape, dtype) `layout` of its parts."""

    name: str
    entry: TensorEntry
    target: torch.dtype | str
    layout: tuple[tuple[tuple[int, ...], torch.dtype], ...]

    @property
    def plain(self) -> bool:
        """Stored as one tensor of a plain dtype (not a form's parts)."""
        return codec_for(self.target) is None or len(self.layout) == 1 and self.layout[0][1] == self.target

    def part_offsets(self) -> list[int]:
        offsets, at = [], 0
        for shape, dtype in self.layout:
            offsets.append(at)
            at = _align(at + math.prod(shape) * dtype.itemsize)
        return offsets

    @property
    def nbytes(self) -> int:
        if self.plain:
            shape, dtype = self.layout[0]
            return math.prod(shape) * dtype.itemsize
        shape, dtype = self.layout[-1]
        return self.part_offsets()[-1] + math.prod(shape) * dtype.itemsize


def _align(n: int) -> int:
    return (n + PART_ALIGN - 1) // PART_ALIGN * PART_ALIGN


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def shard_identity(shard: SafetensorsFile) -> list:
    """A source shard as the key sees it: name, size, mtime and the SHA-256 of its header."""
    st = shard.path.stat()
    with open(shard.path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        digest = hashlib.sha256(head + f.read(min(n, 100 * 1024 * 1024))).hexdigest()
    return [shard.path.name, st.st_size, st.st_mtime_ns, digest]


def codec_params(target: torch.dtype | str) -> dict:
    """The parameters of the form a target stands for (group size, levels, ...), for the key."""
    codec: Codec | None = codec_for(target)
    if codec is None:
        return {}
    return {"codec": f"{type(codec).__module__}.{type(codec).__qualname__}", **getattr(codec, "cache_params", {})}


def cache_key(shards: Sequence[SafetensorsFile], form: str, place_dtype: torch.dtype | str, compute_dtype: torch.dtype, items: Iterable[CacheItem]) -> str:
    """16 hex digits naming the file: everything its bytes depend on (module docstring)."""
    targets = sorted({_dtype_name(i.target) for i in items})
    description = {
        "format": FORMAT_VERSION,
        "shards": [shard_identity(s) for s in shards],
        "form": form,
        "place": _dtype_name(place_dtype),
        "compute": _dtype_name(compute_dtype),
        "params": {t: codec_params(t) for t in targets},
        "tensors": [[i.name, i.entry.key, _dtype_name(i.target), [list(s) for s, _ in i.layout], [_dtype_name(d) for _, d in i.layout]] for i in items],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(folder: Path, component: str, form: str, key: str) -> Path:
    return Path(folder) / f"{component}.{form}.{key}.safetensors"


# --- the header ---------------------------------------------------------------------------------
def _header(items: Sequence[CacheItem], key: str, form: str, crcs: dict[str, int] | None, extra: dict[str, str] | None = None) -> tuple[bytes, int]:
    """The serialized header (padded to 8 bytes, as the safetensors writer does) and the data size."""
    tensors, layout, at = {}, {}, 0
    for item in items:
        n = item.nbytes
        if item.plain:
            shape, dtype = item.layout[0]
            tensors[item.name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        else:
            tensors[item.name] = {"dtype": "U8", "shape": [n], "data_offsets": [at, at + n]}
        layout[item.name] = {
            "target": f"form:{item.target}" if isinstance(item.target, str) else _dtype_name(item.target),
            "shape": list(item.entry.shape),
            "parts": [[list(s), _dtype_name(d), o] for (s, d), o in zip(item.layout, item.part_offsets())],
            "crc": (crcs or {}).get(item.name, 0),
        }
        at += n
    meta = {"lowvram.format": str(FORMAT_VERSION), "lowvram.key": key, "lowvram.form": form, "lowvram.layout": json.dumps(layout), **(extra or {})}
    raw = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, at


def _sample_crc(chunks: Callable[[int, int], bytes], nbytes: int) -> int:
    """CRC32 of a tensor's first and last SAMPLE_BYTES (`chunks(start, length)` reads them)."""
    if nbytes <= 2 * SAMPLE_BYTES:
        return zlib.crc32(chunks(0, nbytes))
    return zlib.crc32(chunks(nbytes - SAMPLE_BYTES, SAMPLE_BYTES), zlib.crc32(chunks(0, SAMPLE_BYTES)))


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


# --- writing ------------------------------------------------------------------------------------
class CacheUnavailable(OSError):
    """The cache folder cannot take the file (read-only, full, ...): the run goes on without."""


def write_cache(
    path: Path, items: Sequence[CacheItem], key: str, form: str, parts_of: Callable[[CacheItem], Sequence[torch.Tensor]],
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the cache file at `path`, tensor by tensor: `parts_of(item)` gives the stored parts
    (CPU tensors laid out as `item.layout`; the loader's own stored tensors, or a tensor just
    quantized and dropped after it is written). Checks the free space first; writes a temporary
    file, fsyncs and renames it. Raises CacheUnavailable (with the reason) when it cannot."""
    path = Path(path)
    header, data = _header(items, key, form, None, extra)
    # the CRCs are known only once the data is written: the header is rewritten in place at the
    # end with the same length (CRCs are zero-padded to 10 digits below)
    total = 8 + len(_header(items, key, form, {i.name: 4294967295 for i in items}, extra)[0]) + data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError as e:
        raise CacheUnavailable(f"cannot use the cache folder {path.parent} ({e.strerror or e})") from None
    if free < total + FREE_MARGIN_BYTES:
        raise CacheUnavailable(
            f"{path.parent} has {free / 2**30:.2f} GiB free; the cache file needs {total / 2**30:.2f} GiB "
            f"(+{FREE_MARGIN_BYTES / 2**20:.0f} MiB margin)"
        )
    _remove_orphans(path.parent)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    crcs: dict[str, int] = {}
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * (total - data))  # the header's room, written last
            for item in items:
                parts = list(parts_of(item))
                if len(parts) != len(item.layout):
                    raise ValueError(f"{item.name}: {len(parts)} parts, layout has {len(item.layout)}")
                at = 0
                views = []
                for part, (shape, dtype), offset in zip(parts, item.layout, item.part_offsets()):
                    if tuple(part.shape) != tuple(shape) or part.dtype != dtype:
                        raise ValueError(f"{item.name}: part {list(part.shape)} {part.dtype}, layout says {list(shape)} {dtype}")
                    if offset > at:
                        f.write(b"\0" * (offset - at))
                        views.append(b"\0" * (offset - at))
                    mv = _bytes_of(part)
                    f.write(mv)
                    views.append(mv)
                    at = offset + len(mv)
                crcs[item.name] = _sample_crc(lambda s, n, v=views: _segment_bytes(v, s, n), item.nbytes)
                del parts, views
            header = _header(items, key, form, crcs, extra)[0]
            header += b" " * (total - data - 8 - len(header))
            f.seek(0)
            f.write(len(header).to_bytes(8, "little") + header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise CacheUnavailable(f"cannot write {path} ({e.strerror or e})") from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def _segment_bytes(segments: Sequence[bytes | memoryview], start: int, n: int) -> bytes:
    """Bytes [start, start + n) of the concatenation of `segments` (without concatenating them)."""
    out, at = [], 0
    for seg in segments:
        length = len(seg)
        lo, hi = max(start, at), min(start + n, at + length)
        if lo < hi:
            out.append(bytes(memoryview(seg)[lo - at : hi - at]))
        at += length
    return b"".join(out)


def _remove_orphans(folder: Path) -> None:
    """Temporary files of writes whose process is gone (a run stopped mid-write)."""
    for f in folder.glob("*.tmp-*"):
        try:
            pid = int(f.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            _remove(f)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class BackgroundWrite:
    """A cache file written on a thread of its own while the model runs (`join` waits)."""

    def __init__(self, path: Path, items: Sequence[CacheItem], key: str, form: str, parts: dict[str, Sequence[torch.Tensor]]):
        self.path = path
        self.error: str | None = None
        self.done = False
        self._thread = threading.Thread(target=self._run, args=(items, key, form, parts), name=f"cache-write {path.name}", daemon=True)
        self._thread.start()

    def _run(self, items, key, form, parts) -> None:
        start = time.perf_counter()
        try:
            write_cache(self.path, items, key, form, lambda item: parts[item.name])
            log.info("stored form cached: %s (%.1f s)", self.path, time.perf_counter() - start)
        except Exception as e:  # a note, never a failed run
            self.error = str(e)
            log.warning("the stored form is not cached (the run goes on): %s", e)
        finally:
            parts.clear()
            self.done = True

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done


# --- reading ------------------------------------------------------------------------------------
class CacheFile:
    """A checked cache file: its tensors by parameter name, read as they are stored."""

    def __init__(self, shard: SafetensorsFile, items: dict[str, CacheItem]):
        self.shard = shard
        self.items = items

    @property
    def path(self) -> Path:
        return self.shard.path

    def entry(self, name: str) -> TensorEntry:
        return self.shard.entries[name]

    def read_parts(self, name: str, outs: Sequence[torch.Tensor]) -> None:
        """Fill `outs` (laid out as the item's parts) with the stored bytes."""
        item, entry = self.items[name], self.shard.entries[name]
        if item.plain:
            self.shard.read_into(entry, outs[0])
            return
        for out, offset in zip(outs, item.part_offsets()):
            self.shard.read_into(entry, out, start=offset)

    def read_stored(self, name: str, new: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]) -> StoredTensor:
        """The stored copy of a parameter, its parts made by `new(shape, dtype)` (a host arena's
        take, or torch.empty) and filled from the file: no quantization."""
        item = self.items[name]
        outs = [new(shape, dtype) for shape, dtype in item.layout]
        self.read_parts(name, outs)
        return wrap(item, outs)

    def disk_master(self, name: str) -> DiskStored:
        """A master that stays in the cache file (disk offload): plain tensors are plain file
        tensors; a quantized one streams its parts in one read."""
        item, entry = self.items[name], self.shard.entries[name]
        return DiskStored(entry) if item.plain else CachedDiskStored(entry, item)

    def close(self) -> None:
        self.shard.close()


def wrap(item: CacheItem, parts: Sequence[torch.Tensor]) -> StoredTensor:
    if item.plain:
        return PlainStored(parts[0])
    return codec_for(item.target).wrap(list(parts), tuple(item.entry.shape), item.target)  # type: ignore[union-attr]


def open_cache(path: Path, key: str, items: Sequence[CacheItem]) -> CacheFile | None:
    """The file at `path` when it is complete and is what `items` and `key` describe; else None
    (a file that is there but wrong is noted in the log and removed, so it is rebuilt)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        shard = SafetensorsFile(path)
        problem = _check(shard, key, items)
    except CheckpointError as e:
        shard, problem = None, str(e)
    if problem is None:
        return CacheFile(shard, {i.name: i for i in items})  # type: ignore[arg-type]
    if shard is not None:
        shard.close()
    log.warning("stored-form cache %s is not usable (%s): ignored, it is rebuilt", path, problem)
    _remove(path)
    return None


def _check(shard: SafetensorsFile, key: str, items: Sequence[CacheItem]) -> str | None:
    meta = shard.metadata
    if meta.get("lowvram.format") != str(FORMAT_VERSION):
        return f"format {meta.get('lowvram.format')!r}, this version reads {FORMAT_VERSION}"
    if meta.get("lowvram.key") != key:
        return "written for other sources or another form"
    try:
        layout = json.loads(meta["lowvram.layout"])
    except (KeyError, ValueError) as e:
        return f"no readable layout ({e!r})"
    data_end = max((e.offset + e.length for e in shard.entries.values()), default=0)
    size = shard.path.stat().st_size
    if size != data_end:
        return f"{size} bytes, the header describes {data_end}"
    if len(shard.entries) != len(items):
        return f"{len(shard.entries)} tensors, {len(items)} expected"
    for item in items:
        entry = shard.entries.get(item.name)
        if entry is None or entry.length != item.nbytes:
            return f"tensor {item.name!r} missing or of another size"
        described = layout.get(item.name, {})
        if described.get("parts") != [[list(s), _dtype_name(d), o] for (s, d), o in zip(item.layout, item.part_offsets())]:
            return f"tensor {item.name!r} laid out otherwise"
        crc = _sample_crc(lambda s, n, e=entry: _pread(shard, e, s, n), entry.length)
        if crc != described.get("crc"):
            return f"tensor {item.name!r} has other bytes than were written (checksum)"
    return None


def _pread(shard: SafetensorsFile, entry: TensorEntry, start: int, n: int) -> bytes:
    data = os.pread(shard.fd(), n, entry.offset + start)
    if len(data) != n:
        raise CheckpointError(f"{shard.path}: truncated")
    return data


class CachedDiskStored(DiskStored):
    """A quantized master left in the cache file (disk offload): one read brings its parts (data
    and scales, as stored), which are dequantized where the layer computes."""

    def __init__(self, entry: TensorEntry, item: CacheItem):
        super().__init__(entry)
        self.item = item
        self.shape = torch.Size(item.entry.shape)

    @property
    def encoded(self) -> tuple[str, int]:
        """The form and bytes this master streams (what the planner sizes disk reads by)."""
        return (_form_name(self.item.target), self.entry.length)

    @property
    def logical_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def stored_from(self, blob: torch.Tensor) -> StoredTensor:
        """The stored copy whose parts are views of `blob` (the entry's bytes, on any device)."""
        flat = blob.reshape(-1)
        parts = []
        for (shape, dtype), offset in zip(self.item.layout, self.item.part_offsets()):
            n = math.prod(shape) * dtype.itemsize
            parts.append(flat[offset : offset + n].view(dtype).view(shape))
        return wrap(self.item, parts)

    def finish(self, host: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.from_parts({"file": host.to(device)}, dtype)

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        stored = self.stored_from(parts["file"])
        return stored.from_parts(dict(stored.parts()), dtype)

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        if place.on_disk:
            return self
        return self.stored_from(self.read()).to_place(place, compute_dtype)

    def __repr__(self) -> str:
        return f"CachedDiskStored({str(self.entry.file.path)!r}, {self.entry.key!r}, {_dtype_name(self.item.target)}, {list(self.shape)})"


def _form_name(target: torch.dtype | str) -> str:
    from engine.storage.forms import find_form

    form = find_form(target)
    return form.name if form is not None else _dtype_name(target)


# --- an exported model (tools/quantize.py) --------------------------------------------------------
EXPORT_KEY = "lowvram.export"


def is_exported(shard: SafetensorsFile) -> bool:
    """Is this .safetensors file a stored-form file that is a model of its own (every tensor of
    the component, named as the model's parameters and buffers)?"""
    return shard.metadata.get(EXPORT_KEY) == "1"


def open_exported(shard: SafetensorsFile) -> CacheFile:
    """The tensors of an exported stored-form file, checked like a cache file (format version,
    layout, exact size, sampled CRCs). CheckpointError says what is wrong."""
    meta = shard.metadata
    if meta.get("lowvram.format") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{shard.path}: a stored-form file of format {meta.get('lowvram.format')!r}; this version reads format "
            f"{FORMAT_VERSION} (export the model again with python -m tools.quantize)"
        )
    try:
        layout = json.loads(meta["lowvram.layout"])
        items = []
        for name, info in layout.items():
            target = info["target"][5:] if info["target"].startswith("form:") else _TORCH_DTYPES[info["target"]]
            parts = tuple((tuple(s), _TORCH_DTYPES[d]) for s, d, _ in info["parts"])
            logical = TensorEntry(shard, name, torch.bfloat16, tuple(info["shape"]), 0, 0)
            items.append(CacheItem(name, logical, target, parts))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{shard.path}: unreadable stored-form layout ({e!r})") from None
    problem = _check(shard, meta.get("lowvram.key", ""), items)
    if problem is not None:
        raise CheckpointError(f"{shard.path}: damaged stored-form file ({problem}); download or export it again")
    return CacheFile(shard, {i.name: i for i in items})
