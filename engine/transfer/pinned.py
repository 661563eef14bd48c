"""Pinned host memory: one exact-size arena per component, under a process-wide pinned budget.

Per-tensor `pin_memory()` goes through the caching host allocator, which rounds every block up
(users of diffusers' group offloading report ~2x host RAM). Here a component loaded by
`load_model` already has its masters in one exact-size host arena (engine.transfer.host_arena), which is
registered with the device in place: pinning costs no copy and no second buffer. Masters of a
model managed after it was built in RAM are packed, 256-byte aligned, into a single pinned buffer
of exactly their size, and the stored copies are re-pointed at views of it. What does not fit
under the pinned budget stays pageable and is staged by the scheduler's worker thread through
small pinned staging buffers.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from engine.transfer.devices import DeviceBackend
from engine.transfer.host_memory import DEFAULT_PINNED_SHARE, host_memory  # noqa: F401  (DEFAULT_PINNED_SHARE: shared here)
from engine.transfer.host_arena import ALIGN, HostArena, aligned, layout_bytes, place_end, release_free_heap  # noqa: F401  (ALIGN: shared here)
from engine.storage.stored import StoredTensor

if TYPE_CHECKING:
    from engine.transfer.streamed import StreamedComponent

TRIM_EVERY_BYTES = 8 * 1024**2  # while moving masters: give freed heap back to the OS this often (~0.1 ms)


PINNED_RAM_ENV = "LOWVRAM_PINNED_RAM_GB"


def parse_pinned_ram_gb(text: str, where: str = PINNED_RAM_ENV) -> float:
    """GB of host RAM that may be pinned, from a flag or the environment: a number, 0 or more
    (0 pins nothing: every streamed weight goes through the staging buffers)."""
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        raise ValueError(f"{where}={text!r}: give the GB of host RAM that may be pinned, a number 0 or more (e.g. 16)")
    return gb


def default_pinned_bytes() -> int:
    """Half the RAM available to this process (the cgroup's memory.max counted), a quarter under
    WSL2 (engine.transfer.host_memory)."""
    return host_memory().default_pinned_bytes


class PinnedBudget:
    """How much host RAM all arenas together may pin: `limit_bytes`, else $LOWVRAM_PINNED_RAM_GB,
    else `default_pinned_bytes()` when first asked."""

    def __init__(self, limit_bytes: int | None = None):
        self._limit = limit_bytes
        self.used = 0
        self._lock = threading.Lock()

    @property
    def limit_bytes(self) -> int:
        if self._limit is None:
            env = os.environ.get(PINNED_RAM_ENV)
            if env:
                self._limit = int(parse_pinned_ram_gb(env) * 1024**3)
            else:
                self._limit = default_pinned_bytes()
        return self._limit

    def planned_limit_bytes(self) -> int:
        """The limit this budget has, or would take if first asked now, without fixing it (the
        estimate asks before anything is pinned)."""
        if self._limit is not None:
            return self._limit
        env = os.environ.get(PINNED_RAM_ENV)
        if env:
            return int(parse_pinned_ram_gb(env) * 1024**3)
        return default_pinned_bytes()

    def take(self, wanted: int) -> int:
        with self._lock:
            granted = max(0, min(wanted, self.limit_bytes - self.used))
            self.used += granted
            return granted

    def take_all(self, wanted: int) -> bool:
        """Take `wanted` bytes, or nothing when they do not all fit."""
        with self._lock:
            if self.used + wanted > self.limit_bytes:
                return False
            self.used += wanted
            return True

    @property
    def room(self) -> int:
        return max(0, self.limit_bytes - self.used)

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


PROCESS_PINNED_BUDGET = PinnedBudget()


def exact_pinned(backend: DeviceBackend, nbytes: int) -> tuple[torch.Tensor, str]:
    """A host buffer of exactly `nbytes`, pinned where the device allows it: an anonymous mapping
    registered in place (torch's pin_memory goes through a caching host allocator that rounds
    sizes up to a power of two), else `backend.pin`, else pageable. Returns (buffer, how): how is
    "registered" (`backend.unregister` it before it is freed), "pinned" or "pageable"."""
    if backend.can_register():
        buffer = HostArena(nbytes).buffer
        if backend.register(buffer):
            return buffer, "registered"
    pinned = backend.pin(nbytes)
    if pinned is not None:
        return pinned, "pinned"
    return torch.empty(nbytes, dtype=torch.uint8), "pageable"


def budgeted_pinned(backend: DeviceBackend, nbytes: int, budget: PinnedBudget) -> tuple[torch.Tensor, str]:
    """`exact_pinned` within the pinned-RAM budget: its bytes are taken before pinning and stay
    taken while it is pinned (the caller gives them back when it frees the buffer). How is
    "refused" (a pageable buffer, nothing taken) when the budget has no room for all of it."""
    if not budget.take_all(nbytes):
        return torch.empty(nbytes, dtype=torch.uint8), "refused"
    buffer, how = exact_pinned(backend, nbytes)
    if how == "pageable":
        budget.give_back(nbytes)
    return buffer, how


@dataclass
class ArenaReport:
    pinned_bytes: int  # pinned host bytes the component streams from
    pageable_bytes: int  # left pageable (over the pinned budget): staged by the scheduler's worker
    tensors_pinned: int
    in_place_bytes: int = 0  # of pinned_bytes: registered where they were (no pinned copy made)


PIN_PIECE_BYTES = 1024**3  # registered at a time (cut at tensor boundaries): see PinnedArena._register_pieces


def _page_floor(n: int) -> int:
    return n // mmap.PAGESIZE * mmap.PAGESIZE


def _page_ceil(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _spans(buffer: torch.Tensor, tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    base = buffer.data_ptr()
    return [(t.data_ptr() - base, t.data_ptr() - base + t.nbytes) for t in tensors]


def piece_ends(length: int, spans: list[tuple[int, int]], piece: int | None = None) -> list[int]:
    """Where to cut `[0, length)` into pieces of about `piece` bytes (PIN_PIECE_BYTES): at page
    boundaries that fall between tensors (`spans`: (start, end) offsets), so no tensor is half
    pinned. A tensor larger than a piece gets a piece of its own, as large as it needs. `length`
    itself must cut no tensor."""
    piece = PIN_PIECE_BYTES if piece is None else piece
    ends: list[int] = []
    start = 0
    while start < length:
        end = length if start + piece >= length else _page_floor(start + piece)
        while True:  # move the cut down, below a tensor across it
            cut = [s for s, e in spans if s < end < e]
            if not cut:
                break
            end = _page_floor(min(cut))
        if end <= start:  # one tensor larger than a piece: up, to past its end
            end = start + piece
            while True:
                cut = [e for s, e in spans if s < end < e]
                if not cut:
                    break
                end = min(length, _page_ceil(max(cut)))
        ends.append(end)
        start = end
    return ends


def _identity(tensor: torch.Tensor) -> tuple:
    """Which memory a tensor shows: parameters may be views into one shared storage (a model loaded
    from a mapped file), so the storage alone does not tell them apart."""
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


Part = tuple[StoredTensor, str]  # a stored copy and the attribute holding one of its host tensors


class PinnedArena:
    """The pinned memory of one component and what it holds.

    Masters the loader read into a host arena (engine.transfer.host_arena) are pinned where they are, by
    registering that arena with the device: as much of it as the budget allows, whole pages, no
    tensor cut in two. Other host masters (a model managed after it was built in RAM) are moved,
    one tensor at a time, into a new host arena of exactly their size, which is then registered;
    each old tensor is freed as soon as it moved, so host RAM never holds the model twice. A device
    that cannot register gets one exact-size pinned buffer instead (allocated, then filled).
    """

    def __init__(self, runtime: "StreamedComponent", backend: DeviceBackend, budget: PinnedBudget = PROCESS_PINNED_BUDGET):
        self.runtime = runtime
        self.backend = backend
        self.budget = budget
        self.buffer: torch.Tensor | None = None  # the pinned buffer of the fallback copy
        self.packed: HostArena | None = None  # the arena masters built in RAM were moved into
        self.registered: list[torch.Tensor] = []
        self.report = ArenaReport(0, 0, 0)
        self.pieces_refused = False  # the device refused a piece: the OS's page-lock limit was met
        self._finalizer: weakref.finalize | None = None

    def _host_parts(self) -> list[Part]:
        """Every host tensor the component streams from, execution order first, each once (kept by
        reference to its stored copy, so moving a tensor frees the old one)."""
        out: list[Part] = []
        seen: set[int] = set()
        for record in self.runtime.planning_order():
            for stored in record.masters.values():
                if id(stored) in seen:
                    continue
                seen.add(id(stored))
                out.extend((stored, part) for part, tensor in stored.parts() if tensor.device.type == "cpu")
        return out

    def build(self) -> ArenaReport:
        """Pin what the budget allows, without holding any master twice where the device can
        register memory in place."""
        todo = self._host_parts()
        wanted = sum(aligned(getattr(s, p).nbytes) for s, p in todo)
        in_place = count = 0
        host = self.runtime.host_arena
        if host is not None and host.nbytes and self.backend.can_register():
            inside = [getattr(s, p) for s, p in todo if host.contains(getattr(s, p))]
            in_place = self._register(host, inside)
            base = host.buffer.data_ptr()
            count = sum(1 for t in inside if t.data_ptr() + t.nbytes - base <= in_place)
            # what it could not register stays pageable where it is (the stager copies it):
            # moving it into another buffer would hold it twice, the loader's arena lives on
            todo = [(s, p) for s, p in todo if not host.contains(getattr(s, p))]
            del inside
        copied = 0
        if self.backend.can_register():
            moved, moved_count = self._move_into_arena(todo)
            in_place += moved
        else:
            copied, moved_count = self._copy_into_buffer(todo)
        pinned = in_place + copied
        self.report = ArenaReport(pinned, max(0, wanted - pinned), count + moved_count, in_place)
        # the pinned bytes return to the budget when the arena goes, released or collected
        self._finalizer = weakref.finalize(self, _release, self.backend, self.budget, list(self.registered), pinned)
        return self.report

    def _register(self, host: HostArena, inside: list[torch.Tensor]) -> int:
        """Register the longest page-aligned prefix of `host` that the budget grants and that cuts
        no tensor, in pieces (`_register_pieces`); returns the length registered (0 when the
        device cannot register)."""
        granted = self.budget.take(host.nbytes)
        length = host.nbytes if granted >= host.nbytes else _page_floor(granted)
        spans = _spans(host.buffer, inside)
        while True:  # a tensor across the boundary would read half pinned: move the boundary below it
            cut = [start for start, end in spans if start < length < end]
            if not cut:
                break
            length = _page_floor(min(cut))
        length = self._register_pieces(host.buffer, length, spans) if length else 0
        self.budget.give_back(granted - length)
        return length

    def _register_pieces(self, buffer: torch.Tensor, length: int, spans: list[tuple[int, int]]) -> int:
        """Register `buffer[:length]` piece by piece (`piece_ends`), stopping at the first piece
        the device refuses; returns the bytes registered, a prefix that cuts no tensor.

        One cudaHostRegister of tens of GB fails as a whole on WSL2 or in a container near its
        limit, and then nothing is pinned; in ~1 GiB pieces the process keeps what the OS grants.
        After a refusal the rest is not tried: the OS's page-lock limit is reached, and each
        refused call costs a driver round trip and a logged warning."""
        done = 0
        for end in piece_ends(length, spans):
            piece = buffer[done:end]
            if not self.backend.register(piece):
                break
            self.registered.append(piece)
            done = end
        if done < length:
            self.pieces_refused = True
        return done

    def _fitting(self, todo: list[Part], budget_bytes: int, advance: "Callable[[int, torch.Tensor], int]") -> tuple[list[Part], int]:
        """The tensors of `todo`, in order, that fit in `budget_bytes` laid out by `advance(end,
        tensor) -> new end`; and the bytes they take."""
        chosen: list[Part] = []
        end = 0
        for stored, part in todo:
            new_end = advance(end, getattr(stored, part))
            if new_end <= budget_bytes:
                chosen.append((stored, part))
                end = new_end
        return chosen, end

    def _move_into_arena(self, todo: list[Part]) -> tuple[int, int]:
        """Move host tensors into one new host arena (old ones freed as they go), register it."""
        if not todo:
            return 0, 0
        granted = self.budget.take(layout_bytes([(getattr(s, p).shape, getattr(s, p).dtype) for s, p in todo]))
        chosen, size = self._fitting(todo, granted, lambda end, t: place_end(end, t.nbytes))
        self.budget.give_back(granted - size)
        if not chosen:
            return 0, 0
        arena = HostArena(size)
        self._relocate(chosen, lambda t: arena.take(t.shape, t.dtype))
        self.packed = arena
        views = [getattr(s, p) for s, p in chosen]
        spans = _spans(arena.buffer, views)
        registered = self._register_pieces(arena.buffer, size, spans)
        self.budget.give_back(size - registered)  # moved but not pinned: staged like any pageable tensor
        return registered, sum(1 for _, end in spans if end <= registered)

    def _copy_into_buffer(self, todo: list[Part]) -> tuple[int, int]:
        """Pack host tensors into one exact-size pinned buffer (a device that cannot register)."""
        wanted = sum(aligned(getattr(s, p).nbytes) for s, p in todo)
        granted = self.budget.take(wanted) if wanted else 0
        buffer = self.backend.pin(granted) if granted else None
        if buffer is None:
            self.budget.give_back(granted)
            return 0, 0
        chosen, size = self._fitting(todo, granted, lambda end, t: end + aligned(t.nbytes))
        offset = 0

        def take(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal offset
            view = buffer[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            offset += aligned(tensor.nbytes)
            return view

        self._relocate(chosen, take)
        self.buffer = buffer
        self.budget.give_back(granted - size)
        return size, len(chosen)

    def _relocate(self, parts: list[Part], take: "Callable[[torch.Tensor], torch.Tensor]") -> None:
        """Copy each tensor to `take(tensor)` and re-point its stored copy and every parameter slot
        that showed it, so nothing keeps the old tensor alive past its own move."""
        slots: dict[tuple, list[tuple[Any, str]]] = {}
        for record in self.runtime.layers:
            for name, placeholder in record.placeholders.items():
                if placeholder.device.type == "cpu":
                    slots.setdefault(_identity(placeholder), []).append((record, name))
        moved = 0
        for stored, part in parts:
            tensor = getattr(stored, part)
            view = take(tensor)
            view.copy_(tensor)
            setattr(stored, part, view)
            for record, name in slots.pop(_identity(tensor), ()):
                record.repoint(name, view)
            moved += tensor.nbytes
            del tensor
            if moved >= TRIM_EVERY_BYTES:  # freed small tensors sit in the heap until trimmed
                release_free_heap()
                moved = 0
        release_free_heap()

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self.buffer = None
        self.registered = []


def _release(backend: DeviceBackend, budget: PinnedBudget, registered: list[torch.Tensor], nbytes: int) -> None:
    """Unregister what was pinned in place (its memory may be freed right after), once the copies
    already enqueued from it are done, and return the bytes."""
    if registered:
        backend.host_wait(backend.record(backend.copy_stream()))
    for buffer in registered:
        backend.unregister(buffer)
    budget.give_back(nbytes)
