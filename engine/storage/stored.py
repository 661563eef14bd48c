"""How one parameter is held in one place: the base classes of every storage form.

A managed layer keeps a master copy of each parameter at the offload place and may hold more
copies (onload, resident on the computation device). A `StoredTensor` knows its byte size and how
to produce another copy: `to_place` for storage copies, `materialize` for the computation copy,
and `from_parts` for the computation copy from device views of its `parts()` (the transfer
scheduler's slots hold those bytes as stored). `PlainStored` is a tensor as is; the forms
(engine.storage.forms: scaled FP8 in engine.storage.fp8, int8, nf4, GGUF blocks) each bring a
`Codec`, the torch side of their record, and their stored class; engine.storage.disk leaves a
tensor in its file. This module imports no form: the registry hands it each form's codec.

Which form a tensor takes at a place is decided from its header alone (`storage_dtype_for`,
`stored_layout`, `piece_bytes`), so the loader can size its host arena and the planner its ledger
before a byte is read: weight matrices and kernels (ndim >= 2) take the place's quantized form;
biases, norm scales and other 1-D tensors stay in the computation dtype; integer tensors stay as
they are.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from engine.config import Place
from engine.storage.forms import find_form

Layout = list[tuple[tuple[int, ...], torch.dtype]]
#: a parameter as the ledger sizes it: (shape, dtype[, encoded]) where `encoded` is (form name,
#: bytes) of blocks a checkpoint file already holds in that form (a GGUF tensor), else None
ParamShape = tuple


class StoredTensor(ABC):
    """One stored copy of a parameter."""

    shape: torch.Size
    #: (form name, bytes) of the checkpoint blocks this copy holds or stands for, as the file has
    #: them (a GGUF tensor's blocks); None for every other copy
    encoded: tuple[str, int] | None = None

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

    def with_parts(self, tensors: Sequence[torch.Tensor]) -> "StoredTensor":
        """The same copy made of other tensors of the same shapes and dtypes as `parts()` (in that
        order): the loader moves a copy into its host arena this way."""
        raise NotImplementedError(f"{type(self).__name__} is not made of tensors")

    def from_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The computation tensor (in `dtype` when floating) rebuilt from views of this copy's
        parts that already are on the computation device (the scheduler's slot views, keyed as
        `parts()` names them). May return the view itself when nothing needs converting."""
        raise NotImplementedError(f"{type(self).__name__} cannot be rebuilt from slot views")


class Codec(ABC):
    """The torch side of a quantized storage form (its record is in engine.storage.forms): which
    tensors take it, their stored layout, how rows are quantized into it and how its stored class
    wraps the parts. `target` is the place dtype (a torch FP8 dtype, or the form's name)."""

    def target(
        self, shape: tuple[int, ...] | None, ndim: int, place_dtype: torch.dtype | str, compute_dtype: torch.dtype
    ) -> torch.dtype | str:
        """The dtype or form a floating tensor takes at a place of this form (`shape` None: only
        `ndim` is known): weight matrices and kernels with no empty dimension take the form, other
        tensors the computation dtype."""
        if ndim < 2 or (shape is not None and not all(shape)):
            return compute_dtype
        return place_dtype

    @abstractmethod
    def layout(self, shape: tuple[int, ...], target: torch.dtype | str) -> Layout:
        """The (shape, dtype) parts a matrix of `shape` is stored as, scales included."""

    @abstractmethod
    def quantize_rows_into(self, w32: torch.Tensor, parts: list[torch.Tensor], target: torch.dtype | str) -> None:
        """Quantize float32 rows `w32` (shape [rows, ...] as the tensor's; may be modified in
        place) into `parts` (views of the same rows of each `layout` part). Rows are independent,
        so the loader quantizes a checkpoint tensor chunk by chunk of rows."""

    @abstractmethod
    def wrap(self, parts: list[torch.Tensor], shape: tuple[int, ...], target: torch.dtype | str) -> StoredTensor:
        """The stored copy made of `parts` (laid out as `layout` says)."""

    def make(self, tensor: torch.Tensor, place: Place, target: torch.dtype | str) -> StoredTensor:
        """A stored copy of `tensor` at `place` (quantized where the tensor is, then moved)."""
        shape = tuple(tensor.shape)
        parts = [torch.empty(s, dtype=d, device=tensor.device) for s, d in self.layout(shape, target)]
        self.quantize_rows_into(tensor.detach().to(torch.float32, copy=True), parts, target)
        return self.wrap([p.to(place.device) for p in parts], shape, target)

    def workspace_bytes(self, shape: tuple[int, ...]) -> int:
        """Temporaries of rebuilding one stored matrix of `shape` on the computation device (the
        planner reserves them with a streamed layer's transient)."""
        return 0


