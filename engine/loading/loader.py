"""`load_model`: build a diffusers/transformers model on the meta device and stream its
.safetensors weights straight into their storage form (bf16 or scaled FP8 in RAM, or left in the
file for disk offload), then manage it with `enable_vram_management`.

    from engine import load_model
    model = load_model(QwenImageTransformer2DModel, "/models/Qwen-Image/transformer",
                       vram_config={"offload_dtype": "disk", "offload_device": "disk",
                                    "computation_dtype": torch.bfloat16, "computation_device": "cuda"},
                       vram_limit=8)

Steps, all validation first so a bad input leaves nothing loaded:
1. files: a directory (config.json + shards, with or without an index json) or a list of shards;
   only .safetensors are accepted (pickle formats are never opened); every header is parsed
   (engine.storage.disk) and checked against the file size and the index.
2. the model is built under accelerate's `init_empty_weights(include_buffers=False)`: parameters
   on meta, buffers real (rope tables computed in __init__ stay valid).
3. checkpoint keys are mapped onto parameter names with the library's own mechanism
   (transformers' conversion mapping: renamings such as Qwen2.5-VL's `model.*` ->
   `model.language_model.*`; converters that merge/split tensors cannot stay in the file);
   tied parameters are tied with `model.tie_weights` and read once; missing, unexpected and
   mis-shaped keys are reported all together.
4. shard by shard, in file order, each tensor is read into its storage form at the offload place
   (bitwise what `engine.storage.stored.store` makes: a bf16 file is read as is, an FP8 place quantizes
   rows a chunk at a time), inside one host arena sized from the headers beforehand
   (engine.transfer.host_arena: a GPU scheduler pins it in place), or becomes a `DiskStored` without
   reading anything.
5. `enable_vram_management(..., master_factory=...)` hands those masters to the managed layers;
   disk offload gets a `DiskPrefetcher` (engine.loading.prefetch) as the runtime's read-ahead.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from engine.runtime.pool import MemoryPool
from engine.config import Place, VramConfig, form_value, storage_name
from engine.storage.disk import CheckpointError, DiskStored, SafetensorsFile, TensorEntry
from engine.storage.form_cache import (
    BackgroundWrite,
    CacheFile,
    CacheItem,
    CacheUnavailable,
    cache_dir_for,
    cache_enabled,
    cache_key,
    cache_path,
    EXPORT_KEY,
    component_name,
    is_exported,
    open_cache,
    open_exported,
    write_cache,
)
from engine.storage.forms import find_form, get_form
from engine.storage.gguf import GgufFile, find_gguf
from engine.storage.gguf_names import check_architecture, map_gguf_keys, original_layout
from engine.transfer.host_arena import HostArena, layout_bytes, release_free_heap
from engine.management import _plan_wrappers, enable_vram_management, runtime_of
from engine.loading.prefetch import DiskPrefetcher
from engine.storage.stored import Codec, FileBlocksCodec, PlainStored, StoredTensor, codec_for, keeps_encoded, storage_dtype_for, store, stored_layout

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


# --- 1. files ---------------------------------------------------------------------------------
def _pickle_error(files: Iterable[Path]) -> CheckpointError:
    names = ", ".join(sorted(str(f) for f in files)[:5])
    return CheckpointError(
        f"only .safetensors checkpoints can be streamed; found {names}. Pickle-based files (.bin/.pth/.pt/.ckpt) are "
        "never unpickled here: convert them to .safetensors once (e.g. with the library's save_pretrained(safe_serialization=True))."
    )


Index = "tuple[Path, dict[str, str]] | None"


def resolve_checkpoint(path: str | Path | Sequence[str | Path]) -> tuple[Path, list[SafetensorsFile], Index]:
    """(config directory, parsed shards, (index path, weight_map) or None) for a directory or a
    list of .safetensors files."""
    index = None
    if isinstance(path, (str, Path)):
        root = Path(path)
        gguf_path = find_gguf(root)
        if gguf_path is not None:
            return gguf_path.parent, [GgufFile(gguf_path)], None
        if root.is_file():
            if root.suffix.lower() != ".safetensors":
                raise _pickle_error([root]) if root.suffix.lower() in PICKLE_SUFFIXES else CheckpointError(
                    f"{root}: not a .safetensors or .gguf file (only those checkpoints can be streamed)"
                )
            files, config_dir = [root], root.parent
        elif root.is_dir():
            config_dir = root
            files, index = _files_in_dir(root)
        else:
            raise CheckpointError(f"{root}: no such file or directory")
    else:
        files = [Path(p) for p in path]
        if not files:
            raise CheckpointError("load_model got an empty list of files")
        config_dir = files[0].parent
        for f in files:
            if f.suffix.lower() in PICKLE_SUFFIXES:
                raise _pickle_error([f])
            if f.suffix.lower() != ".safetensors":
                raise CheckpointError(f"{f}: not a .safetensors file (only .safetensors checkpoints can be streamed)")
            if not f.is_file():
                raise CheckpointError(f"{f}: shard not found")
    shards = [SafetensorsFile(f) for f in files]
    return config_dir, shards, index


def _files_in_dir(root: Path) -> tuple[list[Path], Index]:
    indexes = [root / n for n in INDEX_NAMES if (root / n).is_file()] or sorted(root.glob("*.safetensors.index.json"))
    if indexes:
        index_path = indexes[0]
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e!r})") from None
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            f = root / shard
            if not f.is_file():
                keys = [k for k, v in weight_map.items() if v == shard]
                raise CheckpointError(
                    f"{index_path.name} lists shard {shard!r} (with {len(keys)} tensors, e.g. {keys[0]!r}) but {f} is missing"
                )
            files.append(f)
        return files, (index_path, weight_map)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = [f for f in root.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise _pickle_error(pickles)
        raise CheckpointError(f"{root}: no .safetensors files (and no *.safetensors.index.json)")
    return files, None


def collect_entries(shards: list[SafetensorsFile], index: Index = None) -> dict[str, TensorEntry]:
    """Every tensor by checkpoint key; a key in two shards or an index that disagrees with the
    headers is an error."""
    entries: dict[str, TensorEntry] = {}
    for shard in shards:
        for key, entry in shard.entries.items():
            if key in entries:
                raise CheckpointError(f"tensor {key!r} is in both {entries[key].file.path} and {shard.path}")
            entries[key] = entry
    if index is not None:
        index_path, weight_map = index
        wrong = [k for k, f in weight_map.items() if k not in entries or entries[k].file.path.name != Path(f).name]
        if wrong:
            k = wrong[0]
            where = f"is not in {weight_map[k]}" if k not in entries else f"is in {entries[k].file.path.name}, not {weight_map[k]}"
            raise CheckpointError(f"{index_path.name} lists {len(wrong)} tensor(s) the shards do not hold as listed: {k!r} {where}")
    return entries


# --- 2. the empty model -----------------------------------------------------------------------
def _library_of(model_class: type) -> str:
    try:
        from transformers import PreTrainedModel

        if issubclass(model_class, PreTrainedModel):
            return "transformers"
    except ImportError:  # pragma: no cover
        pass
    try:
        from diffusers import ModelMixin

        if issubclass(model_class, ModelMixin):
            return "diffusers"
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"{model_class!r} is neither a diffusers ModelMixin nor a transformers PreTrainedModel class")


def build_empty(model_class: type, config_dir: Path, comp_dtype: torch.dtype) -> nn.Module:
    """The model with parameters on meta and real buffers."""
    from accelerate import init_empty_weights

    library = _library_of(model_class)
    if not (config_dir / "config.json").is_file():
        raise CheckpointError(f"{config_dir}: no config.json next to the weights")
    if library == "diffusers":
        config = model_class.load_config(config_dir)
        with init_empty_weights(include_buffers=False):
            model = model_class.from_config(config)
    else:
        config = model_class.config_class.from_pretrained(config_dir)
        with init_empty_weights(include_buffers=False):
            # dtype as from_pretrained(dtype=...) would build it (buffers made with the default dtype)
            model = model_class._from_config(config, dtype=comp_dtype)
    model.eval()
    model.requires_grad_(False)
    return model


# --- 3. key mapping ---------------------------------------------------------------------------
class KeyPlan:
    """Which checkpoint tensor feeds which parameter/buffer."""

    def __init__(self) -> None:
        self.direct: dict[str, TensorEntry] = {}  # model name -> entry
        self.converted: dict[str, tuple[Any, list[tuple[str, TensorEntry]]]] = {}  # target -> (converter, [(pattern, entry)])
        self.unexpected: list[str] = []


def _transformers_mapping(model: nn.Module, entries: Mapping[str, TensorEntry], names: dict[str, Any]) -> KeyPlan:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", "") or None
    plan = KeyPlan()
    for key in sorted(entries):
        new, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if new not in names and key in names:
            new, pattern = key, None
        if new not in names:
            plan.unexpected.append(key)
        elif pattern is not None:
            converter, group = plan.converted.setdefault(new, (by_pattern[pattern], []))
            group.append((pattern, entries[key]))
        else:
            plan.direct[new] = entries[key]
    return plan


def map_keys(model: nn.Module, library: str, entries: Mapping[str, TensorEntry]) -> KeyPlan:
    names: dict[str, Any] = dict(model.state_dict(keep_vars=True))
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(n, p)
    if library == "transformers":
        return _transformers_mapping(model, entries, names)
    plan = KeyPlan()
    for key, entry in entries.items():
        if key in names:
            plan.direct[key] = entry
        else:
            plan.unexpected.append(key)
    return plan


def _ignored(key: str, patterns: Iterable[str] | None) -> bool:
    return any(re.search(p, key) for p in (patterns or ()))


def _listing(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


# --- 4. reading into storage ------------------------------------------------------------------
def _by_file_order(items: Iterable[tuple[str, TensorEntry]]) -> list[tuple[str, TensorEntry]]:
    files: dict[Path, int] = {}
    items = list(items)
    for _, e in items:
        files.setdefault(e.file.path, len(files))
    return sorted(items, key=lambda kv: (files[kv[1].file.path], kv[1].offset))


#: a quantized checkpoint tensor is read and quantized this many bytes of float32 rows at a time
QUANT_CHUNK_BYTES = 16 * 1024 * 1024


class _QuantWorkspace:
    """Reusable buffers for chunked quantization (no large temporaries, so glibc's heap does
    not fill with holes between the long-lived storage tensors)."""

    def __init__(self) -> None:
        self.raw: torch.Tensor | None = None  # file dtype bytes of one chunk
        self.w32: torch.Tensor | None = None

    def get(self, numel: int, raw_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w32 is None or self.w32.numel() < numel:
            self.w32 = torch.empty(numel, dtype=torch.float32)
        nbytes = numel * torch.empty((), dtype=raw_dtype).element_size()
        if self.raw is None or self.raw.numel() < nbytes:
            self.raw = torch.empty(nbytes, dtype=torch.uint8)
        return self.raw, self.w32


def _quantizing_codec(entry: TensorEntry, target: torch.dtype | str) -> Codec | None:
    """The codec `store` quantizes this tensor with (a floating matrix at a quantized place), from
    the header; None when it is stored as is or cast."""
    codec = codec_for(target)
    if codec is None or isinstance(codec, FileBlocksCodec) or target == entry.dtype:
        return None
    return codec if entry.dtype.is_floating_point and len(entry.shape) >= 2 and all(entry.shape) else None


def _blocks_codec(entry: TensorEntry) -> FileBlocksCodec | None:
    """The codec of the form an entry's bytes already are in (a GGUF tensor's blocks), or None."""
    return codec_for(entry.form) if entry.form is not None else None  # type: ignore[return-value]


def storage_layout(entry: TensorEntry, place: Place, compute_dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) tensors `read_stored` makes of `entry` at `place`: known from the header
    alone, so a host arena can be sized before anything is read."""
    blocks = _blocks_codec(entry)
    if blocks is not None:
        if keeps_encoded(place.dtype, (entry.form, entry.length)):
            return blocks.entry_layout(entry)  # the blocks as they are in the file
        return stored_layout(logical_shape(entry), torch.float32, place.dtype, compute_dtype)
    return stored_layout(entry.shape, entry.dtype, place.dtype, compute_dtype)


