"""Issue #23's models on their tiny repos (tests/fixtures/tiny_repos.py, the real layout), through
the engine: text-to-image, reference images / image-to-image where the family has them, and the
same pixels whatever the memory strategy (RAM or disk offload, VRAM limit none / 0 / partial)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.generation.pipelines import FAMILIES, build_pipeline
from engine.generation.settings import vram_config_for
from model_registry import get_model, list_models
from tests.fixtures.tiny_repos import TINY_DEFAULTS, write_tiny_repo

#: the new families of issue #23 (the new models of existing families run on those families' tiny repos)
NEW_FAMILIES = ("flux2", "krea2", "hunyuan-image", "qwen-image-21")
#: every model the issue adds, and its family
NEW_MODELS = {
    "qwen-image-2512": "qwen-image",
    "qwen-image-2512-gguf-q4_k_m": "qwen-image",
    "qwen-image-2512-gguf-q8_0": "qwen-image",
    "qwen-image-edit-2511": "qwen-image-edit",
    "z-image": "z-image",
    "flux2-klein-9b": "flux2-klein",
    "flux2-dev": "flux2",
    "flux2-dev-gguf-q4_k_m": "flux2",
    "flux2-dev-gguf-q8_0": "flux2",
    "krea2": "krea2",
    "hunyuanimage-2.1": "hunyuan-image",
    "qwen-image-2.1": "qwen-image-21",
}

STRATEGIES = {  # name: (disk offload, VRAM limit in GB)
    "ram-unlimited": (False, None),
    "ram-0": (False, 0),
    "ram-partial": (False, 0.0001),
    "disk-0": (True, 0),
    "disk-unlimited": (True, None),
}


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("current")
    return {family: write_tiny_repo(family, root / family) for family in NEW_FAMILIES}


def generate(mp, family, **kw):
    d = TINY_DEFAULTS[family]
    return np.asarray(mp.generate("a red fox in the snow", "", width=d.width, height=d.height, steps=2, guidance=d.guidance, seed=3, **kw))


def test_every_new_model_is_catalogued_in_its_family():
    ids = {e.id for e in list_models()}
    assert set(NEW_MODELS) <= ids
    for model_id, family in NEW_MODELS.items():
        entry = get_model(model_id)
        assert entry.family == family and entry.hf_repo and not entry.verified, model_id
        assert entry.components[entry.adapter.denoiser].parameters, model_id


def test_flux2_dev_is_gated_non_commercial_and_about_110_gb():
    entry = get_model("flux2-dev")
    assert entry.gated and "non-commercial" in entry.licence
    assert 105e9 < entry.bytes_bf16 < 115e9  # the model card's "about 110 GB in bf16"
    assert 31e9 < entry.components["transformer"].parameters < 33e9
    assert 23e9 < entry.components["text_encoder"].parameters < 24.5e9


@pytest.mark.parametrize("model_id", ["flux2-dev", "flux2-klein-9b"])
def test_a_gated_download_without_a_token_says_what_to_do(monkeypatch, model_id):
    import model_registry
    from model_registry import hf_source
    from model_registry.types import UserFacingError

    monkeypatch.setattr(hf_source, "get_token", lambda: None)
    with pytest.raises(UserFacingError) as info:
        model_registry.download(model_id)
    message = str(info.value)
    assert f"https://huggingface.co/{get_model(model_id).hf_repo}" in message
    assert "HF_TOKEN" in message and "licence" in message


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_text_to_image_is_the_same_under_every_strategy(repos, family):
    images = {}
    for name, (disk, limit) in STRATEGIES.items():
        mp = build_pipeline(repos[family], vram_config_for(False, disk, "cpu"), limit)
        images[name] = generate(mp, family)
    first = images["ram-unlimited"]
    assert first.shape == (64, 64, 4 if family == "qwen-image-21" else 3) and first.std() > 0  # 2.1 draws RGBA
    for name, image in images.items():
        assert np.array_equal(image, first), name


def test_the_families_without_input_images_refuse_none_they_have():
    assert {f for f in NEW_FAMILIES if FAMILIES[f].image_mode == "none"} == {"krea2", "hunyuan-image"}  # text only


# Qwen-Image-2.1 resizes every condition image to 1024² for its VAE and vision tower
# (reference_area), which the tiny VAE takes minutes to encode on a CPU: not run here
@pytest.mark.parametrize("family", [f for f in NEW_FAMILIES if FAMILIES[f].image_mode != "none" and f != "qwen-image-21"])
def test_input_images_change_the_result_and_stay_bitwise_across_limits(repos, family):
    fam = FAMILIES[family]
    reference = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 64, 3)))
    kw = {"images": [reference]} | ({"strength": 0.6} if fam.image_mode == "img2img" else {})
    plain = generate(build_pipeline(repos[family], vram_config_for(False, False, "cpu"), None), family)
    edits = [
        generate(build_pipeline(repos[family], vram_config_for(False, disk, "cpu"), limit), family, **kw)
        for disk, limit in ((False, None), (True, 0), (False, 0.0001))
    ]
    assert not np.array_equal(edits[0], plain)  # the reference reached the denoiser
    assert all(np.array_equal(e, edits[0]) for e in edits[1:])


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_live_preview_reads_the_latents_each_pipeline_hands_out(repos, family):
    """on_latents gets the pipeline's latents each step, and the preview makes an RGB image of them
    (the family's factors where published, the generic view for the 64-channel VAEs)."""
    from engine.generation import preview

    d = TINY_DEFAULTS[family]
    mp = build_pipeline(repos[family], vram_config_for(False, False, "cpu"), None)
    seen = []
    mp.generate("a cat", "", width=d.width, height=d.height, steps=2, guidance=d.guidance, seed=1,
                on_latents=lambda i, n, latents: seen.append((i, n, latents.clone())))
    assert [(i, n) for i, n, _ in seen] == [(1, 2), (2, 2)]
    image = preview.latents_to_image(seen[-1][2], FAMILIES[family].latent_rgb, d.width, d.height)
    assert image.mode == "RGB" and image.size[0] >= 2 and image.size[1] >= 2, image.size
    mp.close()


def test_the_picker_groups_models_by_family_with_size_and_download_state(tmp_path):
    from model_registry.registry import model_choices
    from ui.formatting import model_choices as dropdown

    choices = model_choices(tmp_path)  # an empty models folder: nothing downloaded but the demo
    assert choices[0].is_demo
    families = [c.family for c in choices[1:]]
    runs = [f for i, f in enumerate(families) if i == 0 or f != families[i - 1]]
    assert len(runs) == len(set(runs)), runs  # each family's models sit together
    labels = dict((v, k) for k, v in dropdown(choices))
    for model_id, family in NEW_MODELS.items():
        entry = get_model(model_id)
        label = labels[model_id]
        assert label.startswith(f"{family} › {entry.name} · ") and "not downloaded" in label, label
        assert f"{entry.size_bytes / 1e9:.1f} GB" in label, label


#: the stored class each form gives a weight matrix (engine.storage)
FORM_CLASSES = {"fp8": "ScaledFp8Stored", "int8": "Int8Stored", "nf4": "Nf4Stored"}


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("form", sorted(FORM_CLASSES))
def test_every_storage_form_holds_every_component_text_encoders_included(repos, family, form):
    """FP8 / int8 / NF4 on the whole pipeline: every weighted component's matrices (the text
    encoders' too: FLUX.2 [dev]'s 24B Mistral fits a small machine only so) are stored in the form,
    and the pipeline still draws a (different, quantized) image."""
    from engine.management import runtime_of

    mp = build_pipeline(repos[family], vram_config_for(False, False, "cpu", storage_name=form), None)
    for name in FAMILIES[family].weighted:
        masters = [s for layer in runtime_of(mp.components[name]).layers for s in layer.masters.values()]
        matrices = [s for s in masters if len(s.shape) >= 2 and s.shape.numel() >= 1024]
        assert matrices, (family, name)
        for s in matrices:
            want = FORM_CLASSES[form]
            if form == "nf4" and (s.shape.numel() // s.shape[0]) % 32:
                want = "Int8Stored"  # rows that do not split into NF4's groups of 32: the next best form
            assert type(s).__name__ == want, (family, name, tuple(s.shape), type(s).__name__)
    te = FAMILIES[family].text_encoders[0]
    kinds = {type(s).__name__ for layer in runtime_of(mp.components[te]).layers for s in layer.masters.values()}
    assert FORM_CLASSES[form] in kinds, (family, te, kinds)  # the (first) text encoder really is in the form
    image = generate(mp, family)
    assert image.std() > 0


# --- LoRAs: each new family's file layouts through engine.load_lora, against diffusers' loading ---
#: family -> (peft targets on the tiny transformer, {layout name: renamer of a diffusers key or None})
def _krea2_original(key: str) -> str:
    """Krea's reference trainer / ComfyUI names (`diffusion_model.blocks.N.attn.wq`), which
    diffusers' _convert_non_diffusers_krea2_lora_to_diffusers maps back."""
    import re

    attn = {"to_q": "wq", "to_k": "wk", "to_v": "wv", "to_out.0": "wo", "to_gate": "gate"}
    m = re.match(r"transformer\.(transformer_blocks|text_fusion\.\w+_blocks)\.(\d+)\.attn\.(to_q|to_k|to_v|to_out\.0|to_gate)\.(lora_[AB]\.weight)$", key)
    assert m, key
    blocks = "blocks" if m[1] == "transformer_blocks" else m[1].replace("text_fusion", "txtfusion")
    return f"diffusion_model.{blocks}.{m[2]}.attn.{attn[m[3]]}.{m[4]}"


LORA_CASES = {
    "krea2": (["to_q", "to_k", "to_v", "to_out.0", "to_gate"], {"diffusers": None, "krea-original": _krea2_original}),
    "qwen-image-21": (["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj"], {"diffusers": None}),
    "flux2": (["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"], {"diffusers": None}),
}
LORA_LAYOUTS = [(f, layout) for f, (_, layouts) in LORA_CASES.items() for layout in layouts]


def _captured_transformer_call(repo, family):
    """The transformer's first call in a real (tiny) generation: its kwargs, cloned."""
    import torch

    mp = build_pipeline(repo, vram_config_for(False, False, "cpu"), None)
    seen = {}

    def grab(module, args, kwargs):
        if not seen:
            seen.update({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    handle = mp.components["transformer"].register_forward_pre_hook(grab, with_kwargs=True)
    generate(mp, family)
    handle.remove()
    mp.close()
    return seen


@pytest.mark.parametrize("family,layout", LORA_LAYOUTS)
def test_lora_layouts_load_through_load_lora_as_diffusers_loads_them(repos, tmp_path, family, layout):
    import copy
    import json

    import diffusers
    import torch
    from safetensors.torch import save_file

    from engine import enable_vram_management, load_lora
    from model_registry.families import FAMILIES as SPECS
    from tests.fixtures.tiny_loras import peft_lora

    spec = SPECS[family]
    index = json.loads((repos[family] / "model_index.json").read_text())
    cls = getattr(diffusers, index["transformer"][1])
    plain = cls.from_pretrained(repos[family] / "transformer", torch_dtype=torch.bfloat16).eval()
    inputs = _captured_transformer_call(repos[family], family)
    targets, layouts = LORA_CASES[family]
    sd, meta = peft_lora(plain, targets, alpha=4.0)  # rank 4: alpha == rank, the scale the converters assume
    tensors = {f"transformer.{k}": v for k, v in sd.items()}
    rename = layouts[layout]
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}
    path = tmp_path / f"{family}-{layout}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})

    mixin = getattr(diffusers.loaders.lora_pipeline, spec.lora_loader)
    ref = copy.deepcopy(plain)
    state = mixin.lora_state_dict(str(path))
    state = state[0] if isinstance(state, tuple) else state
    mixin.load_lora_into_transformer(state, transformer=ref, adapter_name="a")

    def run(model):
        with torch.no_grad():
            out = model(**inputs)
        return (out.sample if hasattr(out, "sample") else out[0]).float()

    expected = run(ref)
    assert not torch.equal(expected, run(plain)), "the LoRA must change the output"
    for limit in (None, 0):
        masters = {"computation_device": "cpu", "computation_dtype": "bfloat16", "offload_dtype": "float32", "onload_dtype": "float32"}
        model = enable_vram_management(copy.deepcopy(plain), vram_config=masters, vram_limit=limit)
        handle = load_lora(model, path)
        assert handle.layers > 0
        got = run(model)
        assert torch.equal(got, expected), (family, layout, limit, (got - expected).abs().max())


@pytest.mark.parametrize("build", ["flux2_transformer", "flux2_dev_transformer"])
def test_the_flux2_gguf_layout_is_diffusers_converter_inverted(build):
    """A FLUX.2 state dict written in BFL's names from the family's GGUF table, converted back by
    diffusers' own convert_flux2_transformer_checkpoint_to_diffusers, is the model's state dict
    bit for bit (so a ComfyUI-named FLUX.2 GGUF maps as diffusers would map it)."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from model_registry.families.flux2_klein import flux2_sources
    from tests.fixtures import tiny_components as tc

    torch.manual_seed(0)
    model = getattr(tc, build)()
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    original: dict[str, torch.Tensor] = {}
    for target, parts in flux2_sources(model).items():
        offset = 0
        for source, r0, r1 in parts:
            rows = state[target].shape[0] if r1 == -1 else r1 - r0
            piece = state[target][offset : offset + rows]
            offset += rows
            if r1 == -1:
                original[source] = piece.clone()
            else:
                whole = original.setdefault(source, torch.zeros((max(r1, original[source].shape[0] if source in original else 0),) + piece.shape[1:]))
                if whole.shape[0] < r1:
                    whole = torch.cat([whole, torch.zeros((r1 - whole.shape[0],) + piece.shape[1:])])
                whole[r0:r1] = piece
                original[source] = whole
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(original))
    assert set(converted) == set(state)
    for k, v in state.items():
        assert torch.equal(converted[k], v), k
