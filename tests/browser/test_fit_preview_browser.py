"""Issue 15 in a real browser: the live preview changes while a 10-step demo run denoises and the
ETA beside the step counter counts down; "Fit to this machine" applies settings and says why;
the estimate on a host without a GPU has no VRAM column. The same server answers /suggest and
streams previews from /generate_stream (gradio_client). Run: `pytest -m browser tests/browser -q`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from .server import CHROMIUM, CHROMIUM_ARGS, running_server
from .test_app_browser import RUN_TIMEOUT_MS, gallery_count, open_page, panel, set_value, start, wait_ready

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]

STEP_DELAY_S = "0.6"  # ten steps of the demo take about 6 s: several previews and ETA readings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"LVS_TEST_STEP_DELAY_S": STEP_DELAY_S}
    with running_server(tmp_path_factory.mktemp("fit"), env=env, entry=["-m", "tests.serve_app"]) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    p = open_page(browser, server)
    yield p
    p.context.close()


def preview_src(page) -> str:
    return page.evaluate("() => (document.querySelector('#live-preview img') || {}).src || ''")


def seconds_left(text: str) -> float | None:
    m = re.fullmatch(r"(?:(\d+) min )?(\d+) s left", text.strip())
    return None if m is None else int(m.group(1) or 0) * 60 + int(m.group(2))


def test_preview_changes_and_eta_counts_down(page):
    assert page.get_by_label("Live preview", exact=True).is_checked()
    start(page, "a lighthouse at dawn", 10, 128)
    sources: list[str] = []
    etas: list[float] = []
    t0 = time.monotonic()
    while gallery_count(page) == 0:
        assert time.monotonic() - t0 < RUN_TIMEOUT_MS / 1000, "no image"
        values = panel(page)
        if values.get("phase", "").startswith("Denoising"):
            src = preview_src(page)
            if src and (not sources or sources[-1] != src):
                sources.append(src)
            left = seconds_left(values.get("eta", ""))
            if left is not None and (not etas or etas[-1] != left):
                etas.append(left)
        time.sleep(0.1)
    wait_ready(page)
    assert len(sources) >= 3, f"the preview should change at least twice while denoising: {len(sources)} images"
    assert len(etas) >= 3, f"the ETA should move: {etas}"
    # it counts down: it ends lower than it starts, and most readings are lower than the one before
    # (a step slowed by other work on a shared machine may push one reading up)
    down = sum(b < a for a, b in zip(etas, etas[1:]))
    assert etas[-1] < etas[0] and down >= 0.7 * (len(etas) - 1), f"the ETA should count down: {etas}"


def test_preview_off_shows_none(page):
    page.wait_for_timeout(1500)  # a few timer ticks: a new tab shows the last run's preview, like the rest of the panel
    before = preview_src(page)
    page.get_by_label("Live preview", exact=True).uncheck()
    start(page, "no preview", 3, 64)
    seen = set()
    t0 = time.monotonic()
    while gallery_count(page) == 0:
        assert time.monotonic() - t0 < RUN_TIMEOUT_MS / 1000, "no image"
        seen.add(preview_src(page))
        time.sleep(0.1)
    wait_ready(page)
    time.sleep(1.0)  # one more timer tick
    assert seen <= {before, ""} and preview_src(page) == "", seen


def test_fit_to_this_machine_and_the_cpu_estimate(page):
    est = page.locator("#estimate").inner_text()
    if "No GPU detected" in page.content():  # this host: the columns say what they mean here
        assert "VRAM" not in est and "RAM" in est and "Disk" in est, est
    page.get_by_label("FP8", exact=True).check()
    page.get_by_role("button", name="Fit to this machine").click()
    page.wait_for_function("() => document.querySelector('#fit-reason').innerText.includes('Applied')")
    reason = page.locator("#fit-reason").inner_text()
    assert "bf16" in reason and "per step" in reason, reason
    assert not page.get_by_label("FP8", exact=True).is_checked()  # the demo fits in bf16: FP8 off again


def test_suggest_and_generate_stream_through_the_api(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    got = client.predict(model="qwen-image", width=1024, height=1024, steps=None, guidance=None, api_name="/suggest")
    assert set(got) >= {"fits", "weights", "fp8", "disk_offload", "vram_limit", "reason", "seconds_per_step", "estimate"}
    assert got["reason"]
    job = client.submit(prompt="a cat", model="demo", width=128, height=128, steps=8, seed=5, api_name="/generate_stream")
    outputs = []
    t0 = time.monotonic()
    while not job.done():
        assert time.monotonic() - t0 < 120
        time.sleep(0.2)
    outputs = job.outputs()
    assert len(outputs) >= 3, outputs  # previews while denoising, then the PNG
    statuses = [o[1] for o in outputs[:-1] if isinstance(o, (list, tuple)) and isinstance(o[1], str)]
    assert any(re.match(r"step \d+/8", s) for s in statuses), statuses
    image, parameters = outputs[-1]
    assert str(image).lower().endswith(".png") and "Steps: 8" in parameters