def read_entry(entry: TensorEntry, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A checkpoint tensor as a CPU tensor (blocks of a form decoded, to `dtype` or float32)."""
    blocks = _blocks_codec(entry)
    if blocks is not None:
        return blocks.decode(entry, dtype or torch.float32)
    return entry.file.read(entry)


def read_joined(parts: list[TensorEntry], place: Place, compute_dtype: torch.dtype) -> StoredTensor:
    """One tensor made of row ranges of checkpoint tensors, in RAM (it is no single byte range of
    the file, so it cannot stay on disk): blocks of one kind are joined as they are (GGUF blocks
    never cross a row) when the place keeps them; otherwise the values are concatenated and
    stored at `place`."""
    blocks = _blocks_codec(parts[0])
    if blocks is not None and keeps_encoded(place.dtype, (parts[0].form, 0)):
        joined = blocks.join(parts)
        if joined is not None:
            return joined
    return store(torch.cat([read_entry(e) for e in parts]), place, compute_dtype)


def logical_shape(entry: TensorEntry) -> tuple[int, ...]:
    """The shape of the tensor an entry holds (for blocks of a form: the values', not the bytes')."""
    return entry.logical_shape if entry.form is not None else entry.shape  # type: ignore[attr-defined]


def read_stored(
    entry: TensorEntry,
    place: Place,
    compute_dtype: torch.dtype,
    workspace: _QuantWorkspace | None = None,
    arena: HostArena | None = None,
) -> StoredTensor:
    """One checkpoint tensor in its storage form at a RAM `place`, bitwise what
    `engine.storage.stored.store` makes of the whole tensor, without ever holding the whole tensor in
    the file's dtype when the place is quantized (FP8, int8, nf4, ...): rows are read and quantized a
    chunk at a time by the form's codec (`Codec.quantize_rows_into`: scales are per row or per group
    within a row, so chunking by rows changes nothing), in reused buffers. With `arena`, the stored
    tensors are views of it (`storage_layout` sized it)."""
    on_cpu = _on_cpu(place)
    if arena is not None and not on_cpu:
        raise ValueError(f"a host arena holds CPU tensors; the place is {place.device}")
    new = arena.take if arena is not None else (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    blocks = _blocks_codec(entry)
    if blocks is not None:
        if keeps_encoded(place.dtype, (entry.form, entry.length)):  # the blocks as they are in the file
            (shape, dtype), = blocks.entry_layout(entry)
            stored = blocks.read_blocks(entry, new(shape, dtype))
            return stored if on_cpu else stored.to_place(place, compute_dtype)
        # another form: decode this one tensor (float32), then store it in that form
        stored = store(read_entry(entry), place, compute_dtype)
        return stored if arena is None else _into_arena(stored, arena)
    target = storage_dtype_for(entry.dtype, entry.shape, place.dtype, compute_dtype)
    codec = _quantizing_codec(entry, target)
    if not (on_cpu and codec is not None):
        if arena is None:
            return store(entry.file.read(entry), place, compute_dtype)
        out = arena.take(entry.shape, target)
        if target == entry.dtype:
            entry.file.read_into(entry, out)
        else:
            out.copy_(entry.file.read(entry))
        return PlainStored(out)
    workspace = workspace or _QuantWorkspace()
    numel = entry.length // entry.dtype.itemsize
    rows = entry.shape[0]
    row_bytes = entry.length // rows
    row_elems = numel // rows
    chunk_rows = max(1, QUANT_CHUNK_BYTES // max(1, row_elems * 4))
    raw, w32 = workspace.get(min(chunk_rows, rows) * row_elems, entry.dtype)
    parts = [new(shape, dtype) for shape, dtype in codec.layout(tuple(entry.shape), target)]
    for r0 in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - r0)
        shape = (n,) + entry.shape[1:]
        part = raw[: n * row_bytes].view(entry.dtype).view(shape)
        entry.file.read_into(entry, part, start=r0 * row_bytes)
        w = w32[: n * row_elems].view(shape)
        w.copy_(part)  # exact upcast, as the whole tensor's .to(float32)
        codec.quantize_rows_into(w, [p[r0 : r0 + n] for p in parts], target)
    return codec.wrap(parts, tuple(entry.shape), target)


def _into_arena(stored: StoredTensor, arena: HostArena) -> StoredTensor:
    """The same stored copy with its parts moved into the arena (in `parts()` order)."""
    views = []
    for _, tensor in stored.parts():
        view = arena.take(tensor.shape, tensor.dtype)
        view.copy_(tensor)
        views.append(view)
    return stored.with_parts(views)


def _on_cpu(place: Place) -> bool:
    return isinstance(place.device, torch.device) and place.device.type == "cpu"


def auto_prefetch(config: VramConfig) -> bool:
    """Default for `prefetch`: read ahead when a core is free for it. With a GPU computing, the
    host threads mostly wait, so yes; with the CPU computing on every core (torch's OpenMP threads
    spin while they wait for work), a reading thread only competes with them: measured on 2 busy
    cores, 2B DiT, no gain (forward 18.5 s with read-ahead vs 11.6 s without in one run, equal
    in a second; docs/loader.md)."""
    device = config.computation_device
    if isinstance(device, torch.device) and device.type != "cpu":
        return True
    return (os.cpu_count() or 1) > torch.get_num_threads()


def _run_converter(converter: Any, target: str, group: list[tuple[str, TensorEntry]], model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers' own WeightConverter on the group's tensors (read when the converter asks)."""
    from copy import deepcopy

    conv = deepcopy(converter)
    for pattern, entry in group:
        conv.add_tensor(target, entry.key, pattern, (lambda e=entry: e.file.read(e)))
    return conv.convert(target, model=model, config=getattr(model, "config", None))


