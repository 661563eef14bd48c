"""bench/bench_gpu.py --dry-run: the GPU benchmark's code path on the CPU with a tiny config.

Runs the real parent/child machinery (one subprocess per configuration) and checks that the
table comes out with measured numbers for our rows and honest "not run" rows for the anchors
that were not selected; no GPU and no DiffSynth needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^\d+\.\d+$")


@pytest.mark.slow
def test_dry_run_ours_table(tmp_path):
    out = tmp_path / "gpu-{gpu}-{date}.md"
    raw = tmp_path / "raw.json"
    cmd = [sys.executable, "-m", "bench.bench_gpu", "--dry-run", "--configs", "ours", "--steps", "1",
           "--limits", "0,0.00014", "--time-budget", "110", "--out", str(out), "--json", str(raw)]
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=150)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = list(tmp_path.glob("gpu-cpu-dry-run-*.md"))
    assert len(written) == 1, proc.stdout[-2000:]
    table = written[0].read_text()
    assert "DRY RUN" in table
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 12 and (cells[0].startswith(("ours", "compute", "DiffSynth", "diffusers"))):
            rows[cells[0]] = cells
    for dtype in ("bf16", "fp8"):
        for limit in ("0", "0.00014"):
            cells = rows[f"ours {dtype} @ vram_limit={limit}"]
            assert NUMBER.match(cells[1]), cells  # s/step measured
            assert float(cells[1]) > 0
            assert NUMBER.match(cells[8]) and float(cells[8]) > 0, cells  # peak host RAM measured
            assert NUMBER.match(cells[10]), cells  # streamed per step
        assert float(rows[f"ours {dtype} @ vram_limit=0"][10]) > 0  # limit 0 streams every layer
    for label, cells in rows.items():
        if not label.startswith("ours"):
            assert cells[1].startswith("not run"), cells
    assert "compute bound" in " ".join(rows) and any(k.startswith("DiffSynth") for k in rows)
    assert any(k.startswith("diffusers") for k in rows)
    assert "not evaluated (anchor missing)" in table
    assert raw.exists()
    assert elapsed < 120, elapsed


@pytest.mark.slow
def test_session_script_puts_every_part_in_the_summary_most_important_first(tmp_path):
    """bench/gpu_session.sh on the CPU (issue 25, point 11): within its time limit, one summary row
    per part in the order they matter (core GPU tests, the doctor, the benchmark's rows as they
    ran, the other GPU tests), each with a figure or the reason it has none."""
    import os

    limit = 200
    env = dict(os.environ, OUT=str(tmp_path), SESSION_LIMIT_S=str(limit), PYTHON=sys.executable,
               BENCH_ARGS="--dry-run --steps 1", BENCH_CONFIGS="ours-bf16", BENCH_LIMITS="0", MORE_TESTS="")
    t0 = time.time()
    proc = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit + 60)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < limit, elapsed
    rows = [line[2:] for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("- ")]
    assert rows[0].startswith("core GPU tests") and "skipped" in rows[0]  # no GPU here: skipped, and says so
    assert rows[1].startswith("doctor (exit 0): no figure: no GPU")
    bench = [r for r in rows if r.startswith("bench ")]
    assert bench[0].startswith("bench H2D pinned: ") and re.search(r"\d+\.\d GiB/s", bench[0])
    assert re.match(r"bench ours bf16 @ vram_limit=0: \d+\.\d{3} s/step$", bench[1]), bench
    assert rows.index(bench[0]) == 2 and rows[-1] == "other GPU tests: none to run (no other gpu-marked test file)"
    for row in rows:  # a figure, or why not
        assert re.search(r"\d", row) or any(w in row for w in ("not run", "no figure", "none to run", "failed")), row
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["gpu"]["available"] is False
    assert list(tmp_path.glob("gpu-cpu-dry-run-*.md")) and len(list(tmp_path.iterdir())) <= 8  # what comes back
