"""Download progress as (fraction 0..1, message) calls, fed by the hub clients' own hooks.

huggingface_hub reports through a tqdm class and modelscope through per-file callback
classes; both are adapted here to one `Reporter`. Callbacks may arrive from download
worker threads. An exception raised by the callback aborts the download (a way to cancel).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

ProgressCallback = Callable[[float, str], None]

_MIN_STEP = 0.005  # report byte progress at most every 0.5 %


class Reporter:
    """Turns bytes and finished files into throttled, monotonic (fraction, message) reports."""

    def __init__(self, callback: ProgressCallback | None, label: str, total_bytes: int = 0, total_files: int = 0):
        self._callback = callback
        self._label = label
        self._lock = threading.Lock()
        self.total_bytes = max(total_bytes, 0)
        self.total_files = max(total_files, 0)
        self.bytes_done = 0
        self.files_done = 0
        self._last = -1.0

    def _fraction(self) -> float:
        if self.total_bytes:
            return min(self.bytes_done / self.total_bytes, 0.99)
        if self.total_files:
            return min(self.files_done / self.total_files, 0.99)
        return 0.0

    def _message(self) -> str:
        parts = [f"Downloading {self._label}"]
        if self.total_files:
            parts.append(f"{self.files_done}/{self.total_files} files")
        if self.total_bytes:
            scale, unit = (1e9, "GB") if self.total_bytes >= 1e9 else (1e6, "MB")
            parts.append(f"{self.bytes_done / scale:.2f}/{self.total_bytes / scale:.2f} {unit}")
        return ", ".join(parts)

    def _emit(self, force: bool) -> None:
        with self._lock:
            fraction = max(self._fraction(), self._last)
            if not force and fraction - self._last < _MIN_STEP:
                return
            self._last = fraction
            message = self._message()
        if self._callback is not None:
            self._callback(fraction, message)

    def add_bytes(self, n: int | float | None) -> None:
        """Some bytes of some file arrived (negative when a client restarts a file)."""
        with self._lock:
            self.bytes_done = max(self.bytes_done + int(n or 0), 0)
        self._emit(force=False)

    def file_done(self) -> None:
        """One file finished (or was already there)."""
        with self._lock:
            self.files_done += 1
        self._emit(force=True)

    def say(self, fraction: float, message: str) -> None:
        """Report a stage (e.g. "checking files") outside the byte stream."""
        with self._lock:
            self._last = max(self._last, fraction)
        if self._callback is not None:
            self._callback(fraction, message)


def hf_tqdm_class(reporter: Reporter) -> type:
    """A huggingface_hub tqdm class that feeds `reporter` and prints nothing.

    snapshot_download builds its aggregate byte bar ("huggingface_hub.snapshot_download")
    and its per-file bar ("Fetching N files") from this class.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _ReportingBar(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            name = kwargs.get("name") or ""
            desc = str(kwargs.get("desc") or "")
            self._role = "bytes" if name == "huggingface_hub.snapshot_download" else ""
            if not name and desc.startswith("Fetching"):
                self._role = "files"
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: int | float | None = 1) -> bool | None:
            if self._role == "bytes":
                reporter.add_bytes(n)
            elif self._role == "files":
                for _ in range(int(n or 0)):
                    reporter.file_done()
            return super().update(n)

    return _ReportingBar


def modelscope_callback_class(reporter: Reporter) -> type:
    """A modelscope ProgressCallback class (instantiated per file) that feeds `reporter`."""
    from modelscope.hub.callback import ProgressCallback as MsProgressCallback

    class _ReportingCallback(MsProgressCallback):  # type: ignore[misc, valid-type]
        def update(self, size: int) -> None:
            reporter.add_bytes(size)

        def end(self) -> None:
            reporter.file_done()

    return _ReportingCallback
