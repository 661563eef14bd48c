"""Ready for real GPUs (issue 25, points 1-5), proven on the CPU.

The GPU's answers come from patched `torch.cuda` queries (`FakeCuda`, which records the device
index every query names) or from a fake device that runs out of memory (`BoundedBackend`):
* one device, one name: "cuda" and "cuda:0" are one device, and computing on cuda:1 asks
  nothing of GPU 0 (point 5);
* the out-of-memory class resolved on every torch, and a torch without kernels for the card
  says what to install (point 4);
* an injected OOM at vram_limit=0: the retry runs a plan with a lower measured peak, or stops
  at once naming the settings that would fit; the failed step is freed outside its except block
  (point 2);
* Auto is the VRAM free now minus a margin, re-checked after the first step; the allocator
  config is set before CUDA starts; on a CPU host Auto leaves headroom (point 1);
* the computation dtype per GPU generation (point 3).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

from engine import enable_vram_management, runtime_of
from engine.config import VramConfig, normalize_device
from engine.runtime import cuda_facts
from engine.runtime.oom import VramExhaustedError
from tests.test_scheduler import CPU, RecordingBackend, make_stack, name_blocks

GiB = 1024**3


# --- a GPU that answers from a table, recording which device each query names ----------------------
class FakeCuda:
    def __init__(self, count=2, current=0, total=8 * GiB, free=6 * GiB, reserved=0, cap=(8, 9), arch=("sm_80", "sm_86", "sm_90")):
        self.count, self.current, self.total, self.free, self.reserved = count, current, total, free, reserved
        self.cap, self.arch = cap, list(arch)
        self.queried: list[tuple[str, object]] = []

    def _index(self, name, device):
        index = device.index if isinstance(device, torch.device) else device
        self.queried.append((name, index))
        return index

    def install(self, monkeypatch) -> "FakeCuda":
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "is_initialized", lambda: False)
        monkeypatch.setattr(cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(cuda, "current_device", lambda: (self.queried.append(("current_device", None)), self.current)[1])
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (self._index("mem_get_info", device), (self.free, self.total))[1])
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: (self._index("memory_reserved", device), self.reserved)[1])
        monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: (self._index("get_device_capability", device), self.cap)[1])
        monkeypatch.setattr(cuda, "get_device_name", lambda device=None: (self._index("get_device_name", device), "Fake GPU")[1])
        monkeypatch.setattr(cuda, "get_arch_list", lambda: list(self.arch))
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.queried.append(("empty_cache", "current")))

        @contextlib.contextmanager
        def device(index):
            self._index("device", index)
            yield

        monkeypatch.setattr(cuda, "device", device)
        return self

    def indices(self) -> set:
        """The device indices named by the queries (None: a query that named no device)."""
        return {index for name, index in self.queried if name not in ("empty_cache",)}


# --- point 5: one device, one name -------------------------------------------------------------------
def test_cuda_and_cuda0_are_one_device_when_parsing(monkeypatch):
    FakeCuda().install(monkeypatch)
    cfg = VramConfig.from_dict({"onload_device": "cuda:0", "onload_dtype": "bfloat16", "computation_device": "cuda"})
    assert cfg.computation_device == cfg.onload_device == cfg.preparing_device == torch.device("cuda", 0)
    # planned for another machine (no CUDA here): "cuda" is its cuda:0 too
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert normalize_device("cuda") == torch.device("cuda:0")
    cfg = VramConfig.from_dict({"onload_device": "cuda:0", "onload_dtype": "bfloat16", "computation_device": "cuda"}, check_present=False)
    assert cfg.onload_device == cfg.computation_device


def test_computing_on_cuda1_asks_nothing_of_gpu0(monkeypatch, tmp_path):
    from engine.generation.session import Session
    from engine.generation.settings import detect_hardware, settings_for
    from engine.generation.types import GenerateRequest

    gpu = FakeCuda(current=0).install(monkeypatch)
    hw = detect_hardware("cuda:1")
    settings = settings_for(GenerateRequest("x"), hw, "cuda:1")
    assert settings.device == settings.vram_config.computation_device == torch.device("cuda", 1)
    session = Session(None, tmp_path, None, device="cuda:1")
    snap = session.telemetry()
    session.unload()  # empties the allocator's cache of cuda:1, under cuda:1
    assert snap.vram_total_gb == 8.0
    assert {name for name, _ in gpu.queried} >= {"mem_get_info", "memory_reserved", "get_device_capability", "get_device_name"}
    assert gpu.indices() == {1}, gpu.queried  # no query of GPU 0, none of "the current device"


def test_pinned_memory_for_cuda1_is_allocated_under_cuda1(monkeypatch):
    from engine.transfer.devices import CudaBackend

    gpu = FakeCuda(current=0).install(monkeypatch)
    backend = object.__new__(CudaBackend)  # no stream: only `pin` is asked
    backend.device = torch.device("cuda", 1)
    made = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: made.append(k.get("pin_memory")) or "pinned")
    assert backend.pin(16) == "pinned" and made == [True]
    assert gpu.queried == [("device", 1)]  # the pinned allocator's context is cuda:1's, not GPU 0's


# --- point 4: versions and architectures -----------------------------------------------------------
def test_the_out_of_memory_class_resolves_on_a_torch_without_torch_OutOfMemoryError():
    class CudaOOM(RuntimeError):
        pass

    torch_24 = types.SimpleNamespace(cuda=types.SimpleNamespace(OutOfMemoryError=CudaOOM))  # torch 2.4: no torch.OutOfMemoryError
    assert cuda_facts.oom_error_classes(torch_24) == (CudaOOM,)
    assert cuda_facts.oom_error_classes(types.SimpleNamespace()) == ()
    from engine.runtime.oom import is_oom

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert "torch.OutOfMemoryError" not in Path("engine/generation/runner.py").read_text()


@pytest.mark.parametrize(
    "cap, arch, ok",
    [
        ((8, 9), ["sm_80", "sm_86", "sm_90"], True),  # sm_86 cubins run on 8.9
        ((12, 0), ["sm_50", "sm_80", "sm_86", "sm_90"], False),  # RTX 50xx on a torch without sm_120
        ((12, 0), ["sm_80", "sm_90", "sm_100", "sm_120"], True),
        ((9, 0), ["sm_80", "compute_80"], True),  # PTX is compiled by the driver for newer cards
        ((9, 0), ["sm_90a"], True),
        ((9, 1), ["sm_90a"], False),  # an arch-specific cubin runs on its exact capability only
        ((6, 1), ["sm_70", "sm_75", "sm_80"], False),  # a Pascal card on a torch that dropped it
    ],
)
def test_kernels_for_the_card(cap, arch, ok):
    assert cuda_facts.has_kernels_for(cap, arch) is ok


def test_a_torch_without_kernels_for_the_card_says_what_to_install(monkeypatch):
    FakeCuda(cap=(12, 0), arch=("sm_50", "sm_80", "sm_86", "sm_90")).install(monkeypatch)
    from engine.generation.settings import detect_hardware

    hw = detect_hardware("cuda:0")
    assert len(hw.warnings) == 1
    assert "sm_120" in hw.warnings[0] and "CUDA 12.8" in hw.warnings[0] and "whl/cu128" in hw.warnings[0]
    old = cuda_facts.missing_kernels_message((6, 1), ["sm_70", "sm_80"], "GTX 1080")
    assert "older PyTorch" in old and "sm_61" in old
    assert cuda_facts.missing_kernels_message((8, 6), ["sm_80"]) is None


# --- point 2: an OOM retry that can succeed ----------------------------------------------------------
class BoundedBackend(RecordingBackend):
    """A device of `capacity` bytes: the streaming slots it allocated, plus the activations a
    block's forward needs (`ACT_PER_ROW` bytes per row of its input), must fit, or the forward
    raises torch's OOM. Records the peak it granted."""

    ACT_PER_ROW = 4096

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.peak = 0
        self.attempts = 0
        self.live: list[weakref.ref] = []

    def allocate(self, nbytes):
        slot = super().allocate(nbytes)
        self.slots.pop()  # held weakly: a slot the scheduler dropped is gone from the device
        self.live.append(weakref.ref(slot))
        return slot

    def slot_of(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        alive = [ref() for ref in self.live]
        return next((i for i, slot in enumerate(alive) if slot is not None and slot.untyped_storage().data_ptr() == ptr), None)

    def live_slot_bytes(self) -> int:
        return sum(slot.nbytes for ref in self.live if (slot := ref()) is not None)

    def need(self, x: torch.Tensor) -> None:
        self.attempts += 1
        need = self.live_slot_bytes() + x.shape[0] * self.ACT_PER_ROW
        if need > self.capacity:
            scratch = torch.empty(need // 4)  # the failed step's "activations", held by this frame
            self.scratch_ref = weakref.ref(scratch)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {need} bytes (simulated)")
        self.peak = max(self.peak, need)


def bounded(capacity_rows: float, monkeypatch):
    plain = make_stack()
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config=CPU, vram_limit=0)
    name_blocks(model)
    backend = BoundedBackend(10**12)
    runtime_of(model).use_scheduler(backend)
    model.blocks[0].register_forward_pre_hook(lambda _m, inputs: backend.need(inputs[0]))
    one_row = torch.randn(1, 32).to(torch.bfloat16)
    model(one_row)  # the trace
    model(one_row)  # streamed through the scheduler's slots
    slots = backend.peak - BoundedBackend.ACT_PER_ROW
    assert slots > 0 and backend.live_slot_bytes() == slots
    backend.capacity = slots + int(capacity_rows * BoundedBackend.ACT_PER_ROW)
    backend.attempts, backend.peak = 0, 0
    return plain, model, backend


def test_an_oom_at_vram_limit_0_retries_at_a_lower_measured_peak(monkeypatch):
    plain, model, backend = bounded(capacity_rows=2.5, monkeypatch=monkeypatch)
    x = torch.randn(4, 32).to(torch.bfloat16)  # a batched CFG's 4 rows need 4: the device has room for 2
    out = model(x)
    assert runtime_of(model).stats.oom_retries == 1
    assert runtime_of(model).batch_chunks == 2
    assert backend.attempts == 3  # the failed full batch, then its two halves
    assert backend.peak <= backend.capacity < backend.live_slot_bytes() + 4 * BoundedBackend.ACT_PER_ROW
    assert torch.equal(out, torch.cat([plain(x[:2]), plain(x[2:])]))
    assert vram_transient(model) == 0


def vram_transient(model) -> int:
    return runtime_of(model).ledger.transient_bytes


def test_an_oom_nothing_can_lower_stops_at_once_naming_settings_that_fit(monkeypatch):
    plain, model, backend = bounded(capacity_rows=0.5, monkeypatch=monkeypatch)
    with pytest.raises(VramExhaustedError) as raised:
        model(torch.randn(1, 32).to(torch.bfloat16))
    message = str(raised.value)
    assert backend.attempts == 1  # the same plan is never run again
    assert "nothing can lower its peak" in message
    assert "Settings that would fit: a smaller image" in message and "FP8 or NF4 weights" in message
    assert "lower VRAM limit" not in message  # nothing was resident: at 0 a lower limit is no answer
    # the model is left consistent: with room again, it runs
    backend.capacity = 10**9
    x = torch.randn(1, 32).to(torch.bfloat16)
    assert torch.equal(model(x), plain(x))


def test_the_failed_step_is_freed_outside_its_except_block(monkeypatch):
    import engine.runtime.entry as entry

    plain, model, backend = bounded(capacity_rows=2.5, monkeypatch=monkeypatch)
    seen = {}
    original = entry.free_failed_step

    def checked(runtime):
        original(runtime)
        seen["exc_info"] = sys.exc_info()[0]
        seen["activations_freed"] = backend.scratch_ref() is None

    monkeypatch.setattr(entry, "free_failed_step", checked)
    model(torch.randn(4, 32).to(torch.bfloat16))
    assert seen == {"exc_info": None, "activations_freed": True}


def test_the_split_batch_joins_outputs_of_every_shape():
    from engine.runtime.entry import join_batch, split_batch

    x, t = torch.arange(8.0).reshape(4, 2), torch.tensor(3.0)
    parts = split_batch((x,), {"timestep": t, "ids": torch.zeros(7, 3)}, 4, 2)
    assert [p[0][0].shape[0] for p in parts] == [2, 2] and parts[0][1]["timestep"] is t and parts[1][1]["ids"].shape == (7, 3)
    assert torch.equal(join_batch([(x[:2],), (x[2:],)])[0], x)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    joined = join_batch([Transformer2DModelOutput(sample=x[:1]), Transformer2DModelOutput(sample=x[1:])])
    assert torch.equal(joined.sample, x)


def test_the_planner_caps_prefetch_depth_after_an_oom():
    from engine.planning.planner import LayerCost, Limits, MemberCost, plan

    member = MemberCost("m", tuple(LayerCost(i, 10, 0, 20) for i in range(8)), group_bytes=10)
    assert plan([member], Limits(60)).depth["m"] > 1
    assert plan([member], Limits(60, max_depth=1)).depth["m"] == 1


# --- point 1: Auto is the VRAM free now ----------------------------------------------------------------
def test_auto_is_the_free_vram_minus_a_margin(monkeypatch):
    from engine.generation.settings import detect_hardware
    from engine.generation.vram_limit import auto_vram_limit_gb

    FakeCuda(total=8 * GiB, free=6 * GiB).install(monkeypatch)  # a desktop and a browser hold 2 GB
    hw = detect_hardware("cuda:0")
    assert hw.vram_free_gb == 6.0 and hw.auto_vram_limit_gb == 4.5  # 6 free - 1.5 margin
    assert auto_vram_limit_gb(8.0) == 6.5  # a machine planned for: the whole card is free


def test_auto_is_measured_when_the_pipeline_is_built_and_lowered_after_the_first_step(monkeypatch, tmp_path):
    from engine.generation.session import AUTO_MIN_FREE_GB, Session

    gpu = FakeCuda(total=8 * GiB, free=5 * GiB).install(monkeypatch)

    class Pipe:
        device = torch.device("cuda", 0)
        vram_limit = None

        def set_vram_limit(self, limit):
            self.vram_limit = limit

        def close(self):
            pass

        def layer_states(self):
            return {}

        def slots_in_flight(self):
            return 0

    session = Session(None, tmp_path, None, device="cuda:0")
    settings = types.SimpleNamespace(limit_is_auto=True, device=torch.device("cuda", 0), vram_limit=6.5)
    r = types.SimpleNamespace(settings=settings)
    assert session._measured_auto(r) == 3.5  # what is free when it is built, not at start
    pipe = Pipe()
    session._pipeline, session.auto_limit_gb = pipe, 3.5
    gpu.free = int(0.2 * GiB)  # the first step's activations took more than planned
    message = session.recheck_auto()
    assert message and "lowering the limit" in message
    assert pipe.vram_limit == session.auto_limit_gb <= 3.5 - (AUTO_MIN_FREE_GB - 0.2) + 1e-9
    assert session.recheck_auto() is None  # once per pipeline
    gpu.reserved, gpu.free = 1 * GiB, 5 * GiB
    assert abs(session.telemetry().vram_other_gb - 2.0) < 1e-6  # 8 total - 5 free - 1 reserved by us
    assert gpu.indices() == {0}


def test_the_allocator_config_is_set_before_cuda_starts_unless_the_user_set_one():
    from engine.runtime.alloc_conf import configure_allocator

    env: dict[str, str] = {}
    assert configure_allocator(env, "linux") and env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert not configure_allocator(mine, "linux") and mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert not configure_allocator({"PYTORCH_ALLOC_CONF": "x"}, "linux")
    assert not configure_allocator({}, "win32")
    import subprocess

    code = "import os, engine; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin"}, cwd=Path.cwd())
    assert out.stdout.strip() == ("expandable_segments:True" if sys.platform == "linux" else "None"), out.stderr


