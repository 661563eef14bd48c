"""Issue 25, point 9: Hugging Face ZeroGPU, with a fake `spaces` module (the package is not
installed here).

Checked: without `spaces` nothing is wrapped; with it, the GPU function is wrapped with a
duration sized per request from the estimate (more steps, more seconds; clamped); the masters
are loaded in the main process before the GPU call and the call itself builds nothing (a worker
forked from that process inherits them: it never reads the model from disk); inside the call the
hardware is detected again; building a pipeline for a CUDA computation device makes no CUDA
stream (a ZeroGPU main process must not start CUDA).
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest

from engine.generation.types import GenerateRequest, GenerationResult, HardwareInfo
from tests.test_studio import TinyRegistry


class FakeSpaces(types.ModuleType):
    """`spaces` as ZeroGPU has it: GPU(duration=...) wraps a function; the fake records the
    reservation asked for each call and what the main process had loaded when it began."""

    def __init__(self):
        super().__init__("spaces")
        self.calls: list[dict] = []
        self.studio = None

    def GPU(self, duration=60):  # noqa: N802  (the package's name)
        def wrap(fn):
            def call(*args, **kwargs):
                seconds = duration(*args, **kwargs) if callable(duration) else duration
                record = {"fn": fn.__name__, "seconds": seconds, "builds_before": getattr(self.studio, "builds", None)}
                self.calls.append(record)
                out = fn(*args, **kwargs)
                if hasattr(out, "__next__"):  # a generator: ZeroGPU streams it from the worker
                    out = list(out)
                record["builds_after"] = getattr(self.studio, "builds", None)
                return iter(out) if isinstance(out, list) else out

            return call

        return wrap


@pytest.fixture
def zero(monkeypatch):
    fake = FakeSpaces()
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.delenv("LVS_ZEROGPU_DURATION", raising=False)
    import ui.handlers

    handlers = importlib.reload(ui.handlers)
    yield fake, handlers
    monkeypatch.delitem(sys.modules, "spaces")
    monkeypatch.delenv("SPACES_ZERO_GPU")
    importlib.reload(ui.handlers)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return TinyRegistry(tmp_path_factory.mktemp("tiny-models-zero"), families=("qwen-image",))


def test_without_spaces_nothing_is_wrapped(monkeypatch):
    import ui.zerogpu as zerogpu

    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails
    assert zerogpu.spaces_module() is None and not zerogpu.zero_gpu()
    fn = lambda: 1  # noqa: E731
    assert zerogpu.on_gpu(fn, lambda: 30) is fn


def test_duration_is_sized_per_model_and_setting_from_the_estimate(tmp_path, registry, monkeypatch):
    from engine.generation.studio import Studio
    import ui.zerogpu as zerogpu

    monkeypatch.delenv("LVS_ZEROGPU_DURATION", raising=False)
    studio = Studio(tmp_path / "models", tmp_path / "outputs", registry=registry)
    base = GenerateRequest("a fox", model="tiny-qwen-image", steps=2)
    # a GPU machine as ZeroGPU's worker sees it, and a slow cost model so steps count
    monkeypatch.setattr(studio, "machine", lambda: __import__("engine.generation.types", fromlist=["Machine"]).Machine(vram_gb=40.0, ram_gb=64.0, disk_free_gb=100.0))
    monkeypatch.setattr("engine.generation.suggest.step_seconds", lambda est, machine, c, work: 2.0 if c.weights == "bf16" else 1.0)
    few = zerogpu.gpu_seconds(studio, base)
    many = zerogpu.gpu_seconds(studio, GenerateRequest("a fox", model="tiny-qwen-image", steps=20))
    fp8 = zerogpu.gpu_seconds(studio, GenerateRequest("a fox", model="tiny-qwen-image", steps=20, weights="fp8"))
    assert few == zerogpu.MIN_SECONDS  # (2 x 2 s + 8 s) x 1.5 = 18 s: the floor
    assert 72 <= many <= 73  # (20 steps x 2 s + 8 s + pinning the tiny masters) x 1.5
    assert 42 <= fp8 <= 43  # the setting counts, not only the model: (20 x 1 s + 8 s) x 1.5
    monkeypatch.setattr("engine.generation.suggest.step_seconds", lambda est, machine, c, work: 100.0)
    assert zerogpu.gpu_seconds(studio, base) == zerogpu.MAX_SECONDS
    monkeypatch.setenv("LVS_ZEROGPU_DURATION", "77")
    assert zerogpu.gpu_seconds(studio, base) == 77
    monkeypatch.delenv("LVS_ZEROGPU_DURATION")
    monkeypatch.setattr(studio, "step_work", lambda r: 1 / 0)
    assert zerogpu.gpu_seconds(studio, base) == zerogpu.MAX_SECONDS  # cannot estimate: the safe reservation


def test_masters_load_in_the_main_process_and_the_gpu_call_only_computes(zero, tmp_path, registry, monkeypatch):
    from engine.generation.studio import Studio

    fake, handlers = zero
    assert handlers.ZERO_GPU
    studio = Studio(tmp_path / "models", tmp_path / "outputs", registry=registry)
    fake.studio = studio
    h = handlers.Handlers(studio)
    detected = []
    real_detect = studio.redetect_hardware
    monkeypatch.setattr(studio, "redetect_hardware", lambda: detected.append(len(fake.calls)) or real_detect())
    request = GenerateRequest("a fox", model="tiny-qwen-image", steps=2, width=64, height=64, seed=1)
    for _ in range(2):
        result = h._execute(request, "tab-1", __import__("threading").Event(), lambda *a, **k: None)
        assert isinstance(result, GenerationResult)
    gen = [c for c in fake.calls if c["fn"] == "_engine_events"]
    assert len(gen) == 2
    # loaded once, before the first GPU call, in the main process; no GPU call built anything
    assert gen[0]["builds_before"] == 1 and all(c["builds_after"] == c["builds_before"] == 1 for c in gen)
    assert all(20 <= c["seconds"] <= 300 for c in gen)
    assert detected == [1, 2]  # inside each GPU call (the call is recorded before it runs)


def test_hardware_is_detected_again(tmp_path, registry, monkeypatch):
    from engine.generation import studio as studio_module
    from engine.generation.studio import Studio

    seen = iter([HardwareInfo(has_gpu=False, gpu_name=None, vram_total_gb=None, auto_vram_limit_gb=None, ram_total_gb=16.0), HardwareInfo(has_gpu=False, gpu_name=None, vram_total_gb=None, auto_vram_limit_gb=None, ram_total_gb=32.0)])
    monkeypatch.setattr(studio_module, "detect_hardware", lambda device=None: next(seen))
    studio = Studio(tmp_path / "models", tmp_path / "outputs", registry=registry)
    assert studio.hardware().ram_total_gb == 16.0 and studio.hardware().ram_total_gb == 16.0  # cached
    assert studio.redetect_hardware().ram_total_gb == 32.0 and studio.hardware().ram_total_gb == 32.0


def test_a_cuda_backend_makes_no_stream_until_it_streams(monkeypatch):
    """Building a pipeline for cuda in ZeroGPU's main process creates the backend: it must not
    start CUDA there (its copy stream is made on first use, in the worker)."""
    import torch

    from engine.transfer.devices import CudaBackend

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(device) or object())
    backend = CudaBackend("cuda:0")
    assert made == []
    stream = backend.copy_stream()
    assert made == [torch.device("cuda", 0)] and backend.copy_stream() is stream
