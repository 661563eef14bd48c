"""GPU data path (skipped without CUDA): the same scheduler as the CPU tests, on a real device.

Bitwise equality with the unmanaged model at vram_limit 0 / partial / None in bf16, peak
`torch.cuda.max_memory_allocated` within the limit, FP8 within its error bound.
"""

import copy

import pytest
import torch

from engine import enable_vram_management, layer_state_counts, runtime_of, vram_budget
from tests.fixtures.tiny_models import run_model, tiny_model

pytestmark = pytest.mark.gpu
GB = 1024**3
CUDA_BF16 = {"offload_device": "cpu", "onload_device": "cpu", "computation_device": "cuda", "computation_dtype": "bfloat16"}
CUDA_FP8 = dict(CUDA_BF16, offload_dtype="float8_e4m3fn", onload_dtype="float8_e4m3fn", preparing_dtype="float8_e4m3fn")


def to_cuda(inputs):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


@pytest.mark.parametrize("name", ["QwenImageTransformer2DModel", "FluxTransformer2DModel", "ZImageTransformer2DModel", "CLIPTextModel"])
def test_bitwise_equal_on_cuda_at_every_limit(name):
    plain, inputs = tiny_model(name, torch.bfloat16)
    inputs = to_cuda(inputs)
    expected = run_model(copy.deepcopy(plain).cuda(), inputs)
    probe = enable_vram_management(copy.deepcopy(plain), vram_config=CUDA_BF16, vram_limit=0)
    reserve = vram_budget(probe).streaming_reserve()
    total = sum(p.numel() * 2 for p in plain.parameters())
    for limit in (0, (reserve + total // 2) / GB, None):
        model = enable_vram_management(copy.deepcopy(plain), vram_config=CUDA_BF16, vram_limit=limit)
        for _ in range(3):  # trace, then scheduled steps with wrap-around prefetch
            assert torch.equal(run_model(model, inputs), expected), (name, limit)
        assert runtime_of(model).stats.sync_fallbacks == 0
        if limit == 0:
            assert layer_state_counts(model)["preparing"] == 0


def test_peak_cuda_memory_within_limit():
    plain, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    inputs = to_cuda(inputs)
    total = sum(p.numel() * 2 for p in plain.parameters())
    probe = enable_vram_management(copy.deepcopy(plain), vram_config=CUDA_BF16, vram_limit=0)
    reserve = vram_budget(probe).streaming_reserve()
    limit_bytes = reserve + total // 3
    model = enable_vram_management(copy.deepcopy(plain), vram_config=CUDA_BF16, vram_limit=limit_bytes / GB)
    run_model(model, inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_model(model, inputs)
    torch.cuda.synchronize()
    weights_peak = torch.cuda.max_memory_allocated() - base
    activations = 64 * 1024**2  # tiny model, tiny activations: a generous allowance
    assert weights_peak <= limit_bytes + activations
    assert vram_budget(model).peak_bytes <= limit_bytes


def test_fp8_on_cuda_within_bound():
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 1024)
    torch.nn.init.normal_(lin.weight, std=0.005)
    x = torch.randn(64, 1024)
    reference = lin(x)
    model = enable_vram_management(copy.deepcopy(lin).bfloat16(), vram_config=CUDA_FP8, vram_limit=0)
    for _ in range(3):
        out = model(x.bfloat16().cuda()).float().cpu()
    assert ((out - reference).norm() / reference.norm()).item() < 0.035


def test_loaded_masters_are_pinned_in_place_on_cuda(tmp_path):
    """load_model's host arena is registered with CUDA (cudaHostRegister): every master is
    pinned where it was read, with no second buffer; unregistering leaves CUDA healthy."""
    from engine import load_model

    plain, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    plain.save_pretrained(tmp_path)
    inputs = to_cuda(inputs)
    expected = run_model(copy.deepcopy(plain).cuda(), inputs)
    model = load_model(type(plain), tmp_path, vram_config=CUDA_BF16, vram_limit=0)
    runtime = runtime_of(model)
    report = runtime.arena.report
    assert report.in_place_bytes == runtime.host_arena.nbytes and report.pageable_bytes == 0
    assert runtime.arena.buffer is None  # nothing was copied into a second pinned buffer
    masters = [t for r in runtime.layers for s in r.masters.values() for _, t in s.parts()]
    assert all(t.is_pinned() for t in masters)
    for _ in range(3):
        assert torch.equal(run_model(model, inputs), expected)
    runtime.close_scheduler()
    assert not masters[0].is_pinned()
    torch.cuda.synchronize()
    assert torch.ones(4, device="cuda").sum().item() == 4  # no error left behind by the runtime calls


def test_disk_offload_streams_through_pinned_staging_on_cuda(tmp_path):
    """Disk masters are read by the stager into its registered staging buffers and copied on the
    copy stream: bitwise equal to the model on the GPU, no synchronous fallback after tracing."""
    from engine import load_model

    plain, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    plain.save_pretrained(tmp_path)
    inputs = to_cuda(inputs)
    expected = run_model(copy.deepcopy(plain).cuda(), inputs)
    config = dict(CUDA_BF16, offload_dtype="disk", offload_device="disk", onload_dtype="disk", onload_device="disk")
    model = load_model(type(plain), tmp_path, vram_config=config, vram_limit=0)
    runtime = runtime_of(model)
    for _ in range(4):
        assert torch.equal(run_model(model, inputs), expected)
    stager = runtime.scheduler.stager
    assert stager is not None and stager.read_bytes > 0 and stager.fresh_reads == 0
    assert runtime.stats.sync_fallbacks == 0


def test_copy_and_compute_times_are_cuda_event_times():
    plain, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    inputs = to_cuda(inputs)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=CUDA_BF16, vram_limit=0)
    run_model(model, inputs)  # traced, synchronous
    runtime = runtime_of(model)
    before = (runtime.stats.copy_seconds, runtime.stats.compute_seconds)
    for _ in range(3):
        run_model(model, inputs)
    torch.cuda.synchronize()
    runtime.collect_timings()
    assert not runtime.scheduler.timer.pending["copy"] and not runtime.scheduler.timer.pending["compute"]
    assert runtime.stats.copy_seconds > before[0] and runtime.stats.compute_seconds > before[1]


def test_host_wait_on_a_copy_event_sleeps_instead_of_spinning():
    """`CudaBackend.record` makes blocking-sync events: waiting on one behind a long kernel costs
    the host thread little CPU time (a default event spins a core for the whole wait)."""
    import time

    from engine.transfer.devices import CudaBackend

    backend = CudaBackend("cuda")
    stream = backend.copy_stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles
    event = backend.record(stream)
    wall, cpu = time.perf_counter(), time.process_time()
    backend.host_wait(event)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall > 0.1 and cpu < 0.5 * wall, (wall, cpu)


def test_fp8_offload_with_bf16_onload_streams_without_overflow_and_profiles_readably():
    """On CUDA the scheduler starts before onload (engine.management), from FP8 masters; onloaded,
    groups stream from bf16 onload copies through staging buffers sized for them. A profile of a
    scheduled forward shows the named transfer ranges, the staging worker's included."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    plain, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    inputs = to_cuda(inputs)
    config = dict(CUDA_BF16, offload_dtype="float8_e4m3fn", onload_dtype="bfloat16", preparing_dtype="bfloat16")
    model = enable_vram_management(copy.deepcopy(plain), vram_config=config, vram_limit=0)
    runtime = runtime_of(model)
    for _ in range(3):
        run_model(model, inputs)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities, experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
        run_model(model, inputs)
        runtime.scheduler.stager.drain()
        torch.cuda.synchronize()
    stager = runtime.scheduler.stager
    assert stager.overflows == 0 and stager.staged_bytes > 0 and runtime.stats.sync_fallbacks == 0
    names = {e.name for e in prof.events()}
    assert {"lowvram.enter_group", "lowvram.copy_group", "lowvram.stage"} <= names, sorted(n for n in names if "lowvram" in n)
