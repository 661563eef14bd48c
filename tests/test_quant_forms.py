"""int8 and nf4 storage forms: error bounds, real bytes in the ledger, the same bits under every
vram_limit and through the scheduler's slots, load_model's chunked quantization bitwise what
`store` makes, disk offload, validation and the nf4 -> int8 fallback."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from engine import enable_vram_management, layer_state_bytes, load_model, runtime_of, vram_budget
from engine.config import Place, VramConfig
from engine.storage.forms import INT8, NF4
from engine.loading.loader import read_stored
from engine.runtime.component import bytes_at
from engine.storage.disk import SafetensorsFile
from engine.storage.int8 import Int8Stored
from engine.storage.nf4 import Nf4Stored, quantize as nf4_quantize
from engine.storage.stored import PlainStored, store
from tests.fixtures.tiny_models import run_model, save_sharded, tiny_model

CPU = torch.device("cpu")


def cfg(form: str, resident_form: bool = True) -> dict:
    out = {"offload_dtype": form, "onload_dtype": form, "computation_device": "cpu", "computation_dtype": "bfloat16"}
    if resident_form:
        out["preparing_dtype"] = form
    return out


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("std", [1e-4, 0.005, 0.02, 0.05, 1.0])
@pytest.mark.parametrize(("form", "bound"), [(INT8, 0.012), (NF4, 0.09)])
def test_error_bound_at_any_weight_scale(form, bound, std):
    torch.manual_seed(0)
    lin = nn.Linear(1024, 512)
    nn.init.normal_(lin.weight, std=std)
    nn.init.normal_(lin.bias, std=std)
    x = torch.randn(64, 1024)
    reference = lin(x)
    managed = enable_vram_management(copy.deepcopy(lin).bfloat16(), vram_config=cfg(form), vram_limit=0)
    with torch.no_grad():
        out = managed(x.bfloat16())
    assert rel_error(out, reference) < bound


@pytest.mark.parametrize("form", [INT8, NF4])
def test_stored_bytes_are_data_plus_scales_and_the_ledger_counts_them(form):
    lin = nn.Linear(256, 128).bfloat16()
    master = store(lin.weight.detach(), Place(CPU, form), torch.bfloat16)
    if form == INT8:
        assert isinstance(master, Int8Stored)
        assert master.nbytes == 128 * 256 + 128 * 4
    else:
        assert isinstance(master, Nf4Stored)
        assert master.nbytes == 128 * 256 // 2 + 128 * (256 // 32) * 2
    shapes = {"weight": (lin.weight.shape, torch.bfloat16), "bias": (lin.bias.shape, torch.bfloat16)}
    assert bytes_at(shapes, Place(CPU, form), torch.bfloat16) == master.nbytes + 128 * 2
    managed = enable_vram_management(lin, vram_config=cfg(form), vram_limit=None)
    managed(torch.randn(2, 256).bfloat16())
    assert layer_state_bytes(managed)["preparing"] == master.nbytes + 128 * 2
    assert vram_budget(managed).snapshot().resident_bytes == master.nbytes + 128 * 2


def test_nf4_rows_that_do_not_split_into_groups_fall_back_to_int8(caplog):
    with caplog.at_level(logging.WARNING):
        stored = store(torch.randn(8, 48), Place(CPU, NF4), torch.bfloat16)
    assert isinstance(stored, Int8Stored)
    assert "stored as int8 instead" in caplog.text and "[8, 48]" in caplog.text
    assert bytes_at({"w": (torch.Size([8, 48]), torch.float32)}, Place(CPU, NF4), torch.bfloat16) == stored.nbytes
    with pytest.raises(ValueError, match="groups of 32"):
        nf4_quantize(torch.randn(8, 48))
    # 1-D tensors stay in the computation dtype
    assert isinstance(store(torch.randn(48), Place(CPU, NF4), torch.bfloat16), PlainStored)


def test_config_names_the_forms():
    config = VramConfig.from_dict(cfg(NF4))
    assert config.offload_dtype == NF4 and config.place("preparing").is_quantized
    assert config.storage_name == "nf4"
    assert VramConfig.from_dict({"offload_dtype": torch.int8, "computation_device": "cpu"}).offload_dtype == INT8
    with pytest.raises(ValueError, match="storage dtypes here"):
        VramConfig.from_dict({"computation_dtype": "int8", "computation_device": "cpu"})
    with pytest.raises(ValueError, match="int8, nf4"):
        VramConfig.from_dict({"offload_dtype": "int3", "computation_device": "cpu"})


MODELS = ["QwenImageTransformer2DModel", "FluxTransformer2DModel", "ZImageTransformer2DModel", "CLIPTextModel"]


@pytest.mark.parametrize("form", [INT8, NF4])
@pytest.mark.parametrize("name", MODELS)
def test_tiny_models_bitwise_equal_across_vram_limits_and_the_scheduler(name, form):
    from engine.transfer.devices import CpuBackend

    plain, inputs = tiny_model(name, torch.bfloat16)
    expected = run_model(plain, inputs)
    outputs = []
    for limit, resident_form, scheduler in ((None, True, False), (0, True, False), (0.0005, True, False), (None, False, False), (0, True, True)):
        model = enable_vram_management(copy.deepcopy(plain), vram_config=cfg(form, resident_form), vram_limit=limit)
        if scheduler:
            runtime_of(model).use_scheduler(CpuBackend())
        for _ in range(2 if scheduler else 1):
            outputs.append(run_model(model, inputs))
        if scheduler:
            assert runtime_of(model).scheduler.groups and runtime_of(model).stats.sync_fallbacks == 0
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])
    assert rel_error(outputs[0], expected) < (0.05 if form == INT8 else 0.3)


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    plain, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    directory = save_sharded(plain, tmp_path_factory.mktemp("qwen"), shards=3)
    return type(plain), directory, plain, inputs


@pytest.mark.parametrize("form", [INT8, NF4])
def test_load_model_quantizes_chunk_by_chunk_bitwise_like_store(qwen_checkpoint, form, monkeypatch):
    import engine.loading.loader as loader

    cls, directory, plain, inputs = qwen_checkpoint
    monkeypatch.setattr(loader, "QUANT_CHUNK_BYTES", 4096)  # many chunks per tensor
    place = Place(CPU, form)
    for shard in directory.glob("*.safetensors"):
        f = SafetensorsFile(shard)
        for key, entry in f.entries.items():
            ours, theirs = read_stored(entry, place, torch.bfloat16), store(f.read(entry), place, torch.bfloat16)
            assert type(ours) is type(theirs)
            for (_, a), (_, b) in zip(ours.parts(), theirs.parts()):
                assert torch.equal(a, b), key
    reference = run_model(enable_vram_management(copy.deepcopy(plain), vram_config=cfg(form), vram_limit=0), inputs)
    for limit in (None, 0):
        model = load_model(cls, directory, vram_config=cfg(form), vram_limit=limit)
        assert runtime_of(model).host_arena is not None
        assert torch.equal(run_model(model, inputs), reference)


@pytest.mark.parametrize("form", [INT8, NF4])
def test_disk_offload_with_a_quantized_onload_and_resident_form(qwen_checkpoint, form):
    cls, directory, plain, inputs = qwen_checkpoint
    reference = run_model(enable_vram_management(copy.deepcopy(plain), vram_config=cfg(form), vram_limit=0), inputs)
    config = {"offload_dtype": "disk", "offload_device": "disk", "onload_dtype": form, "onload_device": "cpu",
              "preparing_dtype": form, "computation_device": "cpu", "computation_dtype": "bfloat16"}
    for limit in (0, None):
        model = load_model(cls, directory, vram_config=config, vram_limit=limit)
        assert torch.equal(run_model(model, inputs), reference)


def test_nf4_codes_are_the_nearest_level_but_within_half_a_bin_of_a_midpoint():
    from engine.storage import nf4

    x = torch.cat([torch.rand(200_000) * 2.2 - 1.1, nf4._MIDPOINTS, nf4._MIDPOINTS + 1e-6, torch.tensor([-1.0, 1.0, 0.0])])
    ours = nf4.nearest_codes(x)
    exact = torch.bucketize(x, nf4._MIDPOINTS).to(torch.uint8)
    differ = ours != exact
    near = (x.unsqueeze(1) - nf4._MIDPOINTS).abs().amin(1) <= 1.0 / nf4._BINS
    assert not (differ & ~near).any()
    assert (ours.long() - exact.long()).abs().max() <= 1


@pytest.mark.parametrize("form", [INT8, NF4])
def test_recording_device_orders_the_quantized_slots_and_pins_their_parts(form, monkeypatch):
    """The GPU path's rules with the recording fake device: every group's int8/nf4 parts are
    copied before its layers compute, no slot is overwritten early, and the pinned arena holds
    the stored parts (data + scales) in place of pageable masters."""
    from engine.transfer.pinned import PinnedBudget
    from tests.test_scheduler import GB, X, PinningBackend, log_computes, make_stack, name_blocks

    plain = make_stack()
    config = {**cfg(form), "computation_device": "cpu"}
    reference = enable_vram_management(copy.deepcopy(plain), vram_config=config, vram_limit=0)
    expected = reference(X)
    backend = PinningBackend()
    model = enable_vram_management(copy.deepcopy(plain), vram_config=config, vram_limit=0)
    name_blocks(model)
    runtime = runtime_of(model)
    runtime.use_scheduler(backend, PinnedBudget(limit_bytes=10 * GB))
    log_computes(backend, monkeypatch)
    for _ in range(4):
        assert torch.equal(model(X), expected)
    backend.check_ordering()
    assert runtime.stats.sync_fallbacks == 0 and runtime.scheduler.groups
    parts = [t for r in runtime.layers for s in r.masters.values() for _, t in s.parts()]
    assert parts and all(backend.is_pinned(t) for t in parts)
    kinds = {type(s).__name__ for r in runtime.layers for s in r.masters.values()}
    assert ("Int8Stored" if form == INT8 else "Nf4Stored") in kinds
    # the slots hold the stored bytes: a streamed step copies data + scales, nothing more
    stored = sum(s.nbytes for r in runtime.layers for s in r.masters.values())
    assert runtime.scheduler.slot_bytes < stored
