"""Benchmark: engine.load_model (bf16 / scaled FP8 / disk offload) against diffusers' from_pretrained.

    .venv/bin/python bench/bench_loader.py                 # ~2B-param Qwen-Image DiT, CPU
    .venv/bin/python bench/bench_loader.py --layers 2      # smaller and quicker

The checkpoint is a QwenImageTransformer2DModel with the real block width (24 heads x 128 = 3072,
joint_attention_dim 3584) and fewer blocks (6 of 60: ~2.05B parameters, ~4.1 GB bf16), random
weights written once with diffusers' save_pretrained (sharded, with index json) into --cache-dir.

Every case runs in a fresh subprocess so its baseline RSS is clean. Memory is RssAnon (anonymous
pages: what cannot be dropped under pressure) sampled every millisecond on a thread, minus the
baseline after imports; RssFile (mapped file pages, e.g. diffusers' mmap-ed safetensors) is
reported next to it. Page cache is warm (the shards were read before) unless --cold, which
evicts the shards' pages (posix_fadvise DONTNEED) before each case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
GB = 1024 * MB

CASES = {
    # name: (label, kind, vram_limit)
    "diffusers_bf16": ("diffusers from_pretrained bf16", "diffusers", None),
    "diffusers_fp8": ("diffusers from_pretrained + layerwise casting fp8", "diffusers_fp8", None),
    "ours_bf16": ("load_model bf16 (RAM, all resident)", "bf16", None),
    "ours_fp8": ("load_model scaled fp8 (RAM, streamed)", "fp8", 0),
    "ours_disk": ("load_model disk offload (+read-ahead)", "disk", 0),
    "ours_disk_noprefetch": ("load_model disk offload, no read-ahead", "disk_noprefetch", 0),
}


def model_config(layers: int) -> dict:
    return dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
    )


# --- child side -----------------------------------------------------------------------------------
def _rss(field: str = "RssAnon:") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class _Peak:
    """Peak RssAnon sampled every ms; reset() is done by the sampling thread itself (assigning
    from outside could be overwritten by a max() it computed from the old value)."""

    def __init__(self) -> None:
        self.value = _rss()
        self.stop = False
        self.resetting = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop:
            v = _rss()
            if self.resetting:
                self.value = v
                self.resetting = False
            else:
                self.value = max(self.value, v)
            time.sleep(0.001)

    def reset(self) -> None:
        self.resetting = True
        while self.resetting:
            time.sleep(0.0002)


def qwen_inputs(side: int, text: int) -> dict:
    """One Qwen-Image DiT forward's inputs (seeded): a side x side latent, `text` prompt tokens."""
    import torch

    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, side * side, 64, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, text, 3584, generator=g).bfloat16(),
        encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long),
        timestep=torch.tensor([0.5]).bfloat16(),
        img_shapes=[(1, side, side)],
        return_dict=False,
    )


def generate(path: Path, layers: int) -> None:
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**model_config(layers))
    model = torch.nn.Module.to(model.to_empty(device="cpu"), torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="1GB")
    tmp.rename(path)


def child(case: str, path: str, forwards: int, side: int, text: int, out_file: str | None = None) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from diffusers import QwenImageTransformer2DModel

    from engine import load_model, runtime_of

    torch.set_num_threads(os.cpu_count() or 1)
    label, kind, limit = CASES[case]
    cpu = {"computation_device": "cpu", "computation_dtype": torch.bfloat16}
    inputs = qwen_inputs(side, text)
    base = _rss()
    base_file = _rss("RssFile:")
    peak = _Peak()
    t0 = time.perf_counter()
    if kind in ("diffusers", "diffusers_fp8"):
        model = QwenImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
        if kind == "diffusers_fp8":
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    else:
        config = {
            "bf16": {"offload_dtype": "bfloat16"},
            "fp8": {"offload_dtype": "float8_e4m3fn"},
            "disk": {"offload_dtype": "disk", "offload_device": "disk"},
            "disk_noprefetch": {"offload_dtype": "disk", "offload_device": "disk"},
        }[kind]
        model = load_model(
            QwenImageTransformer2DModel, path, vram_config={**cpu, **config}, vram_limit=limit, prefetch=kind != "disk_noprefetch"
        )
    load_s = time.perf_counter() - t0
    out = {
        "case": case,
        "label": label,
        "loadavg": os.getloadavg()[0],
        "load_s": load_s,
        "load_peak_anon": peak.value - base,
        "after_load_anon": _rss() - base,
        "after_load_file": _rss("RssFile:") - base_file,
    }
    times, after = [], []
    peak.reset()
    result = None
    with torch.no_grad():
        for _ in range(forwards):
            t = time.perf_counter()
            result = model(**inputs)[0]
            times.append(time.perf_counter() - t)
            after.append(_rss() - base)
    out.update(
        forward_s=times,
        forward_peak_anon=peak.value - base,
        after_forward_anon=after,
        after_forward_file=_rss("RssFile:") - base_file,
    )
    if result is not None and out_file:
        torch.save(result, out_file)
    try:
        rt = runtime_of(model)
        if rt.prefetcher is not None:
            out["prefetch"] = {"hits": rt.prefetcher.hits, "misses": rt.prefetcher.misses}
    except ValueError:
        pass
    return out


