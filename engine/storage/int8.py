"""Symmetric int8 storage (the "int8" form, engine.storage.forms): one float32 scale per output channel.

Each output channel (row of a weight matrix, first dimension of a kernel) is divided by
`amax / 127` and rounded to the nearest integer in [-127, 127]; the scale (float32, shape
[out, 1, ...]) multiplies back where the layer computes. dequantizing computes `data * scale` in float32 and
rounds once to the computation dtype (`dequantize`). Measured relative output error on
Linear(3072, 3072): ~0.009 at every weight scale (README table; `bench/bench_engine.py`). Bytes:
1 per weight + 4 per output channel.
"""

from __future__ import annotations

import math

import torch

from engine.storage.forms import INT8
from engine.storage.stored import RowScaledCodec, RowScaledStored, row_scale_shape

QMAX = 127
#: rows are dequantized in chunks of about this many values (float32 temporaries stay small)
CHUNK_VALUES = 1 << 22


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`data * scale` in float32, rounded once to `dtype`, on `data`'s device, in row chunks.
    (Rounding the scale to bf16 first is a gain error of up to 0.4% per row, the same for every
    weight of it: measured on a Qwen-Image block, 0.0169 relative output error against 0.0165.)"""
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    rows = data.shape[0]
    per_row = max(1, data[0].numel()) if rows else 1
    step = max(1, CHUNK_VALUES // per_row)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out[r0:r1] = data[r0:r1].to(torch.float32).mul_(scale[r0:r1].to(torch.float32))
    return out


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 data, float32 per-row scale) with data * scale ~= weight."""
    data = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(row_scale_shape(weight.shape), dtype=torch.float32, device=weight.device)
    CODEC.quantize_rows_into(weight.detach().to(torch.float32, copy=True), [data, scale], INT8)
    return data, scale


class Int8Stored(RowScaledStored):
    """int8 data with one float32 scale per output channel; dequantized where it computes."""

    form = INT8

    @property
    def storage_dtype(self) -> str:
        return INT8

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["data"], parts["scale"], dtype)


class Int8Codec(RowScaledCodec):
    stored_class = Int8Stored
    rounds = True
    #: what the stored bytes depend on besides the weights (the stored-form cache's key)
    cache_params = {"qmax": QMAX, "scale": "per output channel, float32"}

    def data_dtype(self, target: torch.dtype | str) -> torch.dtype:
        return torch.int8

    def qmax(self, target: torch.dtype | str) -> float:
        return QMAX

    def workspace_bytes(self, shape: tuple[int, ...]) -> int:
        """`dequantize`'s float32 temporaries: one row chunk, ~16 bytes a value at most."""
        return min(math.prod(shape), CHUNK_VALUES) * 16


CODEC = Int8Codec()
