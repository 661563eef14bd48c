"""ModelScope: find a model in modelscope's cache, or fetch it with its snapshot_download.

Same idea as the Hugging Face source: the library's own cache (MODELSCOPE_CACHE) and
transfer code, which keeps finished files and resumes partial ones (`<file>.incomplete`, HTTP
Range, across processes); or, when a download folder is given (--model-dir), the same layout
under <folder>/modelscope. modelscope is imported lazily because importing it takes about two
seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

from . import errors
from .catalog import ModelEntry
from .completeness import is_complete, repo_problems
from .network import hub_timeout, no_answer, timed_out, unreachable_reason
from .paths import modelscope_cache_dir
from .progress import Reporter, modelscope_callback_class
from .resume import partial_bytes, remove_partials

DEFAULT_ENDPOINT = "https://modelscope.cn"


def endpoint() -> str | None:
    """MODELSCOPE_ENDPOINT (or the older MODELSCOPE_DOMAIN), read now; None = library default."""
    value = (os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "").strip()
    if not value:
        return None
    if not value.lower().startswith(("http://", "https://")):
        value = f"https://{value}"
    return value.rstrip("/")


def _cache_candidates(repo: str, base: Path) -> list[Path]:
    """Where modelscope (new and pre-1.38 layouts) would keep `repo` in the cache `base`."""
    owner, _, name = repo.partition("/")
    legacy = name.replace(".", "___")
    return [
        base / "models" / repo.replace("/", "--"),
        base / "models" / owner / legacy,
        base / "hub" / "models" / owner / legacy,
    ]


def cached_snapshot(entry: ModelEntry, cache: Path | None = None) -> Path | None:
    """The cached snapshot of `entry` in `cache` (default: the standard cache) if it is
    complete; no network."""
    repo = entry.modelscope_repo
    cache = cache or modelscope_cache_dir()
    if not repo or not any(p.is_dir() for p in _cache_candidates(repo, cache)):
        return None
    from modelscope.hub.snapshot_download import snapshot_download

    family = entry.adapter
    try:
        path = Path(
            snapshot_download(
                repo,
                cache_dir=str(cache),
                local_files_only=True,
                allow_patterns=family.allow_patterns(),
                ignore_patterns=family.ignore_patterns(),
            )
        )
    except Exception:  # modelscope raises its own CacheNotFound/HubError family; any failure = not cached
        return None
    return path if is_complete(path, family) else None


def _free_bytes(path: Path) -> int:
    import shutil

    return shutil.disk_usage(path).free


def _check_disk(entry: ModelEntry, needed: int, target: Path) -> None:
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = _free_bytes(probe)
    if needed > free:
        raise errors.disk_full(entry, str(target), needed, free)


def download(entry: ModelEntry, reporter: Reporter, token: str | None = None, cache: Path | None = None) -> Path:
    """Fetch the files `entry`'s pipeline needs into modelscope's cache `cache` (default: the
    standard one); returns the snapshot folder.

    `token` is a ModelScope token (MODELSCOPE_API_TOKEN is used when it is None).
    """
    repo = entry.modelscope_repo
    if not repo:
        raise errors.not_found(entry, "modelscope", "(none)", "this model has no ModelScope repository")
    url = endpoint()
    shown = url or DEFAULT_ENDPOINT
    if reason := unreachable_reason(shown):
        raise errors.offline(entry, "modelscope", shown, reason)
    if no_answer(shown):
        raise errors.no_answer(entry, "modelscope", shown, hub_timeout())

    from modelscope.hub.snapshot_download import snapshot_download
    from modelscope_hub import HubApi
    from modelscope_hub.errors import AuthenticationError, NetworkError, NotExistError, PermissionDeniedError
    from requests.exceptions import HTTPError

    family = entry.adapter
    cache = cache or modelscope_cache_dir()
    token = token or os.environ.get("MODELSCOPE_API_TOKEN") or None
    try:
        reporter.say(0.0, f"Asking {shown} for the file list of {repo}")
        listing = HubApi(endpoint=url, token=token).list_repo_files(repo, "model")
        sizes = {f.path: int(f.size or 0) for f in listing if f.path}
        allow = family.allow_patterns(available=sizes)
        wanted = list(filter_repo_objects(sizes, allow_patterns=allow, ignore_patterns=family.ignore_patterns()))
        reporter.total_files = len(wanted)
        reporter.total_bytes = sum(sizes[f] for f in wanted)
        # what is still missing, less the partial files modelscope resumes
        present = cached_files(repo, cache)
        missing = sum(sizes[f] for f in wanted if present.get(f) != sizes[f])
        partial = sum(partial_bytes(p) for p in _cache_candidates(repo, cache))
        _check_disk(entry, max(0, missing - partial), cache)
        path = snapshot_download(
            repo,
            cache_dir=str(cache),
            allow_patterns=allow,
            ignore_patterns=family.ignore_patterns(),
            endpoint=url,
            token=token,
            max_workers=4,
            progress_callbacks=[modelscope_callback_class(reporter)],
        )
    except (NotExistError, HTTPError) as exc:
        raise errors.not_found(entry, "modelscope", repo, type(exc).__name__) from exc
    except (AuthenticationError, PermissionDeniedError) as exc:
        raise errors.not_found(entry, "modelscope", repo, f"access denied: {exc}") from exc
    except NetworkError as exc:
        if errors.is_disk_full(exc):
            raise errors.disk_full(entry, str(cache)) from exc
        if timed_out(exc):
            raise errors.no_answer(entry, "modelscope", shown, _read_timeout(), reporter.bytes_done) from exc
        raise errors.offline(entry, "modelscope", shown, str(exc).splitlines()[0]) from exc
    except OSError as exc:
        if errors.is_disk_full(exc):
            raise errors.disk_full(entry, str(cache)) from exc
        if timed_out(exc):
            raise errors.no_answer(entry, "modelscope", shown, _read_timeout(), reporter.bytes_done) from exc
        raise errors.interrupted(entry, f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # modelscope's FileDownloadError and other HubErrors
        if errors.is_disk_full(exc):
            raise errors.disk_full(entry, str(cache)) from exc
        if timed_out(exc):
            raise errors.no_answer(entry, "modelscope", shown, _read_timeout(), reporter.bytes_done) from exc
        if type(exc).__module__.startswith("modelscope"):
            raise errors.interrupted(entry, f"{type(exc).__name__}: {exc}") from exc
        raise
    reporter.say(0.99, f"Checking the files of {entry.name}")
    if problems := repo_problems(Path(path), family, {f: n for f, n in sizes.items() if n}):
        raise errors.incomplete(entry, str(path), problems)
    for folder in _cache_candidates(repo, cache):  # whole now: no partial of it is needed
        remove_partials(folder)
    return Path(path)


def cached_files(repo: str, cache: Path) -> dict[str, int]:
    """Sizes of the files already in the repo's cache folders (any revision), by repo path."""
    out: dict[str, int] = {}
    for folder in _cache_candidates(repo, cache):
        roots = [p for p in (folder / "snapshots").glob("*") if p.is_dir()] if (folder / "snapshots").is_dir() else [folder]
        for root in roots:
            for f in root.rglob("*"):
                if f.is_file() and not f.name.endswith((".incomplete", ".parallel_tmp", ".lock")):
                    out.setdefault(f.relative_to(root).as_posix(), f.stat().st_size)
    return out


def _read_timeout() -> float:
    """The read timeout modelscope_hub waits for an answer (MODELSCOPE_API_TIMEOUT)."""
    try:
        from modelscope_hub import constants

        return float(constants.API_TIMEOUT)
    except Exception:  # pragma: no cover - another modelscope_hub layout
        return 60.0