def load_model(
    model_class: type,
    path: str | Path | Sequence[str | Path],
    module_map: Mapping[Any, Any] | None = None,
    vram_config: Mapping[str, Any] | VramConfig | None = None,
    vram_limit: float | None = None,
    *,
    budget: MemoryPool | None = None,
    name: str | None = None,
    onload: bool = True,
    disk_fallback: str = "error",
    prefetch: bool | None = None,
    config_dir: str | Path | None = None,
    cache_dir: str | Path | bool | None = None,
    disk_form: str | None = None,
) -> nn.Module:
    """Build `model_class` from `path` (directory with config.json and .safetensors shards, or a
    list of shards, or a .gguf file / a folder holding one) and manage it like
    `enable_vram_management(model, module_map, vram_config, vram_limit, budget=, name=, onload=)`.
    `config_dir` is the folder with the model's config.json when it is not next to the weights
    (a .gguf file holds weights only: e.g. the base repo's transformer/ folder).

    GGUF (engine.storage.gguf): quantized tensors keep their blocks as they are in the file when
    the offload place's dtype is "gguf" (RAM) or "disk" (streamed from the .gguf file), and are
    dequantized on the computation device; at another RAM dtype each is dequantized once at load
    and stored in that form (logged). Its F32/F16/BF16 tensors are handled like .safetensors ones.

    vram_config's offload place decides where the masters live: a dtype in RAM (bf16: the file's
    bytes; FP8: scaled FP8 quantized tensor by tensor) or "disk" (weights stay in their files and
    stream from there; read ahead on a background thread when `prefetch`, see `auto_prefetch` for
    the default). Tensors that cannot
    stay in a file (a checkpoint key that transformers must merge/split/reshape at load) raise a
    ValueError naming them, or with `disk_fallback="ram"` are stored in RAM in the computation dtype.

    The stored-form cache (engine.storage.form_cache): a RAM load in FP8/int8/NF4, or in bf16 from
    an F32 checkpoint, reads the stored form from the cache file when there is a valid one, else
    quantizes and writes it in the background. Disk offload streams the cached form: `disk_form`
    (a form's name; default: the preparing dtype when it is a form, else the computation dtype)
    is what the masters are stored as in the file, built once before the first step. `cache_dir`:
    the cache root (None: $LOWVRAM_CACHE_DIR, else next to the model's folder); False: no cache.
    """
    if disk_fallback not in ("ram", "error"):
        raise ValueError(f"disk_fallback={disk_fallback!r}: use \"error\" (default) or \"ram\"")
    config = VramConfig.from_dict(vram_config)
    if budget is not None and vram_limit is not None:
        raise ValueError("pass either vram_limit or a shared budget (whose limit applies), not both")
    if budget is None:
        budget = MemoryPool(limit_gb=vram_limit)  # the pool checks the limit, before anything is read
    library = _library_of(model_class)
    weights_dir, shards, index = resolve_checkpoint(path)
    if len(shards) == 1 and is_exported(shards[0]):  # a model exported by tools/quantize.py
        return _load_exported(
            model_class, library, shards[0], Path(config_dir or weights_dir), config, module_map, budget, name, onload, prefetch
        )
    is_gguf = any(isinstance(s, GgufFile) for s in shards)
    if config_dir is None:
        if is_gguf and not (weights_dir / "config.json").is_file():
            raise CheckpointError(
                f"{shards[0].path}: a .gguf file holds weights only; pass config_dir= (the folder with "
                f"{model_class.__name__}'s config.json, e.g. the base repo's transformer/ folder)"
            )
        config_dir = weights_dir
    config_dir = Path(config_dir)
    for shard in shards:
        if isinstance(shard, GgufFile):
            check_architecture(shard, model_class)
    entries = collect_entries(shards, index)
    comp_dtype = config.computation_dtype
    offload_place = config.place("offload")

    model: nn.Module | None = build_empty(model_class, config_dir, comp_dtype)
    masters: dict[int, StoredTensor] = {}
    try:
        joined: dict[str, list[TensorEntry]] = {}  # targets made of several row ranges (FLUX GGUF)
        layout = original_layout(model_class, entries) if is_gguf else None  # FLUX's BFL, Z-Image's own names
        if is_gguf:
            if layout is not None:
                entries, joined = layout.map(entries, model)
            else:
                entries = map_gguf_keys(entries, set(model.state_dict().keys()) | {n for n, _ in model.named_parameters()})
            quantized = [e for e in entries.values() if e.form is not None]
            if quantized and not offload_place.on_disk and not keeps_encoded(offload_place.dtype, (quantized[0].form, 0)):
                log.warning(
                    "%s: %d GGUF-quantized tensors are dequantized at load and stored as %s (offload_dtype); "
                    "use offload_dtype \"%s\" to keep the file's blocks, or \"disk\" to stream them from the file",
                    shards[0].path.name, len(quantized), offload_place.dtype, quantized[0].form,
                )
        plan = map_keys(model, library, entries)
        params = dict(model.named_parameters(remove_duplicate=False))
        persistent = dict(model.state_dict(keep_vars=True))
        buffers = {n: b for n, b in persistent.items() if n not in params}
        sources = set(plan.direct) | set(joined)
        for target, (converter, _group) in plan.converted.items():
            sources.update(converter_targets(target, converter, params))

        # ties: the library's own tie_weights (symmetric when one side is missing), then group by identity
        params, groups = _tied_parameter_groups(model, library, params, set(sources))

        ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None)
        ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
        missing = [ns[0] for ns in groups.values() if not any(n in sources for n in ns) and not all(_ignored(n, ignore_missing) for n in ns)]
        unexpected = [k for k in plan.unexpected if not _ignored(k, ignore_unexpected)]
        mismatched = []
        for n, parts in joined.items():
            got = (sum(logical_shape(e)[0] for e in parts),) + tuple(logical_shape(parts[0])[1:])
            want = params[n].shape if n in params else buffers[n].shape
            if tuple(want) != got:
                mismatched.append(f"{n}: checkpoint {list(got)} (joined from {parts[0].key.split('[')[0]}) vs model {list(want)}")
        for n, entry in plan.direct.items():
            want = params[n].shape if n in params else buffers[n].shape
            if tuple(want) != logical_shape(entry):
                mismatched.append(f"{n}: checkpoint {list(logical_shape(entry))} in {entry.file.path.name} vs model {list(want)}")
        problems = []
        if missing:
            problems.append(f"missing key(s) (parameters with no tensor in the checkpoint): {_listing(sorted(missing))}")
            if layout is not None and (absent := layout.names_for(model, missing)):
                problems[-1] += f" (read from {layout.description} tensor(s) the file lacks: {_listing(absent)})"
        if unexpected:
            problems.append(f"unexpected key(s) (checkpoint tensors the model has no place for): {_listing(sorted(unexpected))}")
        if mismatched:
            problems.append(f"shape mismatch (does config.json match these weights?): {_listing(mismatched, 6)}")
        if problems:
            raise CheckpointError(
                f"{model_class.__name__} from {config_dir}: " + "; ".join(problems)
            )
        if plan.converted and config.uses_disk:
            keys = [e.key for _, (c, g) in sorted(plan.converted.items()) for _, e in g]
            ops = sorted({type(op).__name__ for c, _ in plan.converted.values() for op in c.operations})
            why = (
                f"{len(keys)} checkpoint tensor(s) of {model_class.__name__} need a conversion at load ({', '.join(ops)}) "
                f"that changes their bytes, so they cannot be streamed from the file: {_listing(keys, 6)}"
            )
            if disk_fallback == "error":
                raise CheckpointError(why + ". Pass disk_fallback=\"ram\" to keep those in RAM, or use a RAM offload_dtype.")
            log.warning("%s; keeping them in RAM (%s) as disk_fallback=\"ram\" asks.", why, comp_dtype)

        managed_ids = {id(p) for _, module, _ in _plan_wrappers(model, module_map) for p in module._parameters.values() if p is not None}
        ram_place = offload_place if not offload_place.on_disk else Place(torch.device("cpu"), comp_dtype)

        # --- 4. stream, shard by shard in file order
        to_read: list[tuple[int, TensorEntry]] = []  # managed parameters whose masters live in RAM
        names: dict[int, str] = {}  # their names (the stored-form cache's tensors)
        on_disk: list[tuple[int, str, TensorEntry]] = []  # managed parameters left in a .safetensors file
        for n, entry in _by_file_order(plan.direct.items()):
            if n in buffers:
                old = buffers[n]
                value = read_entry(entry)
                _set_tensor(model, n, value.to(old.dtype) if old.is_floating_point() and value.is_floating_point() else value)
                continue
            p = params[n]
            if id(p) in masters:  # tied and both present in the checkpoint: loaded once
                continue
            if id(p) not in managed_ids:
                value = read_entry(entry, comp_dtype)
                _set_tensor(model, n, nn.Parameter(value, requires_grad=False) if value.is_floating_point() else value)
                masters[id(p)] = None  # type: ignore[assignment]
                continue
            if offload_place.on_disk:
                blocks = _blocks_codec(entry)
                masters[id(p)] = blocks.disk_master(entry) if blocks is not None else DiskStored(entry)
                if blocks is None:
                    on_disk.append((id(p), n, entry))
            else:
                masters[id(p)] = None  # type: ignore[assignment]  # read below, into the arena
                to_read.append((id(p), entry))
                names[id(p)] = n
        cache = None if not cache_enabled(cache_dir) or is_gguf else _CachePlan.make(
            shards, weights_dir, cache_dir, comp_dtype,
            *((_disk_form(config, disk_form), [(n, e) for _, n, e in on_disk]) if offload_place.on_disk
              else (offload_place.dtype, [(names[k], e) for k, e in to_read] if _on_cpu(offload_place) else [])),
        )
        if cache is not None and offload_place.on_disk:
            cached = cache.disk_masters()
            for key, n, _entry in on_disk:
                if n in cached:
                    masters[key] = cached[n]
        arena = None
        if to_read and _on_cpu(offload_place):
            arena = HostArena(layout_bytes([part for _, e in to_read for part in storage_layout(e, offload_place, comp_dtype)]))
        workspace = _QuantWorkspace()
        cached_file = cache.open() if cache is not None and not offload_place.on_disk else None
        if cache is not None and cached_file is None and not offload_place.on_disk:
            log.warning("%s: %s", cache.component, cache.first_time_note())
        for key, entry in to_read:
            if cached_file is not None and names[key] in cached_file.items:
                new = arena.take if arena is not None else (lambda shape, dtype: torch.empty(shape, dtype=dtype))
                masters[key] = cached_file.read_stored(names[key], new)  # as stored: no quantization
            else:
                masters[key] = read_stored(entry, offload_place, comp_dtype, workspace, arena)
        if cached_file is not None:
            cached_file.close()
        for target, parts in joined.items():  # row ranges in another order than the file's
            # on "disk" these few tensors are kept in RAM, as GGUF blocks where they are blocks
            kept = Place(torch.device("cpu"), parts[0].form or comp_dtype)
            value = read_joined(parts, kept if offload_place.on_disk else offload_place, comp_dtype)
            p = params.get(target)
            if p is None or id(p) not in managed_ids:
                tensor = value.materialize(torch.device("cpu"), comp_dtype)
                _set_tensor(model, target, nn.Parameter(tensor, requires_grad=False) if p is not None else tensor)
                if p is not None:
                    masters[id(p)] = None  # type: ignore[assignment]
            else:
                masters[id(p)] = value
        for target, (converter, group) in sorted(plan.converted.items()):
            for full, tensor in _run_converter(converter, target, group, model).items():
                if full not in params:
                    raise CheckpointError(f"converting {[e.key for _, e in group]} produced {full!r}, which {model_class.__name__} does not have")
                p = params[full]
                if tuple(p.shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{full}: converted checkpoint tensor is {list(tensor.shape)}, model wants {list(p.shape)}")
                if id(p) not in managed_ids:
                    _set_tensor(model, full, nn.Parameter(tensor, requires_grad=False))
                    masters[id(p)] = None  # type: ignore[assignment]
                else:
                    masters[id(p)] = store(tensor, ram_place, comp_dtype)
                del tensor

        del workspace
        release_free_heap()
        written_parts = {}
        if cache is not None and not offload_place.on_disk and cached_file is None:
            written_parts = {k: masters[k].parts() for k, _ in to_read if names[k] in cache.names}

        def master_factory(full_name: str, param: torch.Tensor) -> StoredTensor:
            stored = masters.get(id(param))
            if stored is None:
                raise CheckpointError(f"{full_name}: no tensor was loaded for this parameter")
            return stored

        enable_vram_management(
            model,
            module_map,
            config,
            budget=budget,
            name=name,
            onload=onload,
            master_factory=master_factory,
            host_arena=arena,
        )
        masters.clear()
        _attach_disk_prefetcher(model, config, prefetch)
        model._vram_checkpoint = [s.path for s in shards]  # type: ignore[attr-defined]
        model._vram_form_cache = None  # type: ignore[attr-defined]
        if cache is not None and not offload_place.on_disk and cached_file is None:
            # written from the masters themselves (no copy), while the model runs
            parts = {names[k]: [t for _, t in stored_parts] for k, stored_parts in written_parts.items()}
            model._vram_form_cache = cache.write_in_background(parts)  # type: ignore[attr-defined]
        elif cache is not None:
            model._vram_form_cache = cache  # type: ignore[attr-defined]
        return model
    except BaseException as exc:
        # Nothing half-loaded survives: drop every master read so far, the model itself and the
        # host arena, even while the caller holds the exception (its traceback keeps the frames)
        masters.clear()
        model = arena = workspace = None  # noqa: F841  (the traceback keeps this frame too)
        _clear_failed_frames(exc)
        for s in shards:
            s.close()
        gc.collect()
        release_free_heap()
        raise


def _disk_form(config: VramConfig, disk_form: str | None) -> torch.dtype | str:
    """The place dtype disk-offloaded masters are stored in: `disk_form` (a form's name), else the
    preparing dtype when it is a form (a GPU run stores its resident copies in it), else the
    computation dtype (an F32 checkpoint then streams bf16)."""
    if disk_form is not None:
        form = get_form(disk_form)
        if form.from_file:
            return config.computation_dtype
        return form_value(form) if form.quantized else config.computation_dtype
    if config.place("preparing").is_quantized:
        return config.preparing_dtype
    return config.computation_dtype


class _CachePlan:
    """The stored-form cache of one load: which tensors, the file's key and path."""

    def __init__(self, shards, folder: Path, component: str, form: str, place_dtype, comp_dtype, items: list[CacheItem]):
        self.shards = shards
        self.component = component
        self.form = form
        self.place_dtype = place_dtype
        self.comp_dtype = comp_dtype
        self.items = items
        self.names = {i.name for i in items}
        self.key = cache_key(shards, form, place_dtype, comp_dtype, items)
        self.path = cache_path(folder, component, form, self.key)
        self.writer: BackgroundWrite | None = None
        self.note: str | None = None  # why there is no cache (read-only folder, full disk)

    @classmethod
    def make(cls, shards, weights_dir: Path, cache_dir, comp_dtype: torch.dtype, place_dtype, named: list[tuple[str, TensorEntry]]) -> "_CachePlan | None":
        """The plan when some tensors take another form than the file's (quantized, or cast from
        a wider dtype), else None."""
        items = []
        place = Place(torch.device("cpu"), place_dtype)
        for name, entry in named:
            if not entry.dtype.is_floating_point or entry.form is not None:
                continue
            target = storage_dtype_for(entry.dtype, entry.shape, place_dtype, comp_dtype)
            if target == entry.dtype:
                continue
            layout = tuple((tuple(shape), dtype) for shape, dtype in storage_layout(entry, place, comp_dtype))
            items.append(CacheItem(name, entry, target, layout))
        if not items:
            return None
        form = find_form(place_dtype)
        form_name = form.name if form is not None else storage_name(place_dtype)
        try:
            folder = cache_dir_for(weights_dir, cache_dir if isinstance(cache_dir, (str, Path)) else None)
            return cls(shards, folder, component_name(weights_dir), form_name, place_dtype, comp_dtype, items)
        except OSError as e:
            log.warning("no stored-form cache for %s (%s); the run goes on", weights_dir, e)
            return None

    def first_time_note(self) -> str:
        verb = "quantizing" if find_form(self.place_dtype) is not None and find_form(self.place_dtype).quantized else "converting"
        return f"{verb} to {self.form} (once), then cached in {self.path.parent}"

    def open(self) -> CacheFile | None:
        return open_cache(self.path, self.key, self.items)

    def write_in_background(self, parts: dict[str, list[torch.Tensor]]) -> BackgroundWrite:
        self.writer = BackgroundWrite(self.path, self.items, self.key, self.form, parts)
        return self.writer

    def join(self, timeout: float | None = None) -> bool:
        """Wait for a background write (True when none is running)."""
        return self.writer.join(timeout) if self.writer is not None else True

    def disk_masters(self) -> dict[str, DiskStored]:
        """Disk offload: the cached masters, the file built first when it is not there (one
        tensor quantized at a time, written, dropped); {} when it cannot be (noted)."""
        cached = self.open()
        if cached is None:
            log.warning("%s: %s", self.component, self.first_time_note())
            place = Place(torch.device("cpu"), self.place_dtype)
            workspace = _QuantWorkspace()
            try:
                write_cache(self.path, self.items, self.key, self.form,
                            lambda item: [t for _, t in read_stored(item.entry, place, self.comp_dtype, workspace).parts()])
            except CacheUnavailable as e:
                self.note = str(e)
                log.warning("the stored form is not cached, disk offload streams the checkpoint's own files: %s", e)
                return {}
            finally:
                del workspace
                release_free_heap()
            cached = self.open()
            if cached is None:
                return {}
        return {name: cached.disk_master(name) for name in cached.items}


def export_component(
    model_class: type, path: str | Path, out_file: str | Path, weights: str, computation_dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write one component in the storage form `weights` ("fp8", "int8", "nf4", "bf16") as a
    stored-form file that loads on its own (`load_model` on it needs no original shards): every
    tensor of the component, named as the model's parameters and buffers, the managed weight
    matrices in the form (bitwise what a load in that form stores), the rest as a load keeps
    them. One tensor is quantized, written and dropped at a time."""
    library = _library_of(model_class)
    weights_dir, shards, index = resolve_checkpoint(path)
    if any(isinstance(s, GgufFile) for s in shards):
        raise CheckpointError(f"{shards[0].path}: a GGUF checkpoint is quantized already; export its base model's .safetensors instead")
    if len(shards) == 1 and is_exported(shards[0]):
        raise CheckpointError(f"{shards[0].path}: already an exported stored form; export the original checkpoint")
    entries = collect_entries(shards, index)
    model = build_empty(model_class, weights_dir, computation_dtype)
    plan = map_keys(model, library, entries)
    if plan.converted:
        raise CheckpointError(f"{model_class.__name__}: tensors that need a conversion at load cannot be exported ({_listing(sorted(plan.converted), 4)})")
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {n for n in model.state_dict(keep_vars=True) if n not in params}
    managed_ids = {id(p) for _, module, _ in _plan_wrappers(model, None) for p in module._parameters.values() if p is not None}
    form = get_form(weights)
    if form.from_file:
        raise CheckpointError(f"--weights {weights}: a file's own blocks cannot be made; choose one of fp8, int8, nf4, bf16")
    place = Place(torch.device("cpu"), form_value(form) if form.quantized else computation_dtype)
    items, seen, managed = [], set(), set()
    for n, entry in _by_file_order(plan.direct.items()):
        if n not in buffers:
            if id(params[n]) in seen:
                continue
            seen.add(id(params[n]))
        if n not in buffers and id(params[n]) in managed_ids:
            target = storage_dtype_for(entry.dtype, entry.shape, place.dtype, computation_dtype)
            layout = tuple((tuple(sh), dt) for sh, dt in storage_layout(entry, place, computation_dtype))
            managed.add(n)
        else:
            target, layout = entry.dtype, ((tuple(entry.shape), entry.dtype),)
        items.append(CacheItem(n, entry, target, layout))
    workspace = _QuantWorkspace()

    def parts_of(item: CacheItem) -> list[torch.Tensor]:
        if item.name in managed:
            return [t for _, t in read_stored(item.entry, place, computation_dtype, workspace).parts()]
        return [item.entry.file.read(item.entry)]

    key = cache_key(shards, form.name, place.dtype, computation_dtype, items)
    out = write_cache(Path(out_file), items, key, form.name, parts_of, extra={EXPORT_KEY: "1", "lowvram.class": model_class.__name__})
    for shard in shards:
        shard.close()
    return out


def _load_exported(
    model_class: type, library: str, shard: SafetensorsFile, config_dir: Path, config: VramConfig,
    module_map: Mapping[Any, Any] | None, budget: MemoryPool, name: str | None, onload: bool, prefetch: bool | None,
) -> nn.Module:
    """`load_model` of a file `export_component` wrote: the stored form is taken as it is where
    the offload place keeps it (streamed from the file on "disk"), converted otherwise."""
    stored_file = open_exported(shard)
    comp_dtype = config.computation_dtype
    offload_place = config.place("offload")
    model = build_empty(model_class, config_dir, comp_dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {n: b for n, b in model.state_dict(keep_vars=True).items() if n not in params}
    params, groups = _tied_parameter_groups(model, library, params, set(stored_file.items))
    missing = [ns[0] for ns in groups.values() if not any(n in stored_file.items for n in ns)]
    unexpected = [n for n in stored_file.items if n not in params and n not in buffers]
    if missing or unexpected:
        raise CheckpointError(
            f"{shard.path} was not exported from a {model_class.__name__} of this config.json: "
            f"missing {_listing(sorted(missing), 6) or 'nothing'}; unexpected {_listing(sorted(unexpected), 6) or 'nothing'}"
        )
    managed_ids = {id(p) for _, module, _ in _plan_wrappers(model, module_map) for p in module._parameters.values() if p is not None}
    masters: dict[int, StoredTensor | None] = {}
    new = lambda shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731
    for n, item in stored_file.items.items():
        if n in buffers:
            old = buffers[n]
            value = stored_file.read_stored(n, new).tensor  # type: ignore[attr-defined]
            _set_tensor(model, n, value.to(old.dtype) if old.is_floating_point() and value.is_floating_point() else value)
            continue
        p = params[n]
        if id(p) in masters:
            continue
        if id(p) not in managed_ids:
            value = stored_file.read_stored(n, new).tensor  # type: ignore[attr-defined]
            _set_tensor(model, n, nn.Parameter(value, requires_grad=False) if value.is_floating_point() else value)
            masters[id(p)] = None
        elif offload_place.on_disk:
            masters[id(p)] = stored_file.disk_master(n)
        else:
            stored = stored_file.read_stored(n, new)
            wanted = storage_dtype_for(torch.bfloat16, item.entry.shape, offload_place.dtype, comp_dtype)
            keep = (wanted == item.target) and _on_cpu(offload_place)
            masters[id(p)] = stored if keep else stored.to_place(offload_place, comp_dtype)

    def master_factory(full_name: str, param: torch.Tensor) -> StoredTensor:
        stored = masters.get(id(param))
        if stored is None:
            raise CheckpointError(f"{full_name}: no tensor was loaded for this parameter")
        return stored

    enable_vram_management(model, module_map, config, budget=budget, name=name, onload=onload, master_factory=master_factory)
    masters.clear()
    _attach_disk_prefetcher(model, config, prefetch)
    model._vram_checkpoint = [shard.path]  # type: ignore[attr-defined]
    model._vram_form_cache = None  # type: ignore[attr-defined]
    return model


def _tied_parameter_groups(
    model: nn.Module, library: str, params: dict[str, nn.Parameter], in_file: set[str]
) -> tuple[dict[str, nn.Parameter], dict[int, list[str]]]:
    """Tie a transformers model's weights the file leaves out (an lm head that is the embedding),
    then group parameter names by the tensor they share: (parameters, id -> names)."""
    if library == "transformers" and hasattr(model, "tie_weights"):
        try:
            model.tie_weights(missing_keys={n for n in params if n not in in_file}, recompute_mapping=False)
        except TypeError:  # older signature
            model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))
    groups: dict[int, list[str]] = defaultdict(list)
    for n, p in params.items():
        groups[id(p)].append(n)
    return params, groups


def _attach_disk_prefetcher(model: nn.Module, config: Any, prefetch: bool | None) -> None:
    """Read ahead from disk (loading.prefetch) for a model whose masters stay in their files;
    `prefetch` None: what `auto_prefetch` says for the config."""
    if prefetch is None:
        prefetch = auto_prefetch(config)
    if prefetch and config.uses_disk:
        runtime = runtime_of(model)
        if any(isinstance(s, DiskStored) for r in runtime.layers for s in r.masters.values()):
            runtime.prefetcher = DiskPrefetcher(runtime)


def _clear_failed_frames(exc: BaseException) -> None:
    """Drop the locals of the frames below the one handling `exc` (read_stored, read_into, ...):
    they finished, but the traceback keeps them, and with them views of the partly filled host
    arena, which keep its whole mapping alive. Line numbers stay; only their locals go."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        traceback.clear_frames(tb.tb_next)


def converter_targets(target: str, converter: Any, params: Mapping[str, Any]) -> list[str]:
    """Model names a converter fills (its first target plus siblings named by its target patterns)."""
    out = [target]
    pats = list(getattr(converter, "target_patterns", []) or [])
    for a in pats:
        for b in pats:
            if a != b and a in target:
                sibling = target.replace(a, b)
                if sibling in params:
                    out.append(sibling)
    return out


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) or not value.is_floating_point() else nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value
