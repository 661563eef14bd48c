"""Benchmark (CPU): bytes streamed per step per storage form, and peak RAM when loading a
real-size Qwen-Image DiT replica in 4-bit.

    .venv/bin/python -m bench.bench_quant                  # both figures, full size (60 blocks)
    .venv/bin/python -m bench.bench_quant --layers 6       # smaller replica

Bytes streamed: a real-width Qwen-Image DiT (dim 3072, joint_attention_dim 3584, --stream-layers
blocks) managed at vram_limit=0, one forward per form; `stats.streamed_bytes` of the second
forward (the first traces) against bf16's.

Replica: the real checkpoint's tensor names, shapes and dtypes (QwenImageTransformer2DModel built
on the meta device from model_registry/component_configs.json) written as safetensors shards of
~5 GB with an index, like the published repo, whose data is a sparse-file hole (no disk used;
reads return zeros); and a GGUF replica with every matrix whose rows split into 256 in Q4_K
(others BF16/F32), also a hole. Each load runs in a fresh subprocess that samples RssAnon every
millisecond; the figure is the peak over the baseline after imports, against the stored bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_loader import _Peak, _rss, qwen_inputs

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
SHARD_BYTES = 5 * 1024**3


def qwen_config(layers: int | None = None) -> dict:
    config = dict(json.loads((REPO / "model_registry" / "component_configs.json").read_text())["qwen-image-transformer"])
    config.pop("_class_name", None)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if layers is not None:
        config["num_layers"] = layers
    return config


def meta_model(layers: int | None):
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(**qwen_config(layers))


def write_safetensors_replica(directory: Path, layers: int | None) -> Path:
    """bf16 shards of ~5 GB + index, data a sparse hole."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "diffusion_pytorch_model.safetensors.index.json").is_file():
        return directory
    model = meta_model(layers)
    model.save_config(directory)
    tensors = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            nbytes = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)  # the data: a hole
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def write_gguf_replica(path: Path, layers: int | None) -> Path:
    """The sparse Q4_K_M-style replica tools/gguf_replica.py writes for the catalogue (Q4_K for
    matrices whose rows split into 256, BF16 for other matrices, F32 for 1-D; data a hole)."""
    from tools.gguf_replica import write_denoiser_gguf

    if path.is_file():
        return path
    model = meta_model(layers)
    model.save_config(path.parent)
    write_denoiser_gguf(path, model, "Q4_K_M")
    return path


# --- child ---------------------------------------------------------------------------------------
def child(kind: str, path: str) -> dict:
    import torch
    from diffusers import QwenImageTransformer2DModel

    sys.path.insert(0, str(REPO))
    from engine import load_model, runtime_of

    torch.set_num_threads(os.cpu_count() or 1)
    base = _rss()
    peak = _Peak()  # RssAnon every ms
    form = {"nf4": "nf4", "gguf": "gguf", "int8": "int8"}[kind]
    cfg = {"offload_dtype": form, "onload_dtype": form, "preparing_dtype": form, "computation_device": "cpu", "computation_dtype": torch.bfloat16}
    t0 = time.perf_counter()
    model = load_model(QwenImageTransformer2DModel, path, vram_config=cfg, vram_limit=0)
    seconds = time.perf_counter() - t0
    peak.stop = True
    time.sleep(0.01)
    runtime = runtime_of(model)
    stored = sum(s.nbytes for r in runtime.layers for n, s in r.masters.items() if n in r.owned)
    return {"kind": kind, "load_s": seconds, "peak_over_base": peak.value - base, "stored": stored, "after": _rss() - base,
            "arena": runtime.host_arena.nbytes if runtime.host_arena is not None else 0}


def run_child(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_quant", "--child", kind, str(path)], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- bytes streamed ------------------------------------------------------------------------------
def streamed_bytes(layers: int) -> list[str]:
    import torch
    from diffusers import QwenImageTransformer2DModel

    from engine import enable_vram_management, runtime_of

    inputs = qwen_inputs(side=8, text=16)
    rows = [
        f"Bytes streamed per step at vram_limit=0: Qwen-Image DiT, real width, {layers} blocks (N(0, 0.02) weights), CPU",
        "",
        "| storage | bytes streamed per forward (MB) | vs bf16 |",
        "|---|---:|---:|",
    ]
    base = None
    for form in ("bfloat16", "float8_e4m3fn", "int8", "nf4"):
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # parameters on meta, rope buffers real
            model = QwenImageTransformer2DModel(**qwen_config(layers))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in list(model.named_parameters()):
                module_name, _, leaf = name.rpartition(".")
                real = torch.empty(p.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
                model.get_submodule(module_name)._parameters[leaf] = torch.nn.Parameter(real, requires_grad=False)
        cfg = {"offload_dtype": form, "onload_dtype": form, "preparing_dtype": form, "computation_device": "cpu", "computation_dtype": "bfloat16"}
        model = enable_vram_management(model, vram_config=cfg, vram_limit=0)
        stats = runtime_of(model).stats
        with torch.no_grad():
            model(**inputs)
            before = stats.streamed_bytes
            model(**inputs)
        step = stats.streamed_bytes - before
        base = base or step
        rows.append(f"| {form} | {step / MB:,.1f} | {step / base:.3f}x |")
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"))
    parser.add_argument("--layers", type=int, default=None, help="blocks of the replica (default: the real 60)")
    parser.add_argument("--stream-layers", type=int, default=2)
    parser.add_argument("--cache-dir", default="/tmp/lowvram-replicas")
    parser.add_argument("--only", choices=("stream", "rss"), default=None)
    parser.add_argument("--kinds", default="nf4,gguf", help="which replica loads to measure (nf4, gguf)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.only != "rss":
        print("\n".join(streamed_bytes(args.stream_layers)))
        print()
    if args.only == "stream":
        return
    tag = "full" if args.layers is None else f"{args.layers}l"
    cache = Path(args.cache_dir)
    kinds = args.kinds.split(",")
    st = write_safetensors_replica(cache / f"qwen-image-{tag}", args.layers) if "nf4" in kinds else None
    gg = write_gguf_replica(cache / f"qwen-image-{tag}-gguf" / "qwen-image-Q4_K.gguf", args.layers) if "gguf" in kinds else None
    print(f"Peak RssAnon when loading the Qwen-Image DiT replica ({args.layers or 60} blocks), over the baseline after imports")
    print()
    print("| load | stored MB | peak RssAnon MB | bound 1.15x stored + 300 MB | within | load s |")
    print("|---|---:|---:|---:|---|---:|")
    for kind, path in (("nf4", st), ("gguf", gg)):
        if path is None:
            continue
        r = run_child(kind, path)
        bound = 1.15 * r["stored"] + 300 * MB
        label = "nf4 on the fly from bf16 shards" if kind == "nf4" else "Q4_K GGUF replica, blocks kept"
        print(f"| {label} | {r['stored'] / MB:,.0f} | {r['peak_over_base'] / MB:,.0f} | {bound / MB:,.0f} | "
              f"{'yes' if r['peak_over_base'] <= bound else 'NO'} | {r['load_s']:.1f} |")


if __name__ == "__main__":
    main()
