"""Write assets/screenshot.png: the page after a generation with the demo model.

    python -m tools.screenshot                   # starts `app.py` offline on a free port, temp dirs
    python -m tools.screenshot --url http://127.0.0.1:7860/ --out /tmp/shot.png

Needs Playwright (the test extra) and Debian's Chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@contextlib.contextmanager
def _server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="lvs-shot-"))
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp / "gradio"))
    cmd = [sys.executable, "app.py", "--port", str(port), "--model-dir", str(tmp / "models"), "--outputs-dir", str(tmp / "outputs")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(360):
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}")
            try:
                urllib.request.urlopen(url + "gradio_api/info", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def take(url: str, out: Path, prompt: str, steps: int, size: int) -> Path:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="load")
        page.wait_for_selector("#generate-btn")
        for label, value in (("Width", size), ("Height", size), ("number input for Steps", steps), ("Seed", 42)):
            box = page.get_by_label(label, exact=True)
            box.fill(str(value))
            box.press("Tab")
        page.get_by_label("Prompt", exact=True).fill(prompt)
        page.locator("#generate-btn").click()
        page.wait_for_selector("#gallery img", timeout=300_000)
        page.wait_for_function(
            "() => { const b = document.querySelector('#generate-btn'); return b && !b.disabled; }", timeout=60_000
        )
        time.sleep(1.5)  # let the last timer tick draw the chart
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an app already running (default: start app.py)")
    ap.add_argument("--out", type=Path, default=REPO / "assets" / "screenshot.png")
    ap.add_argument("--prompt", default="a large yellow star on a blue background, in the centre")  # the demo draws it
    ap.add_argument("--steps", type=int, default=8)  # the demo's default
    ap.add_argument("--size", type=int, default=64)  # the demo was trained at 64x64
    args = ap.parse_args(argv)
    if args.url:
        print(take(args.url, args.out, args.prompt, args.steps, args.size))
    else:
        with _server() as url:
            print(take(url, args.out, args.prompt, args.steps, args.size))


if __name__ == "__main__":
    main()
