"""Read-ahead of disk-offloaded layers in execution order, on one background thread.

This serves the synchronous streaming path (the CPU, and layers a GPU schedule did not foresee).
Layers the transfer scheduler streams (engine.transfer.scheduler) are read by its stager straight into
pinned staging buffers instead; the prefetcher never reads those (`runtime.is_scheduled`).

The runtime calls one hook per synchronously streamed layer, `prefetcher.on_layer_start(record,
source)`, just before it would materialize the layer's parameters:

* if the layer's bytes were read ahead, the hook waits for that read and returns the layer's
  computation parameters ({name: tensor}); otherwise it returns None and the runtime reads them
  itself (first forward, layers the trace did not foresee);
* then it queues reads for the layers that come next in `runtime.execution_order` (known after
  the first forward) and whose weights will be streamed from their files: as many layers as fit in
  `ahead_bytes` (default: the largest disk layer, so at most the running layer plus about one
  layer's bytes are in flight), never past the end of the forward, and drops reads that are no
  longer ahead (so nothing read ahead stays in memory between forwards).

Reads are `DiskStored.read` (positional file reads into fresh CPU tensors; the GIL is released
while the kernel copies), so they overlap the computation of the running layer. The class only
depends on `layer.masters`, `layer.resident`, `layer.onload_copy`, `runtime.wants_resident(layer)`,
`runtime.execution_order` and `runtime.is_scheduled`.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from engine.storage.disk import DiskStored

if TYPE_CHECKING:
    from engine.layers.state import ManagedLayer as LayerRecord
    from engine.runtime.component import VramRuntime
    from engine.storage.stored import StoredTensor


class DiskPrefetcher:
    """Reads the next disk-streamed layers while the current one computes."""

    def __init__(self, runtime: "VramRuntime", ahead_bytes: int | None = None):
        self.runtime = runtime
        self.ahead_bytes = ahead_bytes
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[int, tuple["LayerRecord", Future]] = {}
        self._order_key: tuple[int, int] | None = None
        self._index: dict[int, int] = {}
        self._lock = threading.Lock()
        self.hits = 0  # layers whose bytes were read ahead
        self.misses = 0  # disk layers read synchronously

    # --- which layers stream from disk ---------------------------------------------------------
    @staticmethod
    def disk_bytes(record: "LayerRecord") -> int:
        return sum(s.nbytes for s in record.masters.values() if isinstance(s, DiskStored))

    def streams_from_disk(self, record: "LayerRecord") -> bool:
        """Will the layer's next synchronous forward read its masters (at least one on disk)?
        Not when the transfer scheduler streams it: its stager reads it into staging buffers."""
        runtime = self.runtime
        if record.resident is not None or record.fast or runtime.is_scheduled(record):
            return False
        if runtime.active and (record.onload_copy is not None or runtime.wants_resident(record)):
            return False
        return self.disk_bytes(record) > 0

    def _ahead_limit(self) -> int:
        if self.ahead_bytes is None:
            self.ahead_bytes = max((self.disk_bytes(r) for r in self.runtime.layers), default=0)
        return self.ahead_bytes

    def _position(self, record: "LayerRecord") -> tuple[list["LayerRecord"], int | None]:
        order = self.runtime.execution_order or []
        key = (id(order), len(order))
        if key != self._order_key:
            self._index = {id(r): i for i, r in enumerate(order)}
            self._order_key = key
        return order, self._index.get(id(record))

    # --- the hook -------------------------------------------------------------------------------
    def on_layer_start(self, record: "LayerRecord", source: dict[str, "StoredTensor"]) -> dict[str, torch.Tensor] | None:
        """Called by the runtime before a streamed layer computes. Returns its computation
        parameters if they were read ahead (else None), and queues the next reads."""
        with self._lock:
            entry = self._pending.pop(id(record), None)
        self._schedule_after(record)  # queue the next reads first: they run while this one is used
        host = None
        if entry is not None:
            future = entry[1]
            if source is record.masters:
                host = future.result()  # re-raises a read error here, in the forward that needs it
            else:
                future.cancel()
        elif source is record.masters and self.disk_bytes(record):
            self.misses += 1
        if host is None:
            return None
        self.hits += 1
        runtime = self.runtime
        device, dtype = runtime.comp_device, runtime.comp_dtype
        params = {}
        for name, stored in source.items():
            if name in host:
                params[name] = stored.finish(host.pop(name), device, dtype)  # type: ignore[attr-defined]
            else:
                params[name] = stored.materialize(device, dtype)
        return params

    def _schedule_after(self, record: "LayerRecord") -> None:
        order, index = self._position(record)
        wanted: list["LayerRecord"] = []
        if index is not None:
            limit, total = self._ahead_limit(), 0
            for nxt in order[index + 1 :]:
                if not self.streams_from_disk(nxt):
                    continue
                size = self.disk_bytes(nxt)
                if wanted and total + size > limit:
                    break
                wanted.append(nxt)
                total += size
                if total >= limit:
                    break
        keep = {id(r) for r in wanted}
        with self._lock:
            for key in [k for k in self._pending if k not in keep]:
                self._pending.pop(key)[1].cancel()  # no longer ahead: drop it
            for nxt in wanted:
                if id(nxt) not in self._pending:
                    self._pending[id(nxt)] = (nxt, self._pool().submit(_read_layer, nxt.masters))

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-prefetch")
        return self._executor

    def pending_layers(self) -> list[str]:
        with self._lock:
            return [r.name for r, _ in self._pending.values()]

    def clear(self) -> None:
        """Drop every read ahead (e.g. when the component is offloaded)."""
        with self._lock:
            for _, future in self._pending.values():
                future.cancel()
            self._pending.clear()

    def close(self) -> None:
        self.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __repr__(self) -> str:
        return f"DiskPrefetcher(ahead_bytes={self.ahead_bytes}, hits={self.hits}, misses={self.misses})"


def _read_layer(masters: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: stored.read() for name, stored in masters.items() if isinstance(stored, DiskStored)}
