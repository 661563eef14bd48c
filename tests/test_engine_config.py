"""vram_config / vram_limit validation: clear errors, nothing half-applied."""

import copy

import pytest
import torch
from torch import nn

from engine import VramConfig, enable_vram_management, is_managed, parse_vram_limit
from engine.config import CONFIG_KEYS

CPU_BF16 = {key: ("cpu" if key.endswith("device") else "bfloat16") for key in CONFIG_KEYS}


def test_full_config_accepts_names_and_dtypes():
    cfg = VramConfig.from_dict(
        {
            "offload_dtype": "float8_e4m3fn",
            "offload_device": "cpu",
            "onload_dtype": torch.float8_e4m3fn,
            "onload_device": torch.device("cpu"),
            "preparing_dtype": "torch.float8_e5m2",
            "preparing_device": "cpu",
            "computation_dtype": "bf16",
            "computation_device": "cpu",
        }
    )
    assert cfg.offload_dtype is torch.float8_e4m3fn
    assert cfg.preparing_dtype is torch.float8_e5m2
    assert cfg.computation_dtype is torch.bfloat16
    assert cfg.computation_device == torch.device("cpu")
    assert cfg.stores_fp8


def test_missing_keys_get_documented_defaults():
    cfg = VramConfig.from_dict({"computation_device": "cpu"})
    assert cfg.computation_dtype is torch.bfloat16
    assert (cfg.preparing_device, cfg.preparing_dtype) == (cfg.computation_device, cfg.computation_dtype)
    assert (cfg.offload_device, cfg.offload_dtype) == (torch.device("cpu"), torch.bfloat16)
    assert (cfg.onload_device, cfg.onload_dtype) == (cfg.offload_device, cfg.offload_dtype)


def test_disk_config_parses():
    cfg = VramConfig.from_dict(
        {"offload_dtype": "disk", "offload_device": "disk", "onload_dtype": "disk", "onload_device": "disk", "computation_device": "cpu"}
    )
    assert cfg.uses_disk


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("offload_dtype", "float9", "offload_dtype"),
        ("computation_dtype", "int8", "computation_dtype"),
        ("computation_dtype", "float8_e4m3fn", "storage dtype"),
        ("preparing_dtype", "disk", '"disk" is only accepted'),
        ("preparing_device", "disk", "preparing_device"),
        ("onload_device", "tpu", "onload_device"),
        ("offload_device", 3.5, "offload_device"),
        ("computation_dtype", torch.int64, "computation_dtype"),
    ],
)
def test_bad_values_name_the_key_and_list_accepted(key, value, needle):
    cfg = dict(CPU_BF16, **{key: value})
    with pytest.raises(ValueError) as err:
        VramConfig.from_dict(cfg)
    msg = str(err.value)
    assert needle in msg
    assert key in msg
    if "dtype" in key and "storage" not in needle and "only accepted" not in needle:
        assert "bfloat16" in msg and "float8_e4m3fn" in msg  # lists what is accepted


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(ValueError, match="no usable CUDA device"):
        VramConfig.from_dict(dict(CPU_BF16, computation_device="cuda"))


def test_unknown_key_and_half_disk():
    with pytest.raises(ValueError, match="unknown key"):
        VramConfig.from_dict(dict(CPU_BF16, offload_dtpye="bf16"))
    with pytest.raises(ValueError, match="both"):
        VramConfig.from_dict(dict(CPU_BF16, offload_device="disk"))
    with pytest.raises(ValueError, match="offload"):
        VramConfig.from_dict(dict(CPU_BF16, onload_device="disk", onload_dtype="disk"))


@pytest.mark.parametrize("value", [-1, -0.5, "lots", float("nan"), True, [4], object()])
def test_bad_vram_limit(value):
    with pytest.raises(ValueError, match="vram_limit"):
        parse_vram_limit(value)


@pytest.mark.parametrize("value,expected", [(None, None), (0, 0.0), ("4", 4.0), (2.5, 2.5), (float("inf"), None), ("auto", None)])
def test_good_vram_limit(value, expected):
    assert parse_vram_limit(value) == expected


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(torch.bfloat16)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"vram_config": dict(CPU_BF16, offload_dtype="nope")}, "offload_dtype"),
        ({"vram_config": CPU_BF16, "vram_limit": -2}, "vram_limit"),
        ({"vram_config": dict(CPU_BF16, offload_dtype="disk", offload_device="disk", onload_dtype="disk", onload_device="disk")}, "load_model"),
        ({"vram_config": CPU_BF16, "module_map": {nn.Linear: nn.Linear}}, "module_map"),
        ({"vram_config": CPU_BF16, "module_map": {"torch.nn.NoSuchLayer": "engine.ManagedModule"}}, "cannot import"),
    ],
)
def test_rejected_config_leaves_model_untouched(kwargs, needle):
    model = _model()
    before = {k: v for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    params = [id(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=needle):
        enable_vram_management(model, **kwargs)
    assert not is_managed(model)
    assert [type(m) for m in model.modules()] == classes
    assert [id(p) for p in model.parameters()] == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_enable_twice_is_refused():
    model = enable_vram_management(_model(), vram_config=CPU_BF16)
    with pytest.raises(ValueError, match="already managed"):
        enable_vram_management(model, vram_config=CPU_BF16)


def test_failure_midway_rolls_back(monkeypatch):
    """A failure while storing masters (e.g. out of memory) restores every layer."""
    import engine.management as management

    model = _model()
    reference = copy.deepcopy(model)
    calls = {"n": 0}
    real_store = management.store

    def flaky_store(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated")
        return real_store(*args, **kwargs)

    monkeypatch.setattr(management, "store", flaky_store)
    with pytest.raises(MemoryError):
        enable_vram_management(model, vram_config=CPU_BF16)
    assert not is_managed(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch.equal(model(x), reference(x))
