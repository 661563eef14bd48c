"""The small device interface the transfer scheduler runs against.

CUDA gets a dedicated copy stream, events instead of host syncs and pinned host memory. The CPU
backend runs the same schedule synchronously (events are born complete), and tests plug in a
recording fake that checks ordering and slot reuse without a GPU.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)


class DeviceBackend(ABC):
    """What the scheduler needs from a device: streams, events, slots, async copies, pinning."""

    device: torch.device

    @abstractmethod
    def compute_stream(self) -> Any: ...

    @abstractmethod
    def copy_stream(self) -> Any: ...

    @abstractmethod
    def record(self, stream: Any) -> Any:
        """An event marking everything enqueued on `stream` so far."""

    @abstractmethod
    def wait(self, stream: Any, event: Any) -> None:
        """Make `stream` wait for `event` (device-side; the host does not block)."""

    @abstractmethod
    def allocate(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer on the device (a streaming slot)."""

    @abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        """Enqueue dst <- src on `stream` (asynchronous when src is pinned)."""

    def host_wait(self, event: Any) -> None:
        """Block the host until `event` completed (only used when tearing slots down)."""

    def pin(self, nbytes: int) -> torch.Tensor | None:
        """A pinned host buffer, or None where pinning is not available."""
        return None

    def can_register(self) -> bool:
        """Can this device pin existing host memory in place (`register`)?"""
        return False

    def register(self, buffer: torch.Tensor) -> bool:
        """Pin an existing, page-aligned host buffer in place (no copy). False where the device
        cannot; the caller then copies into `pin` buffers instead."""
        return False

    def unregister(self, buffer: torch.Tensor) -> None:
        """Undo `register` (before the buffer's memory is freed)."""

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        """Can `tensor` be copied to the device asynchronously? (Always, on a synchronous device.)"""
        return True

    def timing_event(self, stream: Any) -> Any:
        """A timestamp of `stream` at this point of its work (None: the device does not time)."""
        return None

    def elapsed_seconds(self, start: Any, end: Any) -> float | None:
        """Seconds between two `timing_event`s, or None while the device has not reached `end`."""
        return None


