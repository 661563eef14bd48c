"""The engine on real diffusers/transformers classes (tiny configs, random weights)."""

import copy

import pytest
import torch

from engine import (
    ManagedModule,
    enable_vram_management,
    layer_state_bytes,
    layer_state_counts,
    runtime_of,
    set_vram_limit,
    vram_budget,
)
from engine.layers.module_maps import import_object, normalize_module_map, shipped_module_maps
from tests.fixtures.tiny_models import TINY_MODEL_NAMES, run_model, tiny_model

GB = 1024**3
BF16 = {"computation_device": "cpu", "computation_dtype": "bfloat16"}
FP32_MASTERS = dict(BF16, offload_dtype="float32", onload_dtype="float32")
FP8 = dict(BF16, offload_dtype="float8_e4m3fn", onload_dtype="float8_e4m3fn", preparing_dtype="float8_e4m3fn")


def total_bf16_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * 2 for p in model.parameters())


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_no_parameter_left_unmanaged(name):
    model, _ = tiny_model(name, torch.bfloat16)
    n_params = len(list(model.parameters()))
    enable_vram_management(model, vram_config=BF16)
    managed_params = {
        id(p) for m in model.modules() if isinstance(m, ManagedModule) for p in m._vram.masters.values()
    }
    assert len(managed_params) == len({id(s) for r in runtime_of(model).layers for s in r.masters.values()})
    assert vram_budget(model).fixed_bytes == sum(b.nbytes for b in model.buffers())
    # every parameter slot belongs to a managed layer
    for module in model.modules():
        if any(p is not None for p in module._parameters.values()):
            assert isinstance(module, ManagedModule), type(module).__name__
    assert sum(len(r.masters) for r in runtime_of(model).layers) >= n_params


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_bitwise_equal_at_none_zero_and_partial(name):
    plain, inputs = tiny_model(name, torch.bfloat16)
    expected = run_model(plain, inputs)
    probe = enable_vram_management(copy.deepcopy(plain), vram_config=FP32_MASTERS, vram_limit=0)
    reserve = vram_budget(probe).streaming_reserve()
    partial = (reserve + total_bf16_bytes(plain) // 2) / GB
    for limit in (None, 0, partial):
        model = copy.deepcopy(plain)
        enable_vram_management(model, vram_config=FP32_MASTERS, vram_limit=limit)
        for _ in range(2):
            assert torch.equal(run_model(model, inputs), expected), f"{name} differs at vram_limit={limit}"
        budget = vram_budget(model)
        counts = layer_state_counts(model)
        n = len(runtime_of(model).layers)
        assert sum(counts.values()) == n
        if limit is None:  # residency is filled lazily: every layer that ran (VAEs here only decode)
            assert counts["preparing"] == len(runtime_of(model).execution_order)
        elif limit == 0:
            assert counts["preparing"] == 0 and budget.peak_resident_bytes == 0
        else:
            if reserve < total_bf16_bytes(plain) // 2:  # else one huge layer's reserve covers it all
                assert 0 < counts["preparing"] < n
            assert budget.peak_bytes <= budget.limit_bytes
        assert budget.resident_bytes == layer_state_bytes(model)["preparing"]


@pytest.mark.parametrize("name", ["QwenImageTransformer2DModel", "FluxTransformer2DModel", "ZImageTransformer2DModel", "CLIPTextModel"])
def test_fp8_close_to_bf16(name):
    plain, inputs = tiny_model(name, torch.bfloat16)
    expected = run_model(plain, inputs).float()
    model = enable_vram_management(copy.deepcopy(plain), vram_config=FP8, vram_limit=None)
    out = run_model(model, inputs).float()
    rel = ((out - expected).norm() / expected.norm()).item()
    assert rel < 0.1, rel
    stored = layer_state_bytes(model)["preparing"]
    assert stored < 0.7 * total_bf16_bytes(plain)


@pytest.mark.parametrize("name", ["QwenImageTransformer2DModel", "Qwen2_5_VLForConditionalGeneration"])
def test_replan_on_live_model_without_reload(name):
    plain, inputs = tiny_model(name, torch.bfloat16)
    expected = run_model(plain, inputs)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=FP32_MASTERS, vram_limit=None)
    run_model(model, inputs)
    masters = [id(s) for r in runtime_of(model).layers for s in r.masters.values()]
    for limit in (0, 0.5 * total_bf16_bytes(plain) / GB, None):
        set_vram_limit(model, limit)
        assert torch.equal(run_model(model, inputs), expected)
    assert [id(s) for r in runtime_of(model).layers for s in r.masters.values()] == masters


@pytest.mark.parametrize("model_path", sorted(shipped_module_maps()))
def test_shipped_module_maps_match_the_real_classes(model_path):
    entry = shipped_module_maps()[model_path]
    model_cls = import_object(model_path)
    assert isinstance(model_cls, type)
    mapping = normalize_module_map(entry["layers"])
    assert mapping
    name = model_cls.__name__
    if name not in TINY_MODEL_NAMES:
        pytest.skip(f"no tiny {name} fixture")
    model, inputs = tiny_model(name, torch.bfloat16)
    for path in entry["blocks"]:
        blocks = model.get_submodule(path)
        assert len(blocks) >= 1, path
    expected = run_model(model, inputs)
    enable_vram_management(model, vram_config=BF16, vram_limit=0)
    # the map (used by default for this class) manages every parameter and names the blocks
    for module in model.modules():
        if any(p is not None for p in module._parameters.values()):
            assert isinstance(module, ManagedModule)
    assert any(r.block for r in runtime_of(model).layers)
    assert torch.equal(run_model(model, inputs), expected)
