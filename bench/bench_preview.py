"""What the live preview costs a denoising step (docs/app.md quotes this script's figures).

    python -m bench.bench_preview [--runs 3] [--steps 10]

1. A/B runs through the real Studio, preview on and off, interleaved, for the demo (Z-Image
   family, 4-D latents) at 256 px and a tiny FLUX.1 (packed latents, unpacked by the preview) at
   512 px: the median seconds per step of each, and the previews' own time (Previewer.seconds)
   as a share of the denoising time.
2. The projection alone on latents of the real models' shapes at their default sizes (the
   preview's cost depends on the latent size only, not on the weights), against the cost model's
   seconds per step for that model on this host (engine.generation.suggest), since no real
   weights are available offline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def run_ab(studio, request, runs: int) -> dict[str, float]:
    from dataclasses import replace

    from engine.generation.types import GenerationEvent

    per = {True: [], False: []}
    share = []
    for i in range(runs):
        for on in (True, False) if i % 2 == 0 else (False, True):
            events = [e for e in studio.generate(replace(request, preview=on, seed=i))
                      if isinstance(e, GenerationEvent) and e.phase == "denoising" and e.step]
            steps = [e.seconds_per_step for e in events[1:]]  # the first step warms up
            per[on].append(statistics.median(steps))
            if on:
                share.append(studio.last_previewer.seconds / sum(e.seconds_per_step for e in events))
    on, off = statistics.median(per[True]), statistics.median(per[False])
    return {"on_s": on, "off_s": off, "slowdown": on / off - 1, "preview_share": statistics.median(share)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    from engine.generation.preview import latents_to_image
    from engine.generation.studio import Studio
    from engine.generation.suggest import step_seconds
    from engine.generation.types import GenerateRequest
    from model_registry.families import FAMILIES
    from tests.serve_app import TinyFluxRegistry

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        studio = Studio(root / "models", root / "outputs", registry=TinyFluxRegistry(root / "models"))
        for name, model, size in (("demo 256 px", "demo", 256), ("tiny FLUX.1 512 px", "tiny-flux1", 512)):
            req = GenerateRequest("a lighthouse", model=model, width=size, height=size, steps=args.steps,
                                  guidance=0.0 if model == "tiny-flux1" else None)
            ab = run_ab(studio, req, args.runs)
            print(f"{name}: {ab['off_s'] * 1000:.1f} ms/step off, {ab['on_s'] * 1000:.1f} ms/step on "
                  f"({ab['slowdown'] * 100:+.1f}%), previews {ab['preview_share'] * 100:.2f}% of the denoising time")
        shapes = {
            "qwen-image": (1, (1328 // 16) ** 2, 64),
            "flux1-dev": (1, 64 * 64, 64),
            "z-image-turbo": (1, 16, 128, 128),
            "flux2-klein-4b": (1, 64 * 64, 128),
            "sdxl-base-1.0": (1, 4, 128, 128),
        }
        machine = studio.machine()
        for model, shape in shapes.items():
            entry = studio.registry.get_model(model)
            w = h = int(entry.defaults.get("width", 1024))
            x = torch.randn(shape, dtype=torch.bfloat16)
            fam = FAMILIES[entry.family].latent_rgb
            latents_to_image(x, fam, w, h)
            times = []
            for _ in range(10):
                t = time.perf_counter()
                latents_to_image(x, fam, w, h)
                times.append(time.perf_counter() - t)
            req = GenerateRequest("x", model=model)
            got = studio.suggest_settings(req, machine)
            step = got.seconds_per_step or float("nan")
            print(f"{model} {w}x{h} latents {tuple(shape)}: preview {statistics.median(times) * 1000:.2f} ms, "
                  f"a CPU step by the cost model {step:.0f} s ({statistics.median(times) / step * 100:.4f}%)")


if __name__ == "__main__":
    main()
