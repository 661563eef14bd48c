"""System check: what this machine gives the engine, measured, in plain words.

    python app.py --doctor            # the report as text
    python app.py --doctor --json     # the same as JSON, to attach to a bug report
    python -m engine.generation.doctor [--model-dir DIR] [--json]

It reports the GPU (name, compute capability, whether this torch has kernels for it), free and
total VRAM and what other programs hold, the RAM that can be pinned, host-to-device bandwidth
pinned and pageable, the read speed of the model folder's disk, a short streamed run of a
synthetic mid-size model at vram_limit=0 (seconds per step next to the transfer bound, and how
much of the copying hid behind compute), and the settings it recommends. Without a GPU it says
so and still reports RAM, disk and the CPU settings. The page's "System check" button shows the
same text (the UI only calls `run_doctor` and `render_text`).

Everything is sized to finish in seconds: 256 MiB copies, 256 MiB read from disk, a ~0.5 GB
model run for a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

GiB = 1024**3
MiB = 1024**2
COPY_BYTES = 256 * MiB  # host-to-device probe buffer
DISK_BYTES = 256 * MiB  # read from the model folder's disk
MODEL_FILES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")
# the synthetic model: 16 blocks of dim 2048 (2 x 2048x4096 bf16 = 32 MiB a block, 0.5 GiB in all),
# 2048 tokens: on a PCIe 4 x16 link (~25 GB/s) copying a step takes ~20 ms, computing it ~1.1
# TFLOP, so both sides matter on most cards and the overlap shows
RUN_DIM, RUN_DEPTH, RUN_TOKENS = 2048, 16, 2048
RUN_WARMUP, RUN_STEPS = 2, 5
SLOW_LINK_GIB_S = 6.0  # below this a PCIe 3/4 x16 slot is not running at its width
SLOW_DISK_MB_S = 500.0  # below this, disk offload makes the disk the pace of every step
VRAM_MARGIN_GB = 0.5  # what Auto leaves free besides other programs (engine.generation.vram_limit)


# --- the synthetic model --------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class SyntheticStack(nn.Module):
    """A transformer-sized stack of MLP blocks: streamed block by block, like a DiT."""

    def __init__(self, dim: int = RUN_DIM, depth: int = RUN_DEPTH):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# --- sections -------------------------------------------------------------------------------------


def system_section() -> dict[str, Any]:
    """Python, torch and the CPU settings the engine computes with when there is no GPU."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_capability": capability,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }


