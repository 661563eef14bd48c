"""GGUF checkpoints: their blocks kept as they are in the file, dequantized on the computation device.

A .gguf file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is parsed with the
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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import GGUF, Place
from engine.storage.disk import CheckpointError, DiskStored, SafetensorsFile, TensorEntry
from engine.storage.stored import PlainStored, StoredTensor, store

#: rows are dequantized in chunks of about this many values
CHUNK_VALUES = 1 << 22

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError("reading .gguf files needs the `gguf` package (pip install gguf)") from e
    return gguf


def _dequantizers() -> dict:
    from diffusers.quantizers.gguf.utils import dequantize_functions

    gguf = _gguf()
    return {gguf.GGMLQuantizationType(k).name: fn for k, fn in dequantize_functions.items() if gguf.GGMLQuantizationType(k).name != "BF16"}


def supported_types() -> list[str]:
    """Quantization types whose blocks are kept and dequantized on the computation device."""
    return sorted(_dequantizers())


@dataclass(frozen=True)
class GgufEntry(TensorEntry):
    """A quantized GGUF tensor: `dtype`/`shape` describe its bytes (uint8, [rows, bytes per
    row]); `qtype` and `logical_shape` what they stand for."""

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


class GgufStored(StoredTensor):
    """A GGUF tensor's blocks, as in the file, in RAM or on the computation device."""

    form = GGUF

    def __init__(self, blocks: torch.Tensor, qtype: str, shape: tuple[int, ...] | torch.Size):
        self.blocks = blocks
        self.qtype = qtype
        self.shape = torch.Size(shape)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @property
    def gguf_nbytes(self) -> int:
        return self.blocks.nbytes

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def storage_dtype(self) -> str:
        return f"gguf:{self.qtype}"

    def materialize(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.blocks.to(device), self.qtype, self.shape, dtype)

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["blocks"], self.qtype, self.shape, dtype)

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        return _gguf_to_place(self, lambda: self.blocks, place, compute_dtype)

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("blocks", self.blocks)]

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
    def gguf_nbytes(self) -> int:
        return self.entry.length

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
        return _gguf_to_place(self, self.read, place, compute_dtype)

    def __repr__(self) -> str:
        e = self.entry
        return f"GgufDiskStored({str(e.file.path)!r}, {e.key!r}, {e.qtype}, {list(self.shape)}, offset={e.offset})"


def _gguf_to_place(stored: StoredTensor, blocks, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
    if place.dtype == GGUF:
        data = blocks()
        if isinstance(stored, GgufStored) and data.device == place.device:
            return stored
        return GgufStored(data.to(place.device), stored.qtype, stored.shape)  # type: ignore[attr-defined]
    if place.is_quantized:  # another form: requantize from the float32 values
        return store(dequantize(blocks(), stored.qtype, stored.shape, torch.float32), place, compute_dtype)  # type: ignore[attr-defined]
    return PlainStored(dequantize(blocks().to(place.device), stored.qtype, stored.shape, place.dtype))  # type: ignore[attr-defined]


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


# --- key mapping ---------------------------------------------------------------------------------
#: prefixes ComfyUI-style files put before the model's own names
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
#: `general.architecture` values the published image-model GGUFs use (city96's convert.py and
#: the files derived from it), per diffusers class; another value is another architecture
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "QwenImageTransformer2DModel": ("qwen_image", "qwenimage"),
    "FluxTransformer2DModel": ("flux",),
    "ZImageTransformer2DModel": ("lumina2", "z_image", "zimage"),
    "Flux2Transformer2DModel": ("flux2",),
    "UNet2DConditionModel": ("sdxl", "sd1"),
}


def check_architecture(file: GgufFile, model_class: type) -> None:
    """A GGUF whose `general.architecture` names another model than `model_class` is refused
    before anything is read (the key check would catch it too, less clearly)."""
    arch = getattr(file, "architecture", None)
    wanted = ARCHITECTURES.get(model_class.__name__)
    if arch is None or wanted is None:
        return
    if arch.lower() not in wanted:
        owners = [cls for cls, names in ARCHITECTURES.items() if arch.lower() in names]
        hint = f" (a {owners[0]} checkpoint)" if owners else ""
        raise CheckpointError(
            f"{file.path}: this GGUF is for architecture {arch!r}{hint}, not {model_class.__name__} "
            f"(expected general.architecture {' or '.join(map(repr, wanted))}): choose the GGUF file made for this model"
        )


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


