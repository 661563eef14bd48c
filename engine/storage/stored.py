"""How one parameter is held in one place: plain, scaled FP8, int8 (engine.storage.int8), NF4
(engine.storage.nf4), GGUF blocks (engine.storage.gguf), or (engine.storage.disk) left in its file.

A managed layer keeps a master copy of each parameter at the offload place and may hold more
copies (onload, resident on the computation device). These classes know their byte size and how
to produce another copy: `to_place` for storage copies, `materialize` for the computation copy,
and `from_parts` for the computation copy from device views of their `parts()` (the transfer
scheduler's slots hold those bytes as stored).

Which form a tensor takes at a place is decided from its header alone (`storage_dtype_for`,
`stored_layout`), so the loader can size its host arena and the planner its ledger before a byte
is read: weight matrices and kernels (ndim >= 2) take the place's quantized form; biases, norm
scales and other 1-D tensors stay in the computation dtype; integer tensors stay as they are.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Callable

import torch

from engine.config import FP8_DTYPES, GGUF, INT8, NF4, Place
from engine.storage.fp8 import dequantize, quantize_per_channel, should_quantize

log = logging.getLogger(__name__)

Layout = list[tuple[tuple[int, ...], torch.dtype]]
# form name -> (make a stored copy of a CPU/device tensor at a place, layout of its parts by shape)
_FORMS: dict[str, tuple[Callable[[torch.Tensor, Place], "StoredTensor"], Callable[[tuple[int, ...]], Layout]]] = {}


def register_form(name: str, make: Callable[[torch.Tensor, Place], "StoredTensor"], layout: Callable[[tuple[int, ...]], Layout]) -> None:
    _FORMS[name] = (make, layout)


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

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The computation tensor (in `dtype` when floating) rebuilt from views of this copy's
        parts that already are on the computation device (the scheduler's slot views, keyed as
        `parts()` names them). May return the view itself when nothing needs converting."""
        raise NotImplementedError(f"{type(self).__name__} cannot be rebuilt from slot views")


def _is_matrix(shape: tuple[int, ...] | torch.Size) -> bool:
    return len(shape) >= 2 and all(shape)


def row_length(shape: tuple[int, ...] | torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) >= 2 else 0


_warned_fallbacks: set[tuple[int, ...]] = set()


def storage_dtype_for(
    tensor_dtype: torch.dtype,
    ndim_or_shape: int | tuple[int, ...] | torch.Size,
    place_dtype: torch.dtype | str,
    compute_dtype: torch.dtype,
) -> torch.dtype | str:
    """Which dtype or form a tensor is stored in at a place: quantized forms (FP8, int8, nf4) only
    for weight matrices and kernels, other floating tensors in the computation dtype (a plain
    float place dtype applies to all); integer tensors keep their dtype.

    nf4 needs each output row to split into groups of `engine.storage.nf4.GROUP` values: a matrix
    whose rows do not falls back to int8, the next best form (logged once per shape). The fallback
    needs the shape; given only `ndim`, nf4 is assumed to fit. "gguf" is a form only GGUF blocks
    read from a .gguf file take: other tensors at a gguf place stay in the computation dtype."""
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    shape = None if isinstance(ndim_or_shape, int) else tuple(ndim_or_shape)
    ndim = ndim_or_shape if shape is None else len(shape)
    if place_dtype in FP8_DTYPES:
        return place_dtype if ndim >= 2 else compute_dtype
    if place_dtype == GGUF:
        return compute_dtype
    if place_dtype in (INT8, NF4):
        if ndim < 2 or (shape is not None and not all(shape)):
            return compute_dtype
        if place_dtype == NF4 and shape is not None:
            from engine.storage.nf4 import GROUP

            if row_length(shape) % GROUP:
                if shape not in _warned_fallbacks:
                    _warned_fallbacks.add(shape)
                    log.warning(
                        "nf4: a weight of shape %s has rows of %d values, which do not split into groups of %d; "
                        "it is stored as int8 instead (the next best form)", list(shape), row_length(shape), GROUP,
                    )
                return INT8
        return place_dtype
    return place_dtype


def stored_layout(
    shape: tuple[int, ...] | torch.Size, tensor_dtype: torch.dtype, place_dtype: torch.dtype | str, compute_dtype: torch.dtype
) -> Layout:
    """The (shape, dtype) tensors `store` makes of a tensor at a place (header facts only)."""
    shape = tuple(shape)
    target = storage_dtype_for(tensor_dtype, shape, place_dtype, compute_dtype)
    if isinstance(target, str):
        return _FORMS[target][1](shape)
    if target in FP8_DTYPES and target != tensor_dtype and _is_matrix(shape):
        return [(shape, target), ((shape[0],) + (1,) * (len(shape) - 1), torch.float32)]
    return [(shape, target)]


def layout_nbytes(layout: Layout) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout)


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

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        tensor = parts["tensor"]
        if tensor.is_floating_point() and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        target = storage_dtype_for(self.tensor.dtype, self.tensor.shape, place.dtype, compute_dtype)
        if target in FP8_DTYPES and should_quantize(self.tensor):
            data, scale = quantize_per_channel(self.tensor, target)
            return ScaledFp8Stored(data.to(place.device), scale.to(place.device))
        if isinstance(target, str):
            return _FORMS[target][0](self.tensor, place)
        if self.tensor.device == place.device and self.tensor.dtype == target:
            return self
        return PlainStored(self.tensor.to(device=place.device, dtype=target))

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("tensor", self.tensor)]


class RowScaledStored(StoredTensor):
    """Quantized data with one float32 scale per output channel (scaled FP8, int8): the bytes
    cross as they are stored and are dequantized where they compute. Subclasses say which places
    keep their form (`keeps_form`) and how to dequantize (`from_parts`)."""

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

    @abstractmethod
    def keeps_form(self, place: Place) -> bool:
        """Does a copy at `place` keep this form (then it is only moved, never requantized)?"""

    def materialize(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # the stored bytes cross to the computation device first; the upcast happens there
        return self.from_parts({"data": self.data.to(device), "scale": self.scale.to(device)}, dtype)

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        if self.keeps_form(place):
            if self.data.device == place.device:
                return self
            return type(self)(self.data.to(place.device), self.scale.to(place.device))
        if place.is_quantized:  # another quantized form: requantize from the dequantized values
            return store(self.materialize(torch.device("cpu"), torch.float32), place, compute_dtype)
        return PlainStored(self.materialize(place.device, place.dtype))

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("data", self.data), ("scale", self.scale)]


class ScaledFp8Stored(RowScaledStored):
    """FP8 data with one float32 scale per output channel; dequantized where it computes."""

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.data.dtype

    def keeps_form(self, place: Place) -> bool:
        return place.dtype == self.data.dtype  # e4m3 <-> e5m2 is another form

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["data"], parts["scale"], dtype)


def store(tensor: torch.Tensor, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
    """Store a freshly loaded tensor at `place` (quantizing when the place's dtype is FP8)."""
    return PlainStored(tensor).to_place(place, compute_dtype)


# the quantized forms register themselves (they subclass StoredTensor, so they come after it)
import engine.storage.int8  # noqa: E402,F401
import engine.storage.nf4  # noqa: E402,F401
