"""bench/bench_gpu.py --dry-run: the GPU benchmark's code path on the CPU with a tiny config.

Runs the real parent/child machinery (one subprocess per configuration) and checks that the
table comes out with measured numbers for our rows and honest "not run" rows for the anchors
that were not selected; no GPU and no DiffSynth needed.
"""

from __future__ import annotations

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
