"""Scaled FP8 storage (the "fp8" form, engine.storage.forms): one scale per output channel.

A plain cast to float8_e4m3fn flushes small weights (std ~0.005 sits in e4m3's subnormal range)
and loses most of their precision. Dividing each output channel by amax/fp8_max first puts every
row at the top of the FP8 range; the scale (float32, one per row) multiplies back at compute time.
The codec stores float8_e5m2 the same way (a vram_config dtype, no form of its own).
"""

from __future__ import annotations

import torch

from engine.config import FP8_DTYPES, Place
from engine.storage.stored import PlainStored, RowScaledCodec, RowScaledStored, StoredTensor, row_scale_shape


def should_quantize(tensor: torch.Tensor) -> bool:
    """Only weight matrices/kernels are stored in FP8; biases and norm scales are tiny and sensitive."""
    return tensor.is_floating_point() and tensor.ndim >= 2 and tensor.numel() > 0


def quantize_per_channel(weight: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (data in fp8_dtype, float32 scale of shape [out, 1, ...]) with data * scale ~= weight."""
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"{fp8_dtype} is not an FP8 dtype")
    data = torch.empty(weight.shape, dtype=fp8_dtype, device=weight.device)
    scale = torch.empty(row_scale_shape(weight.shape), dtype=torch.float32, device=weight.device)
    CODEC.quantize_rows_into(weight.detach().to(torch.float32, copy=True), [data, scale], fp8_dtype)
    return data, scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Upcast on whatever device `data` is on. FP8 values are exact in bf16/fp16/fp32, so the only
    rounding is the final multiply; done in `dtype` to keep the transient copy at `dtype` size."""
    out = data.to(dtype)
    return out.mul_(scale.to(device=out.device, dtype=dtype))


def plain_cast_roundtrip(weight: torch.Tensor, fp8_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """What DiffSynth and diffusers' layerwise casting do (no scale): kept for comparisons."""
    return weight.to(fp8_dtype).to(dtype)


class ScaledFp8Stored(RowScaledStored):
    """FP8 data with one float32 scale per output channel; dequantized where it computes
    (e4m3 <-> e5m2 is another form: requantized)."""

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.data.dtype

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["data"], parts["scale"], dtype)


class Fp8Codec(RowScaledCodec):
    """Matrices of any shape take the FP8 dtype (an empty one is cast, it has no rows to scale)."""

    stored_class = ScaledFp8Stored
    #: what the stored bytes depend on besides the weights (the stored-form cache's key)
    cache_params = {"scale": "per output channel, float32, amax / finfo.max"}

    def target(self, shape, ndim, place_dtype, compute_dtype):
        return place_dtype if ndim >= 2 else compute_dtype

    def data_dtype(self, target: torch.dtype | str) -> torch.dtype:
        return target  # type: ignore[return-value]

    def qmax(self, target: torch.dtype | str) -> float:
        return torch.finfo(target).max  # type: ignore[arg-type]

    def make(self, tensor: torch.Tensor, place: Place, target: torch.dtype | str) -> StoredTensor:
        if not should_quantize(tensor):
            return PlainStored(tensor.to(device=place.device, dtype=target))  # type: ignore[arg-type]
        return super().make(tensor, place, target)


CODEC = Fp8Codec()