# --- parent side ------------------------------------------------------------------------------------
def _evict(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _device() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / GB:.0f} GiB RAM"
    except ImportError:
        ram = ""
    return f"CPU: {cpu}, {os.cpu_count()} cores, {ram}, load average {os.getloadavg()[0]:.1f} at start"


def _fmt_mb(x: float) -> str:
    return f"{x / MB:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6, help="transformer blocks (real width); 6 -> ~2.05B parameters")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/lowvram-studio/bench_loader"))
    ap.add_argument("--forwards", type=int, default=3)
    ap.add_argument("--side", type=int, default=8, help="packed latent side (8 -> 64 image tokens = 128x128 px)")
    ap.add_argument("--text", type=int, default=16, help="text tokens")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--cold", action="store_true", help="evict the shards from the page cache before each case")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.generate:
        generate(Path(args.path), args.layers)
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.path, args.forwards, args.side, args.text, args.out)), flush=True)
        return

    path = Path(args.cache_dir) / f"qwen_image_dit_{args.layers}l_bf16"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the checkpoint once to {path} ...", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", "--path", str(path), "--layers", str(args.layers)], check=True)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    shards = sorted(path.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in shards)
    indexes = list(path.glob("*.index.json"))
    params = (json.loads(indexes[0].read_text()).get("metadata", {}).get("total_size", nbytes) if indexes else nbytes) // 2
    device = _device()
    print(f"checkpoint: {path} ({len(shards)} shards, {nbytes / GB:.2f} GiB, ~{params / 1e9:.2f}B parameters bf16)")
    print(device)
    print(f"forward: {args.side * args.side} image + {args.text} text tokens, {args.forwards} forwards, "
          f"page cache {'cold (evicted before each case)' if args.cold else 'warm'}\n", flush=True)

    import tempfile

    import torch

    outdir = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    results = []
    for case in args.cases.split(","):
        if args.cold:
            _evict(path)
        cmd = [sys.executable, __file__, "--child", case, "--path", str(path), "--forwards", str(args.forwards),
               "--side", str(args.side), "--text", str(args.text), "--out", str(outdir / f"{case}.pt")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{case}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(lines[-1][7:])
        results.append(r)
        print(f"{case}: load {r['load_s']:.1f} s, peak anon {_fmt_mb(r['load_peak_anon'])} MB, forwards "
              f"{', '.join(f'{t:.1f}' for t in r['forward_s'])} s", flush=True)

    if not results:
        return
    base = {r["case"]: r for r in results}
    ref_file = outdir / "diffusers_bf16.pt"
    reference = torch.load(ref_file) if ref_file.exists() else None

    def vs_reference(case: str) -> str:
        f = outdir / f"{case}.pt"
        if reference is None or not f.exists():
            return ""
        out = torch.load(f)
        if torch.equal(out, reference):
            return "bitwise"
        rel = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        return f"no (rel. L2 diff {rel:.3f})"

    print("\n| case | load s | peak RssAnon load MB | RssAnon after load MB | RssFile after load MB | "
          "forward s (median; first) | peak RssAnon forwards MB | RssAnon after each forward MB | RssFile after forwards MB | output vs diffusers bf16 | host load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|")
    for r in results:
        fw = sorted(r["forward_s"])
        med = fw[len(fw) // 2] if fw else float("nan")
        same = vs_reference(r["case"])
        print(f"| {r['label']} | {r['load_s']:.1f} | {_fmt_mb(r['load_peak_anon'])} | {_fmt_mb(r['after_load_anon'])} | "
              f"{_fmt_mb(r['after_load_file'])} | {med:.2f}; {r['forward_s'][0]:.2f} | {_fmt_mb(r['forward_peak_anon'])} | "
              f"{' / '.join(_fmt_mb(a) for a in r['after_forward_anon'])} | {_fmt_mb(r['after_forward_file'])} | {same} | {r['loadavg']:.1f} |")
    print()
    pairs = [("ours_bf16", "diffusers_bf16"), ("ours_fp8", "diffusers_fp8"), ("ours_disk", "ours_bf16"), ("ours_disk", "ours_disk_noprefetch")]
    for a, b in pairs:
        if a in base and b in base:
            ra, rb = base[a], base[b]
            fa, fb = sorted(ra["forward_s"]), sorted(rb["forward_s"])
            print(f"{a} / {b}: load time x{ra['load_s'] / rb['load_s']:.2f}, peak load RssAnon x"
                  f"{ra['load_peak_anon'] / max(rb['load_peak_anon'], 1):.2f}, peak load RssAnon + RssFile after forwards x"
                  f"{(ra['load_peak_anon'] + ra['after_forward_file']) / max(rb['load_peak_anon'] + rb['after_forward_file'], 1):.2f}, "
                  f"forward (median) x{fa[len(fa) // 2] / fb[len(fb) // 2]:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device, "checkpoint": str(path), "bytes": nbytes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
