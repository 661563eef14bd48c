"""Download failures turned into messages that tell the user what to do next."""

from __future__ import annotations

import errno
from collections.abc import Iterator

from .catalog import ModelEntry
from .types import UserFacingError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def offline(entry: ModelEntry, source: str, endpoint: str, reason: str) -> UserFacingError:
    """The hub cannot be reached: connect, use a mirror, switch source, or use a local folder."""
    if source == "hf":
        mirror = "set HF_ENDPOINT to a Hugging Face mirror (e.g. HF_ENDPOINT=https://hf-mirror.com)"
        other = "switch the download source to ModelScope"
    else:
        mirror = "set MODELSCOPE_ENDPOINT to another ModelScope site (e.g. https://www.modelscope.ai)"
        other = "switch the download source to Hugging Face"
    return UserFacingError(
        f"Cannot download {entry.name}: {endpoint} is not reachable ({reason}). "
        f"Connect to the internet and try again; or {mirror}; or {other}; or copy the model folder "
        "(model_index.json and its component folders) into your model directory and add it as a local "
        "folder. The offline demo model works without a connection."
    )


def gated(entry: ModelEntry, has_token: bool) -> UserFacingError:
    """A gated repo and no (working) token: accept the licence, set HF_TOKEN."""
    page = f"https://huggingface.co/{entry.hf_repo}"
    first = "your token has no access to it yet" if has_token else "no Hugging Face token is set"
    return UserFacingError(
        f"{entry.name} is gated on Hugging Face and {first}. Open {page}, log in and accept the licence "
        "conditions, create a read token at https://huggingface.co/settings/tokens, and set it as the "
        "HF_TOKEN environment variable (or enter it as the token); or download it from ModelScope instead."
    )


def not_found(entry: ModelEntry, source: str, repo: str, detail: str) -> UserFacingError:
    """The hub says the repo does not exist (or is private to us)."""
    where = "Hugging Face" if source == "hf" else "ModelScope"
    return UserFacingError(
        f"{where} has no repository '{repo}' for {entry.name} ({detail}). Check the endpoint you use "
        "(HF_ENDPOINT / MODELSCOPE_ENDPOINT) or switch the download source."
    )


def disk_full(entry: ModelEntry, where: str, needed: int | None = None, free: int | None = None) -> UserFacingError:
    """No space left: say where, and how much is needed."""
    amounts = f" It needs {_gb(needed)} more, {_gb(free)} are free." if needed is not None and free is not None else ""
    return UserFacingError(
        f"Not enough disk space to download {entry.name} into {where}.{amounts} Free some space or point "
        "the cache elsewhere (HF_HOME / HF_HUB_CACHE for Hugging Face, MODELSCOPE_CACHE for ModelScope), "
        "then download again: finished files are kept."
    )


def not_writable(entry: ModelEntry, where: str, detail: str) -> UserFacingError:
    """The cache or model directory cannot be written."""
    return UserFacingError(
        f"Cannot write {entry.name} into {where} ({detail}). Make the folder writable, or point the cache "
        "elsewhere (HF_HOME / HF_HUB_CACHE, MODELSCOPE_CACHE, LOWVRAM_MODEL_DIR)."
    )


def no_answer(entry: ModelEntry, source: str, endpoint: str, seconds: float, received: int = 0) -> UserFacingError:
    """The host took the connection but sent nothing back in time (an overloaded hub, a proxy
    or firewall that holds connections open)."""
    mirror = "HF_ENDPOINT (e.g. https://hf-mirror.com)" if source == "hf" else "MODELSCOPE_ENDPOINT"
    other = "ModelScope" if source == "hf" else "Hugging Face"
    amount = _gb(received) if received >= 1e9 else f"{received / 1e6:.1f} MB"
    got = "Nothing was downloaded." if not received else f"{amount} had arrived before it stopped answering; they are kept."
    return UserFacingError(
        f"Cannot download {entry.name}: {endpoint} accepted the connection but sent no answer in {seconds:g} s. "
        f"{got} The hub may be overloaded, or a proxy or firewall holds the connection: try again later, "
        f"set {mirror} to a mirror, or switch the download source to {other}."
    )


def interrupted(entry: ModelEntry, detail: str) -> UserFacingError:
    """The transfer broke off; the files that finished are kept."""
    return UserFacingError(
        f"The download of {entry.name} was interrupted ({detail}). Files that finished are kept: "
        "start the download again to continue where it stopped."
    )


def incomplete(entry: ModelEntry, where: str, problems: list[str]) -> UserFacingError:
    """The files are there but do not make a whole pipeline."""
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return UserFacingError(f"{entry.name} in {where} is incomplete: {shown}. Download it again to complete it.")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes/contexts, and the per-file errors a hub client collected."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]
        failed = getattr(current, "failed_files", None)
        if isinstance(failed, dict):
            stack += [e for e in failed.values() if isinstance(e, BaseException)]


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` was caused by a full disk or an exhausted quota."""
    return any(isinstance(e, OSError) and e.errno in _DISK_FULL for e in causes(exc))
