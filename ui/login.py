"""Password check for `--auth` that slows down guessing: a lockout per user after failures.

Gradio calls `Login.check(username, password)` (a coroutine function, so a wait never holds
a server thread) for the page's login form and for gradio_client's `auth=`. After
`max_failures` wrong passwords in a row for one user name, that name is locked for
`lockout_s` seconds (doubling with each further lockout, up to `max_lockout_s`): while it is
locked every attempt is refused without looking at the password, and each failed attempt also
waits `fail_delay_s` before it is answered. A right password resets the count.

LVS_LOGIN_MAX_FAILURES, LVS_LOGIN_LOCKOUT_S and LVS_LOGIN_FAIL_DELAY_S override the defaults.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("lowvram_studio.login")

MAX_FAILURES = 5
LOCKOUT_S = 30.0
MAX_LOCKOUT_S = 900.0
FAIL_DELAY_S = 1.0


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class _Record:
    failures: int = 0
    lockouts: int = 0
    locked_until: float = 0.0


class Login:
    """The `auth` callable for `Blocks.launch`: `launch(auth=Login(pairs).check)`."""

    def __init__(
        self,
        users: list[tuple[str, str]],
        *,
        max_failures: int | None = None,
        lockout_s: float | None = None,
        fail_delay_s: float | None = None,
        max_lockout_s: float = MAX_LOCKOUT_S,
        clock=time.monotonic,
    ) -> None:
        self.users = dict(users)
        self.max_failures = int(max_failures if max_failures is not None else _env_float("LVS_LOGIN_MAX_FAILURES", MAX_FAILURES))
        self.lockout_s = lockout_s if lockout_s is not None else _env_float("LVS_LOGIN_LOCKOUT_S", LOCKOUT_S)
        self.fail_delay_s = fail_delay_s if fail_delay_s is not None else _env_float("LVS_LOGIN_FAIL_DELAY_S", FAIL_DELAY_S)
        self.max_lockout_s = max_lockout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}

    def locked_for(self, username: str) -> float:
        """Seconds `username` stays locked (0 when it is not)."""
        with self._lock:
            record = self._records.get(username)
            return max(0.0, record.locked_until - self._clock()) if record else 0.0

    def verify(self, username: str, password: str) -> bool:
        """The decision without the wait: False while locked, else whether the password is right."""
        with self._lock:
            now = self._clock()
            record = self._records.setdefault(username, _Record())
            if record.locked_until > now:
                return False
            expected = self.users.get(username)
            # compare in constant time, and as long for an unknown user as for a known one
            ok = hmac.compare_digest((password or "").encode(), (expected if expected is not None else "\0" + (password or "")).encode())
            ok = ok and expected is not None
            if ok:
                self._records.pop(username, None)
                return True
            record.failures += 1
            if record.failures >= self.max_failures:
                seconds = min(self.lockout_s * 2**record.lockouts, self.max_lockout_s)
                record.lockouts += 1
                record.failures = 0
                record.locked_until = now + seconds
                log.warning("login for %r locked for %.0f s after %d failed attempts", username, seconds, self.max_failures)
            if len(self._records) > 10_000:  # bound the memory an attacker can make us hold
                for name in [n for n, r in self._records.items() if r.locked_until <= now][:5_000]:
                    del self._records[name]
            return False

    async def check(self, username: str, password: str) -> bool:
        ok = self.verify(username, password)
        if not ok and self.fail_delay_s > 0:
            await asyncio.sleep(self.fail_delay_s)
        return ok
