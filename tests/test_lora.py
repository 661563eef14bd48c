"""LoRA under every memory strategy (engine.lora): against diffusers' own loading, across
vram_limits, disk offload and FP8/int8/NF4 bases, hot-swapped without reading a base weight, and bad input.

LoRAs are made by peft on the tiny real models (tests.fixtures.tiny_loras) and saved in
diffusers' layout (with the peft config as metadata, so alpha != rank is exercised) and in
kohya/sd-scripts' layout (alpha keys; Flux with Black Forest Labs' original layer names)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine import (
    LoraError,
    active_loras,
    enable_vram_management,
    load_lora,
    load_model,
    remove_lora,
    set_lora_strength,
    vram_budget,
)
from tests.fixtures.tiny_loras import flux_bfl_name, peft_lora, reference, save_diffusers, save_kohya
from tests.fixtures.tiny_models import run_model, tiny_model

BF16 = {"computation_device": "cpu", "computation_dtype": "bfloat16"}
FP32_MASTERS = dict(BF16, offload_dtype="float32", onload_dtype="float32")
FP8 = dict(BF16, offload_dtype="float8_e4m3fn", onload_dtype="float8_e4m3fn", preparing_dtype="float8_e4m3fn")
DISK = dict(BF16, offload_device="disk", offload_dtype="disk", onload_device="disk", onload_dtype="disk")
GB = 1024**3

# model -> (peft target modules, component prefix, kohya prefix, kohya renamer)
CASES = {
    "FluxTransformer2DModel": (["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "ff.net.0.proj", "to_add_out", "proj_out"], "transformer", "lora_unet", flux_bfl_name),
    "QwenImageTransformer2DModel": (["to_q", "to_k", "to_v", "to_out.0", "img_mlp.net.2"], "transformer", "lora_unet", None),
    "ZImageTransformer2DModel": (["to_q", "to_k", "to_v", "to_out.0", "w1"], "transformer", "lora_unet", None),
    "Flux2Transformer2DModel": (["to_q", "to_k", "to_v", "to_out.0"], "transformer", None, None),
    "UNet2DConditionModel": (["to_q", "to_k", "to_v", "to_out.0", "conv1"], "unet", "lora_unet", None),  # conv1: 3x3 convolutions
}
LAYOUTS = [(name, layout) for name, case in CASES.items() for layout in ("diffusers", "kohya") if layout == "diffusers" or case[2]]


def _lora_file(name, layout, tmp_path, model, seed=3, alpha=8.0):
    targets, prefix, kohya_prefix, rename = CASES[name]
    sd, meta = peft_lora(model, targets, seed=seed, alpha=alpha)
    path = tmp_path / f"{name}-{layout}-{seed}.safetensors"
    if layout == "diffusers":
        return save_diffusers(sd, prefix, path, meta)
    return save_kohya(sd, kohya_prefix, path, alpha, rename)


def _partial_limit(plain):
    probe = enable_vram_management(copy.deepcopy(plain), vram_config=FP32_MASTERS, vram_limit=0)
    reserve = vram_budget(probe).streaming_reserve()
    return (reserve + sum(p.numel() * 2 for p in plain.parameters()) // 2) / GB


@pytest.mark.parametrize("name,layout", LAYOUTS)
def test_matches_diffusers_bitwise_at_every_vram_limit(name, layout, tmp_path):
    plain, inputs = tiny_model(name, torch.bfloat16)
    path = _lora_file(name, layout, tmp_path, plain)
    expected = run_model(reference(plain, path), inputs)
    assert not torch.equal(expected, run_model(plain, inputs)), "the LoRA must change the output"
    for limit in (None, 0, _partial_limit(plain)):
        model = enable_vram_management(copy.deepcopy(plain), vram_config=FP32_MASTERS, vram_limit=limit)
        handle = load_lora(model, path)
        assert handle.layers > 0 and handle.nbytes > 0
        for _ in range(2):
            assert torch.equal(run_model(model, inputs), expected), f"{name}/{layout} differs at vram_limit={limit}"
        budget = vram_budget(model)
        if limit not in (None,):
            assert budget.peak_bytes <= max(budget.limit_bytes, budget.smallest_feasible_limit())


def test_strengths_and_several_loras_match_diffusers_set_adapters(tmp_path):
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    name = "FluxTransformer2DModel"
    plain, inputs = tiny_model(name, torch.bfloat16)
    first = _lora_file(name, "diffusers", tmp_path, plain, seed=3)
    second = _lora_file(name, "kohya", tmp_path, plain, seed=4)
    ref = reference(plain, first)
    from diffusers import FluxPipeline

    sd, alphas = FluxPipeline.lora_state_dict(str(second), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(sd, alphas, ref, adapter_name="b")
    set_weights_and_activate_adapters(ref, ["a", "b"], [0.8, 0.5])
    expected = run_model(ref, inputs)

    model = enable_vram_management(copy.deepcopy(plain), vram_config=BF16, vram_limit=0)
    h1 = load_lora(model, first, strength=0.3)
    h2 = load_lora(model, second, strength=0.5)
    set_lora_strength(model, h1, 0.8)
    assert [h.name for h in active_loras(model)] == [h1.name, h2.name]
    assert torch.equal(run_model(model, inputs), expected)
    remove_lora(model, h2)
    set_weights_and_activate_adapters(ref, ["a"], [0.8])
    assert torch.equal(run_model(model, inputs), run_model(ref, inputs))
    remove_lora(model, h1)
    assert torch.equal(run_model(model, inputs), run_model(plain, inputs))
    assert active_loras(model) == []


def test_text_encoder_lora_matches_diffusers(tmp_path):
    plain, inputs = tiny_model("CLIPTextModel", torch.bfloat16)
    sd, meta = peft_lora(plain, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    path = save_diffusers(sd, "text_encoder", tmp_path / "te.safetensors")
    expected = run_model(reference(plain, path, text_encoder=True), inputs)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=BF16, vram_limit=0)
    handle = load_lora(model, path)
    assert handle.components == ("text_encoder",)
    out = run_model(model, inputs)
    assert not torch.equal(out, run_model(plain, inputs))
    assert torch.equal(out, expected)


def test_factors_are_fixed_bytes_the_planner_sees(tmp_path):
    name = "QwenImageTransformer2DModel"
    plain, _ = tiny_model(name, torch.bfloat16)
    path = _lora_file(name, "diffusers", tmp_path, plain)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=BF16, vram_limit=0)
    budget = vram_budget(model)
    fixed, floor = budget.fixed_bytes, budget.smallest_feasible_limit()
    handle = load_lora(model, path)
    assert budget.fixed_bytes == fixed + handle.nbytes
    assert budget.smallest_feasible_limit() == floor + handle.nbytes
    assert budget.last_plan.smallest_feasible_limit == floor + handle.nbytes
    remove_lora(model, handle)
    assert budget.fixed_bytes == fixed


def _saved(name, tmp_path):
    plain, inputs = tiny_model(name, torch.bfloat16)
    directory = tmp_path / "model"
    plain.save_pretrained(directory)
    return plain, inputs, directory


def test_disk_offload_and_hot_swap_read_no_base_weight(tmp_path, monkeypatch):
    """Adding, re-weighting and removing LoRAs between forwards reads only the LoRA files."""
    import safetensors

    from engine.storage import disk

    name = "FluxTransformer2DModel"
    plain, inputs, directory = _saved(name, tmp_path)
    path = _lora_file(name, "diffusers", tmp_path, plain)
    expected = run_model(reference(plain, path), inputs)
    model = load_model(type(plain), directory, vram_config=DISK, vram_limit=0, prefetch=False)
    reads: list[str] = []
    real_read_into, real_safe_open, real_open = disk.SafetensorsFile.read_into, safetensors.safe_open, open

    def read_into(self, *args, **kwargs):
        reads.append(str(self.path))
        return real_read_into(self, *args, **kwargs)

    def safe_open(filename, *args, **kwargs):
        reads.append(str(filename))
        return real_safe_open(filename, *args, **kwargs)

    monkeypatch.setattr(disk.SafetensorsFile, "read_into", read_into)
    monkeypatch.setattr(safetensors, "safe_open", safe_open)
    run_model(model, inputs)  # base weights stream from their files in every forward
    assert any(str(directory) in r for r in reads)
    reads.clear()
    with monkeypatch.context() as m:
        m.setattr("builtins.open", lambda f, *a, **k: (reads.append(str(f)), real_open(f, *a, **k))[1])
        handle = load_lora(model, path, strength=1.0)
        set_lora_strength(model, handle, 0.5)
        set_lora_strength(model, handle, 1.0)
        remove_lora(model, handle)
        handle = load_lora(model, path)
    # only the LoRA file is read (the RAM budget's look at /proc/meminfo is no weight file)
    weight_files = [r for r in reads if r.endswith((".safetensors", ".gguf", ".bin"))]
    assert str(path) in weight_files and all(r == str(path) for r in weight_files), weight_files
    assert torch.equal(run_model(model, inputs), expected)


QUANTIZED = {
    "fp8": FP8,
    "int8": dict(BF16, offload_dtype="int8", onload_dtype="int8", preparing_dtype="int8"),
    "nf4": dict(BF16, offload_dtype="nf4", onload_dtype="nf4", preparing_dtype="nf4"),
}


@pytest.mark.parametrize("form", sorted(QUANTIZED))
@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "QwenImageTransformer2DModel"])
def test_quantized_base_with_lora_no_worse_than_the_base_quantization(name, form, tmp_path):
    """FP8, int8 and 4-bit NF4 bases: the LoRA's post-step never reads the stored form, so the
    error against the bf16 base + LoRA is the base's own quantization error."""
    plain, inputs = tiny_model(name, torch.bfloat16)
    path = _lora_file(name, "diffusers", tmp_path, plain)
    bf16_lora = run_model(reference(plain, path), inputs).float()
    base = run_model(plain, inputs).float()
    quantized = enable_vram_management(copy.deepcopy(plain), vram_config=QUANTIZED[form], vram_limit=0)
    base_err = ((run_model(quantized, inputs).float() - base).norm() / base.norm()).item()
    load_lora(quantized, path)
    lora_err = ((run_model(quantized, inputs).float() - bf16_lora).norm() / bf16_lora.norm()).item()
    assert 0 < lora_err <= base_err * 1.25 + 1e-3, (form, lora_err, base_err)


