"""Real-size runs on sparse replicas (tools/replica.py), one subprocess per model x setting.

    nice -n 19 python -m bench.realsize --models z-image-turbo --settings bf16,fp8,disk \
        --replicas /tmp/replicas --out bench/results/realsize-cpu.md [--timeout 600]
    python -m bench.realsize --models qwen-image --settings disk --blocks 3   # encode + 3 blocks

Each run goes through the app's own `Studio` as a user would: the pre-flight estimate, then
generate (256x256, 1 step or the model's minimum unless --steps). In the child a sampler thread reads
/proc/self/status every 0.2 s and keeps per-stage peaks of RssAnon (anonymous RSS: what the
kernel can only reclaim by killing) and RssFile; page cache is the system's "Cached" growth from
the start (other programs share it: a rough figure). `--blocks N` stops the denoiser after N of
its blocks (the 20B models on this machine): the table then gives seconds per block and a step
extrapolated from it. Zero weights (file holes): memory and speed are real, images are not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

GiB = 1024**3
SETTINGS = {
    "bf16": {"weights": "bf16", "disk_offload": False},
    "fp8": {"weights": "fp8", "disk_offload": False},
    "disk": {"weights": "bf16", "disk_offload": True},
    "disk+fp8": {"weights": "fp8", "disk_offload": True},
    "int8": {"weights": "int8", "disk_offload": False},
    "nf4": {"weights": "nf4", "disk_offload": False},
    "disk+nf4": {"weights": "nf4", "disk_offload": True},
    "gguf": {"disk_offload": False},  # a GGUF entry in RAM: the file's blocks whatever the weights say
}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _cached() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Per-stage peaks of RssAnon / RssFile / page-cache growth, every `period` seconds."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period = period
        self.stage = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.cached0 = _cached()
        self._stop = threading.Event()

    def sample(self) -> None:
        s = _status()
        s["cache"] = max(0, _cached() - self.cached0)
        p = self.peaks.setdefault(self.stage, {})
        for k, v in s.items():
            p[k] = max(p.get(k, 0), v)

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period)

    def set_stage(self, stage: str) -> None:
        self.sample()
        self.stage = stage
        self.sample()

    def stop(self) -> None:
        self._stop.set()
        self.sample()


class StopAfterBlocks(Exception):
    pass


def child(spec: dict[str, Any]) -> None:
    """One run; prints JSON lines (progress) and a final {"result": ...} line."""
    import torch

    from engine.generation.studio import Studio
    from engine.generation.types import GenerateRequest, GenerationResult
    from engine.layers.module_maps import block_paths_for

    def say(**kw: Any) -> None:
        print(json.dumps(kw), flush=True)

    sampler = Sampler()
    sampler.start()
    studio = Studio(spec["replicas"], spec["outputs"], source="hf")
    request = GenerateRequest(
        prompt="a lighthouse on a cliff at dawn, oil painting",
        model=spec["model"],
        width=spec["size"],
        height=spec["size"],
        steps=spec["steps"],
        seed=1,
        vram_limit=spec.get("vram_limit"),
        images=_input_images(spec),
        **SETTINGS[spec["setting"]],
    )
    est = studio.estimate(request)
    say(estimate={"ram_gb": est.ram_gb, "vram_gb": est.vram_gb, "disk_gb": est.disk_gb, "fits": est.fits, "warnings": list(est.warnings)})
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t = {"stage": "start", "t0": time.perf_counter(), "c0": sum(os.times()[:2]), "blocks": 0, "block_t0": None}
    hooks = []

    def mark(stage: str) -> None:
        now = time.perf_counter()
        times[t["stage"]] = times.get(t["stage"], 0.0) + now - t["t0"]
        c = sum(os.times()[:2])
        cpu[t["stage"]] = cpu.get(t["stage"], 0.0) + c - t["c0"]
        t["stage"], t["t0"], t["c0"] = stage, now, c
        sampler.set_stage(stage)
        say(stage=stage, peaks=sampler.peaks, times=times, cpu=cpu)

    blocks = spec.get("blocks")
    result: dict[str, Any] = {"ok": False}
    try:
        for ev in studio.generate(request):
            if isinstance(ev, GenerationResult):
                result["ok"] = True
                continue
            if ev.phase in ("loading", "encoding", "decoding") and ev.phase != t["stage"]:
                mark(ev.phase)
            if ev.phase == "encoding" and blocks and not hooks:
                pipe = studio.pipeline
                den = pipe.components[pipe.family.denoiser]
                paths = block_paths_for(den)
                seq = [child for path in paths for child in den.get_submodule(path).children()]

                def pre(_m: Any, _a: Any) -> None:
                    if t["block_t0"] is None:
                        mark("denoise")
                        t["block_t0"] = time.perf_counter()

                def post(_m: Any, _a: Any, _o: Any) -> None:
                    t["blocks"] += 1
                    if t["blocks"] >= blocks:
                        result["seconds_per_block"] = (time.perf_counter() - t["block_t0"]) / t["blocks"]
                        result["blocks_per_step"] = len(seq)
                        raise StopAfterBlocks()

                for b in seq:
                    hooks.append(b.register_forward_pre_hook(pre))
                    hooks.append(b.register_forward_hook(post))
            if ev.phase == "denoising" and ev.step == 0 and t["stage"] != "denoise":
                mark("denoise")
            if ev.phase == "denoising" and ev.step:
                result.setdefault("step_seconds", []).append(ev.seconds_per_step)
            if ev.phase == "error":
                result["error"] = ev.message
    except StopAfterBlocks:
        result["ok"] = "blocks"
    except Exception as exc:  # noqa: BLE001 - reported in the table
        if "seconds_per_block" in result:
            result["ok"] = "blocks"
        else:
            result["error"] = f"{type(exc).__name__}: {exc}"
    mark("end")
    sampler.stop()
    result.update(peaks=sampler.peaks, times=times, cpu=cpu, threads=torch.get_num_threads())
    say(result=result)


def _image_count(spec: dict[str, Any]) -> int:
    """Input images a run gives its model: one for an edit model, one with --image, else none."""
    from model_registry import get_model
    from model_registry.families import FAMILIES

    mode = FAMILIES[get_model(spec["model"]).family].image_mode
    return int(mode == "reference" or (mode == "img2img" and bool(spec.get("image"))))


def _input_images(spec: dict[str, Any]) -> tuple[Any, ...]:
    """An edit model needs a reference image (a gradient at the output size; image-to-image
    families run text-to-image unless --image): its VAE encode and, for Qwen-Image-Edit, the
    vision tower then run at their real size too."""
    from PIL import Image

    if not _image_count(spec):
        return ()
    size = spec["size"]
    gradient = Image.linear_gradient("L").resize((size, size))
    return (Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))),)


def _child_setup(niceness: int = 19) -> None:
    """Low CPU priority (19 by default: this machine is shared), and first in line for the OOM killer."""
    os.nice(niceness)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def run_one(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.realsize", "--child", json.dumps(spec)]
    lines: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=lambda: _child_setup(spec.get("nice", 19)))
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
            print(f"  [{spec['model']}/{spec['setting']}] {line.strip()[:300]}", file=sys.stderr, flush=True)
    finally:
        proc.wait()
        timer.cancel()
    out: dict[str, Any] = {"spec": spec, "wall_s": time.perf_counter() - t0, "rc": proc.returncode}
    for item in lines:
        if "estimate" in item:
            out["estimate"] = item["estimate"]
        if "stage" in item:
            out["peaks"], out["times"], out["cpu"] = item["peaks"], item["times"], item.get("cpu", {})
        if "result" in item:
            out.update(item["result"])
    if proc.returncode and "result" not in "".join(json.dumps(x) for x in lines):
        out["error"] = f"killed after {timeout:.0f} s (timeout)" if out["wall_s"] >= timeout - 1 else f"exit {proc.returncode}"
    return out


def _gb(v: int | float | None) -> str:
    return "-" if v is None else f"{v / GiB:.2f}"


def disk_bound(model_id: str, size: int, images: int = 0) -> int:
    """Issue #17's bound for disk offload: the largest layer (computation form) + the stage's
    activations (with `images` input images of size x size) + 1 GiB (the process baseline included)."""
    from types import SimpleNamespace

    from engine.generation.estimate import component_cost, stage_activations
    from engine.generation.pipelines.images import reference_pixels, vae_input_pixels
    from model_registry import get_model
    from model_registry.families import FAMILIES

    entry = get_model(model_id)
    fam = FAMILIES[entry.family]
    pictures = [SimpleNamespace(width=size, height=size)] * images
    largest = 0
    for name in fam.weighted:
        c = entry.components[name]
        largest = max(largest, component_cost(c.library, c.class_name, c.config_id, False, True, "cpu").largest_layer_bytes)
    batch = 2 if fam.pair_batched_cfg or fam.native_batched_cfg else 1  # CFG as one batch of two
    act = stage_activations(size, size, batch, reference_pixels(fam, pictures), vae_input_pixels(fam, pictures))
    act = max(v for k, v in act.items() if k != "_size")
    return largest + act + GiB


def table_rows(results: list[dict[str, Any]]) -> list[str]:
    head = (
        "| model | setting | ran | peak RssAnon GiB (load / encode / denoise / decode) | disk-offload bound GiB | page cache GiB | "
        "estimate RAM GiB (fits) | load s (CPU s) | encode s (CPU s) | s/step (CPU s) | decode s (CPU s) | wall s (CPU s) |"
    )
    rows = [head, "|" + "---|" * 12]
    for r in results:
        p = r.get("peaks", {})
        anon = " / ".join(_gb(p.get(s, {}).get("RssAnon")) for s in ("loading", "encoding", "denoise", "decoding"))
        cache = max((v.get("cache", 0) for v in p.values()), default=0)
        est = r.get("estimate", {})
        times = r.get("times", {})
        if r.get("ok") is True:
            ran = "yes"
        elif r.get("ok") == "blocks":
            ran = f"encode + {r['spec']['blocks']} blocks"
        else:
            ran = "no: " + str(r.get("error", "?"))[:120].replace("|", "/")
        cpu = r.get("cpu", {})
        if r.get("seconds_per_block"):
            per = r["blocks_per_step"]
            cpu_block = cpu.get("denoise", 0) / r["spec"]["blocks"]
            step = f"{r['seconds_per_block'] * per:.0f} ({cpu_block * per:.0f}) from {r['spec']['blocks']} of {per} blocks"
        elif r.get("step_seconds"):
            n = len(r["step_seconds"])
            step = f"{sum(r['step_seconds']) / n:.0f} ({cpu.get('denoise', 0) / n:.0f})"
        else:
            step = "-"
        enc = times.get("encoding")
        dec = times.get("decoding")
        enc = None if enc is None else f"{enc:.0f} ({cpu.get('encoding', 0):.0f})"
        dec = None if dec is None or r.get("ok") is not True else f"{dec:.0f} ({cpu.get('decoding', 0):.0f})"
        load = times.get("loading")
        load = "-" if load is None else f"{load:.0f} ({cpu.get('loading', 0):.0f})"
        fits = est.get("fits")
        bound = "-"
        match = ""
        partial = r.get("ok") == "blocks" and not r["spec"]["setting"].startswith("disk")
        if partial:  # copies kept in RAM are made as blocks run: N of them say nothing of the peak
            match = "; not comparable: only some blocks ran, so their RAM copies were not all made"
        elif r.get("ok") and est.get("ram_gb") is not None and p:
            worst = max(v.get("RssAnon", 0) for v in p.values()) / GiB
            off = abs(est["ram_gb"] - worst)
            match = f"; {'within' if off <= max(0.5, 0.1 * worst) else 'MISSED by'} {off:.2f} of the peak"
        if r["spec"]["setting"].startswith("disk") and p:
            b = disk_bound(r["spec"]["model"], r["spec"]["size"], _image_count(r["spec"]))
            worst = max(v.get("RssAnon", 0) for v in p.values())
            bound = f"{b / GiB:.2f} ({'met' if worst <= b else 'MISSED'})"
        rows.append(
            f"| {r['spec']['model']} | {r['spec']['setting']} | {ran} | {anon} | {bound} | {_gb(cache)} | "
            f"{est.get('ram_gb', '-')} ({'fits' if fits else 'does not fit' if fits is False else '-'}{match}) | "
            f"{load} | {enc or '-'} | {step} | {dec or '-'} | "
            f"{r.get('wall_s', 0):.0f} ({sum(r.get('cpu', {}).values()):.0f}) |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--models", default="z-image-turbo")
    parser.add_argument("--settings", default="bf16,fp8,disk")
    parser.add_argument("--replicas", default="/tmp/replicas")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 1, or the model's minimum)")
    parser.add_argument("--blocks", type=int, default=0, help="stop the denoiser after N blocks")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--nice", type=int, default=19, help="the child's niceness (0 on a quiet host)")
    parser.add_argument("--image", action="store_true", help="image-to-image families: give them an input image too")
    parser.add_argument("--out", help="append the table (markdown) to this file")
    parser.add_argument("--json", help="append raw results (JSON lines) to this file")
    parser.add_argument("--table", help="only print the table of the results in this JSON-lines file")
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.table:
        print("\n".join(table_rows([json.loads(line) for line in open(args.table) if line.strip()])))
        return 0
    from model_registry import get_model
    from tools.replica import is_current_replica, write_replica

    results = []
    for model in args.models.split(","):
        root = Path(args.replicas) / model
        if not is_current_replica(model, root):
            write_replica(model, args.replicas)
        for setting in args.settings.split(","):
            spec = {
                "model": model, "setting": setting, "replicas": args.replicas, "outputs": str(Path(args.replicas) / "_outputs"),
                "size": args.size, "steps": args.steps or max(1, int(get_model(model).limits.get("min_steps", 1))), "blocks": args.blocks or None,
                "nice": args.nice, "image": args.image,
            }
            results.append(run_one(spec, args.timeout))
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
    rows = table_rows(results)
    print("\n".join(rows))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