class FileBlocksCodec(Codec):
    """The torch side of a form that is a checkpoint file's own blocks (`StorageForm.from_file`,
    GGUF): nothing is quantized into it. The loader keeps the blocks of the file's tensors of this
    form (`TensorEntry.form`) as they are at a place of the form, leaves them in the file for disk
    offload, and decodes them for any other place; any other tensor at such a place stays in the
    computation dtype."""

    def target(self, shape, ndim, place_dtype, compute_dtype):
        return compute_dtype

    def layout(self, shape, target):
        raise TypeError("a file's blocks are read as they are, never laid out from a shape")

    def quantize_rows_into(self, w32, parts, target):
        raise TypeError("nothing is quantized into a file's blocks")

    def wrap(self, parts, shape, target):
        raise TypeError("a file's blocks are read as they are (read_blocks)")

    @abstractmethod
    def entry_layout(self, entry: Any) -> Layout:
        """The parts an entry's blocks take in RAM (sized from the header, for the host arena)."""

    @abstractmethod
    def read_blocks(self, entry: Any, out: torch.Tensor) -> StoredTensor:
        """Read an entry's blocks into `out` (laid out as `entry_layout`) and wrap them."""

    @abstractmethod
    def decode(self, entry: Any, dtype: torch.dtype) -> torch.Tensor:
        """An entry's values on the CPU in `dtype` (for a place of another form)."""

    @abstractmethod
    def disk_master(self, entry: Any) -> StoredTensor:
        """The master that leaves an entry's blocks in the file (disk offload)."""

    @abstractmethod
    def join(self, entries: list[Any]) -> StoredTensor | None:
        """One copy of the rows of several entries, blocks as they are (None: they cannot be
        joined as blocks; the loader joins their values instead)."""


def codec_for(place_dtype: torch.dtype | str) -> Codec | None:
    """The codec of the form a place dtype stands for (None: a plain dtype, or "disk")."""
    form = find_form(place_dtype)
    return form.load_codec() if form is not None else None


def _is_matrix(shape: tuple[int, ...] | torch.Size) -> bool:
    return len(shape) >= 2 and all(shape)


def row_length(shape: tuple[int, ...] | torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) >= 2 else 0


def storage_dtype_for(
    tensor_dtype: torch.dtype,
    ndim_or_shape: int | tuple[int, ...] | torch.Size,
    place_dtype: torch.dtype | str,
    compute_dtype: torch.dtype,
) -> torch.dtype | str:
    """Which dtype or form a tensor is stored in at a place: quantized forms only for weight
    matrices and kernels (the form's codec decides: `Codec.target`), other floating tensors in
    the computation dtype (a plain float place dtype applies to all); integer tensors keep their
    dtype. A form may fall back to another for shapes it cannot store (nf4 -> int8, which needs
    the shape; given only `ndim`, the form is assumed to fit)."""
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    codec = codec_for(place_dtype)
    if codec is None:
        return place_dtype
    shape = None if isinstance(ndim_or_shape, int) else tuple(ndim_or_shape)
    ndim = ndim_or_shape if shape is None else len(shape)
    return codec.target(shape, ndim, place_dtype, compute_dtype)


def stored_layout(
    shape: tuple[int, ...] | torch.Size, tensor_dtype: torch.dtype, place_dtype: torch.dtype | str, compute_dtype: torch.dtype
) -> Layout:
    """The (shape, dtype) tensors `store` makes of a tensor at a place (header facts only)."""
    shape = tuple(shape)
    target = storage_dtype_for(tensor_dtype, shape, place_dtype, compute_dtype)
    codec = codec_for(target)
    if codec is not None and target != tensor_dtype and _is_matrix(shape):
        return codec.layout(shape, target)
    return [(shape, target)]  # type: ignore[list-item]


def layout_nbytes(layout: Layout) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout)


def keeps_encoded(place_dtype: torch.dtype | str, encoded: tuple[str, int] | None) -> bool:
    """Does a place keep a checkpoint's own blocks as they are (a GGUF tensor at a "gguf" place)?"""
    if encoded is None:
        return False
    form = find_form(place_dtype)
    return form is not None and form.name == encoded[0]


def piece_bytes(item: ParamShape, place_dtype: torch.dtype | str, compute_dtype: torch.dtype) -> list[int]:
    """Bytes of each part a parameter (`ParamShape`) is stored as at a RAM or device place: its
    form's layout, scales included, or a checkpoint's blocks as they are where the place keeps
    them."""
    encoded = item[2] if len(item) > 2 else None
    if keeps_encoded(place_dtype, encoded):
        return [encoded[1]]
    return [math.prod(s) * d.itemsize for s, d in stored_layout(item[0], item[1], place_dtype, compute_dtype)]


