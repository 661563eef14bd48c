"""ui.inputs (strict /generate values) and ui.login (lockout) without a server."""

from __future__ import annotations

import asyncio
import math

import pytest

from engine.generation.types import UserFacingError
from ui import inputs
from ui.login import Login


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (None, False), ("true", True), ("FALSE", False), ("1", True), ("0", False)])
def test_flags(value, expected):
    assert inputs.flag("fp8", value) is expected


@pytest.mark.parametrize("value", ["no", "yes", "off", "", 1, 0, 2.0, [True], {}])
def test_flags_refuse_everything_else(value):
    with pytest.raises(UserFacingError, match=r"^fp8 must be true or false .*; got "):
        inputs.flag("fp8", value)


def test_whole_numbers_are_never_rounded():
    assert inputs.whole("width", 512, "x") == 512 and inputs.whole("width", 512.0, "x") == 512
    assert inputs.whole("width", "512", "x") == 512 and inputs.whole("width", None, "x") is None
    for bad in (512.5, "abc", [512], True, math.inf, math.nan, "5.5"):
        with pytest.raises(UserFacingError, match="^width must be"):
            inputs.whole("width", bad, "a whole number")


def test_seed_vram_limit_and_text():
    assert inputs.seed(-1) is None and inputs.seed(None) is None and inputs.seed(7.0) == 7
    for bad in (-2, 2**32, 1.5, "abc"):
        with pytest.raises(UserFacingError, match="^seed must be"):
            inputs.seed(bad)
    assert inputs.vram_limit(None) is None and inputs.vram_limit("Auto") is None
    assert inputs.vram_limit("Infinity") == math.inf and inputs.vram_limit(2) == 2.0
    for bad in (-1, "lots", True, math.nan, -math.inf):
        with pytest.raises(UserFacingError, match="^vram_limit must be"):
            inputs.vram_limit(bad)
    with pytest.raises(UserFacingError, match="^prompt must be"):
        inputs.text("prompt", None, required=True)
    with pytest.raises(UserFacingError, match="^model must be"):
        inputs.model_id(3)


def test_login_locks_a_user_after_repeated_failures():
    now = [0.0]
    login = Login([("alice", "wonder"), ("bob", "builder")], max_failures=3, lockout_s=10, fail_delay_s=0, clock=lambda: now[0])
    assert login.verify("alice", "wonder")
    for _ in range(3):
        assert not login.verify("alice", "nope")
    assert not login.verify("alice", "wonder") and login.locked_for("alice") == 10  # locked: right password refused
    assert login.verify("bob", "builder")  # per user
    now[0] = 10.5
    assert login.verify("alice", "wonder")  # the lockout ends; success resets the count
    for _ in range(3):
        login.verify("alice", "nope")
    for _ in range(3):  # locked again after the next three: twice as long
        now[0] += 11
        login.verify("alice", "nope")
    assert login.locked_for("alice") == 20
    assert not login.verify("mallory", "")


def test_login_check_is_a_coroutine_function_that_waits_on_failure():
    import inspect
    import time

    login = Login([("a", "b")], fail_delay_s=0.2)
    assert inspect.iscoroutinefunction(login.check)  # Gradio awaits it (a plain callable's coroutine would be truthy)
    t0 = time.monotonic()
    assert asyncio.run(login.check("a", "b"))
    assert time.monotonic() - t0 < 0.1
    assert not asyncio.run(login.check("a", "x"))
    assert time.monotonic() - t0 >= 0.2
