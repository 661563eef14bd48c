"""Engine core benchmark (CPU): per-layer Python overhead of managed forwards, and FP8 error.

    python -m bench.bench_engine [--layers 128 --width 256 --tokens 32 --repeats 30]

Overhead: a model of many small Linear layers, plain vs managed with everything resident
(vram_limit=None) vs managed streaming every layer (vram_limit=0), same weights, same inputs,
runs interleaved; prints medians, per-layer overhead and the ratio to plain.
FP8: relative output error of a 1024x1024 Linear against its float32 output, for a plain cast
(what DiffSynth and diffusers' layerwise casting do) and our per-channel scaled storage.
Storage forms (`--quant`, the README's table): relative output error against float32 on
Linear(3072, 3072), Linear(3072, 12288) with weights N(0, std) and on a real-width Qwen-Image
block, for a plain fp8 cast, our scaled fp8, int8, nf4, bitsandbytes-style NF4 with blocks of 64
(measured here, in the same run) and GGUF Q8_0 / Q4_K / Q4_0 (values from the gguf package's
own dequantization; ours is bitwise equal to it, tests/test_gguf.py). Our forms run through the
engine at vram_limit=0 (streamed, dequantized where the layer computes, bf16 compute).
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




def bnb_nf4_roundtrip(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """bitsandbytes-style NF4 (absmax per block of 64 in float32, nearest NF4 level), in float32."""
    from engine.storage.nf4 import LEVELS

    levels = torch.tensor(LEVELS)
    w = weight.detach().float().reshape(-1, block)
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-30)
    idx = torch.bucketize(w / amax, (levels[1:] + levels[:-1]) / 2)
    return (levels[idx] * amax).reshape(weight.shape)


def gguf_roundtrip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    import gguf

    from tools.gguf_write import quantize

    flat = weight.detach().float().reshape(weight.shape[0], -1).numpy()
    blocks = quantize(flat, qtype)
    return torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).copy()).reshape(weight.shape)


QUANT_COLUMNS = ("fp8 plain cast", "fp8 scaled (ours)", "int8 (ours)", "nf4 (ours)", "NF4 block 64 (bnb-style)", "GGUF Q8_0", "GGUF Q4_K", "GGUF Q4_0")
ENGINE_FORMS = {"fp8 scaled (ours)": "float8_e4m3fn", "int8 (ours)": "int8", "nf4 (ours)": "nf4"}


def _variant(model: nn.Module, column: str) -> nn.Module:
    """`model` (float32) as the bf16 model a column computes with."""
    if column in ENGINE_FORMS:
        form = ENGINE_FORMS[column]
        cfg = {"offload_dtype": form, "onload_dtype": form, "computation_device": "cpu", "computation_dtype": "bfloat16"}
        return enable_vram_management(copy.deepcopy(model).bfloat16(), vram_config=cfg, vram_limit=0)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim < 2:
                continue
            if column == "fp8 plain cast":
                p.copy_(plain_cast_roundtrip(p, torch.float8_e4m3fn, torch.float32))
            elif column.startswith("NF4"):
                p.copy_(bnb_nf4_roundtrip(p))
            else:
                p.copy_(gguf_roundtrip(p, column.split()[-1]))
    return out.bfloat16()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def quant_table(stds: list[float], block: bool = True) -> list[str]:
    rows = [
        "Storage error: relative L2 error of the bf16-compute output against the float32 output "
        "(weights N(0, std), biases 0; 64 random inputs; Qwen-Image block: dim 3072, 24 heads, 256 image + 32 text tokens)",
        "",
        "| layer | weight std | " + " | ".join(QUANT_COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(QUANT_COLUMNS),
    ]
    for fan_in, fan_out in ((3072, 3072), (3072, 12288)):
        for std in stds:
            torch.manual_seed(0)
            lin = nn.Linear(fan_in, fan_out)
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
            x = torch.randn(64, fan_in)
            with torch.no_grad():
                ref = lin(x)
                cells = [f"{_rel(_variant(lin, c)(x.bfloat16()), ref):.4f}" for c in QUANT_COLUMNS]
            rows.append(f"| Linear({fan_in}, {fan_out}) | {std} | " + " | ".join(cells) + " |")
    if block:
        from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

        torch.manual_seed(0)
        blk = QwenImageTransformerBlock(3072, 24, 128).eval()
        with torch.no_grad():
            for p in blk.parameters():
                p.normal_(0, 0.02) if p.ndim >= 2 else None
        g = torch.Generator().manual_seed(1)
        inputs = dict(
            hidden_states=torch.randn(1, 256, 3072, generator=g),
            encoder_hidden_states=torch.randn(1, 32, 3072, generator=g),
            encoder_hidden_states_mask=None,
            temb=torch.randn(1, 3072, generator=g),
        )
        bf = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        with torch.no_grad():
            ref = blk(**inputs)[1]
            cells = []
            for c in QUANT_COLUMNS:
                variant = _variant(blk, c)
                cells.append(f"{_rel(variant(**bf)[1], ref):.4f}")
                del variant
        rows.append("| Qwen-Image block (image stream) | 0.02 | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--quant", action="store_true", help="only the storage-form error table")
    parser.add_argument("--no-block", action="store_true", help="leave the Qwen-Image block out of --quant")
    args = parser.parse_args()
    if args.quant:
        torch.set_num_threads(2)
        print("\n".join(quant_table([0.005, 0.02, 0.05], block=not args.no_block)))
        return
    torch.set_num_threads(1)
    print(f"device: cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}")
    print()
    print("\n".join(overhead_table(args.layers, args.width, args.tokens, args.repeats)))
    print()
    print("\n".join(fp8_table([0.005, 0.02, 0.05])))


if __name__ == "__main__":
    main()
