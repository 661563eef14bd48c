"""The small device interface the transfer scheduler runs against.

CUDA gets a dedicated copy stream, events instead of host syncs and pinned host memory. The CPU
backend runs the same schedule synchronously (events are born complete), and tests plug in a
recording fake that checks ordering and slot reuse without a GPU.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import torch


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


class CudaBackend(DeviceBackend):
    """A copy stream beside the compute stream; events order them, the host never syncs per layer."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._copy_stream = torch.cuda.Stream(device=self.device)

    def compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def copy_stream(self) -> Any:
        return self._copy_stream

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        if event is not None:
            stream.wait_event(event)

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def host_wait(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def pin(self, nbytes: int) -> torch.Tensor | None:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            return None

    def can_register(self) -> bool:
        return True

    def register(self, buffer: torch.Tensor) -> bool:
        # cudaHostRegister page-locks the buffer where it is, as torch's own checkpoint stager does
        # (torch.cuda._pin_memory_utils); flags 0 = cudaHostRegisterDefault
        cudart = torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0))
        if error != 0:
            # a failed runtime call is also the thread's "last error": clear it, or the next kernel
            # launch check in torch would report it as its own
            if hasattr(cudart, "cudaGetLastError"):
                cudart.cudaGetLastError()
            return False
        return True

    def unregister(self, buffer: torch.Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type != "cpu" or tensor.is_pinned()

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