# --- bad input: clear errors, and the previous LoRA set stays active ------------------------------------
@pytest.fixture
def flux_with_lora(tmp_path):
    plain, inputs = tiny_model("FluxTransformer2DModel", torch.bfloat16)
    path = _lora_file("FluxTransformer2DModel", "diffusers", tmp_path, plain)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=BF16, vram_limit=0)
    handle = load_lora(model, path)
    return model, inputs, handle, run_model(model, inputs)


def _unchanged(model, inputs, handle, before):
    assert [h.id for h in active_loras(model)] == [handle.id]
    assert torch.equal(run_model(model, inputs), before)


def test_lora_of_another_family_is_refused(flux_with_lora, tmp_path):
    model, inputs, handle, before = flux_with_lora
    qwen, _ = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    sd, meta = peft_lora(qwen, ["img_mlp.net.2", "txt_mlp.net.2"])
    path = save_diffusers(sd, "transformer", tmp_path / "qwen_style.safetensors", meta)
    with pytest.raises(LoraError, match=r"qwen_style\.safetensors.*(another model family|name no).*img_mlp"):
        load_lora(model, path)
    _unchanged(model, inputs, handle, before)


def test_mismatched_shapes_are_refused(flux_with_lora, tmp_path):
    model, inputs, handle, before = flux_with_lora
    plain, _ = tiny_model("FluxTransformer2DModel", torch.bfloat16)
    sd, meta = peft_lora(plain, ["to_q"])
    sd = {k: (torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v) for k, v in sd.items()}
    path = save_diffusers(sd, "transformer", tmp_path / "wide.safetensors", meta)
    with pytest.raises(LoraError, match=r"wide\.safetensors does not fit.*transformer_blocks\.0\.attn\.to_q.*lora_A"):
        load_lora(model, path)
    _unchanged(model, inputs, handle, before)


