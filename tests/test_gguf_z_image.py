"""Z-Image GGUFs keep the original Z-Image / ComfyUI Lumina2 names (fused `attention.qkv`,
`attention.out`, `q_norm`, `x_embedder`, `final_layer`, ...): load_model maps them to diffusers'
names, splitting each qkv into row ranges of the file's bytes.

The file the tests write is in that layout, and the layout is checked against diffusers' own
converter (convert_z_image_transformer_checkpoint_to_diffusers), not against our mapping: the
reference model is the gguf package's dequantization of the file, converted by diffusers."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers  # noqa: E402

from engine import CheckpointError, disable_vram_management, load_model, runtime_of  # noqa: E402
from engine.storage.gguf import GgufDiskStored, GgufStored  # noqa: E402
from tests.fixtures.tiny_models import run_model  # noqa: E402
from tests.test_gguf import assert_streams_from_its_file  # noqa: E402
from tools.gguf_write import write_gguf  # noqa: E402

PREFIX = "model.diffusion_model."  # ComfyUI's prefix, as the published files have it
DISK = {"offload_dtype": "disk", "offload_device": "disk", "computation_device": "cpu", "computation_dtype": "bfloat16"}


def gguf_config(**kw):
    return {"offload_dtype": "gguf", "offload_device": "cpu", "preparing_dtype": "gguf",
            "computation_device": "cpu", "computation_dtype": "bfloat16", **kw}


def wide_z_image():
    """A Z-Image DiT whose matrices have rows of 256 values (K-quants' super-block): dim 256,
    two heads of 128; its FFN's w2 has 682-value rows (no quant block fits: kept as BF16)."""
    from diffusers import ZImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=256, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
        ).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and "norm" in name:
                    p.normal_(1, 0.1)
                else:
                    p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "x": [torch.randn(16, 1, 8, 8, generator=g).bfloat16()],
        "t": torch.tensor([0.5]).bfloat16(),
        "cap_feats": [torch.randn(8, 256, generator=g).bfloat16()],
    }
    return model, inputs


def original_layout(model) -> dict[str, np.ndarray]:
    """The model's state dict under the original Z-Image / ComfyUI names, written out by hand:
    [to_q; to_k; to_v] fused into `attention.qkv`, `to_out.0` -> `out`, `norm_q`/`norm_k` ->
    `q_norm`/`k_norm`, `all_x_embedder.2-1` / `all_final_layer.2-1` -> `x_embedder` /
    `final_layer`; plus Lumina2's unused final RMSNorm (`norm_final.weight`), which some files keep."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if re.search(r"\.attention\.to_[kv]\.weight$", key):
            continue
        if (m := re.fullmatch(r"(.+)\.attention\.to_q\.weight", key)) is not None:
            out[f"{m[1]}.attention.qkv.weight"] = np.concatenate([sd[f"{m[1]}.attention.to_{x}.weight"] for x in "qkv"])
            continue
        name = (key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
                .replace(".attention.to_out.0.", ".attention.out.")
                .replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm."))
        out[name] = value
    out["norm_final.weight"] = np.ones(model.config.dim, np.float32)
    assert sum(v.size for v in out.values()) == sum(v.size for v in sd.values()) + model.config.dim
    return out


#: qkv's types in file order (row ranges of a K-quant and of legacy blocks); other matrices cycle
QKV_TYPES = ["Q4_K", "Q8_0", "Q4_0", "Q4_K"]
CYCLE = ["Q8_0", "Q4_K", "Q4_0"]


def qtypes_for(state: dict[str, np.ndarray]) -> dict[str, str]:
    """As converters do: K-quants where rows split into 256, Q8_0/Q4_0 where into 32, BF16 for the
    other matrices; 1-D tensors and single rows (the pad tokens) stay F32."""
    out, qkv, i = {}, 0, 0
    for name, array in state.items():
        if array.ndim < 2 or array.shape[0] == 1:
            continue
        if name.endswith(".attention.qkv.weight") and array.shape[-1] % 32 == 0:
            fits = [q for q in QKV_TYPES if array.shape[-1] % 256 == 0 or q != "Q4_K"]
            out[name] = fits[qkv % len(fits)]
            qkv += 1
        elif array.shape[-1] % 256 == 0:
            out[name] = CYCLE[i % len(CYCLE)]
            i += 1
        elif array.shape[-1] % 32 == 0:
            out[name] = "Q8_0" if i % 2 else "Q4_0"
            i += 1
        else:
            out[name] = "BF16"
    return out


def diffusers_reference(path, like) -> torch.nn.Module:
    """`like` (bf16) with the file's tensors as the gguf package dequantizes them, renamed and split
    by diffusers' converter, loaded strictly (no missing or unexpected key)."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))) for t in reader.tensors}
    del reader
    converted = convert_z_image_transformer_checkpoint_to_diffusers(tensors)
    model = copy.deepcopy(like).bfloat16()
    state = model.state_dict()
    model.load_state_dict({k: v.reshape(state[k].shape).to(torch.bfloat16) for k, v in converted.items()}, strict=True)
    return model


