"""GPU benchmark: the full-size Qwen-Image DiT (60 blocks, ~20B params, random weights), one
1024x1024 denoising forward per step, ours against the compute bound, the transfer bound,
DiffSynth 2.x and diffusers' group offloading.

    python -m bench.bench_gpu --out 'bench/results/gpu-{gpu}-{date}.md' [--time-budget 480]
    python -m bench.bench_gpu --dry-run --configs ours         # same code, CPU, tiny model

Every configuration runs in a fresh subprocess (its peak host RAM is its own, an out-of-memory
kill is one failed row). Weights: random, created on the device parameter by parameter (fast),
then moved to host RAM in the storage dtype, so every framework starts from a host-resident model
as after loading a checkpoint. The compute bound keeps them on the GPU. A configuration that
cannot run (package missing, out of time, crashed) is a "not run: why" / "failed: why" row,
never a number. Run `--help` for the options; docs/gpu_bench.md is the one-call recipe.

What each row does (one "step" = one transformer forward, as the pipeline calls it):
- compute bound: diffusers' QwenImageTransformer2DModel, all weights on the GPU.
- ours bf16 / fp8 @ N GB: `engine.enable_vram_management(model, vram_config=..., vram_limit=0)`
  with computation on cuda (TransferScheduler: copy stream, slot ring, pinned arena), then
  `engine.set_vram_limit(model, N)` for each further limit in the same process (the live re-plan
  the app does; `--isolate-limits` gives each limit its own process). FP8 masters are quantized
  by `engine.stored.store` on the device through enable_vram_management's `master_factory` hook
  (CPU quantization of 20B weights takes minutes; the stored form is the same).
- DiffSynth bf16 / fp8 @ 0: DiffSynth's own `QwenImageDiT` (same architecture, its own module
  names) built with random weights in the offload dtype on host RAM (what its loader hands to
  `enable_vram_management`), wrapped with its shipped module map (`ModelPool.fetch_module_map`),
  the "Dynamic VRAM Management" config of its docs (offload/onload on the CPU, preparing and
  computation on cuda), vram_limit=0, onloaded as its pipeline does, stepped through
  `model_fn_qwen_image` (the pipeline's call; `QwenImageDiT.forward` when the pipeline module
  cannot be imported).
- diffusers block / leaf: `model.enable_group_offload(cuda, offload_device="cpu",
  offload_type="block_level", num_blocks_per_group=1, use_stream=True)` and
  `offload_type="leaf_level", use_stream=True`.
- H2D: pinned host-to-device GiB/s with one large buffer; transfer bound = our streamed bytes per
  step / that rate.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

GiB = 1024**3

# --- scenario -----------------------------------------------------------------------------------

FULL_DIT = dict(  # Qwen/Qwen-Image transformer/config.json
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
TINY_DIT = dict(FULL_DIT, num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))

FULL = dict(dit=FULL_DIT, resolution=1024, text_tokens=256, diffsynth_layers=60)
# DiffSynth's QwenImageDiT hard-codes its widths (3072 / 3584): the dry run can only shrink depth.
TINY = dict(dit=TINY_DIT, resolution=256, text_tokens=32, diffsynth_layers=1)

BF16_CONFIG = {
    "offload_dtype": "bfloat16",
    "offload_device": "cpu",
    "onload_dtype": "bfloat16",
    "onload_device": "cpu",
    "preparing_dtype": "bfloat16",
    "preparing_device": "cuda",
    "computation_dtype": "bfloat16",
    "computation_device": "cuda",
}
FP8_CONFIG = dict(BF16_CONFIG, offload_dtype="float8_e4m3fn", onload_dtype="float8_e4m3fn", preparing_dtype="float8_e4m3fn")

DEFAULT_LIMITS = (0.0, 8.0, 16.0, 24.0)
# dry run: 0, then ~0.4x, 0.8x and 1.5x the tiny model's 0.000172 GiB of bf16 weights (partial residency)
DRY_LIMITS = (0.0, 0.00007, 0.00014, 0.00026)

# --- jobs: one subprocess each, in priority order (anchors first) ----------------------------------
# weight: share of the remaining time budget a job is given (roughly its expected cost)
JOBS: list[dict[str, Any]] = [
    {"name": "h2d", "kind": "h2d", "weight": 0.3},
    {"name": "compute", "kind": "compute", "weight": 1.0},
    {"name": "ours-bf16", "kind": "ours", "dtype": "bf16", "weight": 2.5},
    {"name": "diffsynth-bf16", "kind": "diffsynth", "dtype": "bf16", "weight": 1.6},
    {"name": "diffusers-block", "kind": "diffusers", "offload_type": "block_level", "weight": 1.3},
    {"name": "ours-fp8", "kind": "ours", "dtype": "fp8", "weight": 2.5},
    {"name": "diffsynth-fp8", "kind": "diffsynth", "dtype": "fp8", "weight": 1.4},
    {"name": "diffusers-leaf", "kind": "diffusers", "offload_type": "leaf_level", "weight": 1.5},
    # engine.compile_model (inductor, regional): its first warm-up step compiles (setup notes it)
    {"name": "ours-bf16-compiled", "kind": "ours", "dtype": "bf16", "compile": True, "weight": 2.5},
]
GROUPS = {
    "all": [j["name"] for j in JOBS],
    "ours": ["ours-bf16", "ours-fp8"],
    "compiled": ["ours-bf16-compiled"],
    "diffsynth": ["diffsynth-bf16", "diffsynth-fp8"],
    "diffusers": ["diffusers-block", "diffusers-leaf"],
    "anchors": ["compute", "diffsynth-bf16", "diffsynth-fp8", "diffusers-block", "diffusers-leaf"],
}


def row_label(job: dict[str, Any], limit: float | None = None) -> str:
    kind = job["kind"]
    if kind == "compute":
        return "compute bound: all weights on the GPU (bf16)"
    if kind == "ours":
        compiled = " compiled" if job.get("compile") else ""
        return f"ours {job['dtype']}{compiled} @ vram_limit={_fmt_limit(limit)}"
    if kind == "diffsynth":
        return f"DiffSynth {job['dtype']} @ vram_limit=0"
    if kind == "diffusers":
        what = "block_level, num_blocks_per_group=1" if job["offload_type"] == "block_level" else "leaf_level"
        return f"diffusers group offload ({what}, use_stream=True)"
    return job["name"]


def _fmt_limit(limit: float | None) -> str:
    if limit is None:
        return "None"
    return f"{limit:g}" if limit >= 0.1 or limit == 0 else f"{limit:.3g}"


# ================================================================================================
# child side: everything below runs in the subprocess of one job
# ================================================================================================


class Sampler:
    """Background sampling of host RSS (/proc/self/status), system-wide used RAM (psutil, counts
    pinned pages however the kernel books them) and device-wide used VRAM (cudaMemGetInfo), with
    per-phase maxima."""

    def __init__(self, cuda: bool, period: float = 0.05):
        import psutil

        self.psutil = psutil
        self.cuda = cuda
        self.period = period
        self.base_used = psutil.virtual_memory().used
        self.peak_used = self.base_used
        self.phase: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-sampler")
        self._thread.start()

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                        out[key] = int(rest.split()[0]) * 1024
        except OSError:
            import psutil

            out["VmRSS"] = out["VmHWM"] = psutil.Process().memory_info().rss
        return out

    def sample(self) -> None:
        st = self.status()
        used = self.psutil.virtual_memory().used
        dev_used = 0
        if self.cuda:
            import torch

            try:
                free, total = torch.cuda.mem_get_info()
                dev_used = total - free
            except RuntimeError:
                pass
        with self._lock:
            self.peak_used = max(self.peak_used, used)
            for key, value in (("rss", st.get("VmRSS", 0)), ("anon", st.get("RssAnon", 0)), ("used", used), ("dev", dev_used)):
                self.phase[key] = max(self.phase.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def new_phase(self) -> None:
        self.sample()
        with self._lock:
            self.phase = {}
        self.sample()

    def phase_peaks(self) -> dict[str, int]:
        self.sample()
        with self._lock:
            return dict(self.phase)

    def process_peaks(self) -> dict[str, int]:
        self.sample()
        st = self.status()
        with self._lock:
            return {"hwm": st.get("VmHWM", 0), "used_delta": self.peak_used - self.base_used}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class Child:
    """State of one job's subprocess: device, sync, sampler, deadline."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        self.spec = spec
        self.torch = torch
        self.dry = bool(spec["dry_run"])
        self.scn = TINY if self.dry else FULL
        self.dev = torch.device("cpu") if self.dry else torch.device("cuda")
        self.cuda = self.dev.type == "cuda"
        self.deadline = float(spec["deadline"])
        self.seed = int(spec.get("seed", 0))
        if self.cuda:
            torch.cuda.init()
        self.sampler = Sampler(self.cuda)

    # --- helpers ------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def left(self) -> float:
        return self.deadline - time.time()

    def env(self) -> dict[str, Any]:
        torch = self.torch
        info: dict[str, Any] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "host": platform.node(),
            "cpus": os.cpu_count(),
        }
        try:
            import psutil

            info["host_ram"] = psutil.virtual_memory().total
        except Exception:
            pass
        if self.cuda:
            props = torch.cuda.get_device_properties(self.dev)
            info["device"] = props.name
            info["device_memory"] = props.total_memory
            info["sms"] = props.multi_processor_count
        else:
            info["device"] = f"cpu ({platform.processor() or platform.machine()}), dry run"
        for pkg in ("diffusers", "diffsynth", "transformers", "accelerate"):
            info[pkg] = _version_of(pkg)
        return info

    def reset_device_peaks(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def device_peak_alloc(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None

    # --- weights ------------------------------------------------------------------------------
    def build_random(self, factory: Callable[[], Any], storage_dtype: Any, to_host: bool) -> Any:
        """Construct the model with parameters on the meta device (accelerate.init_empty_weights:
        buffers and plain tensors stay real), then create every parameter on the device, fill it
        with seeded random values (weights N(0, 1/fan_in), 1-d weights 1, biases 0), cast it to
        `storage_dtype` there and move it to host RAM when `to_host`: one parameter at a time on
        the device, so even the 41 GB model needs no device memory to build."""
        torch = self.torch
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = factory()
        model.eval()
        gen = torch.Generator(device=self.dev).manual_seed(self.seed)
        with torch.no_grad():
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if param is None:
                        continue
                    dtype = torch.bfloat16 if param.is_floating_point() else param.dtype
                    t = torch.empty(param.shape, dtype=dtype, device=self.dev)
                    if not t.is_floating_point():
                        t.zero_()
                    elif t.ndim >= 2:
                        fan_in = max(1, math.prod(t.shape[1:]))
                        t.normal_(0.0, fan_in**-0.5, generator=gen)
                    elif name == "bias":
                        t.zero_()
                    else:
                        t.fill_(1.0)
                    if t.is_floating_point() and storage_dtype is not None and t.dtype != storage_dtype:
                        t = t.to(storage_dtype)
                    if to_host:
                        t = t.to("cpu")
                    module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
            if not to_host:
                model.to(self.dev)  # buffers
        self.sync()
        return model

    def diffusers_model(self, to_host: bool) -> Any:
        from diffusers import QwenImageTransformer2DModel

        cfg = dict(self.scn["dit"])
        cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
        return self.build_random(lambda: QwenImageTransformer2DModel(**cfg), self.torch.bfloat16, to_host)

    def diffusers_inputs(self) -> dict[str, Any]:
        """What QwenImagePipeline passes to the transformer for one 1024x1024 image, batch 1, no CFG:
        packed latents (1, (H/16)*(W/16), 64), prompt embeds (1, L, 3584), the mask is None when
        every token is valid (the pipeline drops an all-ones mask), img_shapes per sample,
        timestep / 1000."""
        torch = self.torch
        g = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        side = self.scn["resolution"] // 16
        dit = self.scn["dit"]
        return {
            "hidden_states": torch.randn(1, side * side, dit["in_channels"], generator=g).to(self.dev, torch.bfloat16),
            "encoder_hidden_states": torch.randn(1, self.scn["text_tokens"], dit["joint_attention_dim"], generator=g).to(self.dev, torch.bfloat16),
            "encoder_hidden_states_mask": None,
            "timestep": torch.full((1,), 1000.0, dtype=torch.bfloat16).to(self.dev) / 1000,
            "img_shapes": [[(1, side, side)]],
            "guidance": None,
            "attention_kwargs": None,
            "return_dict": False,
        }

    # --- timing -------------------------------------------------------------------------------
    def time_steps(
        self, step: Callable[[], Any], warmup: int, max_steps: int, share_of_left: float = 1.0, probe: Callable[[], int] | None = None
    ) -> dict[str, Any]:
        """Warm-up steps, then as many timed steps (<= max_steps, >= 1) as the time left allows;
        each step is bracketed by device synchronisation. `probe` (a byte counter) is read
        around the timed steps: its delta per timed step is returned as `probe_per_step`."""
        torch = self.torch
        warm_times = []
        out = None
        with torch.no_grad():
            for _ in range(warmup):
                self.sync()
                t0 = time.perf_counter()
                out = step()
                self.sync()
                warm_times.append(time.perf_counter() - t0)
            finite = _finite(out)
            est = warm_times[-1] if warm_times else 0.0
            budget = self.left() * share_of_left - 5.0
            n = max_steps if est <= 0 else int(max(1, min(max_steps, budget // max(est, 1e-6))))
            times = []
            p0 = probe() if probe else None
            for _ in range(n):
                self.sync()
                t0 = time.perf_counter()
                out = step()
                self.sync()
                times.append(time.perf_counter() - t0)
        if finite is None:
            finite = _finite(out)
        result = {"warmup_s": warm_times, "steps_s": times, "s_per_step": statistics.median(times), "finite": finite}
        if probe:
            result["probe_per_step"] = (probe() - p0) / len(times)
        return result


def _finite(out: Any) -> bool | None:
    import torch

    t = out
    while isinstance(t, (tuple, list)) and t:
        t = t[0]
    if hasattr(t, "sample"):
        t = t.sample
    if isinstance(t, torch.Tensor):
        return bool(torch.isfinite(t).all().item())
    return None


def _version_of(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def _param_bytes(model: Any) -> int:
    return sum(p.nbytes for p in model.parameters() if p.device.type != "meta")


def _param_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _row(child: Child, label: str, timing: dict[str, Any], notes: list[str], **extra: Any) -> dict[str, Any]:
    phase = child.sampler.phase_peaks()
    proc = child.sampler.process_peaks()
    row = {
        "config": label,
        "status": "ok",
        "s_per_step": timing["s_per_step"],
        "steps_s": timing["steps_s"],
        "warmup_s": timing["warmup_s"],
        "peak_vram_alloc": child.device_peak_alloc(),
        "peak_device_used": phase.get("dev") if child.cuda else None,
        "host_peak": max(proc["hwm"], proc["used_delta"]),
        "host_hwm": proc["hwm"],
        "host_used_delta": proc["used_delta"],
        # during the steps: VmRSS, or the rise of system-wide used RAM when larger (pinned pages)
        "host_steady_rss": max(phase.get("rss", 0), phase.get("used", 0) - child.sampler.base_used),
        "notes": list(notes),
    }
    if timing.get("finite") is False:
        row["notes"].append("output not finite (random weights)")
    row.update(extra)
    return row


# --- the jobs ---------------------------------------------------------------------------------


def job_h2d(child: Child, spec: dict[str, Any]) -> dict[str, Any]:
    """Pinned host-to-device copy rate with one large buffer (and pageable, for reference)."""
    torch = child.torch
    nbytes = (64 if child.dry else 4096) * 1024**2
    result: dict[str, Any] = {"nbytes": nbytes}
    if child.cuda:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        host.fill_(1)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=child.dev)
        for _ in range(2):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        reps = 8
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        result["pinned_gib_s"] = nbytes * reps / (start.elapsed_time(end) / 1000) / GiB
        pageable = torch.empty(nbytes, dtype=torch.uint8)
        pageable.fill_(1)
        dev.copy_(pageable)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2):
            dev.copy_(pageable)
        torch.cuda.synchronize()
        result["pageable_gib_s"] = nbytes * 2 / (time.perf_counter() - t0) / GiB
        result["what"] = f"pinned H2D, {nbytes // 1024**2} MiB buffer, {reps} copies, CUDA events"
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(4):
            dst.copy_(src)
        result["pinned_gib_s"] = nbytes * 4 / (time.perf_counter() - t0) / GiB
        result["pageable_gib_s"] = result["pinned_gib_s"]
        result["what"] = f"dry run: host memcpy of {nbytes // 1024**2} MiB stands in for pinned H2D"
    return {"h2d": result, "rows": []}


def job_compute(child: Child, spec: dict[str, Any]) -> dict[str, Any]:
    model = child.diffusers_model(to_host=False)
    inputs = child.diffusers_inputs()
    weights = _param_bytes(model)
    child.reset_device_peaks()
    child.sampler.new_phase()
    timing = child.time_steps(lambda: model(**inputs), spec["warmup"], spec["steps"])
    notes = ["built on the device, never moved to host"]
    return {"rows": [_row(child, row_label(spec), timing, notes, weights_bytes=weights)], "model": {"params": _param_count(model), "bf16_bytes": weights}}


def job_ours(child: Child, spec: dict[str, Any]) -> dict[str, Any]:
    torch = child.torch
    import engine
    from engine.config import Place
    from engine.storage.stored import store

    fp8 = spec["dtype"] == "fp8"
    config = dict(FP8_CONFIG if fp8 else BF16_CONFIG)
    if not child.cuda:
        config.update(preparing_device="cpu", computation_device="cpu")
    model = child.diffusers_model(to_host=True)
    params, bf16_bytes = _param_count(model), _param_bytes(model)
    notes = []
    factory = None
    if fp8 and spec.get("fp8_quantize", "device") == "device":
        place = Place(torch.device("cpu"), torch.float8_e4m3fn)

        def factory(name: str, param: torch.Tensor) -> Any:  # the store() enable_vram_management does, on the device
            return store(param.detach().to(child.dev), place, torch.bfloat16)

        notes.append("FP8 masters quantized on the device (store via master_factory)")
    limits = [float(x) for x in spec["limits"]]
    t_setup = time.perf_counter()
    engine.enable_vram_management(model, vram_config=config, vram_limit=limits[0], master_factory=factory)
    if spec.get("compile"):
        engine.compile_model(model)
    setup_s = time.perf_counter() - t_setup
    if spec.get("compile"):
        t_compile = time.perf_counter()
        with torch.no_grad():
            model(**child.diffusers_inputs())  # the first call compiles (one graph per block class)
        child.sync()
        notes.append(f"engine.compile_model (inductor, regional): first call {time.perf_counter() - t_compile:.1f} s, compile included")
    runtime = engine.runtime_of(model)
    arena = getattr(runtime, "arena", None)
    if arena is not None:
        report = arena.report
        notes.append(f"{report.pinned_bytes / GiB:.1f} GiB pinned ({report.in_place_bytes / GiB:.1f} GiB registered in place)")
        if report.pageable_bytes:
            notes.append(f"{report.pageable_bytes / GiB:.1f} GiB left pageable (pinned budget), staged by the worker")
    inputs = child.diffusers_inputs()
    rows = []
    for i, limit in enumerate(limits):
        if child.left() < 10:
            rows.extend({"config": row_label(spec, x), "status": "not run", "why": "time slice used up"} for x in limits[i:])
            break
        try:
            rows.append(_ours_limit_row(child, spec, model, runtime, inputs, notes, limits, i, setup_s))
        except Exception as exc:  # one limit failing (e.g. VramExhaustedError) keeps the rows before it
            traceback.print_exc()
            rows.append({"config": row_label(spec, limit), "status": "failed", "why": _short_error(exc)})
    return {"rows": rows, "model": {"params": params, "bf16_bytes": bf16_bytes}}


def _ours_limit_row(child: Child, spec: dict[str, Any], model: Any, runtime: Any, inputs: dict[str, Any], notes: list[str], limits: list[float], i: int, setup_s: float) -> dict[str, Any]:
    import engine

    limit = limits[i]
    if i:
        engine.set_vram_limit(model, limit)
    child.reset_device_peaks()
    engine.vram_budget(model).reset_peak()
    child.sampler.new_phase()
    fallbacks0, ooms0 = runtime.stats.sync_fallbacks, runtime.stats.oom_retries
    share = 1.0 / (len(limits) - i)
    # bytes streamed per timed step (the scheduler counts a group when its copy is issued;
    # prefetch is cyclic, so in steady state that is one step's bytes)
    timing = child.time_steps(lambda: model(**inputs), spec["warmup"], spec["steps"], share_of_left=share, probe=lambda: runtime.stats.streamed_bytes)
    streamed = timing["probe_per_step"]
    snap = engine.vram_budget(model).snapshot()
    counts = engine.layer_state_counts(model)
    row_notes = list(notes)
    if i:
        row_notes.append("same process as the limit above (set_vram_limit)")
    fallbacks = runtime.stats.sync_fallbacks - fallbacks0
    if fallbacks:
        row_notes.append(f"{fallbacks} sync fallbacks")
    if runtime.stats.oom_retries - ooms0:
        row_notes.append(f"{runtime.stats.oom_retries - ooms0} OOM retries")
    row_notes.append(f"{counts.get('preparing', 0)} resident / {len(runtime.layers)} layers, prefetch depth {runtime.stream_depth}")
    return _row(
        child,
        row_label(spec, limit),
        timing,
        row_notes,
        limit_gb=limit,
        streamed_per_step=streamed,
        ledger_peak=snap.peak_bytes,
        setup_s=setup_s if i == 0 else None,
        dtype=spec["dtype"],
    )


def job_diffsynth(child: Child, spec: dict[str, Any]) -> dict[str, Any]:
    torch = child.torch
    notes: list[str] = []
    try:
        import diffsynth  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "diffsynth":
            return {"rows": [{"config": row_label(spec), "status": "not run", "why": "diffsynth is not installed (pip install diffsynth)"}]}
        # diffsynth/core/loader/config.py imports modelscope.snapshot_download at import time, only
        # to download checkpoints (modelscope pulls modelscope_hub, cryptography, ...); the
        # benchmark never downloads, so a missing link in that chain is replaced by a stub.
        first = exc.name
        _drop_modules("diffsynth")
        for name in ("modelscope", "modelscope_hub"):
            _drop_modules(name)
        _stub_modelscope()
        try:
            import diffsynth  # noqa: F401
        except ModuleNotFoundError as exc2:
            why = f"diffsynth is installed but its import needs {exc2.name!r} (first missing: {first!r}); carry that wheel"
            return {"rows": [{"config": row_label(spec), "status": "not run", "why": why}]}
        notes.append(f"modelscope stubbed ({first!r} missing; download-only import)")
    from diffsynth.core.vram.layers import enable_vram_management as ds_enable
    from diffsynth.models.model_loader import ModelPool
    from diffsynth.models.qwen_image_dit import QwenImageDiT

    model_fn = None
    try:
        from diffsynth.pipelines.qwen_image import model_fn_qwen_image as model_fn
    except Exception as exc:  # the pipeline module pulls in text encoders, VAEs, processors
        notes.append(f"QwenImageDiT.forward (pipeline module import failed: {_short_error(exc)[:120]})")

    fp8 = spec["dtype"] == "fp8"
    store_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    dev = "cuda" if child.cuda else "cpu"
    vram_config = {  # DiffSynth docs, "Dynamic VRAM Management" (bf16: the same with bfloat16)
        "offload_dtype": store_dtype,
        "offload_device": "cpu",
        "onload_dtype": store_dtype,
        "onload_device": "cpu",
        "preparing_dtype": store_dtype,
        "preparing_device": dev,
        "computation_dtype": torch.bfloat16,
        "computation_device": dev,
    }
    layers = child.scn["diffsynth_layers"]
    model = child.build_random(lambda: QwenImageDiT(num_layers=layers), store_dtype, to_host=True)
    params, weight_bytes = _param_count(model), _param_bytes(model)
    if child.dry:
        notes.append(f"dry run: DiffSynth's widths are fixed, {layers} block(s) at full width")
    module_map = ModelPool().fetch_module_map("diffsynth.models.qwen_image_dit.QwenImageDiT", vram_config)
    ds_limit: float | None = 0
    if not child.cuda:  # AutoTorchModule.check_free_vram asks torch.<device>.mem_get_info: no CPU version
        ds_limit = None
        notes.append("dry run: vram_limit=None (DiffSynth's free-VRAM check needs a GPU)")
    model = ds_enable(model, module_map, vram_config=vram_config, disk_map=None, vram_limit=ds_limit)
    for module in model.modules():  # QwenImagePipeline.load_models_to_device(["dit"])
        if hasattr(module, "onload"):
            module.onload()

    g = torch.Generator(device="cpu").manual_seed(child.seed + 1)
    res = child.scn["resolution"]
    latents = torch.randn(1, 16, res // 8, res // 8, generator=g).to(child.dev, torch.bfloat16)
    prompt_emb = torch.randn(1, child.scn["text_tokens"], 3584, generator=g).to(child.dev, torch.bfloat16)
    prompt_emb_mask = torch.ones(1, child.scn["text_tokens"], dtype=torch.long, device=child.dev)
    timestep = torch.full((1,), 1000.0, dtype=torch.bfloat16, device=child.dev)

    if model_fn is not None:

        def step() -> Any:
            return model_fn(dit=model, latents=latents, timestep=timestep, prompt_emb=prompt_emb, prompt_emb_mask=prompt_emb_mask, height=res, width=res)

    else:

        def step() -> Any:
            return model(latents=latents, timestep=timestep / 1000, prompt_emb=prompt_emb, prompt_emb_mask=prompt_emb_mask, height=res, width=res)

    child.reset_device_peaks()
    child.sampler.new_phase()
    timing = child.time_steps(step, spec["warmup"], spec["steps"])
    notes.append(f"own QwenImageDiT, {params / 1e9:.2f}B params, random weights")
    return {"rows": [_row(child, row_label(spec), timing, notes, dtype=spec["dtype"], weights_bytes=weight_bytes)]}


def _stub_modelscope() -> None:
    import types

    def snapshot_download(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("modelscope is stubbed in bench_gpu: no downloads")

    stub = types.ModuleType("modelscope")
    stub.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    sys.modules["modelscope"] = stub


def _drop_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def job_diffusers(child: Child, spec: dict[str, Any]) -> dict[str, Any]:
    torch = child.torch
    model = child.diffusers_model(to_host=True)
    weights = _param_bytes(model)
    notes = []
    use_stream = child.cuda
    if not use_stream:
        notes.append("dry run: use_stream=False (diffusers allows streams on CUDA/XPU only)")
    kwargs: dict[str, Any] = dict(onload_device=child.dev, offload_device=torch.device("cpu"), offload_type=spec["offload_type"], use_stream=use_stream)
    if spec["offload_type"] == "block_level":
        kwargs["num_blocks_per_group"] = 1
    model.enable_group_offload(**kwargs)
    inputs = child.diffusers_inputs()
    child.reset_device_peaks()
    child.sampler.new_phase()
    timing = child.time_steps(lambda: model(**inputs), spec["warmup"], spec["steps"])
    return {"rows": [_row(child, row_label(spec), timing, notes, weights_bytes=weights)]}


JOB_FUNCS = {"h2d": job_h2d, "compute": job_compute, "ours": job_ours, "diffsynth": job_diffsynth, "diffusers": job_diffusers}


def child_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"job": spec["name"]}
    child = None
    try:
        child = Child(spec)
        result["env"] = child.env()
        out = JOB_FUNCS[spec["kind"]](child, spec)
        result.update(out)
        result["process"] = child.sampler.process_peaks()
    except Exception as exc:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        why = _short_error(exc)
        result["error"] = why
        result["traceback"] = tb[-4000:]
    finally:
        if child is not None:
            child.sampler.stop()
        Path(result_path).write_text(json.dumps(result, default=str))
    return 0


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 240 else text[:237] + "..."


# ================================================================================================
# parent side: schedule the jobs, collect the rows, print the table
# ================================================================================================


def select_jobs(configs: str) -> list[str]:
    chosen: list[str] = []
    for part in [p.strip() for p in configs.split(",") if p.strip()]:
        names = GROUPS.get(part, [part])
        for name in names:
            if name not in GROUPS["all"]:
                raise SystemExit(f"--configs: unknown configuration {name!r}; known: {', '.join(GROUPS['all'])} and groups {', '.join(k for k in GROUPS if k != 'all')}")
            if name not in chosen:
                chosen.append(name)
    if "h2d" not in chosen:
        chosen.insert(0, "h2d")  # the transfer-bound anchor is cheap: always measured
    return chosen


def run_parent(args: argparse.Namespace) -> int:
    t_start = time.time()
    deadline = t_start + args.time_budget
    chosen = select_jobs(args.configs)
    limits = ours_limits(args)
    log_path = Path(args.log) if args.log else None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
    results: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    by_name = {job["name"]: job for job in JOBS}
    for job in (by_name[name] for name in chosen):  # in the order --configs gives (the session: most important first)
        if job["kind"] == "ours" and args.isolate_limits and len(limits) > 1:
            pending.extend(dict(job, limits=[x], weight=job["weight"] / len(limits)) for x in limits)
        else:
            pending.append(dict(job, limits=limits) if job["kind"] == "ours" else dict(job))
    tail = 3.0 if args.dry_run else 15.0  # soft deadlines end this long before the hard one
    for idx, job in enumerate(pending):
        left = deadline - tail - time.time()
        weights_left = sum(j["weight"] for j in pending[idx:])
        # a share of what is left, by weight: time an earlier job did not use flows to later ones
        slice_s = left * job["weight"] / weights_left
        if slice_s < args.min_slice * min(1.0, job["weight"]):
            res = {"job": job["name"], "rows": _not_run_rows(job, f"time budget used up (--time-budget {args.time_budget:g} s)")}
        else:
            # soft deadline at the slice (the child cuts timed steps to fit), hard kill later
            hard = min(deadline - time.time(), slice_s * 1.5 + 20.0)
            res = run_child(job, args, slice_s, hard, log_path)
        results.append(res)
        print(_progress_line(res), flush=True)
    text = render(results, chosen, args, limits, time.time() - t_start)
    print(text)
    if args.out:
        out = Path(_expand_out(args.out, results))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"\nwritten: {out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "args": vars(args)}, indent=1, default=str))
    return 0


def ours_limits(args: argparse.Namespace) -> list[float]:
    if args.limits:
        return [float(x) for x in args.limits.split(",")]
    return list(DRY_LIMITS if args.dry_run else DEFAULT_LIMITS)


def _not_run_rows(job: dict[str, Any], why: str) -> list[dict[str, Any]]:
    if job["kind"] == "h2d":
        return []
    if job["kind"] == "ours":
        return [{"config": row_label(job, x), "status": "not run", "why": why} for x in job.get("limits") or [0.0]]
    return [{"config": row_label(job), "status": "not run", "why": why}]


def run_child(job: dict[str, Any], args: argparse.Namespace, slice_s: float, hard_s: float, log_path: Path | None) -> dict[str, Any]:
    spec = dict(job, dry_run=args.dry_run, warmup=args.warmup, steps=args.steps, seed=args.seed, deadline=time.time() + slice_s, fp8_quantize=args.fp8_quantize)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "bench.bench_gpu", "--child", str(spec_path), "--result", str(result_path)]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        t0 = time.time()
        log = open(log_path, "a") if log_path else None
        try:
            if log:
                log.write(f"\n===== {job['name']} (slice {slice_s:.0f} s) {_dt.datetime.now(_dt.timezone.utc):%H:%M:%S} =====\n")
                log.flush()
            proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True)
            try:
                rc = proc.wait(timeout=max(5.0, hard_s))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                why = f"killed after {hard_s:.0f} s (its share of --time-budget {args.time_budget:g} s was {slice_s:.0f} s)"
                return {"job": job["name"], "rows": _not_run_rows(job, why), "wall_s": time.time() - t0}
        finally:
            if log:
                log.close()
        wall = time.time() - t0
        if not result_path.exists():
            why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            if rc in (-9, 137):
                why += " (SIGKILL: likely out of host memory)"
            return {"job": job["name"], "rows": [dict(r, status="failed", why=why) for r in _not_run_rows(job, why)], "wall_s": wall}
        res = json.loads(result_path.read_text())
    res["wall_s"] = wall
    if "error" in res and not res.get("rows"):
        res["rows"] = [dict(r, status="failed", why=res["error"]) for r in _not_run_rows(job, res["error"])]
    return res


def _progress_line(res: dict[str, Any]) -> str:
    parts = [f"[{res.get('job')}] {res.get('wall_s', 0):.0f} s"]
    if "h2d" in res:
        parts.append(f"H2D {res['h2d']['pinned_gib_s']:.1f} GiB/s")
    for row in res.get("rows", []):
        if row.get("status") == "ok":
            parts.append(f"{row['config']}: {row['s_per_step']:.3f} s/step")
        else:
            parts.append(f"{row['config']}: {row['status']}: {row.get('why')}")
    return " | ".join(parts)


def _expand_out(template: str, results: list[dict[str, Any]]) -> str:
    env = _first_env(results)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", str(env.get("device", "unknown"))).strip("-").lower() or "unknown"
    if "dry run" in str(env.get("device", "")):
        gpu = "cpu-dry-run"
    return template.replace("{gpu}", gpu).replace("{date}", _dt.date.today().isoformat())


def _first_env(results: list[dict[str, Any]]) -> dict[str, Any]:
    for res in results:
        if res.get("env"):
            return res["env"]
    return {}


# --- the table -------------------------------------------------------------------------------


UNIT = {"name": "GiB", "bytes": GiB}


def _g(nbytes: Any) -> str:
    return "—" if nbytes is None else f"{nbytes / UNIT['bytes']:.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _rx(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def render(results: list[dict[str, Any]], chosen: list[str], args: argparse.Namespace, limits: list[float], wall: float) -> str:
    env = _first_env(results)
    rows = [r for res in results for r in res.get("rows", [])]
    ok = {r["config"]: r for r in rows if r.get("status") == "ok"}
    h2d = next((res["h2d"] for res in results if "h2d" in res), None)
    h2d_err = next((res.get("error") for res in results if res.get("job") == "h2d" and res.get("error")), None)
    model = next((res["model"] for res in results if res.get("model")), None)
    rate = h2d["pinned_gib_s"] * GiB if h2d else None

    def t(label: str) -> float | None:
        r = ok.get(label)
        return r["s_per_step"] if r else None

    compute = t(row_label({"kind": "compute"}))
    ds = {d: t(row_label({"kind": "diffsynth", "dtype": d})) for d in ("bf16", "fp8")}
    dfu = {k: ok.get(row_label({"kind": "diffusers", "offload_type": k})) for k in ("block_level", "leaf_level")}

    def transfer_bound(row: dict[str, Any]) -> float | None:
        b = row.get("streamed_per_step")
        return b / rate if (b is not None and rate) else None

    lines = []
    dry = args.dry_run
    UNIT.update(name="MiB", bytes=1024**2) if dry else UNIT.update(name="GiB", bytes=GiB)
    u = UNIT["name"]
    title = "GPU benchmark: Qwen-Image DiT, one 1024x1024 denoising step" if not dry else "DRY RUN (CPU, tiny config): code-path check, not a result"
    lines.append(f"## {title}")
    lines.append("")
    scn = TINY if dry else FULL
    d = scn["dit"]
    lines.append(f"- date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {env.get('device', 'unknown')}" + (f" ({env['device_memory'] / GiB:.0f} GiB)" if env.get("device_memory") else "") + f"; host: {env.get('cpus', '?')} CPUs, {(env.get('host_ram') or 0) / GiB:.0f} GiB RAM")
    lines.append(f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), diffusers {env.get('diffusers')}, diffsynth {env.get('diffsynth') or 'not installed'}, transformers {env.get('transformers')}")
    size = f"{model['params'] / 1e6:,.1f}M params, {_g(model['bf16_bytes'])} {u} in bf16" if model else "size not measured"
    lines.append(
        f"- model: QwenImageTransformer2DModel, {d['num_layers']} blocks, {d['num_attention_heads']} heads x {d['attention_head_dim']}, "
        f"joint_attention_dim {d['joint_attention_dim']} ({size}), random weights; inputs: {scn['resolution']}x{scn['resolution']} "
        f"({(scn['resolution'] // 16) ** 2} image tokens), {scn['text_tokens']} text tokens, batch 1, no CFG"
    )
    if h2d:
        lines.append(f"- H2D: {h2d['pinned_gib_s']:.1f} GiB/s pinned, {h2d['pageable_gib_s']:.1f} GiB/s pageable ({h2d['what']})")
        for dtype in ("bf16", "fp8"):
            r0 = ok.get(row_label({"kind": "ours", "dtype": dtype}, 0.0))
            if r0 and r0.get("streamed_per_step") is not None:
                lines.append(
                    f"- transfer bound {dtype}: ours @0 streams {_g(r0['streamed_per_step'])} {u}/step / {h2d['pinned_gib_s']:.1f} GiB/s = {_s(transfer_bound(r0))}"
                )
    else:
        lines.append(f"- H2D: not measured ({h2d_err or 'not run'})")
    lines.append(f"- steps: {args.warmup} warm-up + up to {args.steps} timed per row (median; fewer when the {args.time_budget:g} s budget is short); whole run {wall:.0f} s")
    lines.append("")
    lines.append(
        "| configuration | s/step | x compute bound | x transfer bound | DiffSynth / this | diffusers block / this | "
        f"peak VRAM alloc {u} | peak device used {u} | peak host RAM {u} | host RAM in steps {u} | streamed {u}/step | notes |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        label = row["config"]
        if row.get("status") != "ok":
            lines.append(f"| {label} | {row.get('status', 'not run')}: {row.get('why', '')} | | | | | | | | | | |")
            continue
        s = row["s_per_step"]
        ds_ref = ds.get(row.get("dtype", "bf16"))
        blk = dfu["block_level"]["s_per_step"] if dfu["block_level"] else None
        tb = transfer_bound(row)
        notes = "; ".join(row.get("notes") or [])
        if row.get("ledger_peak") is not None:
            notes = (notes + "; " if notes else "") + f"engine ledger peak {_g(row['ledger_peak'])} {u}"
        if row.get("weights_bytes") is not None and row.get("streamed_per_step") is None and "compute" not in label:
            notes += f"; holds {_g(row['weights_bytes'])} {u} of weights off the GPU, moved every step (bytes not instrumented)"
        if row.get("setup_s"):
            notes += f"; enable {row['setup_s']:.0f} s"
        lines.append(
            f"| {label} | {s:.3f} | {_rx(_ratio(s, compute))} | {_rx(_ratio(s, tb))} | {_rx(_ratio(ds_ref, s)) if 'DiffSynth' not in label else '—'} | "
            f"{_rx(_ratio(blk, s)) if 'diffusers' not in label else '—'} | {_g(row.get('peak_vram_alloc'))} | {_g(row.get('peak_device_used'))} | "
            f"{_g(row.get('host_peak'))} | {_g(row.get('host_steady_rss'))} | {_g(row.get('streamed_per_step'))} | {notes} |"
        )
    missing = [name for name in GROUPS["all"] if name not in chosen]
    for name in missing:
        job = next(j for j in JOBS if j["name"] == name)
        for r in _not_run_rows(dict(job, limits=limits), "not selected (--configs)"):
            lines.append(f"| {r['config']} | not run: not selected (--configs) | | | | | | | | | | |")
    lines.append("")
    lines.append(
        "Columns: s/step = median wall time of one forward, device-synchronised. x transfer bound = s/step over "
        "(this row's streamed bytes per step / pinned H2D rate), ours only (measured bytes). Peak VRAM alloc = "
        "torch.cuda.max_memory_allocated over warm-up and timed steps; peak device used = cudaMemGetInfo total-free, "
        "sampled every 50 ms (CUDA context and allocator cache included). Peak host RAM = max(VmHWM, rise of "
        "system-wide used RAM) over the whole process, setup included (pinned pages counted either way; the system-wide part assumes nothing else runs on the host); host RAM "
        "in steps = the same, sampled during the warm-up and timed steps only."
    )
    lines.append("")
    lines.extend(targets(ok, compute, ds, dfu, transfer_bound, dry))
    return "\n".join(lines) + "\n"


def targets(ok: dict[str, dict[str, Any]], compute: float | None, ds: dict[str, float | None], dfu: dict[str, Any], transfer_bound: Callable[[dict[str, Any]], float | None], dry: bool) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]

    def verdict(cond: bool | None) -> str:
        if cond is None:
            return "not evaluated (anchor missing)"
        return ("yes" if cond else "no") + (" (dry run: meaningless)" if dry else "")

    for dtype in ("bf16", "fp8"):
        ours = ok.get(row_label({"kind": "ours", "dtype": dtype}, 0.0))
        if ours is None:
            lines.append(f"| ours {dtype} @0 within 1.15x of max(compute bound, transfer bound) | ours not measured | {verdict(None)} |")
        else:
            tb = transfer_bound(ours)
            bound = max([x for x in (compute, tb) if x is not None], default=None)
            r = _ratio(ours["s_per_step"], bound)
            have = compute is not None and tb is not None
            lines.append(
                f"| ours {dtype} @0 within 1.15x of max(compute bound, transfer bound) | {ours['s_per_step']:.3f} s vs max({_s(compute)}, {_s(tb)}) = {_rx(r)} | "
                f"{verdict(r <= 1.15 if (r is not None and have) else None)} |"
            )
    for dtype in ("bf16", "fp8"):
        ours = ok.get(row_label({"kind": "ours", "dtype": dtype}, 0.0))
        r = _ratio(ds.get(dtype), ours["s_per_step"] if ours else None)
        lines.append(f"| ours {dtype} @0 at least 3x faster than DiffSynth {dtype} @0 | {_rx(r)} | {verdict(r >= 3 if r is not None else None)} |")
    ours = ok.get(row_label({"kind": "ours", "dtype": "bf16"}, 0.0))
    for kind, row in dfu.items():
        if ours is None or row is None:
            lines.append(f"| ours bf16 @0 faster than diffusers {kind}, host RAM <= 0.6x | {'ours' if ours is None else 'diffusers'} not measured | {verdict(None)} |")
            continue
        speed = _ratio(row["s_per_step"], ours["s_per_step"])
        ram = _ratio(ours.get("host_peak"), row.get("host_peak"))
        cond = (speed is not None and speed > 1.0) and (ram is not None and ram <= 0.6)
        steady = _ratio(ours.get("host_steady_rss"), row.get("host_steady_rss"))
        lines.append(
            f"| ours bf16 @0 faster than diffusers {kind}, host RAM <= 0.6x | {_rx(speed)} faster, {_rx(ram)} peak host RAM "
            f"({_rx(steady)} of its host RAM during steps) | {verdict(cond)} |"
        )
    return lines


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} s"


# --- entry ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="all", help="comma list of configurations or groups: " + ", ".join(GROUPS["all"]) + "; groups: " + ", ".join(k for k in GROUPS if k != "all"))
    parser.add_argument("--limits", default=None, help="vram_limit values in GB for ours (default 0,8,16,24; dry run: fractions of the tiny model)")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds for the whole run; fewer timed steps or 'not run' rows when short")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per row (ours: the first traces, the second builds the schedule)")
    parser.add_argument("--steps", type=int, default=3, help="at most this many timed steps per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-slice", type=float, default=30.0, help="a job given less than this many seconds is reported 'not run'")
    parser.add_argument("--isolate-limits", action="store_true", help="one process per vram_limit for ours (per-limit host peaks; more setup time)")
    parser.add_argument("--fp8-quantize", choices=("device", "cpu"), default="device", help="where our FP8 masters are quantized at setup (not timed)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config (2 blocks, 256x256): checks the code path")
    parser.add_argument("--out", default=None, help="write the Markdown table here; {gpu} and {date} are filled in")
    parser.add_argument("--json", default=None, help="write all raw results here")
    parser.add_argument("--log", default=None, help="append every child's stdout/stderr here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.result)
    if args.dry_run and args.min_slice == 30.0:
        args.min_slice = 5.0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
