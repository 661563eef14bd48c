"""A toy storage form in one file, as a new form would be added: its record and its codec.

"fp8cast" stores weight matrices as a plain cast to float8_e4m3fn, without a scale (what
DiffSynth and diffusers' layerwise casting do; engine.storage.fp8 explains why the app scales
instead). One byte a weight and nothing else, so it is sized, loaded, offered and estimated
unlike any built-in form. A product form would call `register_form(FORM)` at import; the tests
register it only for as long as they need it (`engine.storage.forms.registered(FORM)`), so the
rest of the suite sees the built-in forms alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from engine.storage.forms import StorageForm
from engine.storage.stored import Codec, QuantizedStored, StoredTensor

NAME = "fp8cast"


class Fp8CastStored(QuantizedStored):
    """float8_e4m3fn data, no scale; cast back where the layer computes."""

    def __init__(self, data: torch.Tensor):
        self.data = data
        self.shape = data.shape

    @property
    def storage_dtype(self) -> str:
        return NAME

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("data", self.data)]

    def with_parts(self, tensors: Sequence[torch.Tensor]) -> StoredTensor:
        return Fp8CastStored(tensors[0])

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return parts["data"].to(dtype)


class Fp8CastCodec(Codec):
    def layout(self, shape, target):
        return [(tuple(shape), torch.float8_e4m3fn)]

    def quantize_rows_into(self, w32, parts, target):
        parts[0].copy_(w32)

    def wrap(self, parts, shape, target):
        return Fp8CastStored(parts[0])


FORM = StorageForm(
    NAME, "fp8cast (plain e4m3 cast)", "FP8 cast", size_factor=0.5, dequant_traffic=3.0, codec=Fp8CastCodec(),
    aliases=("fp8-cast",),
)
