"""Soak: 100 generations in a row through the API with changing settings (FP8 on/off, disk
offload on/off, several VRAM limits, two models), against the real server. No error, and the
server's RSS after the 100th within 150 MB of after the 10th.

    .venv/bin/python -m pytest -q tests/test_soak.py -s    # prints the RSS figures
"""

from __future__ import annotations

import itertools
import time

import psutil
import pytest

from tests.browser.server import running_server

pytestmark = pytest.mark.slow
gradio_client = pytest.importorskip("gradio_client")

RUNS = 100
RSS_GROWTH_LIMIT_MB = 150


def settings():
    """(model, fp8, disk_offload, vram_limit) cycling so each run differs from the one before."""
    combos = list(itertools.product(["demo", "tiny-flux1"], [False, True], [False, True], [None, 0, 0.5, 2]))
    # a stride co-prime with the 32 combinations: every one is visited, neighbours differ
    return [combos[(i * 7) % len(combos)] for i in range(RUNS)]


def test_100_generations_with_changing_settings(tmp_path):
    procs: list = []
    with running_server(tmp_path, env={"LVS_TEST_TINY_MODEL": "1"}, entry=["-m", "tests.serve_app"], procs=procs) as url:
        server = psutil.Process(procs[0].pid)
        client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        rss: dict[int, float] = {}
        t0 = time.monotonic()
        for i, (model, fp8, disk, limit) in enumerate(settings(), start=1):
            image, parameters = client.predict(
                prompt=f"soak {i}", model=model, width=64, height=64, steps=1 + i % 2, seed=i,
                vram_limit=limit, fp8=fp8, disk_offload=disk, api_name="/generate",
            )
            assert f"Seed: {i}," in parameters and f"Model: {model}" in parameters, parameters
            assert f"FP8: {'on' if fp8 else 'off'}" in parameters
            if i in (10, RUNS):
                rss[i] = server.memory_info().rss / 2**20
        seconds = time.monotonic() - t0
    growth = rss[RUNS] - rss[10]
    print(f"\nsoak: {RUNS} generations in {seconds:.0f} s; server RSS after the 10th {rss[10]:.0f} MB, "
          f"after the {RUNS}th {rss[RUNS]:.0f} MB ({growth:+.0f} MB)")
    assert growth <= RSS_GROWTH_LIMIT_MB, rss
