"""Engine core benchmark (CPU): per-layer Python overhead of managed forwards, and FP8 error.

    python -m bench.bench_engine [--layers 128 --width 256 --tokens 32 --repeats 30]

Overhead: a model of many small Linear layers, plain vs managed with everything resident
(vram_limit=None) vs managed streaming every layer (vram_limit=0), same weights, same inputs,
runs interleaved; prints medians, per-layer overhead and the ratio to plain.
FP8: relative output error of a 1024x1024 Linear against its float32 output, for a plain cast
(what DiffSynth and diffusers' layerwise casting do) and our per-channel scaled storage.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

from engine import enable_vram_management
from engine.storage.fp8 import plain_cast_roundtrip


def small_layer_model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval()


def time_forward(model: nn.Module, x: torch.Tensor) -> float:
    """CPU time of this thread: with one intra-op thread that is the forward's whole cost, and it
    does not count time the OS gave to other processes on a busy machine."""
    t0 = time.thread_time()
    model(x)
    return time.thread_time() - t0


def overhead_table(layers: int, width: int, tokens: int, repeats: int) -> list[str]:
    plain = small_layer_model(layers, width)
    cfg = {"computation_device": "cpu", "computation_dtype": "float32", "offload_dtype": "float32"}
    resident = enable_vram_management(copy.deepcopy(plain), vram_config=cfg, vram_limit=None)
    streaming = enable_vram_management(copy.deepcopy(plain), vram_config=cfg, vram_limit=0)
    x = torch.randn(tokens, width)
    models = {"plain": plain, "managed, all resident": resident, "managed, streaming (vram_limit=0)": streaming}
    samples: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(repeats):
            for name, model in models.items():  # interleaved, so drift hits all alike
                samples[name].append(time_forward(model, x))
    base = statistics.median(samples["plain"])
    rows = [
        f"Per-layer overhead: {layers} x Linear({width}, {width}), {tokens} tokens, float32, "
        f"1 thread, thread CPU time, median of {repeats} interleaved runs",
        "",
        "| model | ms / forward | overhead per layer (us) | vs plain |",
        "|---|---:|---:|---:|",
    ]
    for name in models:
        t = statistics.median(samples[name])
        rows.append(f"| {name} | {t * 1e3:.3f} | {(t - base) / layers * 1e6:+.2f} | {t / base:.3f}x |")
    return rows


def fp8_table(stds: list[float]) -> list[str]:
    rows = [
        "FP8 storage error: Linear(1024, 1024), weights N(0, std), 64 random inputs, relative L2 error of the "
        "bf16-compute output against the float32 output",
        "",
        "| weight std | e4m3 plain cast | e4m3 ours (per-channel scale) | e5m2 plain cast | e5m2 ours |",
        "|---:|---:|---:|---:|---:|",
    ]
    for std in stds:
        torch.manual_seed(0)
        lin = nn.Linear(1024, 1024)
        nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(lin.bias)
        x = torch.randn(64, 1024)
        ref = lin(x).detach()
        cells = []
        for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            w = plain_cast_roundtrip(lin.weight.detach(), fp8, torch.bfloat16)
            plain = nn.functional.linear(x.bfloat16(), w, lin.bias.detach().bfloat16()).float()
            cfg = {"offload_dtype": fp8, "onload_dtype": fp8, "computation_device": "cpu", "computation_dtype": "bfloat16"}
            ours_model = enable_vram_management(copy.deepcopy(lin).bfloat16(), vram_config=cfg, vram_limit=0)
            ours = ours_model(x.bfloat16()).float().detach()
            for y in (plain, ours):
                cells.append(f"{((y - ref).norm() / ref.norm()).item():.4f}")
        rows.append(f"| {std} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"device: cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}")
    print()
    print("\n".join(overhead_table(args.layers, args.width, args.tokens, args.repeats)))
    print()
    print("\n".join(fp8_table([0.005, 0.02, 0.05])))


if __name__ == "__main__":
    main()
