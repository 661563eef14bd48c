"""Hugging Face Hub: find a model in the standard cache, or fetch it with snapshot_download.

Downloads go into huggingface_hub's own cache (HF_HUB_CACHE / HF_HOME), so a model that
diffusers, ComfyUI or `hf download` already fetched is reused, and what we fetch is reused
by them; or, when a download folder is given (--model-dir), into the same cache layout under
<folder>/huggingface/hub (the standard cache is still looked at for complete copies). The
library does the transfer: per-file atomic writes (a cut-off file is never moved into place),
Range-resume of a dropped connection, and skipping of files already cached on the next call;
model_registry.resume makes a partial file survive a failed or killed attempt and resumes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, get_token

from . import errors
from .catalog import ModelEntry
from .completeness import is_complete, repo_problems
from .network import hub_timeout, no_answer, timed_out, unreachable_reason
from .paths import hf_cache_dir
from .progress import Reporter, hf_tqdm_class
from .resume import install_hf_resume, partial_bytes, remove_partials
from .types import UserFacingError

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")


def endpoint() -> str:
    """The hub URL (HF_ENDPOINT, e.g. a mirror), read now rather than at import."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network at all."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _etag_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT", 10))
    except ValueError:
        return 10.0


def _download_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def storage_dir(entry: ModelEntry, cache: Path) -> Path:
    """The repo's folder in an HF cache (blobs, snapshots, refs)."""
    return cache / f"models--{(entry.hf_repo or '').replace('/', '--')}"


def cached_snapshot(entry: ModelEntry, cache: Path | None = None) -> Path | None:
    """The cached snapshot of `entry` in `cache` (default: the standard cache) if it is
    complete; no network. A GGUF variant is never a cached snapshot (its folder is assembled in
    the model directory, see `download_gguf`)."""
    if not entry.hf_repo or entry.gguf is not None:
        return None
    cache = cache or hf_cache_dir()
    if not storage_dir(entry, cache).is_dir():
        return None
    family = entry.adapter
    try:
        path = Path(
            snapshot_download(
                entry.hf_repo,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=family.allow_patterns(),
                ignore_patterns=family.ignore_patterns(),
            )
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if is_complete(path, family, _known_sizes(entry.hf_repo, path.name, cache)) else None


def _known_sizes(repo_id: str, commit: str, cache: Path) -> dict[str, int]:
    """File sizes the hub listed for `commit` (cached by snapshot_download); {} if never listed."""
    try:
        return {f.path: f.size for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache)}
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return {}


def _remaining_bytes(entry: ModelEntry, sizes: dict[str, int], allow: list[str], commit: str | None, cache: Path) -> tuple[int, int]:
    """(bytes still to fetch, number of files the pipeline needs) for the listed repo files.
    Partial files of earlier attempts are resumed, so their bytes are not fetched again."""
    wanted = list(filter_repo_objects(sizes, allow_patterns=allow, ignore_patterns=entry.adapter.ignore_patterns()))
    snapshot = storage_dir(entry, cache) / "snapshots" / (commit or "-")
    remaining = sum(sizes[f] for f in wanted if not (snapshot / f).is_file())
    remaining = max(0, remaining - partial_bytes(storage_dir(entry, cache) / "blobs"))
    return remaining, len(wanted)


def _check_disk(entry: ModelEntry, needed: int, target: Path) -> None:
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise errors.disk_full(entry, str(target), needed, free)


def download(entry: ModelEntry, reporter: Reporter, token: str | None = None, cache: Path | None = None) -> Path:
    """Fetch the files `entry`'s pipeline needs into the HF cache `cache` (default: the
    standard one); returns the snapshot folder."""
    repo = entry.hf_repo
    if not repo:
        raise errors.not_found(entry, "hf", "(none)", "this model has no Hugging Face repository")
    url = endpoint()
    if offline_mode():
        raise errors.offline(entry, "hf", url, "HF_HUB_OFFLINE is set and the model is not in the cache")
    token = token or get_token()
    if entry.gated and not token:
        raise errors.gated(entry, has_token=False)
    if reason := unreachable_reason(url):
        raise errors.offline(entry, "hf", url, reason)
    if no_answer(url):
        raise errors.no_answer(entry, "hf", url, hub_timeout())

    family = entry.adapter
    cache = cache or hf_cache_dir()
    install_hf_resume()
    waited = _etag_timeout()
    try:
        reporter.say(0.0, f"Asking {url} for the file list of {repo}")
        info = HfApi(endpoint=url, token=token).model_info(repo, files_metadata=True, timeout=waited)
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        allow = family.allow_patterns(available=sizes)
        remaining, reporter.total_files = _remaining_bytes(entry, sizes, allow, info.sha, cache)
        reporter.total_bytes = remaining
        _check_disk(entry, remaining, cache)
        waited = max(_etag_timeout(), _download_timeout())
        path = Path(
            snapshot_download(
                repo,
                cache_dir=cache,
                endpoint=url,
                token=token,
                allow_patterns=allow,
                ignore_patterns=family.ignore_patterns(),
                etag_timeout=_etag_timeout(),
                max_workers=4,
                tqdm_class=hf_tqdm_class(reporter),
            )
        )
    except GatedRepoError as exc:
        raise errors.gated(entry, has_token=bool(token)) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise errors.not_found(entry, "hf", repo, type(exc).__name__) from exc
    except LocalEntryNotFoundError as exc:  # the hub went away between listing and fetching
        raise errors.offline(entry, "hf", url, str(exc).splitlines()[0]) from exc
    except (httpx2.TransportError, HfHubHTTPError, OSError) as exc:
        raise _translate(entry, exc, url, token, cache, waited, reporter.bytes_done) from exc
    reporter.say(0.99, f"Checking the files of {entry.name}")
    if problems := repo_problems(path, family, {f: n for f, n in sizes.items() if n}):
        raise errors.incomplete(entry, str(path), problems)
    remove_partials(storage_dir(entry, cache) / "blobs")  # whole now: no partial of it is needed
    return path


