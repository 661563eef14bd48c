"""A quick "can we reach the hub at all?" check before a download starts.

Both hub clients retry connection errors with growing back-off (modelscope ~8 s, and with
no connect timeout a filtered network can hang huggingface_hub for minutes). One TCP
connect with a short timeout tells an offline user within seconds, with advice, instead.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlsplit

DEFAULT_TIMEOUT_S = 5.0
TIMEOUT_ENV = "LOWVRAM_HUB_TIMEOUT"


def hub_timeout() -> float:
    """Seconds to wait for a hub to answer (LOWVRAM_HUB_TIMEOUT, default 5)."""
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _connect_target(url: str) -> tuple[str, int]:
    """Host and port a request to `url` really connects to: the proxy when one applies."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or host, p.port or (443 if p.scheme == "https" else 80)
    return host, port


def unreachable_reason(url: str, timeout: float | None = None) -> str | None:
    """Why a TCP connection to `url`'s host (or its proxy) fails, or None when it opens."""
    host, port = _connect_target(url)
    if not host:
        return f"'{url}' is not a valid URL"
    try:
        with socket.create_connection((host, port), timeout=hub_timeout() if timeout is None else timeout):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or exc})"


def no_answer(url: str, timeout: float | None = None) -> bool:
    """True when the host takes the connection but sends no HTTP answer (any status counts as
    one) within `timeout` seconds (default: hub_timeout()). A hub in that state would otherwise
    hold each library call until its own read timeout, retries included (minutes for modelscope)."""
    import urllib.error

    request = urllib.request.Request(url.rstrip("/") + "/", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=hub_timeout() if timeout is None else timeout):
            return False
    except urllib.error.HTTPError:  # an answer, whatever it says
        return False
    except (TimeoutError, socket.timeout):
        return True
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, (TimeoutError, socket.timeout))
    except OSError:  # reset, TLS trouble ...: not "no answer"; the library reports it
        return False


def timed_out(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a read/connect timeout of an HTTP client: the host
    accepted the connection (or never finished it) and sent no answer in time."""
    from .errors import causes

    for e in causes(exc):
        if isinstance(e, (TimeoutError, socket.timeout)):
            return True
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"TimeoutException", "ReadTimeout", "ConnectTimeout", "Timeout", "ReadTimeoutError", "ConnectTimeoutError"}:
            return True
    return False
