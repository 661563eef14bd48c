"""The stored-form cache on a real-size replica: load seconds (first: quantize + background write;
second: read the cached form), and under disk offload the bytes read and seconds per forward.

    flock /tmp/lvs-heavy.lock nice -n 10 python -m bench.form_cache --replica /tmp/fc/z-image-turbo \
        --out bench/results/form-cache-cpu.md

The replica (tools/replica.py: real shapes and dtypes, zeros in file holes) is Z-Image-Turbo,
whose transformer is published in F32 (24.6 GB). Only the transformer is loaded. Each run is a
subprocess: peak RssAnon is sampled every 0.1 s; bytes read are /proc/self/io `rchar` over one
forward (bytes through read calls, page-cache hits included: what the loader asked the kernel for;
dropping the page cache needs privileges this host does not give). One forward = one denoising
step of Z-Image-Turbo at 256x256 (256 image tokens + 32 caption tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3

CHILD = r"""
import json, sys, threading, time, torch
from pathlib import Path
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def rchar():
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
peak = {"v": 0}
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak["v"] = max(peak["v"], status("RssAnon:")); time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
folder, form, disk, cache, forward = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5] == "1"
from diffusers import ZImageTransformer2DModel
from engine.loading.loader import load_model
from engine.generation.settings import vram_config_for
config = vram_config_for(False, disk, "cpu", storage_name=form if form != "source" else "bf16")
base = status("RssAnon:")
t0 = time.perf_counter()
kw = {"cache_dir": False if form == "source" else cache}
if disk and form != "source":
    kw["disk_form"] = form
model = load_model(ZImageTransformer2DModel, folder, vram_config=config, vram_limit=0 if disk else None, **kw)
load_s = time.perf_counter() - t0
writer = getattr(model, "_vram_form_cache", None)
write_s = None
if writer is not None and hasattr(writer, "_thread"):
    writer.join(); write_s = time.perf_counter() - t0
out = {"load_s": load_s, "write_done_s": write_s, "base": base}
if forward:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(cfg.in_channels, 1, 32, 32, generator=g).to(torch.bfloat16)]
    cap = [torch.randn(32, cfg.cap_feat_dim, generator=g).to(torch.bfloat16)]
    r0, t1 = rchar(), time.perf_counter()
    with torch.no_grad():
        model(x, torch.tensor([0.5]), cap)
    out["forward_s"] = time.perf_counter() - t1
    out["read_bytes"] = rchar() - r0
stop.set()
out["peak_anon"] = max(peak["v"], status("RssAnon:")) - base
print(json.dumps(out))
"""


def run(folder: Path, form: str, disk: bool, cache: Path, forward: bool, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), form, "1" if disk else "0", str(cache), "1" if forward else "0"],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}", "wall_s": time.perf_counter() - t0}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replica", type=Path, required=True, help="the Z-Image-Turbo replica folder (tools.replica write)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--forms", default="fp8,int8,nf4")
    ap.add_argument("--disk", default="source,bf16,fp8,int8,nf4", help="disk offload runs (source: the F32 shards, no cache)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--timeout", type=int, default=900)
    args = ap.parse_args(argv)
    folder = args.replica / "transformer"
    cache = args.cache or args.replica.parent / "fc-cache"
    rows_load, rows_disk = [], []
    for form in [f for f in args.forms.split(",") if f]:
        first = run(folder, form, False, cache, False, args.timeout)
        second = run(folder, form, False, cache, False, args.timeout)
        size = sum(p.stat().st_size for p in cache.rglob(f"*.{form}.*.safetensors"))
        rows_load.append((form, first, second, size))
        print(form, first, second, size, flush=True)
    for form in [f for f in args.disk.split(",") if f]:
        r = run(folder, form, True, cache, True, args.timeout)
        rows_disk.append((form, r))
        print("disk", form, r, flush=True)
    lines = [
        "# The stored-form cache, Z-Image-Turbo replica (transformer, F32 on disk), CPU",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, this 2-core host, **host shared** (other jobs ran: load average"
        f" {os.getloadavg()[0]:.1f}); `python -m bench.form_cache`. Zeros in file holes: memory, bytes and speed are real, images are not.",
        "",
        "| form | first load s (quantize) | cache written at s | second load s (cache) | second / first | peak RssAnon first / second GiB | cache file GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for form, a, b, size in rows_load:
        if "error" in a or "error" in b:
            lines.append(f"| {form} | {a.get('error', '')} | | {b.get('error', '')} | | | |")
            continue
        lines.append(
            f"| {form} | {a['load_s']:.1f} | {a['write_done_s'] or 0:.1f} | {b['load_s']:.1f} | {b['load_s'] / a['load_s']:.2f} | "
            f"{a['peak_anon'] / GiB:.2f} / {b['peak_anon'] / GiB:.2f} | {size / 1e9:.2f} |"
        )
    lines += [
        "",
        "Disk offload, one forward (= one step at 256x256); bytes read = /proc/self/io rchar over the forward:",
        "",
        "| streamed form | load s | bytes read per step GB | / F32 shards | s per step | peak RssAnon GiB |",
        "|---|---|---|---|---|---|",
    ]
    src = next((r["read_bytes"] for f, r in rows_disk if f == "source" and "read_bytes" in r), None)
    for form, r in rows_disk:
        if "error" in r:
            lines.append(f"| {form} | {r['error']} | | | | |")
            continue
        ratio = f"{r['read_bytes'] / src:.3f}" if src else ""
        name = "F32 shards (no cache)" if form == "source" else f"{form} (cache)"
        lines.append(f"| {name} | {r['load_s']:.1f} | {r['read_bytes'] / 1e9:.2f} | {ratio} | {r['forward_s']:.1f} | {r['peak_anon'] / GiB:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
