"""Filling a resident copy on the computation device without blocking the host.

After a re-plan keeps more layers resident, each is filled the first time it runs, inside a
streamed forward. `stored.to_place(device)` does that with one blocking `.to(device)` per
tensor: the host waits for the compute stream to drain and for each copy, so the prefetch the
scheduler queued stops running ahead. Here the host parts (pinned) are copied on the copy stream
without blocking, after one event that orders the copy stream behind the compute stream (the
fresh device buffers may reuse memory the compute stream freed and still reads), and the compute
stream waits on one event after them. Conversion to the resident form, if any, then runs on the
device, in stream order.
"""

from __future__ import annotations

import torch

from engine.storage.stored import StoredTensor
from engine.transfer.devices import DeviceBackend


def copy_to_device(backend: DeviceBackend, source: dict[str, StoredTensor], device: torch.device) -> dict[str, StoredTensor] | None:
    """`source` with every host part copied to `device` asynchronously (parts already on it are
    kept); None when some part cannot be copied so (a disk master, pageable memory): the caller
    then takes the synchronous path."""
    plans: list[tuple[str, StoredTensor, list[torch.Tensor]]] = []
    for name, stored in source.items():
        parts = [t for _, t in stored.parts()]
        if not parts:
            return None
        for t in parts:
            if not backend.is_pinned(t) if t.device.type == "cpu" else t.device != device:
                return None
        plans.append((name, stored, parts))
    copy_stream, compute_stream = backend.copy_stream(), backend.compute_stream()
    backend.wait(copy_stream, backend.record(compute_stream))
    out: dict[str, StoredTensor] = {}
    for name, stored, parts in plans:
        moved = []
        for t in parts:
            if t.device.type != "cpu":  # already on the device (an onload copy there)
                moved.append(t)
                continue
            dst = torch.empty(t.shape, dtype=t.dtype, device=device)
            backend.copy(dst, t, copy_stream)
            moved.append(dst)
        out[name] = stored if all(a is b for a, b in zip(moved, parts)) else stored.with_parts(moved)
    backend.wait(compute_stream, backend.record(copy_stream))
    return out