def _translate(
    entry: ModelEntry, exc: BaseException, url: str, token: str | None, cache: Path, waited: float, received: int
) -> UserFacingError:
    """The user-facing error for a transfer or file-system failure during a download."""
    if errors.is_disk_full(exc):
        return errors.disk_full(entry, str(cache))
    if isinstance(exc, PermissionError):
        return errors.not_writable(entry, str(cache), str(exc))
    if timed_out(exc):
        return errors.no_answer(entry, "hf", url, waited, received)
    if isinstance(exc, httpx2.ConnectError):
        return errors.offline(entry, "hf", url, str(exc))
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    if status in (401, 403):
        if entry.gated:
            return errors.gated(entry, has_token=bool(token))
        return errors.not_found(entry, "hf", entry.hf_repo or "", f"HTTP {status}: check HF_TOKEN")
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return errors.interrupted(entry, f"{type(exc).__name__}: {first_line}")


def gguf_allow_patterns(entry: ModelEntry, available=None) -> list[str]:
    """The base repo's files a GGUF variant needs: everything but the denoiser's weights (its
    config.json only)."""
    denoiser = entry.adapter.denoiser
    keep = [p for p in entry.adapter.allow_patterns(available) if not p.startswith(f"{denoiser}/")]
    return keep + [f"{denoiser}/config.json"]


def download_gguf(entry: ModelEntry, reporter: Reporter, token: str | None, target: Path, cache: Path | None = None) -> Path:
    """A GGUF variant: the base repo without its denoiser weights, plus the one chosen .gguf
    file, assembled as a pipeline folder at `target` (links into the HF cache `cache`, default
    the standard one; no copies): the denoiser folder holds the base config.json and the .gguf,
    which engine.load_model reads."""
    from huggingface_hub import hf_hub_download

    assert entry.gguf is not None and entry.hf_repo
    url = endpoint()
    if offline_mode():
        raise errors.offline(entry, "hf", url, "HF_HUB_OFFLINE is set and the model is not in the cache")
    token = token or get_token()
    if reason := unreachable_reason(url):
        raise errors.offline(entry, "hf", url, reason)
    denoiser = entry.adapter.denoiser
    try:
        reporter.say(0.0, f"Fetching {entry.hf_repo} without its {denoiser} weights")
        base = Path(
            snapshot_download(
                entry.hf_repo, cache_dir=cache or hf_cache_dir(), endpoint=url, token=token,
                allow_patterns=gguf_allow_patterns(entry), ignore_patterns=entry.adapter.ignore_patterns(),
                etag_timeout=_etag_timeout(), max_workers=4, tqdm_class=hf_tqdm_class(reporter),
            )
        )
        reporter.say(0.1, f"Fetching {entry.gguf.file} from {entry.gguf.repo}")
        gguf_file = Path(
            hf_hub_download(entry.gguf.repo, entry.gguf.file, cache_dir=cache or hf_cache_dir(), endpoint=url, token=token,
                            etag_timeout=_etag_timeout(), tqdm_class=hf_tqdm_class(reporter))
        )
    except GatedRepoError as exc:
        raise errors.gated(entry, has_token=bool(token)) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise errors.not_found(entry, "hf", entry.gguf.repo, type(exc).__name__) from exc
    except LocalEntryNotFoundError as exc:
        raise errors.offline(entry, "hf", url, str(exc).splitlines()[0]) from exc
    except (httpx2.TransportError, HfHubHTTPError, OSError) as exc:
        raise _translate(entry, exc, url, token) from exc
    assemble_gguf_folder(base, gguf_file, denoiser, target)
    if problems := repo_problems(target, entry.adapter):
        raise errors.incomplete(entry, str(target), problems)
    return target


def assemble_gguf_folder(base: Path, gguf_file: Path, denoiser: str, target: Path) -> Path:
    """`target`: links to every top-level item of `base` but the denoiser folder, and a denoiser
    folder with links to its config.json and to `gguf_file`."""
    target.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.name == denoiser:
            continue
        link = target / item.name
        if not link.exists():
            link.symlink_to(item.resolve(), target_is_directory=item.is_dir())
    folder = target / denoiser
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.gguf"):
        if old.name != gguf_file.name:
            old.unlink()
    for src, name in ((base / denoiser / "config.json", "config.json"), (gguf_file, gguf_file.name)):
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(src).resolve())
    return target
