"""The layer state machine: one owner per layer, legal transitions only, one writer of parameters;
named hooks that come off; disable_vram_management; deepcopy; a pool that applies only what changed
and pins by priority."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import (
    LayerState,
    VramBudget,
    disable_vram_management,
    enable_vram_management,
    is_managed,
    layer_state_counts,
    runtime_of,
    set_vram_limit,
    vram_budget,
)
from engine.layers.hooks import HookRegistry, ModelHook, get_hook, register_hook, remove_hook
from engine.layers.state import LayerStateError
from engine.runtime.entry import ENTRY_HOOK
from engine.transfer.pinned import PinnedBudget
from tests.test_engine_states import CPU, CPU_FP32_MASTERS, X, make_net
from tests.test_scheduler import PinningBackend, RecordingBackend, make_stack, name_blocks

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3


def test_states_are_an_enum_with_the_four_documented_values():
    assert [s.value for s in LayerState] == ["offload", "onload", "preparing", "computation"]
    assert all(s.__doc__ and len(s.__doc__) > 40 for s in LayerState)


def test_transitions_check_their_source_state():
    net = make_net()
    enable_vram_management(net, vram_config=CPU_FP32_MASTERS, vram_limit=0, onload=False)
    layer = runtime_of(net).layers[0]
    assert layer.state is LayerState.OFFLOAD
    with pytest.raises(LayerStateError, match="cannot make resident from state offload"):
        layer.make_resident({}, 0, False)
    with pytest.raises(LayerStateError, match="cannot drop residency from state offload"):
        layer.drop_resident()
    runtime_of(net).onload()
    assert layer.state is LayerState.ONLOAD
    with pytest.raises(LayerStateError, match="cannot onload from state onload"):
        layer.onload(None)
    with layer.computing():
        assert layer.state is LayerState.COMPUTATION
        with pytest.raises(LayerStateError, match="from state computation"):
            layer.offload()
    assert layer.state is LayerState.ONLOAD


def test_residency_and_fast_path_are_derived_from_one_state():
    net = make_net()
    enable_vram_management(net, vram_config=CPU, vram_limit=None)
    net(X)
    runtime = runtime_of(net)
    assert all(layer.state is LayerState.PREPARING and layer.fast for layer in runtime.layers)
    set_vram_limit(net, 0)
    assert all(layer.state is LayerState.ONLOAD and not layer.fast and layer.resident is None for layer in runtime.layers)
    assert vram_budget(net).resident_bytes == 0


def _parameter_writers(path: Path) -> list[int]:
    """Lines that write a module's parameter slots (`x._parameters[...] = ...`, `.update`)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute) and target.value.attr == "_parameters":
                lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update":
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and owner.attr == "_parameters":
                lines.append(node.lineno)
    return lines


def test_one_writer_of_managed_parameters():
    """Only the layer object writes a managed layer's slots. The two other writers touch modules
    that are not managed layers: the loader filling a meta-built model before management, and
    enable placing parameters a user's map leaves unmanaged."""
    allowed = {"engine/layers/state.py", "engine/loading/loader.py", "engine/management.py"}
    writers = {str(p.relative_to(ROOT)): _parameter_writers(p) for p in sorted((ROOT / "engine").rglob("*.py"))}
    assert {path for path, lines in writers.items() if lines} <= allowed, writers
    assert len(writers["engine/loading/loader.py"]) == 1 and len(writers["engine/management.py"]) == 1
    # `slots[name] = ...` with slots = module._parameters is the layer's one helper
    text = (ROOT / "engine/layers/state.py").read_text()
    assert text.count("slots = self.module._parameters") == 2


# --- hooks ----------------------------------------------------------------------------------------
class Doubler(ModelHook):
    name = "test.double"

    def call(self, method, inner, *args, **kwargs):
        return inner(*args, **kwargs) * 2


def test_hooks_chain_by_name_and_come_off():
    model = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    plain = model(x)
    register_hook(model, Doubler())
    assert torch.equal(model(x), plain * 2)
    with pytest.raises(ValueError, match="already has a hook named 'test.double'"):
        register_hook(model, Doubler())
    assert "forward" in model.__dict__ and HookRegistry.of(model, create=False).names() == ["test.double"]
    remove_hook(model, "test.double")
    assert "forward" not in model.__dict__ and "_lowvram_hooks" not in model.__dict__
    assert torch.equal(model(x), plain)


def test_engine_hooks_are_named_and_removable():
    net = make_net()
    enable_vram_management(net, vram_config=CPU, vram_limit=0)
    assert get_hook(net, ENTRY_HOOK) is not None
    assert isinstance(net.__dict__["forward"].__wrapped__.__self__, type(net))  # signature of the real forward