def test_unknown_keys_are_listed(flux_with_lora, tmp_path):
    model, inputs, handle, before = flux_with_lora
    plain, _ = tiny_model("FluxTransformer2DModel", torch.bfloat16)
    sd, meta = peft_lora(plain, ["to_q"])
    sd["transformer_blocks.0.attn.no_such_layer.lora_A.weight"] = torch.zeros(4, 32)
    sd["transformer_blocks.0.attn.no_such_layer.lora_B.weight"] = torch.zeros(32, 4)
    path = save_diffusers(sd, "transformer", tmp_path / "extra.safetensors", meta)
    with pytest.raises(LoraError, match=r"extra\.safetensors: 1 keys name no LoRA layer.*transformer\.transformer_blocks\.0\.attn\.no_such_layer"):
        load_lora(model, path)
    _unchanged(model, inputs, handle, before)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_pickled_lora_is_refused(flux_with_lora, tmp_path, suffix):
    model, inputs, handle, before = flux_with_lora
    path = tmp_path / f"old{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(LoraError, match=r"pickled.*only \.safetensors"):
        load_lora(model, path)
    _unchanged(model, inputs, handle, before)


def test_missing_file_is_named(flux_with_lora, tmp_path):
    model, inputs, handle, before = flux_with_lora
    with pytest.raises(LoraError, match="LoRA file not found: .*nowhere.safetensors"):
        load_lora(model, tmp_path / "nowhere.safetensors")
    _unchanged(model, inputs, handle, before)