# --- point 1, on a CPU host: Auto leaves the machine headroom, copies only where they pay back ----------
def test_auto_on_a_cpu_leaves_headroom_to_the_rest_of_the_machine(monkeypatch):
    from engine.runtime import ram

    monkeypatch.delenv(ram.OVERRIDE, raising=False)
    assert ram.machine_headroom_bytes(24 * GiB) == 3 * GiB  # a few GiB on a small machine ...
    assert ram.machine_headroom_bytes(64 * GiB) == int(6.4 * GiB)  # ... a share of a large one
    # 21 GiB available: the planner may use 21 - 1 (this process) - the machine's headroom
    assert ram.ram_room(0, 0, 0, available=21 * GiB) == 20 * GiB - ram.machine_headroom_bytes() > 0
    monkeypatch.setenv(ram.OVERRIDE, "10")  # the user said what the engine may use: no machine headroom
    assert ram.machine_headroom_bytes(24 * GiB) == 0


def test_the_ram_available_is_what_the_cgroup_still_allows(monkeypatch, tmp_path):
    from engine.runtime import ram

    root = tmp_path / "cg"
    leaf = root / "user.slice" / "app.scope"
    leaf.mkdir(parents=True)
    (root / "user.slice" / "memory.max").write_text(str(18 * GiB))  # a process held to 18 GiB
    (root / "user.slice" / "memory.current").write_text(str(10 * GiB))
    (leaf / "memory.max").write_text("max")
    (leaf / "memory.current").write_text(str(9 * GiB))
    assert ram.cgroup_room_bytes(leaf, root) == 8 * GiB
    monkeypatch.delenv(ram.OVERRIDE, raising=False)
    monkeypatch.setattr(ram, "cgroup_room_bytes", lambda *a: 8 * GiB)
    assert ram.available_ram_bytes() <= 8 * GiB


