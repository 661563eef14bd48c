"""Start the real app (`python app.py ...`) in a subprocess on a free port, offline, with temp dirs.

Set LVS_FAKE_STUDIO=1 to serve the UI over tests/browser/fake_studio.py instead (UI development
only; the committed tests are meant to run against the real Studio and its demo model).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_TIMEOUT = float(os.environ.get("LVS_SERVER_STARTUP_TIMEOUT", "180"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(tmp / "gradio"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    for key in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "GRADIO_SHARE"):
        env.pop(key, None)
    return env


@contextlib.contextmanager
def running_server(
    tmp: Path, extra_args: list[str] | None = None, *, env: dict[str, str] | None = None,
    entry: list[str] | None = None, procs: list | None = None,
) -> Iterator[str]:
    """Yield the base URL of a running app; stop it afterwards (its log is printed on failure).

    `entry`: what `python` runs (default app.py; ["-m", "tests.serve_app"] for the test knobs);
    `env`: extra environment; `procs`: a list that receives the server's Popen (its pid, RSS).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if entry is None:
        entry = ["-m", "tests.browser.serve_fake"] if os.environ.get("LVS_FAKE_STUDIO") == "1" else ["app.py"]
    cmd = [sys.executable, *entry, "--port", str(port), "--model-dir", str(tmp / "models"),
           "--outputs-dir", str(tmp / "outputs"), *(extra_args or [])]
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**offline_env(tmp), **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    if procs is not None:
        procs.append(proc)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:  # answering, behind --auth
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after {STARTUP_TIMEOUT}s:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.environ.get("LVS_SHOW_SERVER_LOG") == "1":
            sys.stderr.write(log_path.read_text(errors="replace"))
