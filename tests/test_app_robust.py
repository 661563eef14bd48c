"""Requests that cannot hurt each other: gradio_client (and plain HTTP) against the real server.

The server is the real app (real Studio, demo model) started by `tests.serve_app` with each
denoising step slowed to STEP_DELAY_S, so a run lasts long enough to be cancelled or dropped
mid-way. Covers: API cancel, a dropped client, strict API inputs, the infotext and size hints,
the upload limit and the login lockout. (Atomic PNG writes: tests/test_outputs.py; a closed
tab: tests/browser/test_app_browser.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.browser.server import REPO, running_server

pytestmark = pytest.mark.slow
gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

STEP_DELAY_S = 0.3
LONG_STEPS = 20  # 20 x 0.3 s: a run that is still going when it is cancelled
START_WITHIN_S = 2.0
SERVE = ["-m", "tests.serve_app"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    with running_server(tmp, entry=SERVE, env={"LVS_TEST_STEP_DELAY_S": str(STEP_DELAY_S)}) as url:
        yield url, tmp


def client(server) -> gradio_client.Client:
    url, tmp = server
    return gradio_client.Client(url, verbose=False, download_files=str(tmp / "downloads"))


def saved(server, seed: int) -> list[Path]:
    return sorted((server[1] / "outputs").glob(f"*-{seed}.png"))


def wait_denoising(job, timeout: float = 60) -> None:
    """Until the job's progress shows a denoising step done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.status()
        units = status.progress_data or []
        if status.code in (Status.PROCESSING, Status.PROGRESS) and any((u.index or 0) >= 1 and u.unit == "steps" for u in units):
            return
        assert not job.done(), f"the job ended early: {job.exception() if job.done() else ''}"
        time.sleep(0.05)
    raise AssertionError(f"the job never reached its denoising steps: {job.status()}")