class CpuBackend(DeviceBackend):
    """Synchronous: every copy is done when issued, so every event is complete."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def compute_stream(self) -> Any:
        return "compute"

    def copy_stream(self) -> Any:
        return "copy"

    def record(self, stream: Any) -> Any:
        return None

    def wait(self, stream: Any, event: Any) -> None:
        return None

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        dst.copy_(src)

    def timing_event(self, stream: Any) -> Any:
        return time.perf_counter()  # synchronous: the host clock is the device's

    def elapsed_seconds(self, start: Any, end: Any) -> float | None:
        return end - start


class RegisteredRanges:
    """Host memory this process registered in place, by address range.

    torch's `Tensor.is_pinned()` asks the driver about the start of the tensor's *storage*, so every
    view into a buffer whose prefix is registered reports pinned, the unregistered tail included;
    copying such a tail "asynchronously" would silently run as a blocking pageable copy on the
    thread that launches compute. So registered memory is judged by range here."""

    def __init__(self) -> None:
        self.ranges: dict[int, int] = {}  # start address -> bytes
        self.storages: dict[int, int] = {}  # storages with a registered part -> how many parts

    def add(self, buffer: torch.Tensor) -> None:
        self.ranges[buffer.data_ptr()] = buffer.nbytes
        key = buffer.untyped_storage().data_ptr()
        self.storages[key] = self.storages.get(key, 0) + 1

    def remove(self, buffer: torch.Tensor) -> None:
        if self.ranges.pop(buffer.data_ptr(), None) is None:
            return
        key = buffer.untyped_storage().data_ptr()
        left = self.storages.get(key, 0) - 1
        if left > 0:
            self.storages[key] = left
        else:
            self.storages.pop(key, None)

    def covers(self, tensor: torch.Tensor) -> bool | None:
        """True: wholly inside a registered range; False: in a storage registered only in part,
        outside it; None: not memory registered here (ask torch)."""
        start = tensor.data_ptr()
        end = start + tensor.nbytes
        if any(base <= start and end <= base + n for base, n in self.ranges.items()):
            return True
        if tensor.untyped_storage().data_ptr() in self.storages:
            return False
        return None


CUDART_NAMES = ("libcudart.so", "libcudart.so.12", "libcudart.so.13")  # tried when none is mapped
MAPS = "/proc/self/maps"


def _clear_cuda_error() -> None:
    """Reset the thread's CUDA "last error" after a failed runtime call, which torch's next kernel
    launch check would otherwise report as its own."""
    get_last_error = _find_cuda_get_last_error()
    if get_last_error is None:
        log.debug("no cudaGetLastError found: the CUDA error state is left as it is")
        return
    try:
        get_last_error()
    except OSError:  # pragma: no cover - best effort
        log.debug("could not clear the CUDA error state", exc_info=True)


def _find_cuda_get_last_error() -> Callable[[], Any] | None:
    """The cudaGetLastError of the runtime torch uses: torch's own binding where it has one, else
    the libcudart this process has mapped (the error state is per runtime copy, so the mapped one
    is the one to clear), else a libcudart found by its usual names, else None."""
    for find in (_torch_get_last_error, _mapped_get_last_error, _named_get_last_error):
        found = find()
        if found is not None:
            return found
    return None


def _torch_get_last_error() -> Callable[[], Any] | None:
    try:
        return getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    except (AssertionError, RuntimeError, AttributeError):  # torch without CUDA
        return None


def _mapped_get_last_error() -> Callable[[], Any] | None:
    try:
        with open(MAPS) as maps:
            paths = sorted({line.split()[-1] for line in maps if "libcudart" in line})
    except OSError:  # not Linux
        return None
    return _first_loadable(paths)


def _named_get_last_error() -> Callable[[], Any] | None:
    return _first_loadable(CUDART_NAMES)


def _first_loadable(names: Iterable[str]) -> Callable[[], Any] | None:
    import ctypes

    for name in names:
        try:
            return ctypes.CDLL(name).cudaGetLastError
        except (OSError, AttributeError):
            continue
    return None


class CudaBackend(DeviceBackend):
    """A copy stream beside the compute stream; events order them, the host never syncs per layer."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # made on first use, not here: a pipeline is built (and its backend with it) where no
        # CUDA context may be made yet (ZeroGPU's main process, ui.zerogpu)
        self._copy_stream: Any = None
        self._stream_lock = threading.Lock()
        self._registered = RegisteredRanges()

    def compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def copy_stream(self) -> Any:
        if self._copy_stream is None:
            with self._stream_lock:  # the stager's thread asks too
                if self._copy_stream is None:
                    self._copy_stream = torch.cuda.Stream(device=self.device)
        return self._copy_stream

    def record(self, stream: Any) -> Any:
        # the host waits on these (slot teardown, the stager's buffers): a blocking-sync event
        # sleeps in the driver, where a default one spins a core; timing events stay apart
        event = torch.cuda.Event(blocking=True)
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        if event is not None:
            stream.wait_event(event)

    def allocate(self, nbytes: int) -> torch.Tensor:
        slot = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        # written on the copy stream: when the slot is freed, the allocator must not hand its
        # memory out again before the copies pending then are done
        slot.record_stream(self.copy_stream())
        return slot

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def host_wait(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def pin(self, nbytes: int) -> torch.Tensor | None:
        # under this device: where no CUDA context exists yet, the pinned allocator makes one on
        # the current device, and computing on cuda:1 must create none on GPU 0
        try:
            with torch.cuda.device(self.device):
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            return None

    def can_register(self) -> bool:
        return True

    def register(self, buffer: torch.Tensor) -> bool:
        # cudaHostRegister page-locks the buffer where it is, as torch's own checkpoint stager does
        # (torch.cuda._pin_memory_utils); flags 1 = cudaHostRegisterPortable: pinned for every
        # context, whichever device is current on this thread
        with torch.cuda.device(self.device):
            error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 1))
        if error != 0:
            _clear_cuda_error()
            log.warning("cudaHostRegister of %d bytes failed (cudaError %d): that memory stays pageable", buffer.numel(), error)
            return False
        self._registered.add(buffer)
        return True

    def unregister(self, buffer: torch.Tensor) -> None:
        self._registered.remove(buffer)
        with torch.cuda.device(self.device):
            error = int(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))
        if error != 0:
            _clear_cuda_error()
            log.warning("cudaHostUnregister failed (cudaError %d)", error)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cpu":
            return True
        covered = self._registered.covers(tensor)
        return tensor.is_pinned() if covered is None else covered

    def timing_event(self, stream: Any) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def elapsed_seconds(self, start: Any, end: Any) -> float | None:
        if start is None or end is None or not end.query():
            return None
        return start.elapsed_time(end) / 1000.0


def backend_for(device: torch.device) -> DeviceBackend:
    return CudaBackend(device) if device.type == "cuda" else CpuBackend(device)