def test_auto_on_a_cpu_copies_quantized_masters_only_where_they_pay_back():
    from engine.generation.types import GenerateRequest, HardwareInfo
    from engine.generation.settings import settings_for
    from engine.generation.vram_limit import AUTO_COPY_MIN_STEPS

    cpu = HardwareInfo(False, None, None, None, 24.0)
    fp8 = lambda steps: settings_for(GenerateRequest("x", weights="fp8"), cpu, "cpu", steps=steps)
    assert fp8(1).vram_limit == 0.0 and fp8(1).describe_limit() == "Auto (0 GB)"  # a 1-step image: no copies
    assert fp8(AUTO_COPY_MIN_STEPS).vram_limit is None  # enough steps: copies within the RAM room
    assert settings_for(GenerateRequest("x", weights="bf16"), cpu, "cpu", steps=1).vram_limit is None  # nothing to copy
    assert settings_for(GenerateRequest("x", weights="fp8", vram_limit=2), cpu, "cpu", steps=1).vram_limit == 2  # asked


def test_the_estimate_fits_only_with_the_machines_headroom(monkeypatch):
    from engine.generation.estimate import cpu_ram_verdict
    from engine.generation.pipelines import FAMILIES
    from engine.runtime import ram
    from model_registry import get_model

    monkeypatch.delenv(ram.OVERRIDE, raising=False)
    entry = get_model("z-image-turbo")
    fam = FAMILIES[entry.family]
    common = dict(storage="fp8", disk=False, limit_bytes=None, width=512, height=512, batch=1)
    need = cpu_ram_verdict(entry, fam, **common, available_bytes=10**15).estimate.minimum_bytes
    headroom = ram.machine_headroom_bytes()
    assert not cpu_ram_verdict(entry, fam, **common, available_bytes=need + headroom // 2).fits
    verdict = cpu_ram_verdict(entry, fam, **common, available_bytes=need + headroom // 2)
    assert f"leaves {headroom / GiB:.1f} GiB to the rest of the machine" in verdict.message
    assert cpu_ram_verdict(entry, fam, **common, available_bytes=need + headroom + GiB // 4).fits


# --- point 3: the computation dtype fits the GPU generation ------------------------------------------
def _hardware(cap):
    from engine.generation.types import HardwareInfo

    return HardwareInfo(True, "a GPU", 16.0, 14.0, 64.0, vram_free_gb=15.5, compute_capability=cap)


def _resolved(monkeypatch, tmp_path, cap, model="qwen-image", size=1024):
    import model_registry
    from engine.generation.request import Resolver
    from engine.generation.types import GenerateRequest

    FakeCuda(cap=cap).install(monkeypatch)
    resolver = Resolver(model_registry, tmp_path, "cuda:0", hardware=lambda: _hardware(cap))
    return resolver(GenerateRequest("a cat", model=model, width=size, height=size))


@pytest.mark.parametrize("cap, dtype", [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((12, 0), torch.bfloat16)])
def test_below_capability_8_the_computation_runs_in_fp16(monkeypatch, tmp_path, cap, dtype):
    from engine.generation.request import infotext

    r = _resolved(monkeypatch, tmp_path, cap)
    assert r.settings.compute_dtype == dtype and r.settings.vram_config.computation_dtype == dtype
    name = "fp16" if dtype == torch.float16 else "bf16"
    assert f"Compute dtype: {name}" in infotext(r, "euler")  # the PNG's parameters say which dtype ran


def test_beside_fp16_the_vae_computes_in_fp32(tmp_path):
    from engine.generation.pipelines.managed import component_config

    fp16 = VramConfig.from_dict({"computation_device": "cuda:0", "computation_dtype": "float16"}, check_present=False)
    vae = component_config("vae", "Conv2d", tmp_path, fp16)
    assert vae.computation_dtype == vae.preparing_dtype == torch.float32
    assert component_config("transformer", None, tmp_path, fp16) is fp16
    bf16 = VramConfig.from_dict({"computation_device": "cuda:0"}, check_present=False)
    assert component_config("vae", "Conv2d", tmp_path, bf16) is bf16


def test_the_estimate_counts_the_attention_path_the_card_takes(monkeypatch, tmp_path):
    import dataclasses

    from engine.generation.estimator import Estimator, math_attention_bytes

    r = _resolved(monkeypatch, tmp_path, (7, 5))  # a T4: fp16, memory-efficient attention
    assert math_attention_bytes(r, 1) == 0
    bf16_on_t4 = dataclasses.replace(r, settings=dataclasses.replace(r.settings, compute_dtype=torch.bfloat16))
    scores = math_attention_bytes(bf16_on_t4, 1)  # bf16 there: the math path's full score matrix
    assert scores == 24 * 4096 * 4096 * 2  # Qwen-Image's 24 heads at 1024x1024: about 0.8 GB per call
    estimator = Estimator(None)
    from engine.generation.pipelines import cfg_batch

    from engine.generation.pipelines import activation_bytes

    batch = cfg_batch(r.family, r.guidance, r.negative_prompt)
    assert estimator.activations(bf16_on_t4) == activation_bytes(1024, 1024, batch) + batch * scores
    # in fp16 the VAE computes in fp32: its decode's activations count twice the bytes
    assert estimator.activations(r) == activation_bytes(1024, 1024, batch, vae_element_bytes=4) > activation_bytes(1024, 1024, batch)
    ampere = _resolved(monkeypatch, tmp_path, (8, 6))
    assert math_attention_bytes(ampere, 1) == 0
    est = estimator.estimate(r, _hardware((7, 5)))
    assert est.compute_dtype == "fp16"


def test_an_oom_with_prefetch_in_flight_retries_with_fewer_slots():
    from engine import set_vram_limit, vram_budget

    plain = make_stack()
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config=CPU, vram_limit=0)
    reserve = vram_budget(model).streaming_reserve()
    name_blocks(model)
    backend = BoundedBackend(10**12)
    runtime = runtime_of(model)
    runtime.use_scheduler(backend)
    model.blocks[0].register_forward_pre_hook(lambda _m, inputs: backend.need(inputs[0]))
    x = torch.randn(1, 32).to(torch.bfloat16)
    model(x)  # the trace
    group = runtime.scheduler.max_group_bytes(runtime.planning_order())
    set_vram_limit(model, (reserve + 3 * group) / GiB)  # room for prefetch two groups ahead, not for residency
    model(x)
    assert runtime.stream_depth >= 2
    deep = backend.live_slot_bytes()
    backend.capacity = deep - 1  # the device now has less room than these slots take
    backend.attempts = backend.peak = 0
    assert torch.equal(model(x), plain(x))
    assert runtime.stream_depth == 1 and runtime.stats.oom_retries == 1
    assert backend.attempts == 2 and backend.live_slot_bytes() < deep  # the retry's measured peak is lower



class TinyAttention(torch.nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


def test_an_oom_in_attention_retries_with_chunked_attention_at_a_lower_measured_peak(monkeypatch):
    torch.manual_seed(0)
    plain = TinyAttention().eval()
    model = copy.deepcopy(plain)
    enable_vram_management(model, vram_config={"computation_device": "cpu", "computation_dtype": "float32"}, vram_limit=0)
    real = torch.nn.functional.scaled_dot_product_attention
    device = {"capacity": 10**12, "peak": 0, "calls": 0}

    def bounded(q, k, v, *args, **kwargs):  # the math path: a score matrix of q x k rows per head
        device["calls"] += 1
        scores = q.shape[0] * q.shape[1] * q.shape[-2] * k.shape[-2] * q.element_size()
        if scores > device["capacity"]:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {scores} bytes (simulated)")
        device["peak"] = max(device["peak"], scores)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", bounded)
    x = torch.randn(1, 64, 32)
    whole = 1 * 4 * 64 * 64 * 4
    device["capacity"] = whole // 2  # a quarter of the queries at a time fits, all of them not
    out = model(x)
    assert runtime_of(model).stats.oom_retries == 1 and runtime_of(model).attention_chunks == 4
    assert device["peak"] == whole // 4 < whole  # the retry's measured peak
    assert torch.nn.functional.scaled_dot_product_attention is bounded  # restored after the step
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real)
    with torch.no_grad():
        torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-6)  # each query row's softmax is over every key


def test_the_estimate_fits_the_free_vram_not_the_total(monkeypatch, tmp_path):
    import dataclasses

    from engine.generation.estimator import Estimator
    from engine.generation.types import HardwareInfo

    r = _resolved(monkeypatch, tmp_path, (8, 6), model="z-image-turbo", size=1024)
    unlimited = dataclasses.replace(r, settings=dataclasses.replace(r.settings, vram_limit=None, limit_is_auto=False))
    need = Estimator(None).estimate(unlimited, HardwareInfo(True, "a GPU", 80.0, 70.0, 64.0)).vram_gb
    whole = HardwareInfo(True, "a GPU", need + 2, need, 64.0)
    busy = dataclasses.replace(whole, vram_free_gb=need - 1)  # a desktop and a browser hold 3 GB
    assert Estimator(None).estimate(unlimited, whole).fits
    est = Estimator(None).estimate(unlimited, busy)
    assert not est.fits and any("other programs hold the rest" in w for w in est.warnings)
