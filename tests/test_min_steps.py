"""The smallest step count the catalogue allows works (issue #17): for every catalogue model, its
family's tiny real-class pipeline, with the model's real scheduler config (the tiny repos carry
the real repos' scheduler configs), at `min_steps` gives a finite denoiser output and image.

Found so: Qwen-Image's scheduler config stretches its sigmas to `shift_terminal` (0.02), which at
one step divides by zero (FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal: 1 - 1.0 =
0) and makes the latents NaN; its minimum is 2 steps.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
import pytest
import torch

from engine.generation.pipelines import build_pipeline
from engine.generation.settings import vram_config_for
from model_registry import list_models
from tests.fixtures.tiny_repos import TINY_DEFAULTS, write_tiny_repo

ENTRIES = {e.id: e for e in list_models() if not e.is_demo}


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_min_steps")
    return {f: write_tiny_repo(f, root / f) for f in {e.family for e in ENTRIES.values()}}


@pytest.mark.parametrize("model_id", sorted(ENTRIES))
def test_min_steps_gives_finite_latents(repos, model_id):
    entry = ENTRIES[model_id]
    steps = int(entry.limits["min_steps"])
    d = TINY_DEFAULTS[entry.family]
    mp = build_pipeline(repos[entry.family], vram_config_for(False, False, "cpu"), None)
    outputs = []
    den = mp.components[mp.family.denoiser]
    den.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else getattr(out, "sample", out)))
    guidance = max(float(entry.limits.get("min_guidance", 0.0)), d.guidance) if entry.limits.get("max_guidance", 1) else 0.0
    # an edit model needs its reference image (a plain one: the check is about the step count)
    images = [Image.new("RGB", (d.width, d.height), (120, 90, 60))] if mp.family.requires_image else ()
    image = np.asarray(mp.generate("a cat on a chair", "blurry", width=d.width, height=d.height, steps=steps, guidance=guidance, seed=1, images=images))
    assert outputs, "the denoiser ran"
    flat = [t for out in outputs for t in (out if isinstance(out, (list, tuple)) else [out])]
    for out in flat:
        assert torch.isfinite(out.float()).all(), f"{model_id}: denoiser output not finite at {steps} step(s)"
    assert np.isfinite(image.astype(float)).all() and image.std() > 0, f"{model_id}: a blank or broken image at {steps} step(s)"