def workspace_bytes(item: ParamShape, source_dtype: torch.dtype | str) -> int:
    """Temporaries of rebuilding a parameter (`ParamShape`) streamed from a place of
    `source_dtype` on the computation device: its blocks' codec when it holds a checkpoint's
    blocks, else the place's form's, for a floating matrix; 0 for plain dtypes."""
    shape, dtype = item[0], item[1]
    encoded = item[2] if len(item) > 2 else None
    if encoded is not None:
        codec = codec_for(encoded[0])
    elif dtype.is_floating_point and len(shape) >= 2:
        codec = codec_for(source_dtype)
        if isinstance(codec, FileBlocksCodec):  # only a file's own tensors take such a form
            return 0
    else:
        return 0
    return codec.workspace_bytes(tuple(shape)) if codec is not None else 0


class PlainStored(StoredTensor):
    """A tensor stored as is (any device, any plain dtype; integer tensors too)."""

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
        codec = codec_for(target)
        if codec is not None:
            return codec.make(self.tensor, place, target)
        if self.tensor.device == place.device and self.tensor.dtype == target:
            return self
        return PlainStored(self.tensor.to(device=place.device, dtype=target))

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("tensor", self.tensor)]

    def with_parts(self, tensors: Sequence[torch.Tensor]) -> StoredTensor:
        return PlainStored(tensors[0])


class QuantizedStored(StoredTensor):
    """A copy in a quantized form, made of tensors (`parts()`): the bytes cross as they are
    stored and are dequantized where they compute (`from_parts`). A copy at a place of its own
    form is only moved; at a place of another quantized form it is requantized from its values;
    at a float place it is dequantized there."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self.parts())

    @property
    def device(self) -> torch.device:
        return self.parts()[0][1].device

    def keeps_form(self, place: Place) -> bool:
        """Does a copy at `place` keep this form (then it is only moved, never requantized)?"""
        return place.dtype == self.storage_dtype

    def materialize(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # the stored bytes cross to the computation device first; the upcast happens there
        return self.from_parts({name: t.to(device) for name, t in self.parts()}, dtype)

    def to_place(self, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
        if self.keeps_form(place):
            if self.device == place.device:
                return self
            return self.with_parts([t.to(place.device) for _, t in self.parts()])
        if place.is_quantized:  # another quantized form: requantize from the dequantized values
            return store(self.materialize(torch.device("cpu"), torch.float32), place, compute_dtype)
        return PlainStored(self.materialize(place.device, place.dtype))


class RowScaledStored(QuantizedStored):
    """Quantized data with one float32 scale per output channel (scaled FP8, int8). Subclasses say
    how to dequantize (`from_parts`)."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data = data
        self.scale = scale
        self.shape = data.shape

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [("data", self.data), ("scale", self.scale)]

    def with_parts(self, tensors: Sequence[torch.Tensor]) -> StoredTensor:
        return type(self)(tensors[0], tensors[1])


def row_scale_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """One scale per output channel: [out, 1, ...]."""
    return (shape[0],) + (1,) * (len(shape) - 1)


class RowScaledCodec(Codec):
    """Forms with one float32 scale per output channel (scaled FP8, int8): each row is divided by
    `amax / qmax` and cast (int8: rounded first) into the data dtype."""

    stored_class: type[RowScaledStored]
    rounds = False  # round to the nearest integer before the cast (int8)

    @abstractmethod
    def data_dtype(self, target: torch.dtype | str) -> torch.dtype: ...

    @abstractmethod
    def qmax(self, target: torch.dtype | str) -> float: ...

    def layout(self, shape: tuple[int, ...], target: torch.dtype | str) -> Layout:
        return [(tuple(shape), self.data_dtype(target)), (row_scale_shape(shape), torch.float32)]

    def quantize_rows_into(self, w32: torch.Tensor, parts: list[torch.Tensor], target: torch.dtype | str) -> None:
        data, scale = parts
        dims = tuple(range(1, w32.ndim))
        if len(dims) == 1:
            lo, hi = torch.aminmax(w32, dim=1, keepdim=True)
        else:
            lo, hi = w32.amin(dim=dims, keepdim=True), w32.amax(dim=dims, keepdim=True)
        amax = torch.maximum(lo.abs_(), hi)  # == w32.abs().amax(...) without a tensor-sized temporary
        qmax = self.qmax(target)
        sc = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        torch.div(w32, sc, out=w32)
        if self.rounds:
            w32.round_()
        w32.clamp_(-qmax, qmax)
        data.copy_(w32)
        scale.copy_(sc)

    def wrap(self, parts: list[torch.Tensor], shape: tuple[int, ...], target: torch.dtype | str) -> StoredTensor:
        return self.stored_class(parts[0], parts[1])


def store(tensor: torch.Tensor, place: Place, compute_dtype: torch.dtype) -> StoredTensor:
    """Store a freshly loaded tensor at `place` (quantizing it when the place's dtype is a form)."""
    return PlainStored(tensor).to_place(place, compute_dtype)
