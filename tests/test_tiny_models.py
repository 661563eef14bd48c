"""The tiny single-model fixtures run, are deterministic, and honour dtype and seed."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.tiny_models import TINY_MODEL_NAMES, call, run_model, tiny_model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_names_cover_the_engine_targets() -> None:
    assert set(TINY_MODEL_NAMES) == {
        "QwenImageTransformer2DModel",
        "FluxTransformer2DModel",
        "ZImageTransformer2DModel",
        "Flux2Transformer2DModel",
        "UNet2DConditionModel",
        "AutoencoderKL",
        "AutoencoderKLQwenImage",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3Model",
        "CLIPTextModel",
        "T5EncoderModel",
    }


def test_unknown_name_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown tiny model"):
        tiny_model("NoSuchModel")


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_runs_and_is_deterministic(name: str) -> None:
    model, inputs = tiny_model(name)
    assert type(model).__name__ == name
    assert not model.training
    out = run_model(model, inputs)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0
    assert torch.equal(run_model(model, inputs), out)  # same call, same result

    again, again_inputs = tiny_model(name)
    assert same_weights(model, again)
    assert torch.equal(run_model(again, again_inputs), out)


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_seed_changes_the_weights(name: str) -> None:
    a, _ = tiny_model(name, seed=0)
    b, _ = tiny_model(name, seed=1)
    assert not same_weights(a, b)


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_bf16_matches_fp32_roughly(name: str) -> None:
    """bf16 weights are the fp32 weights rounded, so outputs agree to bf16 precision."""
    ref_model, ref_inputs = tiny_model(name)
    model, inputs = tiny_model(name, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = run_model(model, inputs)
    assert out.dtype == torch.bfloat16
    reference = run_model(ref_model, ref_inputs)
    error = (out.float() - reference).norm() / reference.norm()
    assert error < 0.1, float(error)


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("FluxTransformer2DModel")
    assert torch.equal(torch.rand(3), expected)


def test_call_decodes_with_vaes() -> None:
    model, inputs = tiny_model("AutoencoderKL")
    with torch.no_grad():
        sample = call(model, inputs).sample
    assert sample.shape == (1, 3, 64, 64)