def _flux_sources(model) -> dict[str, list[tuple[str, int, int]]]:
    """diffusers name -> [(BFL name, first row, end row)] for FluxTransformer2DModel: the layout of
    BFL's own checkpoints, which the published FLUX GGUFs keep (diffusers'
    convert_flux_transformer_checkpoint_to_diffusers does the same on tensors)."""
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = model.single_transformer_blocks[0].proj_mlp.out_features if cfg.num_single_layers else 4 * inner
    out: dict[str, list[tuple[str, int, int]]] = {}

    def whole(target: str, source: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = [(f"{source}.{kind}", 0, -1)]

    def rows(target: str, source: str, r0: int, r1: int) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = [(f"{source}.{kind}", r0, r1)]

    for a, b in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in")):
        whole(f"time_text_embed.{a}.linear_1", f"{b}.in_layer")
        whole(f"time_text_embed.{a}.linear_2", f"{b}.out_layer")
    whole("context_embedder", "txt_in")
    whole("x_embedder", "img_in")
    for i in range(cfg.num_layers):
        t, s = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        whole(t + "norm1.linear", s + "img_mod.lin")
        whole(t + "norm1_context.linear", s + "txt_mod.lin")
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            rows(t + f"attn.{name}", s + "img_attn.qkv", j * inner, (j + 1) * inner)
        for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            rows(t + f"attn.{name}", s + "txt_attn.qkv", j * inner, (j + 1) * inner)
        for target, source in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                               ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[t + f"attn.{target}.weight"] = [(s + f"{source}.scale", 0, -1)]
        whole(t + "ff.net.0.proj", s + "img_mlp.0")
        whole(t + "ff.net.2", s + "img_mlp.2")
        whole(t + "ff_context.net.0.proj", s + "txt_mlp.0")
        whole(t + "ff_context.net.2", s + "txt_mlp.2")
        whole(t + "attn.to_out.0", s + "img_attn.proj")
        whole(t + "attn.to_add_out", s + "txt_attn.proj")
    for i in range(cfg.num_single_layers):
        t, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        whole(t + "norm.linear", s + "modulation.lin")
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            rows(t + name, s + "linear1", j * inner, (j + 1) * inner)
        rows(t + "proj_mlp", s + "linear1", 3 * inner, 3 * inner + mlp)
        out[t + "attn.norm_q.weight"] = [(s + "norm.query_norm.scale", 0, -1)]
        out[t + "attn.norm_k.weight"] = [(s + "norm.key_norm.scale", 0, -1)]
        whole(t + "proj_out", s + "linear2")
    whole("proj_out", "final_layer.linear")
    # BFL's final modulation is [shift, scale]; diffusers' AdaLayerNormContinuous wants [scale, shift]
    for kind in ("weight", "bias"):
        out[f"norm_out.linear.{kind}"] = [(f"final_layer.adaLN_modulation.1.{kind}", inner, 2 * inner),
                                          (f"final_layer.adaLN_modulation.1.{kind}", 0, inner)]
    return out


def map_flux_keys(entries: dict[str, TensorEntry], model) -> tuple[dict[str, TensorEntry], dict[str, list[TensorEntry]]]:
    """BFL-named FLUX GGUF tensors -> diffusers names: fused qkv (and single blocks' qkv+mlp) are
    split into row ranges of the same file bytes; the final modulation's two halves swap, which
    is no single byte range: those targets come back in `joined` (row ranges to concatenate at
    load, kept in RAM). Source tensors no target uses stay under their own names (reported as
    unexpected); targets whose sources are missing are left out (reported as missing)."""
    stripped = {}
    for key, entry in entries.items():
        name = key
        for prefix in PREFIXES:
            if key.startswith(prefix):
                name = key[len(prefix):]
                break
        stripped[name] = entry
    direct: dict[str, TensorEntry] = {}
    joined: dict[str, list[TensorEntry]] = {}
    used: set[str] = set()
    for target, parts in _flux_sources(model).items():
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


def map_gguf_keys(entries: dict[str, TensorEntry], model_names: set[str]) -> dict[str, TensorEntry]:
    """GGUF tensor names -> the model's names. The published Qwen-Image GGUFs use diffusers' own
    module names (the original checkpoint is in diffusers format), some with a ComfyUI prefix
    (`model.diffusion_model.`): the prefix is dropped where that makes a model name. Names that
    match nothing are kept as they are (the loader reports them as unexpected keys). FLUX files
    with BFL names go through `map_flux_keys` instead."""
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