@pytest.fixture(scope="module")
def z_gguf(tmp_path_factory):
    model, inputs = wide_z_image()
    directory = tmp_path_factory.mktemp("z-image-gguf")
    state = original_layout(model)
    qtypes = qtypes_for(state)
    assert {"Q8_0", "Q4_K", "Q4_0", "BF16"} <= set(qtypes.values())
    path = write_gguf(directory / "z_image_turbo-mixed.gguf", state, qtypes, "lumina2", prefix=PREFIX)
    model.save_config(directory)
    return type(model), directory, path, diffusers_reference(path, model), inputs, state


def test_the_test_layout_is_what_diffusers_converter_reads():
    model, _ = wide_z_image()
    state = original_layout(model)
    converted = convert_z_image_transformer_checkpoint_to_diffusers({PREFIX + k: torch.from_numpy(v) for k, v in state.items()})
    expected = model.state_dict()
    assert set(converted) == set(expected)
    for name, value in converted.items():
        assert torch.equal(value, expected[name].float()), name


def test_z_image_gguf_loads_bitwise_as_diffusers_converts_it(z_gguf):
    from engine.transfer.devices import CpuBackend

    cls, directory, path, reference, inputs, state = z_gguf
    qtypes = qtypes_for(state)
    expected = run_model(reference, inputs)
    for limit in (None, 0):
        model = load_model(cls, path, vram_config=gguf_config(), vram_limit=limit)  # no missing/unexpected key, or it raises
        masters = {r.name: r.masters for r in runtime_of(model).layers}
        for block in ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"):
            for x in "qkv":  # each a row range of the fused qkv, as its blocks
                part = masters[f"{block}.attention.to_{x}"]["weight"]
                assert isinstance(part, GgufStored) and tuple(part.shape) == (256, 256)
                assert part.qtype == qtypes[f"{block}.attention.qkv.weight"]
        assert torch.equal(run_model(model, inputs), expected)
    runtime_of(model).use_scheduler(CpuBackend())
    for _ in range(2):
        assert torch.equal(run_model(model, inputs), expected)
    # the state diffusers' converter gives, tensor by tensor (dequantized into bf16 at load)
    plain = load_model(cls, path, vram_config={"offload_dtype": "bfloat16", "computation_device": "cpu", "computation_dtype": "bfloat16"})
    ours = dict(disable_vram_management(plain).state_dict())
    theirs = reference.state_dict()
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


@pytest.mark.parametrize("prefetch", [False, True])
def test_z_image_disk_offload_streams_the_split_qkv_from_the_gguf(z_gguf, prefetch):
    cls, directory, path, reference, inputs, _ = z_gguf
    expected = run_model(reference, inputs)
    model = load_model(cls, path, vram_config=DISK, vram_limit=0, prefetch=prefetch)
    runtime = runtime_of(model)
    masters = {r.name: r.masters for r in runtime.layers}
    parts = [masters[f"noise_refiner.0.attention.to_{x}"]["weight"] for x in "qkv"]
    assert all(isinstance(p, GgufDiskStored) and p.path == path for p in parts)
    # three consecutive row ranges of the one fused tensor, in the file's own bytes
    assert parts[0].entry.offset + parts[0].entry.length == parts[1].entry.offset
    assert parts[1].entry.offset + parts[1].entry.length == parts[2].entry.offset
    assert parts[0].entry.key == PREFIX + "noise_refiner.0.attention.qkv.weight[0:256]"
    assert_streams_from_its_file(model, inputs, expected)


def test_z_image_gguf_without_a_prefix_loads_too(z_gguf, tmp_path):
    cls, directory, path, reference, inputs, state = z_gguf
    bare = write_gguf(tmp_path / "bare.gguf", state, qtypes_for(state), "lumina2")
    model = load_model(cls, bare, vram_config=gguf_config(), config_dir=directory, vram_limit=0)
    assert torch.equal(run_model(model, inputs), run_model(reference, inputs))


