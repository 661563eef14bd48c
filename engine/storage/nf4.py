"""4-bit NormalFloat storage (NF4), one bfloat16 absmax scale per group of 32 inputs.

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
32 is stored as int8 instead (engine.storage.stored.storage_dtype_for logs which).
"""

from __future__ import annotations

import torch

from engine.config import NF4, Place
from engine.storage.stored import PlainStored, StoredTensor, register_form, row_length, store

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


def _table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (str(device), dtype)
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = _LEVELS32.to(device=device, dtype=dtype)
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
    lo, hi = torch.aminmax(groups, dim=2, keepdim=True)
    amax = torch.maximum(lo.abs_(), hi).to(torch.bfloat16)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale.copy_(amax.view(rows, -1))
    groups.div_(amax.to(torch.float32))
    codes = torch.bucketize(w32.view(rows, -1), _MIDPOINTS.to(w32.device)).to(torch.uint8)
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
    """The weight in `dtype` on `packed`'s device, rows in chunks (temporaries ~6 bytes/value of
    one chunk)."""
    rows, half = packed.shape
    n = half * 2
    out = torch.empty((rows, n), dtype=dtype, device=packed.device)
    table = _table(packed.device, dtype)
    step = max(1, CHUNK_VALUES // max(1, n))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        p = packed[r0:r1]
        codes = torch.stack((p & 0x0F, p >> 4), dim=-1).view(r1 - r0, n).to(torch.int32)
        values = table[codes].view(r1 - r0, -1, GROUP)
        values.mul_(scale[r0:r1].to(dtype).unsqueeze(-1))
        out[r0:r1] = values.view(r1 - r0, n)
    return out.view(shape)


class Nf4Stored(StoredTensor):
    """NF4 codes (two per byte) with one bfloat16 scale per group of 32; dequantized where it computes."""

    form = NF4

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, shape: torch.Size):
        self.packed = packed
        self.scale = scale
        self.shape = torch.Size(shape)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def storage_dtype(self) -> str:
        return NF4

    def materialize(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.from_parts({"packed": self.packed.to(device), "scale": self.scale.to(device)}, dtype)

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["packed"], parts["scale"], self.shape, dtype)

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        if place.dtype == NF4:
            if self.packed.device == place.device:
                return self
            return Nf4Stored(self.packed.to(place.device), self.scale.to(place.device), self.shape)
        if place.is_quantized:
            return store(self.materialize(torch.device("cpu"), torch.float32), place, compute_dtype)
        return PlainStored(self.materialize(place.device, place.dtype))

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("packed", self.packed), ("scale", self.scale)]


def _make(tensor: torch.Tensor, place: Place) -> StoredTensor:
    packed, scale = quantize(tensor)
    return Nf4Stored(packed.to(place.device), scale.to(place.device), tensor.shape)


register_form(NF4, _make, layout)
