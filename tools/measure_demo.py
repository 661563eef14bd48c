"""How well the shipped demo draws what it is told, per storage form and VRAM limit.

    python -m tools.measure_demo [--count 20] [--steps 8]

Every held-out caption (tools/demo_shapes.held_out_scenes: colour/shape/position triples that
training never drew) is generated through the app's Studio, seed fixed, in each storage form
(bf16, FP8, int8, NF4, GGUF Q8_0 and Q4_K files made here from the demo's transformer, and bf16
streamed from disk) under VRAM limits 0, partial (half the transformer) and Auto; tests/judge.py
says whether the picture shows the caption. Prints one Markdown row per form and limit: the
judge's rates (everything right; colours and position right, the shape's class aside) and the
mean absolute pixel difference from bf16 at the same limit (0..255).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import model_registry
from model_registry.catalog import GgufSource
from tests.judge import judge
from tools.demo_shapes import held_out_scenes


def original_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The diffusers Z-Image state dict under the original / ComfyUI names published GGUFs use
    ([to_q; to_k; to_v] fused into attention.qkv, to_out.0 -> out, norm_q/k -> q_norm/k_norm)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if re.search(r"\.attention\.to_[kv]\.weight$", key):
            continue
        if (m := re.fullmatch(r"(.+)\.attention\.to_q\.weight", key)) is not None:
            out[f"{m[1]}.attention.qkv.weight"] = np.concatenate([state[f"{m[1]}.attention.to_{x}.weight"] for x in "qkv"])
            continue
        name = (key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
                .replace(".attention.to_out.0.", ".attention.out.")
                .replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm."))
        out[name] = value
    return out


def qtypes(state: dict[str, np.ndarray], main: str) -> dict[str, str]:
    """As llama.cpp-style converters do: `main` where a row splits into its blocks (256 values for
    K-quants, 32 otherwise), else Q4_0/Q8_0 where rows split into 32 (Q4_K's fallback is Q4_0),
    else BF16; 1-D tensors and single rows stay as they are."""
    block = 256 if main.endswith("_K") else 32
    fallback = "Q4_0" if main.startswith("Q4") else "Q8_0"
    out = {}
    for name, a in state.items():
        if a.ndim < 2 or a.shape[0] == 1:
            continue
        out[name] = main if a.shape[-1] % block == 0 else fallback if a.shape[-1] % 32 == 0 else "BF16"
    return out


def gguf_copy(demo: Path, target: Path, quant: str) -> tuple[Path, dict[str, int]]:
    """A copy of the demo folder whose transformer is a .gguf file of `quant` (and its config)."""
    from safetensors.torch import load_file

    from tools.gguf_write import write_gguf

    shutil.copytree(demo, target)
    state: dict[str, np.ndarray] = {}
    for f in sorted((target / "transformer").glob("*.safetensors")):
        state |= {k: v.float().numpy() for k, v in load_file(f).items()}
    for f in (target / "transformer").iterdir():
        if f.name != "config.json":
            f.unlink()
    original = original_layout(state)
    types = qtypes(original, quant)
    write_gguf(target / "transformer" / f"demo-{quant}.gguf", original, types, "lumina2", prefix="model.diffusion_model.")
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return target, counts


class Variants:
    """model_registry plus the demo's GGUF copies (ids demo-gguf-<quant>)."""

    def __init__(self, demo_entry: Any, copies: dict[str, Path]) -> None:
        self.entries = {
            f"demo-gguf-{q.lower()}": dataclasses.replace(
                demo_entry, id=f"demo-gguf-{q.lower()}", name=f"demo {q}", is_demo=False,
                gguf=GgufSource(repo="local/demo", file=p.joinpath("transformer", f"demo-{q}.gguf").name, quant=q,
                                bytes=p.joinpath("transformer", f"demo-{q}.gguf").stat().st_size),
            )
            for q, p in copies.items()
        }
        self.paths = {f"demo-gguf-{q.lower()}": p for q, p in copies.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(model_registry, name)

    def get_model(self, model_id: str) -> Any:
        return self.entries.get(model_id) or model_registry.get_model(model_id)

    def is_downloaded(self, model_id: str, models_dir: Any = None) -> bool:
        return model_id in self.entries or model_registry.is_downloaded(model_id, models_dir)

    def local_path(self, model_id: str, models_dir: Any = None) -> Path | None:
        return self.paths.get(model_id) or model_registry.local_path(model_id, models_dir)

    def download(self, model_id: str, source: str = "hf", progress: Any = None, models_dir: Any = None, token: Any = None) -> Path:
        if model_id in self.paths:
            return self.paths[model_id]
        return model_registry.download(model_id, source, progress=progress, models_dir=models_dir, token=token)

    def load_options(self, model_id: str, path: Any) -> dict[str, Any]:
        return {} if model_id in self.entries else model_registry.load_options(model_id, path)


def generate(studio: Any, request: Any) -> np.ndarray:
    from engine.generation.types import GenerationResult

    for item in studio.generate(request):
        if isinstance(item, GenerationResult):
            return np.asarray(item.image.convert("RGB"), np.uint8)
    raise RuntimeError("no image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20, help="held-out captions per bf16 row")
    ap.add_argument("--others", type=int, default=20, help="of those, how many the other rows generate (time: the host is shared)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the demo's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="bf16,fp8,int8,nf4,gguf-q8_0,gguf-q4_k,disk", help="which forms")
    args = ap.parse_args()

    from engine.generation.studio import Studio
    from engine.generation.types import GenerateRequest

    scenes = held_out_scenes(args.count)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        demo_entry = model_registry.get_model("demo")
        demo = model_registry.download("demo", models_dir=root / "models")
        copies, counts = {}, {}
        for q in ("Q8_0", "Q4_K"):
            copies[q], counts[q] = gguf_copy(demo, root / f"demo-{q}", q)
        print(f"GGUF tensor types: {counts}")
        transformer_gb = sum(f.stat().st_size for f in (demo / "transformer").glob("*.safetensors")) / 1e9
        limits = {"0": 0.0, "partial": transformer_gb / 2, "Auto": None}
        studio = Studio(root / "models", root / "outputs", registry=Variants(demo_entry, copies), device="cpu")
        forms = {"bf16": ("demo", "bf16", False), "fp8": ("demo", "fp8", False), "int8": ("demo", "int8", False),
                 "nf4": ("demo", "nf4", False), "gguf-q8_0": ("demo-gguf-q8_0", "auto", False),
                 "gguf-q4_k": ("demo-gguf-q4_k", "auto", False), "disk": ("demo", "bf16", True)}
        reference: dict[str, list[np.ndarray]] = {}
        print("| form | VRAM limit | judge: all right | colours and position right | mean pixel difference from bf16 |")
        print("|---|---|---|---|---|")
        for form in args.rows.split(","):
            model, weights, disk = forms[form]
            for label, limit in limits.items():
                t0 = time.perf_counter()
                rows = scenes if form == "bf16" else scenes[: args.others]
                images = [generate(studio, GenerateRequest(s.caption(), model=model, seed=args.seed, steps=args.steps, weights=weights,
                                                           vram_limit=limit, disk_offload=disk, preview=False)) for s in rows]
                verdicts = [judge(im, s) for im, s in zip(images, rows)]
                right = sum(v.ok for v in verdicts)
                placed = sum(v.colours_and_place_ok for v in verdicts)
                if form == "bf16":
                    reference[label] = images
                diff = (np.mean([np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() for a, b in zip(images, reference[label])])
                        if label in reference else float("nan"))
                print(f"| {form} | {label} | {right}/{len(rows)} ({100 * right / len(rows):.0f}%) | {placed}/{len(rows)} ({100 * placed / len(rows):.0f}%) | {diff:.2f} |"
                      f"  <!-- {time.perf_counter() - t0:.0f}s -->", flush=True)


if __name__ == "__main__":
    main()
