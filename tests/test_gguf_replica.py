"""tools/gguf_replica.py: the sparse GGUF replicas of the catalogue's GGUF entries (issues #12, #17).

The BFL layout of the FLUX replicas is the inversion of the table the loader reads (FLUX.1's
family spec, `model_registry.families.flux1.flux_sources`); here it is checked independently: diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` (the converter diffusers' single-file loader
runs on BFL checkpoints) must turn it back into the diffusers state dict, name for name and row
for row, consuming every BFL tensor.
"""

from __future__ import annotations

import math

import gguf
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from model_registry.sizes import build_on_meta, load_component_configs
from tools import gguf_replica
from tools.gguf_write import write_sparse_gguf


def flux_meta(config_id: str, layers: int = 2):
    """FLUX.1 at its real width (diffusers' converter hard-codes inner_dim 3072 and mlp_ratio 4),
    `layers` double and single blocks, on the meta device."""
    config = dict(load_component_configs()[config_id], num_layers=layers, num_single_layers=layers)
    return build_on_meta("diffusers", "FluxTransformer2DModel", config)


@pytest.mark.parametrize("config_id", ["flux1-dev-transformer", "flux1-schnell-transformer"])
def test_the_bfl_inversion_is_what_diffusers_converts_back(config_id):
    model = flux_meta(config_id)
    state = {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        # distinct values in every row of every tensor; two columns are enough (the converter
        # only takes row ranges), 1-D tensors keep their length
        shape = (t.shape[0], 2) if t.ndim == 2 else tuple(t.shape)
        state[name] = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) + 1e7 * i
    bfl = gguf_replica.original_state(state, model)
    assert "single_blocks.0.linear1.weight" in bfl and "double_blocks.1.img_attn.qkv.bias" in bfl
    assert ("guidance_in.in_layer.weight" in bfl) == model.config.guidance_embeds
    checkpoint = dict(bfl)
    back = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"BFL tensors diffusers does not know: {sorted(checkpoint)[:5]}"
    assert set(back) == set(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name


def test_real_size_bfl_shapes():
    model = flux_meta("flux1-dev-transformer", layers=1)
    shapes = {n: s for n, s, _ in gguf_replica.denoiser_tensors(model, "Q4_K_S")}
    assert shapes["double_blocks.0.img_attn.qkv.weight"] == (3 * 3072, 3072)
    assert shapes["single_blocks.0.linear1.weight"] == (3 * 3072 + 4 * 3072, 3072)
    assert shapes["single_blocks.0.linear2.weight"] == (3072, 3072 + 4 * 3072)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2 * 3072, 3072)
    assert not any(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in shapes)


def test_an_incomplete_table_is_refused():
    model = flux_meta("flux1-schnell-transformer", layers=1)
    state = dict(model.state_dict())
    state["not_in_the_table.weight"] = torch.empty(4, 4, device="meta")
    with pytest.raises(ValueError, match="no BFL FLUX source"):
        gguf_replica.original_state(state, model)


@pytest.mark.parametrize(
    "shape,quant,expected",
    [((3072, 3072), "Q4_K_M", "Q4_K"), ((3072, 64), "Q4_K_S", "BF16"), ((3072,), "Q4_K_M", "F32"),
     ((3072, 64), "Q8_0", "Q8_0"), ((8, 48), "Q8_0", "BF16"), ((3072,), "Q8_0", "F32")],
)
def test_types_per_quant(shape, quant, expected):
    assert gguf_replica.tensor_type(shape, quant) == expected


def test_unknown_quant_is_named():
    with pytest.raises(ValueError, match="Q3_K_L"):
        gguf_replica.tensor_type((256, 256), "Q3_K_L")


def test_sparse_gguf_reads_back_with_the_gguf_reader(tmp_path):
    tensors = [("a.weight", (512, 1024), "Q4_K"), ("a.bias", (512,), "F32"), ("b.weight", (3, 64), "BF16"), ("c.weight", (64, 64), "Q8_0")]
    path = tmp_path / "x.gguf"
    size = write_sparse_gguf(path, tensors, "flux", name="X", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_S)
    assert path.stat().st_size == size
    assert path.stat().st_blocks * 512 < 64 * 1024  # the data is a hole
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "flux"
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_S)
    got = {t.name: (tuple(int(d) for d in reversed(list(t.shape))), t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors}
    assert got == {
        "a.weight": ((512, 1024), "Q4_K", 512 * 4 * 144),
        "a.bias": ((512,), "F32", 512 * 4),
        "b.weight": ((3, 64), "BF16", 3 * 64 * 2),
        "c.weight": ((64, 64), "Q8_0", 64 * 2 * 34),
    }
    last = max(reader.tensors, key=lambda t: int(t.data_offset))
    assert int(last.data_offset) + int(last.n_bytes) <= size
    del reader
    with pytest.raises(ValueError, match="do not split into Q4_K blocks"):
        write_sparse_gguf(tmp_path / "y.gguf", [("w", (4, 100), "Q4_K")], "flux")


def test_the_z_image_replica_keeps_the_original_names_diffusers_converts_back():
    """Z-Image's GGUFs keep the original (ComfyUI Lumina2) names: the replica's are those, and
    diffusers' own converter takes them back to the model's names, row for row."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    config = dict(load_component_configs()["z-image-turbo-transformer"], n_layers=1, n_refiner_layers=1)
    model = build_on_meta("diffusers", "ZImageTransformer2DModel", config)
    state = {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        shape = (t.shape[0], 2) if t.ndim == 2 else tuple(t.shape)
        state[name] = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) + 1e7 * i
    original = gguf_replica.original_state(state, model)
    assert "layers.0.attention.qkv.weight" in original and "layers.0.attention.to_q.weight" not in original
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    names = [n for n, _, _ in gguf_replica.denoiser_tensors(model, "Q4_K_M")]
    assert "layers.0.attention.qkv.weight" in names
