"""4-bit NormalFloat storage (the "nf4" form, engine.storage.forms), one bfloat16 absmax scale per
group of 32 inputs.

Each output row of a weight matrix (kernels: the flattened trailing dimensions) is split into
groups of `GROUP` = 32 consecutive values; each group is divided by its absolute maximum (the
scale, rounded to bfloat16) and every value is stored as the 4-bit index of the nearest of the 16
NF4 levels (QLoRA's quantiles of N(0, 1), the table bitsandbytes uses), two indices per byte (the
even-indexed value in the low nibble). Dequantizing on the computation device: a table lookup in
the computation dtype times the group's scale.

Bytes: 4 bits per weight + 16 bits per 32 weights = 4.5 bits (0.28x of bf16). Why NF4 with
groups of 32 and not int4: measured on Linear(3072, 3072) and (3072, 12288) with weights N(0, std)
(README table, `bench/bench_engine.py`), the relative output error is ~0.087 for this form,
~0.092 for bitsandbytes-style NF4 with blocks of 64 (float32 absmax), ~0.097 for symmetric int4
with groups of 32 and ~0.108 with groups of 64. A matrix whose rows do not split into groups of
32 is stored as int8 instead (`Nf4Codec.target` logs which).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from engine.storage.forms import INT8, NF4
from engine.storage.stored import Codec, QuantizedStored, StoredTensor, row_length

log = logging.getLogger(__name__)

GROUP = 32
#: rows are dequantized in chunks of about this many values, so temporaries stay small
CHUNK_VALUES = 1 << 22

# QLoRA's NF4 levels (bitsandbytes' table), ascending
LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_LEVELS32 = torch.tensor(LEVELS, dtype=torch.float32)
_MIDPOINTS = (_LEVELS32[1:] + _LEVELS32[:-1]) / 2
_tables: dict[tuple[str, torch.dtype], torch.Tensor] = {}

# Nearest level without a binary search (torch.bucketize is ~10x slower on these values: its
# branches mispredict; gathers from a small table are slow in torch on the CPU, fast in numpy):
# a uniform grid of _BINS bins over [-1, 1] maps each bin to the level nearest its centre. A value
# gets the nearest level except within half a bin (1/65536 of the group's absmax) of a midpoint
# between two levels, where it may get the other one of the two: an extra error of at most
# 1/65536 of the scale, against ~1/20 for the quantization itself.
_BINS = 1 << 16
_CENTRES = torch.linspace(-1.0, 1.0, _BINS + 1, dtype=torch.float64)[:-1] + 1.0 / _BINS
_CODE_OF_BIN = torch.bucketize(_CENTRES, _MIDPOINTS.double()).to(torch.uint8)
_CODE_OF_BIN_NP = _CODE_OF_BIN.numpy()


def nearest_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 index of the NF4 level nearest each value of float32 `x` (see above)."""
    pos = torch.mul(x, _BINS / 2).add_(_BINS / 2).floor_().clamp_(0, _BINS - 1).to(torch.int32)
    if pos.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.take(_CODE_OF_BIN_NP, pos.numpy()))
    return _CODE_OF_BIN.to(pos.device)[pos]


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two levels a packed byte stands for (low nibble first)."""
    key = (str(device), torch.float32)
    table = _tables.get(key)
    if table is None:
        byte = torch.arange(256)
        table = _tables[key] = torch.stack([_LEVELS32[byte & 15], _LEVELS32[byte >> 4]], dim=1).contiguous().to(device)
    return table


def fits(shape: tuple[int, ...] | torch.Size) -> bool:
    """Do the rows of a weight of this shape split into groups of GROUP (and bytes of 2 values)?"""
    return len(shape) >= 2 and all(shape) and row_length(shape) % GROUP == 0


def layout(shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    n = row_length(shape)
    return [((shape[0], n // 2), torch.uint8), ((shape[0], n // GROUP), torch.bfloat16)]


def quantize_rows_into(w32: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize float32 rows `w32` ([rows, n], modified in place) into `packed` ([rows, n/2]
    uint8) and `scale` ([rows, n/GROUP] bfloat16). Rows are independent: any slice of rows works."""
    rows = w32.shape[0]
    groups = w32.view(rows, -1, GROUP)
    amax = groups.abs().amax(dim=2, keepdim=True).to(torch.bfloat16)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale.copy_(amax.view(rows, -1))
    groups.div_(amax.to(torch.float32))
    codes = nearest_codes(w32.view(rows, -1))
    pairs = codes.view(rows, -1, 2)
    torch.bitwise_or(pairs[..., 0], pairs[..., 1] << 4, out=packed)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes, bfloat16 group scales) of a weight whose shape `fits`."""
    if not fits(weight.shape):
        raise ValueError(f"nf4: a weight of shape {list(weight.shape)} does not split into groups of {GROUP}")
    (pshape, _), (sshape, _) = layout(tuple(weight.shape))
    w32 = weight.detach().to(torch.float32, copy=True).reshape(weight.shape[0], -1)
    packed = torch.empty(pshape, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(sshape, dtype=torch.bfloat16, device=weight.device)
    quantize_rows_into(w32, packed, scale)
    return packed, scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype` on `packed`'s device: one lookup per byte in a (256, 2) float32
    table of level pairs, times the group's scale in float32, rounded once to `dtype`. (Rounding
    the levels to bf16 first is a systematic error per level that attention amplifies: measured
    on a Qwen-Image block, 0.159 relative output error against 0.153 this way.) Rows go in
    chunks of ~CHUNK_VALUES values, so the float32 temporaries stay ~8 bytes a value of one chunk."""
    rows, half = packed.shape
    n = half * 2
    out = torch.empty((rows, n), dtype=dtype, device=packed.device)
    table = _pair_table(packed.device)
    step = max(1, CHUNK_VALUES // max(1, n))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codes = packed[r0:r1].reshape(-1).to(torch.int32)
        values = torch.index_select(table, 0, codes).view(r1 - r0, -1, GROUP)
        values.mul_(scale[r0:r1].to(torch.float32).unsqueeze(-1))
        out[r0:r1] = values.view(r1 - r0, n)
    return out.view(shape)


class Nf4Stored(QuantizedStored):
    """NF4 codes (two per byte) with one bfloat16 scale per group of 32; dequantized where it computes."""

    form = NF4

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, shape: torch.Size):
        self.packed = packed
        self.scale = scale
        self.shape = torch.Size(shape)

    @property
    def storage_dtype(self) -> str:
        return NF4

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["packed"], parts["scale"], self.shape, dtype)

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("packed", self.packed), ("scale", self.scale)]

    def with_parts(self, tensors: Sequence[torch.Tensor]) -> StoredTensor:
        return Nf4Stored(tensors[0], tensors[1], self.shape)