def wait_processing(job, timeout: float) -> float:
    """Seconds until the job is being processed (or done)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if job.done() or job.status().code in (Status.PROCESSING, Status.PROGRESS, Status.ITERATING):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"not started within {timeout} s: {job.status()}")


def long_run(c, seed: int):
    return c.submit(prompt="a long run", width=64, height=64, steps=LONG_STEPS, seed=seed, api_name="/generate")


def assert_stopped_unsaved(server, seed: int, started: float) -> None:
    """Past the time the whole run would have needed, its PNG is still not there."""
    time.sleep(max(0.0, started + LONG_STEPS * STEP_DELAY_S + 2 - time.monotonic()))
    assert not saved(server, seed), "the cancelled run still saved its image"


# ---------------------------------------------------------------- 1. cancel that stops the work
def test_api_cancel_stops_the_run_and_waiting_requests_are_served(server):
    first, second, third = client(server), client(server), client(server)
    started = time.monotonic()
    job = long_run(first, seed=101)
    wait_denoising(job)
    waiting = second.submit(prompt="queued behind", width=64, height=64, steps=1, seed=102, api_name="/generate")
    time.sleep(0.5)  # in the queue behind the long run
    assert job.cancel()
    t_cancel = time.monotonic()
    assert wait_processing(waiting, 15) < START_WITHIN_S + 0.5  # the slot passes on at the next step
    image, parameters = waiting.result(timeout=60)
    assert Path(image).is_file() and "Seed: 102" in parameters
    # a new request (any client) is served too, not refused with "already running"
    image, parameters = third.predict(prompt="after", width=64, height=64, steps=1, seed=103, api_name="/generate")
    assert Path(image).is_file() and "Seed: 103" in parameters
    assert time.monotonic() - t_cancel < LONG_STEPS * STEP_DELAY_S  # sooner than the long run's end
    assert_stopped_unsaved(server, 101, started)


def test_dropped_client_stops_its_run(server, tmp_path):
    script = tmp_path / "drop.py"
    script.write_text(
        "import sys, time\n"
        "from gradio_client import Client\n"
        "c = Client(sys.argv[1], verbose=False)\n"
        f"job = c.submit(prompt='dropped', width=64, height=64, steps={LONG_STEPS}, seed=201, api_name='/generate')\n"
        "deadline = time.monotonic() + 90\n"
        "while not any((u.index or 0) >= 1 for u in (job.status().progress_data or [])):\n"
        "    if job.done() or time.monotonic() > deadline:\n"
        "        print('ended', job.done() and job.exception(), flush=True); sys.exit(1)\n"
        "    time.sleep(0.05)\n"
        "print('denoising', flush=True)\n"
        "time.sleep(600)\n"
    )
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script), server[0]], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "denoising"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    t_kill = time.monotonic()
    nxt = client(server).submit(prompt="next", width=64, height=64, steps=1, seed=202, api_name="/generate")
    assert wait_processing(nxt, 15) < START_WITHIN_S + 0.5
    image, _ = nxt.result(timeout=60)
    assert Path(image).is_file()
    assert time.monotonic() - t_kill < LONG_STEPS * STEP_DELAY_S
    assert_stopped_unsaved(server, 201, started)


# ---------------------------------------------------------------- 3. booleans, 4. every parameter checked
@pytest.mark.parametrize(
    "name, value",
    [
        ("fp8", "no"), ("fp8", "yes"), ("disk_offload", "no"), ("disk_offload", "off"), ("fp8", 2), ("disk_offload", [True]),
        ("width", "abc"), ("width", 64.5), ("height", 80.25), ("height", [64]), ("steps", [1, 2]), ("steps", 1.5),
        ("steps", "two"), ("seed", "abc"), ("seed", 1.5), ("seed", -2), ("seed", 2**40), ("guidance", "high"),
        ("guidance", [1.0]), ("vram_limit", "lots"), ("vram_limit", -1), ("vram_limit", True), ("prompt", 5),
        ("prompt", None), ("negative_prompt", ["x"]), ("model", 3), ("width", True),
    ],
)
def test_bad_values_get_the_apps_own_message(server, name, value):
    kwargs = {"prompt": "bad input", "width": 64, "height": 64, "steps": 1, name: value}
    with pytest.raises(AppError) as exc:
        client(server).predict(**kwargs, api_name="/generate")
    message = str(exc.value)
    assert "upstream Gradio app" not in message and "Traceback" not in message
    assert name in message and repr(value)[:20] in message, message


def test_bad_values_leave_no_traceback_in_the_log(server):
    c = client(server)
    for kwargs in ({"width": "abc"}, {"steps": [1, 2]}, {"seed": "abc"}, {"fp8": "no"}, {"width": 64.5}):
        with pytest.raises(AppError):
            c.predict(prompt="x", **kwargs, api_name="/generate")
    log = (server[1] / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize(
    "value, shown",
    [(True, "on"), (False, "off"), ("true", "on"), ("false", "off"), ("1", "on"), ("0", "off")],
)
def test_booleans_and_their_strings(server, value, shown):
    _, parameters = client(server).predict(
        prompt="flags", width=64, height=64, steps=1, seed=5, fp8=value, disk_offload=value, api_name="/generate"
    )
    assert f"FP8: {shown}" in parameters and f"Disk offload: {shown}" in parameters, parameters


def test_whole_floats_are_accepted_unchanged(server):
    _, parameters = client(server).predict(
        prompt="floats", width=64.0, height=80.0, steps=1.0, seed=7.0, api_name="/generate"
    )
    assert "Size: 64x80" in parameters and "Steps: 1," in parameters and "Seed: 7," in parameters


# ---------------------------------------------------------------- 9. infotext and hints
def test_infotext_states_an_unlimited_vram_limit(server):
    # JSON has no Infinity literal (gradio_client's encoder refuses it): the string is the way
    _, parameters = client(server).predict(
        prompt="unlimited", width=64, height=64, steps=1, seed=9, vram_limit="Infinity", api_name="/generate"
    )
    assert "VRAM limit: unlimited" in parameters and "VRAM limit: 0 GB" not in parameters, parameters
    _, parameters = client(server).predict(prompt="auto", width=64, height=64, steps=1, seed=9, api_name="/generate")
    assert "VRAM limit: Auto (" in parameters, parameters
    _, parameters = client(server).predict(
        prompt="two", width=64, height=64, steps=1, seed=9, vram_limit=2, api_name="/generate"
    )
    assert "VRAM limit: 2 GB" in parameters, parameters


@pytest.mark.parametrize("width, hint, never", [(520, "Use 512", "528"), (40, "Use 64", "32"), (100, "Use 96 or 112", None)])
def test_size_hints_stay_in_the_models_range(server, width, hint, never):
    with pytest.raises(AppError) as exc:
        client(server).predict(prompt="x", width=width, height=64, steps=1, api_name="/generate")
    message = str(exc.value)
    assert hint in message, message
    if never:
        assert never not in message, message


# ---------------------------------------------------------------- 10. uploads, logins
def test_uploads_are_limited(server):
    import httpx

    from ui import MAX_UPLOAD  # input images up to 20 MB: the server takes 24 MB, no more

    big = httpx.post(server[0] + "gradio_api/upload", files={"files": ("big.bin", b"\0" * (MAX_UPLOAD + 1024))}, timeout=30)
    assert big.status_code == 413, (big.status_code, big.text[:200])
    small = httpx.post(server[0] + "gradio_api/upload", files={"files": ("small.txt", b"hello")}, timeout=30)
    assert small.status_code == 200


def test_failed_logins_lock_the_user_out(tmp_path):
    import httpx

    env = {"LVS_LOGIN_LOCKOUT_S": "4", "LVS_LOGIN_FAIL_DELAY_S": "0.2", "LVS_LOGIN_MAX_FAILURES": "5"}
    with running_server(tmp_path / "srv", ["--auth", "alice:wonder,bob:builder"], env=env) as url:
        def login(user: str, password: str) -> int:
            return httpx.post(url + "login", data={"username": user, "password": password}, timeout=30).status_code

        t0 = time.monotonic()
        codes = [login("alice", f"guess{i}") for i in range(8)]
        assert all(c == 400 for c in codes)
        assert time.monotonic() - t0 >= 8 * 0.2  # every failure is answered late
        assert login("alice", "wonder") == 400  # locked: even the right password is refused
        assert login("bob", "builder") == 200  # per user: the others are not locked
        with pytest.raises(Exception):
            gradio_client.Client(url, auth=("alice", "wonder"), verbose=False)
        time.sleep(4.5)
        assert login("alice", "wonder") == 200
        c = gradio_client.Client(url, auth=("alice", "wonder"), verbose=False)
        assert "/generate" in c.view_api(return_format="dict", print_info=False)["named_endpoints"]


# ---------------------------------------------------------------- what already held, and must keep holding
def test_ten_concurrent_calls_each_get_their_own_image(server):
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one(i: int):
        return client(server).predict(prompt=f"call {i}", width=64, height=64, steps=1, seed=300 + i, api_name="/generate")

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    for i, (image, parameters) in enumerate(results):
        assert parameters.startswith(f"call {i}\n") and f"Seed: {300 + i}," in parameters
        with Image.open(image) as png:
            assert png.info["parameters"] == parameters


def test_a_full_queue_answers_503_and_file_routes_refuse_traversal(server):
    import httpx

    url = server[0]
    c = client(server)
    fn_index = next(d["id"] for d in c.config["dependencies"] if d.get("api_name") == "generate")
    job = long_run(c, seed=401)
    wait_denoising(job)
    statuses = []
    for i in range(70):  # bad inputs: each fails at once when its turn comes
        body = {"data": ["q", "", None, "abc", 64, 1, None, -1, None, False, False], "fn_index": fn_index,
                "session_hash": f"full-queue-{i}", "event_data": None, "trigger_id": None}
        statuses.append(httpx.post(url + "gradio_api/queue/join", json=body, timeout=30).status_code)
    job.cancel()
    assert statuses.count(200) >= 60 and 503 in statuses, statuses
    for path in ("/etc/passwd", str(server[1] / "outputs" / ".." / "server.log"), "../../../../etc/passwd"):
        r = httpx.get(url + "gradio_api/file=" + path, timeout=30)
        assert r.status_code in (403, 404), (path, r.status_code)
    assert wait_processing(client(server).submit(prompt="after", width=64, height=64, steps=1, api_name="/generate"), 60) < 60
