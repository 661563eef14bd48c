"""Outputs are written atomically: a process killed while its PNG is written leaves no file under
the final name, and what it left is removed when the Studio (the app) starts again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from engine.generation.studio import Studio
from tests.browser.server import REPO

DIE_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys
    from PIL import Image
    from engine.generation.studio import Studio
    from engine.generation.types import GenerateRequest

    studio = Studio(sys.argv[1], sys.argv[2])

    def save(self, fp, *args, **kwargs):  # the first bytes reach the disk, then kill -9
        f = fp if hasattr(fp, "write") else open(fp, "wb")
        f.write(b"\\x89PNG\\r\\n")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    Image.Image.save = save
    for _ in studio.generate(GenerateRequest("killed while saving", width=64, height=64, steps=1, seed=3)):
        pass
    """
)


def test_a_kill_while_the_png_is_written_leaves_nothing_under_its_name(tmp_path):
    models, outputs = tmp_path / "models", tmp_path / "outputs"
    proc = subprocess.run([sys.executable, "-c", DIE_WHILE_SAVING, str(models), str(outputs)], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode(errors="replace")[-2000:]
    assert not list(outputs.glob("*.png")), "a cut-off PNG lies under its final name"
    from engine.generation.studio import PARTIAL_SUFFIX

    leftovers = list(outputs.glob(f".*.png{PARTIAL_SUFFIX}"))
    assert leftovers  # what the kill left is under the temporary name ...
    studio = Studio(models, outputs)  # ... and goes when the app starts again
    assert not list(outputs.iterdir())
    from engine.generation.types import GenerateRequest, GenerationResult

    result = [r for r in studio.generate(GenerateRequest("after the crash", width=64, height=64, steps=1, seed=3))
              if isinstance(r, GenerationResult)][0]
    assert [p.name for p in outputs.iterdir()] == [result.path.name] and result.path.stat().st_size > 100


def test_size_hints_stay_in_range():
    from engine.generation.request import size_hint

    assert size_hint(520, 16, 64, 512) == "Use 512 (sizes go from 64 to 512)."
    assert size_hint(40, 16, 64, 512) == "Use 64 (sizes go from 64 to 512)."
    assert size_hint(100, 16, 64, 512) == "Use 96 or 112."
    assert size_hint(1030, 16, 256, 2048) == "Use 1024 or 1040."


def test_infotext_limit_says_what_was_used(tmp_path):
    from engine.generation.studio import describe_vram_limit
    from engine.generation.types import GenerateRequest

    studio = Studio(tmp_path / "m", tmp_path / "o", device="cpu")
    for given, shown in ((float("inf"), "unlimited"), ("Infinity", "unlimited"), (0, "0 GB"), (2.5, "2.5 GB"), (None, "Auto (unlimited)")):
        r = studio.resolve(GenerateRequest("x", vram_limit=given))
        assert describe_vram_limit(r) == shown, given