_warned_fallbacks: set[tuple[int, ...]] = set()


class Nf4Codec(Codec):
    """Matrices whose rows split into groups of GROUP; others fall back to int8 (logged once per shape)."""

    #: what the stored bytes depend on besides the weights (the stored-form cache's key)
    cache_params = {"group": GROUP, "levels": LEVELS, "pairs": "low nibble first"}

    def target(self, shape, ndim, place_dtype, compute_dtype):
        target = super().target(shape, ndim, place_dtype, compute_dtype)
        if target == NF4 and shape is not None and row_length(shape) % GROUP:
            if shape not in _warned_fallbacks:
                _warned_fallbacks.add(shape)
                log.warning(
                    "nf4: a weight of shape %s has rows of %d values, which do not split into groups of %d; "
                    "it is stored as int8 instead (the next best form)", list(shape), row_length(shape), GROUP,
                )
            return INT8
        return target

    def layout(self, shape: tuple[int, ...], target: torch.dtype | str) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return layout(shape)

    def quantize_rows_into(self, w32: torch.Tensor, parts: list[torch.Tensor], target: torch.dtype | str) -> None:
        quantize_rows_into(w32.view(w32.shape[0], -1), parts[0], parts[1])

    def wrap(self, parts: list[torch.Tensor], shape: tuple[int, ...], target: torch.dtype | str) -> StoredTensor:
        return Nf4Stored(parts[0], parts[1], torch.Size(shape))

    def workspace_bytes(self, shape: tuple[int, ...]) -> int:
        """`dequantize`'s temporaries: one row chunk, ~16 bytes a value at most."""
        return min(math.prod(shape), CHUNK_VALUES) * 16


CODEC = Nf4Codec()
