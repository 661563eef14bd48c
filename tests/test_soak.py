"""Soak: 100 generations in a row through the API with changing settings (FP8 on/off, disk
offload on/off, several VRAM limits, two models), against the real server. No error, and the
server's RSS after the 100th within 150 MB of after the 10th.

    .venv/bin/python -m pytest -q tests/test_soak.py -s    # prints the RSS figures
"""

from __future__ import annotations

import itertools
import time

import psutil
from PIL import Image
import pytest

from tests.browser.server import running_server
from tests.judge import judge
from tools.demo_shapes import held_out_scenes

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
        scenes = held_out_scenes(RUNS)
        wrong: list[str] = []
        t0 = time.monotonic()
        for i, (model, fp8, disk, limit) in enumerate(settings(), start=1):
            scene = scenes[i - 1]
            image, parameters = client.predict(
                prompt=scene.caption(), model=model, width=64, height=64, steps=None if model == "demo" else 1 + i % 2, seed=i,
                vram_limit=limit, fp8=fp8, disk_offload=disk, api_name="/generate",
            )
            if model == "demo":  # the demo draws what it is told, whatever the memory settings
                verdict = judge(Image.open(image), scene)
                if not verdict.colours_and_place_ok:
                    wrong.append(f"run {i} (fp8 {fp8}, disk {disk}, limit {limit}): {verdict}")
            assert f"Seed: {i}," in parameters and f"Model: {model}" in parameters, parameters
            assert f"FP8: {'on' if fp8 else 'off'}" in parameters
            if i in (10, RUNS):
                rss[i] = server.memory_info().rss / 2**20
        seconds = time.monotonic() - t0
    demo_runs = sum(m == "demo" for m, *_ in settings())
    # the demo's colours and place: 90% right on the README's held-out captions, 45 of these 51
    # (more small shapes); noise scores 0, so a wiring mistake under any setting fails this
    assert len(wrong) <= demo_runs // 5, "\n".join(wrong)
    growth = rss[RUNS] - rss[10]
    print(f"\nsoak: {RUNS} generations in {seconds:.0f} s; server RSS after the 10th {rss[10]:.0f} MB, "
          f"after the {RUNS}th {rss[RUNS]:.0f} MB ({growth:+.0f} MB)")
    assert growth <= RSS_GROWTH_LIMIT_MB, rss
