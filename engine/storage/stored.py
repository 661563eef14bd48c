"""How one parameter is held in one place: plain, scaled FP8, or (see engine.storage.disk) left in its file.

A managed layer keeps a master copy of each parameter at the offload place and may hold more
copies (onload, resident on the computation device). These classes know their byte size and how
to produce another copy: `to_place` for storage copies, `materialize` for the computation copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.config import FP8_DTYPES, Place
from engine.storage.fp8 import dequantize, quantize_per_channel, should_quantize


class StoredTensor(ABC):
    """One stored copy of a parameter."""

    shape: torch.Size

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device | str: ...

    @property
    @abstractmethod
    def storage_dtype(self) -> torch.dtype | str: ...

    @abstractmethod
    def materialize(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The tensor a forward computes with, on `device` in `dtype` (floating tensors only)."""

    @abstractmethod
    def to_place(self, place: Place, compute_dtype: torch.dtype) -> "StoredTensor":
        """A copy stored at `place` (returns self when nothing would change)."""

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        """(attribute, tensor) pairs this copy is made of, for code that relocates its bytes (the
        pinned arena, the scheduler's slots). Empty for copies that are not tensors (disk)."""
        return []


def storage_dtype_for(tensor_dtype: torch.dtype, ndim: int, place_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """Which dtype a tensor is stored in at a place: FP8 only for weight matrices, others keep a float dtype."""
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    if place_dtype in FP8_DTYPES:
        return place_dtype if ndim >= 2 else compute_dtype
    return place_dtype


class PlainStored(StoredTensor):
    """A tensor stored as is (any device, any non-FP8 dtype; integer tensors too)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()
        self.shape = tensor.shape

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def materialize(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        target = dtype if self.tensor.is_floating_point() else self.tensor.dtype
        return self.tensor.to(device=device, dtype=target)

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        target = storage_dtype_for(self.tensor.dtype, self.tensor.ndim, place.dtype, compute_dtype)
        if target in FP8_DTYPES and should_quantize(self.tensor):
            data, scale = quantize_per_channel(self.tensor, target)
            return ScaledFp8Stored(data.to(place.device), scale.to(place.device))
        if self.tensor.device == place.device and self.tensor.dtype == target:
            return self
        return PlainStored(self.tensor.to(device=place.device, dtype=target))

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("tensor", self.tensor)]


class ScaledFp8Stored(StoredTensor):
    """FP8 data with one float32 scale per output channel; dequantized where it computes."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data = data
        self.scale = scale
        self.shape = data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.data.dtype

    def materialize(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # FP8 bytes cross to the computation device first; the upcast happens there.
        return dequantize(self.data.to(device), self.scale.to(device), dtype)

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        if place.dtype == self.data.dtype:
            if self.data.device == place.device:
                return self
            return ScaledFp8Stored(self.data.to(place.device), self.scale.to(place.device))
        if place.dtype in FP8_DTYPES:  # e4m3 <-> e5m2: requantize from the dequantized values
            return PlainStored(self.materialize(torch.device("cpu"), torch.float32)).to_place(place, compute_dtype)
        return PlainStored(self.materialize(place.device, place.dtype))

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("data", self.data), ("scale", self.scale)]


def store(tensor: torch.Tensor, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
    """Store a freshly loaded tensor at `place` (quantizing when the place's dtype is FP8)."""
    return PlainStored(tensor).to_place(place, compute_dtype)
