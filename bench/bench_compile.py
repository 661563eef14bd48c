"""Compiled against eager (CPU): s/step of a mid-size Flux-style DiT under the engine, side by side.

    python -m bench.bench_compile [--steps 3] [--side 16] [--json out.json]

One child process (an empty inductor cache) builds the model once (random bf16 weights, seeded),
manages two copies of it per storage form (bf16, fp8), compiles one with
`engine.compile_model` (inductor, regional), and times them interleaved, step by step, at
vram_limit=0 and at Auto (unlimited on a host without a GPU): the ratio is measured side by side
in one run. The first compiled call's seconds are the cold compile. A second child with the
same cache directory measures the warm start (a restart: Dynamo traces again, inductor's
compiled code comes from the cache). Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: a mid-size Flux-style DiT: hidden 768 (12 heads x 64), 4 double-stream + 8 single-stream blocks
CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=12,
    joint_attention_dim=768, pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 24, 24),
)
FORMS = {"bf16": {"offload_dtype": "bfloat16"}, "fp8": {"offload_dtype": "float8_e4m3fn"}}
LIMITS = {"0": 0, "Auto": None}
TEXT_TOKENS = 64


def build(seed: int = 0) -> Any:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return torch.nn.Module.to(model, torch.bfloat16).eval()


def inputs(side: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return {
        "hidden_states": torch.randn(1, side * side, CONFIG["in_channels"], generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, CONFIG["joint_attention_dim"], generator=g).bfloat16(),
        "pooled_projections": torch.randn(1, CONFIG["pooled_projection_dim"], generator=g).bfloat16(),
        "timestep": torch.tensor([0.5]).bfloat16(),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }


def timed(model: Any, x: dict[str, Any]) -> tuple[float, Any]:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**x).sample
    return time.perf_counter() - t0, out


def child_main(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    import engine

    x = inputs(args.side)
    plain = build()
    params = sum(p.numel() for p in plain.parameters())
    rows, compile_s, errors, warm_graphs = [], None, [], None
    for form, storage in FORMS.items():
        config = {"computation_device": "cpu", "computation_dtype": "bfloat16", **storage}
        eager = engine.enable_vram_management(copy.deepcopy(plain), vram_config=config, vram_limit=0)
        compiled = engine.enable_vram_management(copy.deepcopy(plain), vram_config=config, vram_limit=0)
        engine.compile_model(compiled)
        first, out_c = timed(compiled, x)  # compiles (the first form only: the graphs are shared)
        eager_first, out_e = timed(eager, x)
        if compile_s is None:
            compile_s, warm_graphs = first, counters["stats"]["unique_graphs"]
        error = ((out_c.float() - out_e.float()).abs().max() / out_e.float().abs().max()).item()
        errors.append(error)
        for label, limit in LIMITS.items():
            engine.set_vram_limit(eager, limit)
            engine.set_vram_limit(compiled, limit)
            timed(eager, x), timed(compiled, x)  # the limit's first step fills resident copies
            te, tc = [], []
            for _ in range(args.steps):  # interleaved: both see the same host load
                te.append(timed(eager, x)[0])
                tc.append(timed(compiled, x)[0])
            e, c = statistics.median(te), statistics.median(tc)
            rows.append({"form": form, "limit": label, "eager": e, "compiled": c, "speedup": e / c})
            print(f"{form} @ {label}: eager {e:.3f} s/step, compiled {c:.3f} s/step, x{e / c:.2f}", flush=True)
        del eager, compiled
    return {"rows": rows, "compile_cold_s": compile_s, "max_rel_error": max(errors), "params": params,
            "recompiles_after_warmup": counters["stats"]["unique_graphs"] - warm_graphs}


def child_warm(args: argparse.Namespace) -> dict[str, Any]:
    import engine

    x = inputs(args.side)
    plain = build()
    model = engine.enable_vram_management(plain, vram_config={"computation_device": "cpu", "computation_dtype": "bfloat16"}, vram_limit=0)
    engine.compile_model(model)
    first, _ = timed(model, x)
    step, _ = timed(model, x)
    return {"first_call_s": first, "step_s": step}


def run_child(which: str, args: argparse.Namespace, cache: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "bench.bench_compile", "--child", which, "--result", out, "--steps", str(args.steps), "--side", str(args.side)]
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(Path(out).read_text())


def table(main: dict[str, Any], warm: dict[str, Any], args: argparse.Namespace) -> str:
    import torch

    tokens = args.side * args.side + TEXT_TOKENS
    lines = [
        f"Flux-style DiT, {main['params'] / 1e6:.0f} M parameters (4 double + 8 single blocks, hidden 768), {tokens} tokens, "
        f"batch 1; CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {args.steps} interleaved steps.",
        "",
        "| weights | vram_limit | eager s/step | compiled s/step | speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in main["rows"]:
        lines.append(f"| {r['form']} | {r['limit']} | {r['eager']:.3f} | {r['compiled']:.3f} | {r['speedup']:.2f}x |")
    step = next(r["compiled"] for r in main["rows"])
    lines += [
        "",
        f"Compile (first call, one step included): cold {main['compile_cold_s']:.1f} s (empty inductor cache), "
        f"warm {warm['first_call_s']:.1f} s (a new process, same cache; one compiled step is {step:.2f} s). "
        f"Compiled against eager: max relative error {main['max_rel_error']:.1e}; "
        f"recompiles after warm-up (limit 0 -> Auto, bf16 -> fp8 models): {main['recompiles_after_warmup']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--side", type=int, default=16, help="latent side in tokens (16: a 256 px Flux image)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=("main", "warm"))
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.child:
        result = child_main(args) if args.child == "main" else child_warm(args)
        args.result.write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="lvs-inductor-") as cache:
        main_result = run_child("main", args, cache)
        warm_result = run_child("warm", args, cache)
    text = table(main_result, warm_result, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"main": main_result, "warm": warm_result}, indent=1))


if __name__ == "__main__":
    main()