def test_z_image_gguf_with_a_missing_tensor_names_it(z_gguf, tmp_path):
    cls, directory, path, reference, inputs, state = z_gguf
    without_qkv = {k: v for k, v in state.items() if k != "layers.1.attention.qkv.weight"}
    bad = write_gguf(tmp_path / "no-qkv.gguf", without_qkv, qtypes_for(without_qkv), "lumina2", prefix=PREFIX)
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*layers\.1\.attention\.to_k\.weight.*layers\.1\.attention\.to_q\.weight"
                       r".*\(read from original Z-Image \(ComfyUI Lumina2\) tensor\(s\) the file lacks: layers\.1\.attention\.qkv\.weight\)"):
        load_model(cls, bad, vram_config=gguf_config(), config_dir=directory)
    without_embedder = {k: v for k, v in state.items() if not k.startswith("x_embedder.")}
    bad = write_gguf(tmp_path / "no-embedder.gguf", without_embedder, qtypes_for(without_embedder), "lumina2")
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*all_x_embedder\.2-1\.bias.*lacks: x_embedder\.bias, x_embedder\.weight"):
        load_model(cls, bad, vram_config=gguf_config(), config_dir=directory)
    extra = write_gguf(tmp_path / "extra.gguf", {**state, "layers.0.attention.rope.weight": np.zeros((4, 32), np.float32)}, {}, "lumina2")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\).*layers\.0\.attention\.rope\.weight") as err:
        load_model(cls, extra, vram_config=gguf_config(), config_dir=directory)
    assert "missing" not in str(err.value) and "norm_final" not in str(err.value)  # dropped, as diffusers does


def test_a_z_image_gguf_in_diffusers_names_still_loads(z_gguf, tmp_path):
    """Files converted from the diffusers repo keep diffusers' names: no original layout applies."""
    cls, directory, path, reference, inputs, _ = z_gguf
    model, _ = wide_z_image()
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    plain = write_gguf(tmp_path / "diffusers-names.gguf", state, {}, "lumina2", prefix=PREFIX)
    loaded = load_model(cls, plain, vram_config=gguf_config(), config_dir=directory, vram_limit=0)
    assert torch.equal(run_model(loaded, inputs), run_model(model.bfloat16(), inputs))


# --- the catalogue entries, end to end on the tiny Z-Image repo ------------------------------------
def test_z_image_gguf_catalogue_entry_downloads_builds_and_generates(tmp_path, monkeypatch):
    """The hub is faked (the base repo's snapshot and the one .gguf file); the tiny Z-Image repo's
    transformer is written as a ComfyUI-layout GGUF; the app's pipeline builds from the download
    with the transformer as the file's blocks and generates."""
    import model_registry
    from engine.generation.pipelines.managed import build_pipeline
    from engine.generation.settings import vram_config_for
    from model_registry import hf_source, registry
    from model_registry.catalog import get_model
    from tests.fixtures.tiny_repos import write_tiny_repo

    entry = get_model("z-image-turbo-gguf-q4_k_m")
    assert entry.gguf.repo == "jayn7/Z-Image-Turbo-GGUF" and entry.hf_repo == "Tongyi-MAI/Z-Image-Turbo"
    base = write_tiny_repo("z-image", tmp_path / "base")
    from diffusers import ZImageTransformer2DModel

    tiny = ZImageTransformer2DModel.from_pretrained(base / "transformer")
    state = original_layout(tiny)
    gguf_path = write_gguf(tmp_path / "hub" / entry.gguf.file, state, qtypes_for(state), "lumina2", prefix=PREFIX)
    monkeypatch.setattr(hf_source, "snapshot_download", lambda repo, **kw: str(base))
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo, filename, **kw: str(gguf_path))
    monkeypatch.setattr(hf_source, "unreachable_reason", lambda url: None)
    monkeypatch.setattr(hf_source, "offline_mode", lambda: False)
    monkeypatch.setattr(registry, "_existing_copy", lambda e, d: None)
    models_dir = tmp_path / "models"
    path = model_registry.download(entry.id, "hf", models_dir=models_dir)
    assert sorted(p.name for p in (path / "transformer").iterdir()) == ["config.json", entry.gguf.file]

    from model_registry.local import local_copy

    assert local_copy(entry, models_dir) == path
    # the pipeline the app builds for it (the app's own RAM check judges the real model's size)
    pipe = build_pipeline(path, vram_config_for(False, False, "cpu", "gguf"), 0)
    try:
        transformer = pipe.components["transformer"]
        masters = [s for r in runtime_of(transformer).layers for s in r.masters.values()]
        assert {s.qtype for s in masters if isinstance(s, GgufStored)} >= {"Q8_0", "Q4_0"}
        image = pipe.generate("a fox", width=64, height=64, steps=2, guidance=0.0, seed=3)
        assert image.size == (64, 64) and np.asarray(image).std() > 0
    finally:
        pipe.close()
