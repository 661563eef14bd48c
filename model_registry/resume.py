"""Downloads that resume across processes, and no partial file left behind for good.

huggingface_hub 2.x writes each file to a name unique to one attempt
(`blobs/<etag>.<8 hex>.incomplete`) and deletes it when the attempt fails; a killed process
leaves it behind, and no later attempt looks at it. So the next run downloads every
interrupted file from zero, and the partial stays in the cache for good. `install_hf_resume`
replaces that one step (`file_download._download_to_tmp_and_move`) with one that

* claims the largest partial of the same blob left by an earlier attempt (ours, or the
  library's own unique names), by renaming it to this attempt's name (the library holds its
  per-blob file lock around the call), and deletes any other partials of that blob;
* continues it with the library's own `http_get(resume_size=...)` (an HTTP Range request; a
  server that ignores the range gets the whole file again, handled by http_get);
* on failure or cancel keeps what arrived under the blob's stable name `<etag>.incomplete`,
  for the next attempt; on success moves the file into place as the library does.

Xet transfers keep the library's own path (hf_xet has its own chunk cache).

modelscope_hub already resumes `<file>.incomplete` with Range requests across processes;
`partial_bytes` and `remove_partials` serve both hubs: partials count in the disk-space check
(they are on disk already and shrink what still has to come), and once a model is complete
the partials left in its folders are removed.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARTIAL_SUFFIXES = (".incomplete", ".parallel_tmp")
_installed = False


def _partials_of(incomplete_path: Path) -> list[Path]:
    """Partial files of one blob: `<etag>.incomplete` and `<etag>.<hex>.incomplete`."""
    stem = incomplete_path.name[: -len(".incomplete")]
    pattern = re.compile(re.escape(stem) + r"(\.[0-9a-f]{8})?\.incomplete")
    try:
        return [p for p in incomplete_path.parent.iterdir() if pattern.fullmatch(p.name)]
    except FileNotFoundError:
        return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def claim_partial(incomplete_path: Path, mine: Path, expected_size: int | None) -> int:
    """Rename the largest usable partial of this blob to `mine`; delete the others. Bytes claimed."""
    candidates = sorted(_partials_of(incomplete_path), key=_size, reverse=True)
    claimed = 0
    for path in candidates:
        size = _size(path)
        usable = size > 0 and (expected_size is None or size <= expected_size)
        if usable and not claimed:
            try:
                os.replace(path, mine)
                claimed = size
                continue
            except OSError:
                pass
        path.unlink(missing_ok=True)
    return claimed


def park_partial(mine: Path, incomplete_path: Path) -> None:
    """Keep what an attempt got under the blob's stable partial name (nothing: delete it)."""
    if _size(mine) > 0:
        try:
            os.replace(mine, incomplete_path)
            return
        except OSError:
            log.debug("could not keep the partial %s", mine, exc_info=True)
    mine.unlink(missing_ok=True)


def install_hf_resume() -> None:
    """Make huggingface_hub's cache downloads resume partial files (idempotent)."""
    global _installed
    if _installed:
        return
    from huggingface_hub import file_download as fd

    original = fd._download_to_tmp_and_move

    def _download_to_tmp_and_move(
        incomplete_path: Path,
        destination_path: Path,
        url_to_download: str,
        headers: dict[str, str],
        expected_size: int | None,
        filename: str,
        force_download: bool,
        etag: str | None,
        xet_file_data: Any,
        tqdm_class: Any = None,
        **extra: Any,
    ) -> None:
        if destination_path.exists() and not force_download:
            return
        if extra or (xet_file_data is not None and fd.is_xet_available()):
            return original(
                incomplete_path=incomplete_path, destination_path=destination_path, url_to_download=url_to_download,
                headers=headers, expected_size=expected_size, filename=filename, force_download=force_download,
                etag=etag, xet_file_data=xet_file_data, tqdm_class=tqdm_class, **extra,
            )
        incomplete_path = Path(incomplete_path)
        mine = incomplete_path.with_name(f"{incomplete_path.name[: -len('.incomplete')]}.{uuid.uuid4().hex[:8]}.incomplete")
        resume = claim_partial(incomplete_path, mine, expected_size)
        if resume:
            log.info("resuming %s from byte %d", filename, resume)
        try:
            with open(mine, "ab") as f:
                if expected_size is not None:
                    fd._check_disk_space(expected_size - resume, mine.parent)
                    fd._check_disk_space(expected_size - resume, Path(destination_path).parent)
                fd.http_get(url_to_download, f, resume_size=resume, headers=headers,
                            expected_size=expected_size, tqdm_class=tqdm_class)
            fd._chmod_and_move(mine, Path(destination_path))
        except BaseException:
            park_partial(mine, incomplete_path)
            raise

    fd._download_to_tmp_and_move = _download_to_tmp_and_move
    _installed = True


def _partials_under(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.rglob("*") if p.name.endswith(PARTIAL_SUFFIXES) and p.is_file()]


def partial_bytes(folder: Path) -> int:
    """Bytes of partial downloads under `folder` (they need no new disk space)."""
    return sum(max(_size(p), 0) for p in _partials_under(folder))


def remove_partials(folder: Path) -> int:
    """Delete every partial download under `folder` (call once its model is complete)."""
    removed = 0
    for path in _partials_under(folder):
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d leftover partial download(s) under %s", removed, folder)
    return removed