def test_unmanaged_model_is_refused():
    plain, _ = tiny_model("FluxTransformer2DModel", torch.bfloat16)
    with pytest.raises(LoraError, match="not managed"):
        load_lora(plain, "x.safetensors")


# --- a whole pipeline: the LoRA's keys go to their components (text encoders too) -----------------------
def test_pipeline_lora_reaches_the_text_encoders(tmp_path):
    """An SDXL LoRA with UNet and both text-encoder parts: each goes to its component; each text
    encoder then computes as peft's own injection of those factors (diffusers' text-encoder path)."""
    from engine.generation.pipelines.managed import build_pipeline
    from tests.fixtures.tiny_repos import write_tiny_repo

    repo = write_tiny_repo("sdxl", tmp_path / "sdxl")
    pipe = build_pipeline(repo, BF16, 0)
    parts = {}
    for name, targets in (("unet", ["to_q", "to_v"]), ("text_encoder", ["q_proj", "fc1"]), ("text_encoder_2", ["k_proj", "out_proj"])):
        sd, _ = peft_lora(_plain_copy(repo, name), targets, seed=len(name))
        parts.update({f"{name}.{k}": v for k, v in sd.items()})
    path = tmp_path / "sdxl_all.safetensors"
    from safetensors.torch import save_file

    save_file(parts, str(path))
    handle = load_lora(pipe, path, strength=0.7)
    assert set(handle.components) == {"unet", "text_encoder", "text_encoder_2"}
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    for name in ("text_encoder", "text_encoder_2"):
        ref = reference(_plain_copy(repo, name), path, text_encoder=True, strength=0.7, prefix=name)
        with torch.no_grad():
            expected = ref(ids, output_hidden_states=True).hidden_states[-2]
            out = pipe.components[name](ids, output_hidden_states=True).hidden_states[-2]
            untouched = _plain_copy(repo, name)(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(out, expected) and not torch.equal(out, untouched), name
    image = pipe.generate("a cat", width=64, height=64, steps=1, guidance=5.0, seed=1)
    assert image is not None
    pipe.close()


def _plain_copy(repo, name):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    from diffusers import UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}[name]
    return cls.from_pretrained(repo / name, torch_dtype=torch.bfloat16).eval()


def test_disable_gives_the_plain_model_back_without_the_lora(tmp_path):
    from engine import disable_vram_management

    name = "QwenImageTransformer2DModel"
    plain, inputs = tiny_model(name, torch.bfloat16)
    path = _lora_file(name, "diffusers", tmp_path, plain)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=BF16, vram_limit=None)
    load_lora(model, path)
    disable_vram_management(model)
    assert torch.equal(run_model(model, inputs), run_model(plain, inputs))


def test_scheduler_route_takes_the_lora_too(tmp_path):
    """The transfer scheduler's route (slots, copy stream, events; a recording device on the CPU)
    runs the same post-step: bitwise equal to diffusers, no synchronous fallback."""
    from engine import runtime_of
    from tests.test_scheduler import RecordingBackend

    name = "FluxTransformer2DModel"
    plain, inputs = tiny_model(name, torch.bfloat16)
    path = _lora_file(name, "diffusers", tmp_path, plain)
    expected = run_model(reference(plain, path), inputs)
    model = enable_vram_management(copy.deepcopy(plain), vram_config=BF16, vram_limit=0)
    backend = RecordingBackend()
    runtime = runtime_of(model)
    runtime.use_scheduler(backend)
    load_lora(model, path)
    run_model(model, inputs)  # the first forward traces the order
    fallbacks = runtime.stats.sync_fallbacks
    for _ in range(2):
        assert torch.equal(run_model(model, inputs), expected)
    assert runtime.scheduler.groups and runtime.stats.sync_fallbacks == fallbacks
    backend.check_ordering()