# --- disable --------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [CPU, CPU_FP32_MASTERS, dict(CPU, offload_dtype="float8_e4m3fn")], ids=["bf16", "fp32-masters", "fp8"])
def test_disable_restores_the_plain_model(config):
    plain = make_net()
    reference = plain(X)
    keys = list(plain.state_dict())
    net = copy.deepcopy(plain)
    pool = VramBudget(limit_gb=0)
    enable_vram_management(net, vram_config=config, budget=pool)
    managed_out = net(X)
    assert pool.members
    disable_vram_management(net)
    assert not is_managed(net)
    assert "forward" not in net.__dict__ and "_lowvram_hooks" not in net.__dict__
    assert all(type(m).__module__.startswith("torch") or type(m).__name__ in {"Net", "Probe"} for m in net.modules())
    assert list(net.state_dict()) == keys
    assert not pool.members and pool.fixed_bytes == 0 and pool.resident_bytes == 0
    out = net(X)
    if config is CPU:
        assert torch.equal(out, reference)  # the masters were the parameters themselves
        assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in net.parameters())
    elif config is CPU_FP32_MASTERS:
        assert all(p.dtype == torch.float32 for p in net.parameters())  # plain masters come back as stored
        assert torch.allclose(out.float(), reference.float(), atol=0.05)
    else:
        assert torch.equal(out, managed_out)  # rebuilt from the masters: what the managed model computed
    enable_vram_management(net, vram_config=CPU, vram_limit=0)  # and it can be managed again
    assert layer_state_counts(net)["onload"] > 0


def test_deepcopy_of_a_managed_model_says_what_to_do():
    net = make_net()
    enable_vram_management(net, vram_config=CPU, vram_limit=0)
    with pytest.raises(TypeError, match="disable_vram_management"):
        copy.deepcopy(net)


# --- the pool -------------------------------------------------------------------------------------
def test_replan_keeps_the_schedule_of_members_whose_streamed_set_did_not_change(monkeypatch):
    from engine.transfer.scheduler import TransferScheduler

    resets: list[str] = []
    real_reset = TransferScheduler.reset
    monkeypatch.setattr(TransferScheduler, "reset", lambda self: (resets.append(self.runtime.name), real_reset(self))[1])
    pool = VramBudget(limit_gb=0)
    models = []
    for name in ("a", "b"):
        model = make_stack()
        enable_vram_management(model, vram_config=CPU, budget=pool, name=name)
        name_blocks(model)
        runtime_of(model).use_scheduler(RecordingBackend())
        model(X_STACK)
        model(X_STACK)  # the schedule is laid out
        models.append(model)
    assert all(runtime_of(m).scheduler.ready for m in models)
    resets.clear()
    pool.replan()  # nothing changed: nobody's slots are freed
    assert resets == []
    runtime_of(models[0]).offload()  # a's streamed set changes; b's does not
    assert resets == ["a"] and runtime_of(models[1]).scheduler.ready


X_STACK = torch.randn(4, 32).to(torch.bfloat16)


def test_pinned_ram_goes_to_the_denoiser_first_after_loading():
    """A text encoder loaded first must not take the pinned RAM the denoiser streams every step."""
    encoder, denoiser = make_stack(1), make_stack(2)
    size = sum(p.nbytes for p in denoiser.parameters())
    pinned = PinnedBudget(limit_bytes=size + size // 2)  # all of one, part of the other
    pool = VramBudget(limit_gb=0, pinned=pinned)
    for name, model in (("text_encoder", encoder), ("transformer", denoiser)):
        enable_vram_management(model, vram_config=CPU, budget=pool, name=name, onload=False)
        runtime_of(model).use_scheduler(PinningBackend(), pinned)
    runtime_of(denoiser).pin_priority = 0
    assert all(runtime_of(m).arena is None for m in (encoder, denoiser))  # nothing pinned before the first onload
    runtime_of(encoder).onload()  # the encode stage comes first ...
    assert runtime_of(denoiser).arena.report.pageable_bytes == 0  # ... but the denoiser was pinned first
    assert runtime_of(encoder).arena.report.pinned_bytes < sum(p.nbytes for p in encoder.parameters())
    runtime_of(denoiser).close()  # offloaded for good: its pinned bytes come back
    encoder_runtime = runtime_of(encoder)
    assert pinned.used == encoder_runtime.arena.report.pinned_bytes + encoder_runtime.scheduler.stager.pinned_bytes
