"""CPU kernel timings behind the engine's CPU dtype choices (issue #17).

    nice -n 19 python -m bench.cpu_kernels [--out bench/results/cpu-kernels.md]

bf16 vs float32 for a Linear at a DiT's width, the VAE convolutions (Conv2d 512 ch, Qwen-Image's
Conv3d 384 ch at the size the report named), and the FP8 path: float8_e4m3fn -> bf16 conversion
and the per-row scale multiply that dequantizing one weight matrix costs at every forward
(engine.storage.stored.ScaledFp8Stored.materialize), against a bf16 -> float32 conversion of the
same size. Best of 3, all cores torch uses.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def best(fn, n: int = 3, clock=time.perf_counter) -> float:
    fn()
    out = float("inf")
    for _ in range(n):
        t0 = clock()
        fn()
        out = min(out, clock() - t0)
    return out


def cpu_clock() -> float:
    """Process CPU seconds (all threads): on a shared host, what a run costs, not what it waited."""
    import os

    return sum(os.times()[:2])


def rows() -> list[str]:
    F = torch.nn.functional
    out = ["| kernel | float32 s | bfloat16 s | ratio f32/bf16 |", "|---|---|---|---|"]
    x, w = torch.randn(256, 3072), torch.randn(3072, 3072)
    cases = [
        ("Linear 256x3072 @ 3072x3072", lambda d: (lambda a=x.to(d), b=w.to(d): F.linear(a, b))),
        ("Conv2d 512->512 k3 on 1x512x64x64", lambda d: (lambda a=torch.randn(1, 512, 64, 64).to(d), b=torch.randn(512, 512, 3, 3).to(d): F.conv2d(a, b, padding=1))),
        ("Conv3d 384->384 k3 on 1x384x3x64x64", lambda d: (lambda a=torch.randn(1, 384, 3, 64, 64).to(d), b=torch.randn(384, 384, 3, 3, 3).to(d): F.conv3d(a, b))),
    ]
    for name, make in cases:
        f32, bf16 = best(make(torch.float32)), best(make(torch.bfloat16))
        out.append(f"| {name} | {f32:.3f} | {bf16:.3f} | {f32 / bf16:.2f} |")
    w8 = (w * 0.02).to(torch.float8_e4m3fn)
    scale = torch.rand(3072, 1)
    wb = w.to(torch.bfloat16)
    n = w.numel()
    out += ["", "| conversion of a 3072x3072 weight | s | elements/s |", "|---|---|---|"]
    for name, fn in (
        ("fp8 e4m3 -> bf16 (.to)", lambda: w8.to(torch.bfloat16)),
        ("fp8 -> bf16, then * per-row scale (one dequantization)", lambda: w8.to(torch.bfloat16) * scale),
        ("bf16 -> float32 (.to), for comparison", lambda: wb.to(torch.float32)),
    ):
        t = best(fn)
        out.append(f"| {name} | {t:.4f} | {n / t / 1e6:.0f} M |")
    return out


def engine_rows() -> list[str]:
    """A real-width MLP (Z-Image's 3840 -> 10240 -> 3840, x3) at 288 tokens through the engine:
    bf16 RAM masters, FP8 with no resident copy (dequantized at every forward, as before issue
    #17) and FP8 with the RAM room (bf16 copies made once)."""
    import os

    from torch import nn

    from engine import enable_vram_management
    from engine.generation.settings import vram_config_for

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        layers = []
        for _ in range(3):
            layers += [nn.Linear(3840, 10240, bias=False), nn.Linear(10240, 3840, bias=False)]
        return nn.Sequential(*layers).to(torch.bfloat16).eval()

    x = torch.randn(288, 3840, dtype=torch.bfloat16)
    out = ["", "| engine, 6 real-width layers (236M weights), 288 tokens | CPU s / forward (best of 3) |", "|---|---|"]
    cases = (("bf16 RAM masters (resident = master)", False, None), ("FP8, vram_limit=0 (dequantized every forward)", True, 0), ("FP8, Auto on the CPU (bf16 copies once, RAM room)", True, None))
    os.environ.setdefault("LOWVRAM_RAM_AVAILABLE_GB", "8")
    for name, fp8, limit in cases:
        model = enable_vram_management(mlp(), vram_config=vram_config_for(fp8, False, "cpu"), vram_limit=limit)
        with torch.no_grad():
            t = best(lambda: model(x), clock=cpu_clock)
        out.append(f"| {name} | {t:.3f} |")
        del model
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    head = [f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads", ""]
    lines = head + rows() + engine_rows()
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
