"""`python -m tests.serve_app [app.py flags]`: the real app (real Studio, demo model) with test knobs.

LVS_TEST_STEP_DELAY_S=0.5   each denoising step lasts at least this long (a run long enough to
                            cancel, drop or close mid-way; the demo's steps take milliseconds)
LVS_TEST_TINY_MODEL=1       also offer "tiny-flux1", a tiny FLUX.1 pipeline registered like the
                            tiny models of tests/test_studio.py (a second model for the soak test)
LVS_TEST_TEXT_ONLY_MODEL=1  also offer "text-only-test" in the model dropdown, a model whose family
                            takes no input image (tests/fixtures/text_only_model.py)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import app


def slow_steps(delay: float) -> None:
    from engine.generation.pipelines import ManagedPipeline

    real_generate = ManagedPipeline.generate

    def generate(self, *args, on_step=None, **kwargs):
        def step(i, n, stats):
            time.sleep(delay)
            if on_step is not None:
                on_step(i, n, stats)

        return real_generate(self, *args, on_step=step, **kwargs)

    ManagedPipeline.generate = generate


class TinyFluxRegistry:
    """model_registry plus "tiny-flux1" (written once under <model dir>/tiny-flux1)."""

    MODEL_ID = "tiny-flux1"

    def __init__(self, models_dir: Path):
        import model_registry
        from tests.fixtures.tiny_repos import write_tiny_repo

        self._reg = model_registry
        demo = model_registry.get_model("demo")
        self.entry = dataclasses.replace(
            demo, id=self.MODEL_ID, name="Tiny FLUX.1", family="flux1", is_demo=False,
            defaults={"steps": 2, "guidance": 0.0, "width": 64, "height": 64},
            limits={**demo.limits, "min_guidance": 0.0, "max_guidance": 0.0},
        )
        self.path = Path(models_dir) / self.MODEL_ID
        if not (self.path / "model_index.json").is_file():
            write_tiny_repo("flux1", self.path)

    def __getattr__(self, name):
        return getattr(self._reg, name)

    def get_model(self, model_id):
        return self.entry if model_id == self.MODEL_ID else self._reg.get_model(model_id)

    def is_downloaded(self, model_id, models_dir=None):
        return model_id == self.MODEL_ID or self._reg.is_downloaded(model_id, models_dir)

    def local_path(self, model_id, models_dir=None):
        return self.path if model_id == self.MODEL_ID else self._reg.local_path(model_id, models_dir)

    def load_options(self, model_id, path):
        return {} if model_id == self.MODEL_ID else self._reg.load_options(model_id, path)


def main(argv: list[str]) -> None:
    if delay := float(os.environ.get("LVS_TEST_STEP_DELAY_S") or 0):
        slow_steps(delay)
    factory = None
    tiny = os.environ.get("LVS_TEST_TINY_MODEL") == "1"
    text_only = os.environ.get("LVS_TEST_TEXT_ONLY_MODEL") == "1"
    if tiny or text_only:
        from engine.generation.studio import Studio

        def factory(models_dir, outputs_dir, source="hf", **kwargs):
            registry = TinyFluxRegistry(models_dir) if tiny else None
            if text_only:
                from tests.fixtures.text_only_model import TextOnlyRegistry

                registry = TextOnlyRegistry(registry)
            return Studio(models_dir, outputs_dir, source, registry=registry, **kwargs)

    app.main(argv, studio_factory=factory)


if __name__ == "__main__":
    main(sys.argv[1:])