def _kernels_for(capability: tuple[int, int], arch_list: list[str]) -> tuple[bool, str]:
    """Does this torch carry kernels the GPU can run? A cubin runs on its own major version at
    the same or a higher minor (sm_80 code on sm_86); PTX (compute_XY) is compiled by the driver
    for any GPU at or above XY."""
    major, minor = capability
    here = major * 10 + minor
    sm = sorted(int(a[3:]) for a in arch_list if a.startswith("sm_") and a[3:].isdigit())
    ptx = sorted(int(a[8:]) for a in arch_list if a.startswith("compute_") and a[8:].isdigit())
    if here in sm:
        return True, f"torch has sm_{here} kernels"
    same_major = [a for a in sm if a // 10 == major and a <= here]
    if same_major:
        return True, f"torch's sm_{same_major[-1]} kernels run on sm_{here}"
    below = [a for a in ptx if a <= here]
    if below:
        return True, f"no sm_{here} kernels; the driver compiles torch's compute_{below[-1]} PTX (slow first start)"
    return False, (
        f"this torch ({torch.__version__}, built for {', '.join(arch_list) or 'no GPU'}) has no kernels for this GPU (sm_{here}): "
        f"install a build that lists sm_{here}, e.g. `pip install --upgrade torch --index-url https://download.pytorch.org/whl/cu128` "
        "(CUDA 12.8 builds carry sm_120 for RTX 50xx)"
    )


def gpu_section(device: torch.device) -> dict[str, Any]:
    """The GPU, its capability and kernels, and its memory: free, total, this process's, others'."""
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch has CUDA but sees no GPU (driver, CUDA_VISIBLE_DEVICES?)"
        return {"available": False, "why": why}
    props = torch.cuda.get_device_properties(device)
    capability = tuple(torch.cuda.get_device_capability(device))
    arch_list = list(torch.cuda.get_arch_list())
    ok, kernels = _kernels_for(capability, arch_list)  # type: ignore[arg-type]
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    others = max(0, total - free - reserved)
    return {
        "available": True,
        "device": str(device),
        "name": props.name,
        "capability": f"{capability[0]}.{capability[1]}",
        "arch_list": arch_list,
        "kernels_ok": ok,
        "kernels": kernels,
        "bf16_fast": capability[0] >= 8,  # below sm_80: no bf16 tensor cores, fused attention or cuDNN bf16
        "vram_total_bytes": int(total),
        "vram_free_bytes": int(free),
        "vram_this_process_bytes": int(reserved),
        "vram_others_bytes": int(others),
    }


def ram_section() -> dict[str, Any]:
    """Host RAM as this process sees it (the cgroup's limit counted) and the pinned budget."""
    from engine.transfer.host_memory import host_memory
    from engine.transfer.pinned import PINNED_RAM_ENV, PROCESS_PINNED_BUDGET

    mem = host_memory()
    return {
        "total_bytes": mem.total_bytes,
        "available_bytes": mem.available_bytes,
        "machine_available_bytes": mem.machine_available_bytes,
        "cgroup_limit_bytes": mem.cgroup_limit_bytes,
        "wsl": mem.wsl,
        "pinned_budget_bytes": PROCESS_PINNED_BUDGET.planned_limit_bytes(),
        "pinned_budget_from": f"${PINNED_RAM_ENV}" if os.environ.get(PINNED_RAM_ENV) else f"{mem.pinned_share:.0%} of the available RAM",
    }


def transfer_section(device: torch.device, nbytes: int = COPY_BYTES) -> dict[str, Any]:
    """Host-to-device GiB/s from pinned memory (registered in place, as the engine pins its
    arenas) and from pageable memory; and whether pinning worked at all."""
    from engine.transfer.devices import CudaBackend
    from engine.transfer.host_arena import HostArena

    backend = CudaBackend(device)
    host = HostArena(nbytes)
    host.buffer.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out: dict[str, Any] = {"bytes": nbytes}
    pinned = backend.register(host.buffer)
    out["pin_ok"] = pinned
    try:
        if pinned:
            stream = backend.copy_stream()
            for _ in range(2):
                backend.copy(dev, host.buffer, stream)
            torch.cuda.synchronize(device)
            reps = 6
            start = backend.timing_event(stream)
            for _ in range(reps):
                backend.copy(dev, host.buffer, stream)
            end = backend.timing_event(stream)
            end.synchronize()
            out["pinned_gib_s"] = nbytes * reps / backend.elapsed_seconds(start, end) / GiB
    finally:
        if pinned:
            torch.cuda.synchronize(device)
            backend.unregister(host.buffer)
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    dev.copy_(pageable)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(2):
        dev.copy_(pageable)
    torch.cuda.synchronize(device)
    out["pageable_gib_s"] = nbytes * 2 / (time.perf_counter() - t0) / GiB
    return out


def _largest_model_file(model_dir: Path, limit: int = 20000) -> Path | None:
    best: tuple[int, Path] | None = None
    for i, path in enumerate(model_dir.rglob("*")):
        if i >= limit:
            break
        if path.suffix.lower() in MODEL_FILES and path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            if best is None or size > best[0]:
                best = (size, path)
    return None if best is None else best[1]


def _drop_cache(fd: int) -> bool:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (AttributeError, OSError):
        return False


def disk_section(model_dir: Path, nbytes: int = DISK_BYTES) -> dict[str, Any]:
    """Read speed of the model folder's disk: the start of its largest model file, else a
    temporary file written there; its cached pages dropped first (where the OS allows) so the
    figure is the disk's and not the page cache's."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {"skipped": f"{model_dir} does not exist yet; the app makes it on first start"}
    source = _largest_model_file(model_dir)
    made = None
    if source is None or source.stat().st_size < 16 * MiB:
        fd, name = tempfile.mkstemp(prefix=".doctor-", dir=model_dir)
        made = Path(name)
        try:
            chunk = os.urandom(MiB)
            for _ in range(nbytes // MiB):
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        source = made
    try:
        with open(source, "rb", buffering=0) as f:
            dropped = _drop_cache(f.fileno())
            buf = bytearray(16 * MiB)
            view = memoryview(buf)
            read = 0
            t0 = time.perf_counter()
            while read < nbytes:
                n = f.readinto(view)
                if not n:
                    break
                read += n
            seconds = time.perf_counter() - t0
    finally:
        if made is not None:
            made.unlink(missing_ok=True)
    return {
        "file": str(source) if made is None else f"a temporary file in {model_dir}",
        "bytes": read,
        "mb_s": read / max(seconds, 1e-9) / 1e6,
        "cache_dropped": dropped,
    }


def _name_blocks(model: nn.Module) -> None:
    from engine.management import runtime_of

    for record in runtime_of(model).layers:
        if record.name.startswith("blocks."):
            record.block = ".".join(record.name.split(".")[:2])


def streamed_section(device: torch.device, h2d_gib_s: float | None, backend: Any = None,
                     dim: int = RUN_DIM, depth: int = RUN_DEPTH, tokens: int = RUN_TOKENS, steps: int = RUN_STEPS) -> dict[str, Any]:
    """A few steps of `SyntheticStack` at vram_limit=0 (every block streamed every step) on
    `device`; `backend` replaces the device's own (tests run it on the CPU)."""
    from engine.management import enable_vram_management, runtime_of
    from engine.transfer.pinned import PinnedBudget

    torch.manual_seed(0)
    model = SyntheticStack(dim, depth).to(torch.bfloat16).eval()
    weights = sum(p.nbytes for p in model.parameters())
    config = {"offload_device": "cpu", "onload_device": "cpu", "computation_device": str(device), "computation_dtype": "bfloat16"}
    t_setup = time.perf_counter()
    enable_vram_management(model, vram_config=config, vram_limit=0)
    _name_blocks(model)
    runtime = runtime_of(model)
    if backend is not None:
        runtime.use_scheduler(backend, PinnedBudget(limit_bytes=2 * weights))
    setup_s = time.perf_counter() - t_setup
    x = torch.randn(tokens, dim, dtype=torch.bfloat16, device=device)
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    try:
        with torch.inference_mode():
            for _ in range(RUN_WARMUP):  # trace, then the schedule's first pass
                model(x)
            sync()
            runtime.collect_timings()
            s0 = runtime.stats
            streamed0, copy0, compute0 = s0.streamed_bytes, s0.copy_seconds, s0.compute_seconds
            t0 = time.perf_counter()
            for _ in range(steps):
                model(x)
            sync()
            wall = (time.perf_counter() - t0) / steps
            runtime.collect_timings()
        s = runtime.stats
        streamed = (s.streamed_bytes - streamed0) / steps
        copy_s = (s.copy_seconds - copy0) / steps
        compute_s = (s.compute_seconds - compute0) / steps
    finally:
        runtime.close_scheduler()
    bound = streamed / (h2d_gib_s * GiB) if h2d_gib_s else None
    # how much of the shorter side ran under the longer one: 1 = fully overlapped, 0 = serial
    overlap = None
    if copy_s > 0 and compute_s > 0:
        overlap = max(0.0, min(1.0, (copy_s + compute_s - wall) / min(copy_s, compute_s)))
    return {
        "model": f"{depth} blocks of dim {dim}, {weights / GiB:.2f} GiB bf16, {tokens} tokens",
        "weights_bytes": weights,
        "setup_s": setup_s,
        "s_per_step": wall,
        "streamed_bytes_per_step": streamed,
        "transfer_bound_s": bound,
        "copy_s_per_step": copy_s,
        "compute_s_per_step": compute_s,
        "overlap": overlap,
        "sync_fallbacks": s.sync_fallbacks,
    }


# --- advice ---------------------------------------------------------------------------------------


def recommend(report: dict[str, Any]) -> list[str]:
    """The settings this machine suggests, and what to fix first, in plain words."""
    out: list[str] = []
    gpu, ram = report["gpu"], report["ram"]
    disk, run, link = report.get("disk", {}), report.get("streamed_run", {}), report.get("transfer", {})
    if not gpu.get("available"):
        threads = report["system"]["torch_threads"]
        out.append(f"No GPU ({gpu['why']}): images are computed on the CPU with {threads} threads. "
                   "Pick FP8 or NF4 weights so the model fits in RAM, and keep steps low; Auto sizes RAM use.")
        if report["system"].get("OMP_NUM_THREADS"):
            out.append(f"OMP_NUM_THREADS={report['system']['OMP_NUM_THREADS']} limits the CPU threads; unset it to use every core.")
    else:
        if not gpu["kernels_ok"]:
            out.append("Fix first: " + gpu["kernels"])
        free_gb = gpu["vram_free_bytes"] / GiB
        out.append(f"VRAM limit: Auto (about {max(0.0, free_gb - VRAM_MARGIN_GB):.1f} GB: what is free now minus a margin).")
        if gpu["vram_others_bytes"] > GiB:
            out.append(f"Other programs hold {gpu['vram_others_bytes'] / GiB:.1f} GB of VRAM; closing them (browser tabs, games) gives streaming more room.")
        if not gpu["bf16_fast"]:
            out.append(f"Compute capability {gpu['capability']} (below 8.0) has no fast bf16: computing in fp16 is the fast path on this card.")
        pinned_gib_s = link.get("pinned_gib_s")
        if link.get("pin_ok") is False:
            out.append("Pinning host memory failed: copies go through small staging buffers (slower). "
                       "Lower --pinned-ram-gb, or raise the container's memory limit / WSL2's memory setting.")
        elif pinned_gib_s is not None and pinned_gib_s < SLOW_LINK_GIB_S:
            out.append(f"The GPU link moves only {pinned_gib_s:.1f} GiB/s pinned: check that the card sits in a x16 slot "
                       "(a x4 or PCIe 3 link makes streaming the bottleneck); prefer FP8/NF4 weights, which stream fewer bytes.")
        budget_gb = ram["pinned_budget_bytes"] / GiB
        out.append(f"Pinned RAM: {budget_gb:.1f} GB ({ram['pinned_budget_from']}); set --pinned-ram-gb to change it.")
        if run.get("s_per_step") and run.get("transfer_bound_s"):
            pace = max(run["transfer_bound_s"], run.get("compute_s_per_step") or 0.0)
            if run["s_per_step"] > 1.5 * pace:
                out.append(f"Streaming ran at {run['s_per_step'] * 1000:.0f} ms/step against a bound of {pace * 1000:.0f} ms: "
                           "slower than it should be; please attach `python app.py --doctor --json` to a bug report.")
    if ram.get("cgroup_limit_bytes") is not None:
        out.append(f"A container limit of {ram['cgroup_limit_bytes'] / GiB:.1f} GB applies: the engine plans RAM against it.")
    if ram.get("wsl"):
        out.append("WSL2: pinned memory is granted sparingly; the engine pins in 1 GiB pieces and keeps what it gets.")
    mb_s = disk.get("mb_s")
    if mb_s is not None and mb_s < SLOW_DISK_MB_S:
        out.append(f"The model folder's disk reads {mb_s:.0f} MB/s: avoid disk offload (keep weights in RAM, FP8/NF4 if RAM is short), "
                   "or move the models to an SSD with --model-dir.")
    return out


# --- the whole check ------------------------------------------------------------------------------


def _timed(name: str, fn: Callable[[], dict[str, Any]], problems: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # a failed probe is reported, and the rest of the check goes on
        out = {"error": f"{type(exc).__name__}: {exc}"}
        problems.append(f"{name}: {type(exc).__name__}: {exc}")
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def run_doctor(model_dir: Path | str = Path("models"), device: torch.device | str | None = None, run_model: bool = True) -> dict[str, Any]:
    """Every section, as a JSON-able dict (`render_text` turns it into the plain-words report)."""
    t0 = time.perf_counter()
    problems: list[str] = []
    report: dict[str, Any] = {"system": system_section()}
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    report["gpu"] = _timed("gpu", lambda: gpu_section(device), problems)
    report["ram"] = _timed("ram", ram_section, problems)
    gpu = bool(report["gpu"].get("available"))
    if gpu:
        report["transfer"] = _timed("transfer", lambda: transfer_section(device), problems)
    else:
        report["transfer"] = {"skipped": "no GPU: nothing is copied to a device"}
    report["disk"] = _timed("disk", lambda: disk_section(Path(model_dir)), problems)
    if gpu and run_model:
        h2d = report["transfer"].get("pinned_gib_s")
        report["streamed_run"] = _timed("streamed run", lambda: streamed_section(device, h2d), problems)
    else:
        report["streamed_run"] = {"skipped": "no GPU: nothing streams; the CPU computes from RAM where the weights lie" if not gpu else "not asked"}
    report["recommended"] = recommend(report)
    report["problems"] = problems
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _gb(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.1f} GB"


def _said_why_not(lines: list[str], label: str, part: dict[str, Any]) -> bool:
    """Append "<label>: skipped (why)" or "<label>: failed (error)" for a part of the report that
    has no figures; False when it has them (the caller writes its line)."""
    if "skipped" in part:
        lines.append(f"{label}: skipped ({part['skipped']})")
    elif "error" in part:
        lines.append(f"{label}: failed ({part['error']})")
    else:
        return False
    return True


def render_text(report: dict[str, Any]) -> str:
    """The report in plain words, one fact a line."""
    s, g, r, t, d, run = (report.get(k, {}) for k in ("system", "gpu", "ram", "transfer", "disk", "streamed_run"))
    lines = ["lowvram-studio system check", ""]
    lines.append(f"System: Python {s.get('python')}, torch {s.get('torch')} (CUDA {s.get('torch_cuda') or 'none'}), {s.get('platform')}")
    lines.append(f"CPU: {s.get('cpus_usable')} of {s.get('cpus')} cores usable, torch uses {s.get('torch_threads')} threads"
                 f"{', OMP_NUM_THREADS=' + s['OMP_NUM_THREADS'] if s.get('OMP_NUM_THREADS') else ''}, "
                 f"vector unit {s.get('cpu_capability')}, oneDNN {'yes' if s.get('mkldnn') else 'no'}")
    if g.get("error"):
        lines.append(f"GPU: check failed ({g['error']})")
    elif not g.get("available"):
        lines.append(f"GPU: none ({g.get('why')})")
    else:
        lines.append(f"GPU: {g['name']} ({g['device']}), compute capability {g['capability']}; {g['kernels']}")
        lines.append(f"VRAM: {_gb(g['vram_free_bytes'])} free of {_gb(g['vram_total_bytes'])}; other programs hold "
                     f"{_gb(g['vram_others_bytes'])}, this process {_gb(g['vram_this_process_bytes'])}")
    ram_line = f"RAM: {_gb(r.get('available_bytes'))} available of {_gb(r.get('total_bytes'))}"
    if r.get("cgroup_limit_bytes") is not None:
        ram_line += f" (container limit {_gb(r['cgroup_limit_bytes'])})"
    if r.get("wsl"):
        ram_line += " (WSL2)"
    lines.append(ram_line)
    if g.get("available"):
        lines.append(f"Pinnable RAM: {_gb(r.get('pinned_budget_bytes'))} ({r.get('pinned_budget_from')}); "
                     f"a {t.get('bytes', 0) // MiB} MiB test pin {'worked' if t.get('pin_ok') else 'FAILED'}")
    if not _said_why_not(lines, "Host to GPU", t):
        pinned = f"{t['pinned_gib_s']:.1f} GiB/s pinned" if t.get("pinned_gib_s") else "pinned not measured"
        lines.append(f"Host to GPU: {pinned}, {t['pageable_gib_s']:.1f} GiB/s pageable")
    if not _said_why_not(lines, "Model folder disk", d):
        cached = "" if d.get("cache_dropped") else " (page cache could not be dropped: may be the cache's speed)"
        lines.append(f"Model folder disk: {d['mb_s']:.0f} MB/s reading {d['bytes'] // MiB} MiB of {d['file']}{cached}")
    if not _said_why_not(lines, "Streamed run", run):
        bound = f"{run['transfer_bound_s'] * 1000:.1f} ms" if run.get("transfer_bound_s") else "n/a"
        overlap = f"{run['overlap']:.0%}" if run.get("overlap") is not None else "n/a"
        lines.append(f"Streamed run at vram_limit=0 ({run['model']}): {run['s_per_step'] * 1000:.1f} ms/step; "
                     f"transfer bound {bound}, copy {run['copy_s_per_step'] * 1000:.1f} ms and compute "
                     f"{run['compute_s_per_step'] * 1000:.1f} ms a step, overlap {overlap}")
    lines.append("")
    lines.append("Recommended:")
    lines.extend(f"- {line}" for line in report.get("recommended", []))
    if report.get("problems"):
        lines.append("")
        lines.append("Checks that failed:")
        lines.extend(f"- {p}" for p in report["problems"])
    lines.append("")
    lines.append(f"(checked in {report.get('seconds', 0):.1f} s; `python app.py --doctor --json` gives this as JSON for a bug report)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engine.generation.doctor", description="lowvram-studio system check")
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--json", action="store_true", help="print JSON (to attach to a bug report)")
    p.add_argument("--no-run", action="store_true", help="skip the streamed run of the synthetic model")
    args = p.parse_args(argv)
    report = run_doctor(args.model_dir, run_model=not args.no_run)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
