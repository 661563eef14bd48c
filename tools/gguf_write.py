"""Write .gguf files from tensors with the `gguf` package's GGUFWriter (for tests and benchmarks).

`write_gguf` writes real data; `write_sparse_gguf` writes the header and tensor infos of any
tensors (name, shape, type) and leaves their data a file hole (sparse replicas, tools/gguf_replica.py).

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 are quantized by the gguf package itself. It has no quantizer for
the K-quants, so `quantize_q4_k` is a plain min/max one (one scale and min per 32 values, 6-bit
sub-scales per 256; llama.cpp's quantizer searches scales and does better), and `random_blocks`
makes valid blocks of any type with small, finite scales (enough to test loading and bitwise
dequantization; they are not the tensor's values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks (uint8 [rows, row/256*144]) of a float32 [rows, n] array, n % 256 == 0."""
    rows, n = x.shape
    sb = x.reshape(-1, 8, 32).astype(np.float32)  # super-blocks of 8 sub-blocks of 32
    xmin = np.minimum(sb.min(axis=2), 0)
    xmax = sb.max(axis=2)
    scale = (xmax - xmin) / 15
    mins = -xmin
    d = (scale.max(axis=1) / 63).astype(np.float16)
    dmin = (mins.max(axis=1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32[:, None] > 0, np.rint(mins / dmin32[:, None]), 0).clip(0, 63).astype(np.uint8)
        s = d32[:, None] * sc
        mm = dmin32[:, None] * m
        q = np.where(s[:, :, None] > 0, np.rint((sb + mm[:, :, None]) / s[:, :, None]), 0).clip(0, 15).astype(np.uint8)
    scales = np.zeros((sb.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)  # sub-blocks 2k (low) and 2k+1 (high)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return blocks.reshape(rows, -1)


def random_blocks(qtype_name: str, rows: int, n: int, seed: int = 0, d: float = 0.0005) -> np.ndarray:
    """Valid blocks of `qtype_name` for a [rows, n] tensor: random quants, scales ~`d` (finite)."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype_name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows * n // block, size), dtype=np.uint8)
    sane = lambda: np.abs(rng.normal(d, d / 4, b.shape[0])).astype(np.float16).view(np.uint8).reshape(-1, 2)  # noqa: E731
    if qtype_name in ("Q6_K", "Q3_K"):
        b[:, size - 2 :] = sane()
    elif qtype_name == "Q2_K":
        b[:, size - 4 : size - 2] = sane()
        b[:, size - 2 :] = sane()
    elif qtype_name in ("Q4_K", "Q5_K", "Q4_1", "Q5_1"):
        b[:, 0:2] = sane()
        b[:, 2:4] = sane()
    else:  # Q8_0, Q4_0, Q5_0, IQ4_NL, IQ4_XS: d first
        b[:, 0:2] = sane()
    return b.reshape(rows, -1)


def quantize(x: np.ndarray, qtype_name: str, seed: int = 0) -> np.ndarray:
    """Blocks of `x` (float32, [rows, n]) in `qtype_name`: the gguf package's quantizer where it
    has one, `quantize_q4_k` for Q4_K, else valid random blocks (see the module doc)."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name == "Q4_K":
        return quantize_q4_k(x)
    try:
        return gguf.quants.quantize(x.astype(np.float32), qt)
    except NotImplementedError:
        return random_blocks(qtype_name, x.shape[0], x.shape[1], seed)


def write_gguf(
    path: str | Path,
    tensors: Mapping[str, np.ndarray],
    qtype_for: "Mapping[str, str] | None" = None,
    architecture: str = "qwen_image",
    prefix: str = "",
) -> Path:
    """Write `tensors` (float arrays, torch layout) to `path`. `qtype_for[name]` quantizes a
    2-D+ tensor (flattened to [rows, last dim]) in that type; others are written as they are."""
    import gguf

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    for name, array in tensors.items():
        qname = (qtype_for or {}).get(name)
        if qname:
            qt = gguf.GGMLQuantizationType[qname]
            flat = array.reshape(-1, array.shape[-1]).astype(np.float32)
            blocks = quantize(flat, qname, seed=hash(name) % 1000).reshape(*array.shape[:-1], -1)
            writer.add_tensor(prefix + name, blocks, raw_shape=blocks.shape, raw_dtype=qt)
        else:
            writer.add_tensor(prefix + name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_sparse_gguf(
    path: str | Path,
    tensors: Sequence[tuple[str, tuple[int, ...], str]],
    architecture: str,
    name: str | None = None,
    file_type: int | None = None,
) -> int:
    """A .gguf file whose header, metadata and tensor infos are real and whose data is a hole.

    `tensors`: (name, torch-order shape, GGML type name: "Q4_K", "Q8_0", "BF16", "F32", ...) in
    file order. `file_type`: llama.cpp's `general.file_type` (gguf.LlamaFileType). Returns the
    file's size (what the tensors' data plus the header take, as the real file would)."""
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    if name:
        writer.add_name(name)
    if file_type is not None:
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    align = writer.data_alignment
    data = 0
    for key, shape, qname in tensors:
        qt = gguf.GGMLQuantizationType[qname]
        block, type_size = gguf.GGML_QUANT_SIZES[qt]
        if shape[-1] % block:
            raise ValueError(f"{key}: rows of {shape[-1]} values do not split into {qname} blocks of {block}")
        nbytes = math.prod(shape) // block * type_size
        if block > 1:  # a quantized type: the writer takes the byte shape [..., bytes per row]
            writer.add_tensor_info(key, (*shape[:-1], shape[-1] // block * type_size), np.dtype(np.uint8), nbytes, raw_dtype=qt)
        else:
            writer.add_tensor_info(key, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        data += gguf.GGUFWriter.ggml_pad(nbytes, align)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    (f,) = writer.fout
    f.flush()
    size = gguf.GGUFWriter.ggml_pad(f.tell(), align) + data
    f.truncate(size)  # the data: a hole
    writer.close()
    return size
