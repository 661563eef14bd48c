"""One exact-size host buffer that a component's RAM masters are loaded straight into.

Pinning after loading means copying every master into a second, pinned buffer: for a moment the
process holds the model twice (about 76 GB for a 20B DiT in bf16). `load_model` knows every
tensor's storage size from the checkpoint headers before it reads a byte, so it lays the masters
out in one page-aligned anonymous mapping of exactly their size and reads (or quantizes) each
tensor into its place. When a scheduler later wants pinned memory, the device registers that
mapping in place (cudaHostRegister): no copy, no second buffer (engine.transfer.pinned).

The mapping is `mmap`ed, not taken from the heap, so its pages are touched only as tensors are
written and return to the OS as a whole when the last view of it dies.
"""

from __future__ import annotations

import math
import mmap
from typing import Sequence

import torch

Layout = Sequence[tuple[Sequence[int], torch.dtype]]


ALIGN = 256  # byte alignment of each tensor inside an arena, a slot or a staging buffer


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def place_end(end: int, nbytes: int) -> int:
    """Where the arena ends after placing `nbytes` at `end`: each tensor starts 256-byte aligned,
    and page-aligned from a page up, so page boundaries fall between large tensors and a pinned
    prefix can end at one."""
    align = mmap.PAGESIZE if nbytes >= mmap.PAGESIZE else ALIGN
    return (end + align - 1) // align * align + nbytes


def layout_bytes(layout: Layout) -> int:
    """Bytes `HostArena.take` uses for these (shape, dtype) tensors, alignment included."""
    end = 0
    for shape, dtype in layout:
        end = place_end(end, math.prod(shape) * dtype.itemsize)
    return end


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps the holes that freed tensors leave between
    long-lived ones; without this, RssAnon after moving or quantizing masters overstates what is
    alive)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class HostArena:
    """A bump allocator over one anonymous mapping; views of it are the masters."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.offset = 0
        if nbytes:
            self._mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.buffer = torch.frombuffer(self._mapping, dtype=torch.uint8, count=nbytes)
        else:
            self.buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The next free tensor of `shape` and `dtype` in the arena (aligned as `layout_bytes` says)."""
        nbytes = math.prod(shape) * dtype.itemsize
        end = place_end(self.offset, nbytes)
        if end > self.nbytes:
            raise RuntimeError(f"host arena of {self.nbytes} bytes is full at {self.offset}: the layout missed a tensor")
        self.offset = end
        return self.buffer[end - nbytes : end].view(dtype).view(tuple(shape))

    def contains(self, tensor: torch.Tensor) -> bool:
        """Is `tensor`'s memory inside this arena?"""
        if not self.nbytes or tensor.device.type != "cpu":
            return False
        start = self.buffer.data_ptr()
        ptr = tensor.data_ptr()
        return start <= ptr and ptr + tensor.nbytes <= start + self.nbytes

    def __repr__(self) -> str:
        return f"HostArena({self.offset}/{self.nbytes} bytes used)"
