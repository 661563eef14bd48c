"""ModelScope: find a model in modelscope's cache, or fetch it with its snapshot_download.

Same idea as the Hugging Face source: the library's own cache (MODELSCOPE_CACHE) and
transfer code, which keeps finished files and resumes partial ones. modelscope is imported
lazily because importing it takes about two seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

from . import errors
from .catalog import ModelEntry
from .completeness import is_complete, repo_problems
from .network import unreachable_reason
from .paths import modelscope_cache_dir
from .progress import Reporter, modelscope_callback_class

DEFAULT_ENDPOINT = "https://modelscope.cn"


def endpoint() -> str | None:
    """MODELSCOPE_ENDPOINT (or the older MODELSCOPE_DOMAIN), read now; None = library default."""
    value = (os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "").strip()
    if not value:
        return None
    if not value.lower().startswith(("http://", "https://")):
        value = f"https://{value}"
    return value.rstrip("/")


def _cache_candidates(repo: str) -> list[Path]:
    """Where modelscope (new and pre-1.38 layouts) would keep `repo`."""
    base = modelscope_cache_dir()
    owner, _, name = repo.partition("/")
    legacy = name.replace(".", "___")
    return [
        base / "models" / repo.replace("/", "--"),
        base / "models" / owner / legacy,
        base / "hub" / "models" / owner / legacy,
    ]


def cached_snapshot(entry: ModelEntry) -> Path | None:
    """The cached snapshot of `entry` if it is complete; no network."""
    repo = entry.modelscope_repo
    if not repo or not any(p.is_dir() for p in _cache_candidates(repo)):
        return None
    from modelscope.hub.snapshot_download import snapshot_download

    family = entry.adapter
    try:
        path = Path(
            snapshot_download(
                repo,
                cache_dir=str(modelscope_cache_dir()),
                local_files_only=True,
                allow_patterns=family.allow_patterns(),
                ignore_patterns=family.ignore_patterns(),
            )
        )
    except Exception:  # modelscope raises its own CacheNotFound/HubError family; any failure = not cached
        return None
    return path if is_complete(path, family) else None


def download(entry: ModelEntry, reporter: Reporter, token: str | None = None) -> Path:
    """Fetch the files `entry`'s pipeline needs into modelscope's cache; returns the snapshot folder.

    `token` is a ModelScope token (MODELSCOPE_API_TOKEN is used when it is None).
    """
    repo = entry.modelscope_repo
    if not repo:
        raise errors.not_found(entry, "modelscope", "(none)", "this model has no ModelScope repository")
    url = endpoint()
    shown = url or DEFAULT_ENDPOINT
    if reason := unreachable_reason(shown):
        raise errors.offline(entry, "modelscope", shown, reason)

    from modelscope.hub.snapshot_download import snapshot_download
    from modelscope_hub import HubApi
    from modelscope_hub.errors import AuthenticationError, NetworkError, NotExistError, PermissionDeniedError
    from requests.exceptions import HTTPError

    family = entry.adapter
    token = token or os.environ.get("MODELSCOPE_API_TOKEN") or None
    try:
        reporter.say(0.0, f"Asking {shown} for the file list of {repo}")
        listing = HubApi(endpoint=url, token=token).list_repo_files(repo, "model")
        sizes = {f.path: int(f.size or 0) for f in listing if f.path}
        allow = family.allow_patterns(available=sizes)
        wanted = list(filter_repo_objects(sizes, allow_patterns=allow, ignore_patterns=family.ignore_patterns()))
        reporter.total_files = len(wanted)
        reporter.total_bytes = sum(sizes[f] for f in wanted)
        path = snapshot_download(
            repo,
            cache_dir=str(modelscope_cache_dir()),
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
            raise errors.disk_full(entry, str(modelscope_cache_dir())) from exc
        raise errors.offline(entry, "modelscope", shown, str(exc).splitlines()[0]) from exc
    except OSError as exc:
        if errors.is_disk_full(exc):
            raise errors.disk_full(entry, str(modelscope_cache_dir())) from exc
        raise errors.interrupted(entry, f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # modelscope's FileDownloadError and other HubErrors
        if errors.is_disk_full(exc):
            raise errors.disk_full(entry, str(modelscope_cache_dir())) from exc
        if type(exc).__module__.startswith("modelscope"):
            raise errors.interrupted(entry, f"{type(exc).__name__}: {exc}") from exc
        raise
    reporter.say(0.99, f"Checking the files of {entry.name}")
    if problems := repo_problems(Path(path), family, {f: n for f, n in sizes.items() if n}):
        raise errors.incomplete(entry, str(path), problems)
    return Path(path)
