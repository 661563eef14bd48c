"""GGUF checkpoints: our dequantization is bitwise the gguf package's, load_model keeps the
file's blocks (RAM "gguf" form, or disk offload straight from the .gguf file) and gives the same
bits as the plain model with the dequantized weights under every vram_limit and through the
scheduler's slots; bad files give clear errors. Files are written by gguf's GGUFWriter."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from engine import CheckpointError, load_model, runtime_of, vram_budget  # noqa: E402
from engine.storage.gguf import GgufDiskStored, GgufStored, dequantize, supported_types  # noqa: E402
from engine.storage.stored import PlainStored  # noqa: E402
from tests.fixtures.tiny_models import run_model  # noqa: E402
from tools.gguf_write import quantize, random_blocks, write_gguf  # noqa: E402

TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantization_is_bitwise_the_gguf_reference(qtype):
    assert qtype in supported_types()
    rng = np.random.default_rng(0)
    rows, n = 24, 512
    x = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    blocks = quantize(x, qtype) if qtype in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q4_K") else random_blocks(qtype, rows, n)
    reference = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    import engine.storage.gguf as g

    for chunk in (g.CHUNK_VALUES, 1000):  # one chunk, and several rows per chunk
        g.CHUNK_VALUES, saved = chunk, g.CHUNK_VALUES
        try:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                ours = dequantize(torch.from_numpy(blocks), qtype, (rows, n), dtype)
                assert ours.dtype == dtype and ours.shape == (rows, n)
                assert torch.equal(ours, torch.from_numpy(reference).to(dtype)), (qtype, dtype)
        finally:
            g.CHUNK_VALUES = saved


def wide_qwen():
    """A Qwen-Image DiT whose matrices have rows of 256 values (K-quants' super-block)."""
    from diffusers import QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
            num_attention_heads=2, joint_attention_dim=256, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
        ).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, 8, 256, generator=g).bfloat16(),
        "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long),
        "timestep": torch.tensor([0.5]).bfloat16(),
        "img_shapes": [[(1, 4, 4)]],
    }
    return model, inputs


CYCLE = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0"]


def qtypes_for(state: dict[str, np.ndarray]) -> dict[str, str]:
    """As converters do: K-quants where rows split into 256, Q8_0/Q4_0 where into 32, 1-D kept."""
    out, i = {}, 0
    for name, array in state.items():
        if array.ndim < 2:
            continue
        if array.shape[-1] % 256 == 0:
            out[name] = CYCLE[i % len(CYCLE)]
            i += 1
        elif array.shape[-1] % 32 == 0:
            out[name] = "Q8_0" if i % 2 else "Q4_0"
            i += 1
    return out


@pytest.fixture(scope="module")
def gguf_checkpoint(tmp_path_factory):
    model, inputs = wide_qwen()
    directory = tmp_path_factory.mktemp("qwen-gguf")
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    state = {k: (v.astype(np.float16) if v.ndim >= 2 and k not in qtypes_for(state) else v) for k, v in state.items()}
    qtypes = qtypes_for(state)
    assert set(CYCLE) <= set(qtypes.values())
    path = write_gguf(directory / "qwen-image-mixed.gguf", state, qtypes, "qwen_image", prefix="model.diffusion_model.")
    model.save_config(directory)
    # the reference: the plain model with the gguf package's dequantization of the file's tensors
    reader = gguf.GGUFReader(path)
    plain = copy.deepcopy(model).bfloat16()
    with torch.no_grad():
        params = dict(plain.state_dict())
        for t in reader.tensors:
            name = t.name.removeprefix("model.diffusion_model.")
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            params[name].copy_(torch.from_numpy(np.array(values)).float().reshape(params[name].shape).to(torch.bfloat16))
    del reader
    return type(model), directory, path, plain, inputs


def gguf_config(**kw):
    return {"offload_dtype": "gguf", "offload_device": "cpu", "preparing_dtype": "gguf",
            "computation_device": "cpu", "computation_dtype": "bfloat16", **kw}


DISK = {"offload_dtype": "disk", "offload_device": "disk", "computation_device": "cpu", "computation_dtype": "bfloat16"}


def test_gguf_loads_as_its_blocks_bitwise_under_every_limit_and_the_scheduler(gguf_checkpoint):
    from engine.transfer.devices import CpuBackend

    cls, directory, path, plain, inputs = gguf_checkpoint
    expected = run_model(plain, inputs)
    file_bytes = path.stat().st_size
    for source in (path, directory):
        for limit in (None, 0, 0.0002):
            model = load_model(cls, source, vram_config=gguf_config(), vram_limit=limit)
            runtime = runtime_of(model)
            masters = [s for r in runtime.layers for s in r.masters.values()]
            blocks = [s for s in masters if isinstance(s, GgufStored)]
            assert {s.qtype for s in blocks} == set(CYCLE)
            assert sum(s.nbytes for s in blocks) < file_bytes  # the blocks as in the file, nothing more
            assert torch.equal(run_model(model, inputs), expected)
            if limit is None:  # resident in "gguf" form: the ledger counts the blocks' real bytes
                resident = vram_budget(model).snapshot().resident_bytes
                assert resident == sum(s.nbytes for s in blocks) + sum(s.nbytes for s in masters if isinstance(s, PlainStored))
    model = load_model(cls, path, vram_config=gguf_config(), vram_limit=0)
    runtime_of(model).use_scheduler(CpuBackend())
    for _ in range(3):
        assert torch.equal(run_model(model, inputs), expected)
    assert runtime_of(model).scheduler.groups and runtime_of(model).stats.sync_fallbacks == 0


@pytest.mark.parametrize("prefetch", [False, True])
def test_disk_offload_streams_the_blocks_from_the_gguf_file(gguf_checkpoint, prefetch):
    cls, directory, path, plain, inputs = gguf_checkpoint
    expected = run_model(plain, inputs)
    model = load_model(cls, path, vram_config=DISK, vram_limit=0, prefetch=prefetch)
    runtime = runtime_of(model)
    disk = [s for r in runtime.layers for s in r.masters.values() if isinstance(s, GgufDiskStored)]
    assert disk and all(s.path == path for s in disk)
    assert_streams_from_its_file(model, inputs, expected)


def assert_streams_from_its_file(model, inputs, expected) -> None:
    """Disk offload from a .gguf: nothing of the model in RAM, and the same output through the
    synchronous path and through the scheduler's stager, which reads the file."""
    from engine.transfer.devices import CpuBackend

    runtime = runtime_of(model)
    assert runtime.host_arena is None or runtime.host_arena.nbytes == 0  # nothing of the model in RAM
    for _ in range(2):
        assert torch.equal(run_model(model, inputs), expected)
    runtime.use_scheduler(CpuBackend())
    for _ in range(2):
        assert torch.equal(run_model(model, inputs), expected)
    assert runtime.scheduler.stager is not None and runtime.scheduler.stager.read_bytes > 0


def test_gguf_into_another_form_is_dequantized_once_at_load(gguf_checkpoint, caplog):
    cls, directory, path, plain, inputs = gguf_checkpoint
    bf16 = {"offload_dtype": "bfloat16", "computation_device": "cpu", "computation_dtype": "bfloat16"}
    model = load_model(cls, path, vram_config=bf16, vram_limit=0)
    assert "use offload_dtype \"gguf\"" in caplog.text
    assert torch.equal(run_model(model, inputs), run_model(plain, inputs))
    nf4 = load_model(cls, path, vram_config={**bf16, "offload_dtype": "nf4"}, vram_limit=0)
    assert torch.isfinite(run_model(nf4, inputs)).all()


def test_gguf_of_another_architecture_is_refused(gguf_checkpoint, tmp_path):
    cls, directory, path, plain, inputs = gguf_checkpoint
    other = write_gguf(tmp_path / "flux.gguf", {"double_blocks.0.img_attn.qkv.weight": np.zeros((96, 32), np.float32)}, {}, "flux")
    with pytest.raises(CheckpointError, match=r"architecture 'flux' \(a FluxTransformer2DModel checkpoint\), not QwenImageTransformer2DModel"):
        load_model(cls, other, vram_config=gguf_config(), config_dir=directory)
    with pytest.raises(CheckpointError, match=r"architecture 'llama', not QwenImageTransformer2DModel"):
        load_model(cls, write_gguf(tmp_path / "llm.gguf", {"x.weight": np.zeros((4, 32), np.float32)}, {}, "llama"), config_dir=directory)
    # metadata that claims the right architecture: the key check names what does not fit
    unnamed = write_gguf(tmp_path / "unknown.gguf", {"double_blocks.0.img_attn.qkv.weight": np.zeros((96, 32), np.float32)}, {}, "qwen_image")
    with pytest.raises(CheckpointError, match="missing key.*unexpected key.*double_blocks"):
        load_model(cls, unnamed, vram_config=gguf_config(), config_dir=directory)


def test_gguf_without_a_config_asks_for_config_dir(gguf_checkpoint, tmp_path):
    cls, directory, path, plain, inputs = gguf_checkpoint
    alone = tmp_path / "alone.gguf"
    alone.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="config_dir="):
        load_model(cls, alone, vram_config=gguf_config())
    model = load_model(cls, alone, vram_config=gguf_config(), config_dir=directory, vram_limit=0)
    assert torch.equal(run_model(model, inputs), run_model(plain, inputs))


def test_truncated_gguf_is_a_clear_error(gguf_checkpoint, tmp_path):
    cls, directory, path, plain, inputs = gguf_checkpoint
    data = path.read_bytes()
    for cut in (len(data) - 1000, 200, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"truncated|corrupted"):
            load_model(cls, bad, vram_config=gguf_config(), config_dir=directory)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model(cls, not_gguf, vram_config=gguf_config(), config_dir=directory)


def test_unsupported_quant_type_is_named_with_the_supported_ones(gguf_checkpoint, tmp_path):
    cls, directory, path, plain, inputs = gguf_checkpoint
    writer = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "qwen_image")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    writer.add_tensor("img_in.weight", np.zeros((256, 64 // block * size), np.uint8), raw_shape=(256, 64 // block * size), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(CheckpointError, match=r"unsupported GGUF quantization type\(s\): Q8_1 .*'img_in.weight'.*Supported: .*Q4_K.*Q8_0"):
        load_model(cls, tmp_path / "q81.gguf", vram_config=gguf_config(), config_dir=directory)


# --- catalogue, download and pipeline -------------------------------------------------------------
def test_catalogue_marks_gguf_variants_and_sizes_them_by_the_file():
    import model_registry
    from model_registry.catalog import get_model, list_models

    variants = [e for e in list_models() if e.gguf is not None]
    assert {e.id for e in variants} >= {"qwen-image-gguf-q4_k_m", "qwen-image-gguf-q8_0", "flux1-dev-gguf-q4_k_s", "flux1-schnell-gguf-q4_k_s",
                                          "z-image-turbo-gguf-q4_k_m", "z-image-turbo-gguf-q8_0"}
    for entry in variants:
        base = get_model(entry.id.split("-gguf-")[0])
        assert not entry.verified and not entry.gguf.verified and "unverified" in entry.name
        assert entry.family == base.family and entry.hf_repo == base.hf_repo and entry.modelscope_repo is None
        assert entry.size_bytes < base.bytes_bf16
    choices = {c.id: c for c in model_registry.model_choices()}
    q4 = choices["qwen-image-gguf-q4_k_m"]
    assert abs(q4.size_gb - get_model("qwen-image-gguf-q4_k_m").size_bytes / 1e9) < 1e-9
    assert q4.size_gb < choices["qwen-image-gguf-q8_0"].size_gb < choices["qwen-image"].size_gb


def test_gguf_download_fetches_one_file_and_the_base_without_its_denoiser(tmp_path, monkeypatch):
    """The hub is faked: snapshot_download of the base repo (patterns recorded) and
    hf_hub_download of the one file; the assembled folder is a complete pipeline copy."""
    import model_registry
    from model_registry import hf_source
    from model_registry.catalog import get_model
    from tests.fixtures.tiny_repos import write_tiny_repo

    base = write_tiny_repo("qwen-image", tmp_path / "base")
    plain = load_model(__import__("diffusers").QwenImageTransformer2DModel, base / "transformer", vram_config={"computation_device": "cpu"})
    from engine import disable_vram_management

    state = {k: v.float().numpy() for k, v in disable_vram_management(plain).state_dict().items()}
    gguf_path = write_gguf(tmp_path / "hub" / "qwen-image-Q4_K_M.gguf", state, qtypes_for(state), "qwen_image")
    calls = {}

    def fake_snapshot(repo, **kw):
        calls["snapshot"] = (repo, kw["allow_patterns"])
        return str(base)

    def fake_file(repo, filename, **kw):
        calls["file"] = (repo, filename)
        return str(gguf_path)

    monkeypatch.setattr(hf_source, "snapshot_download", fake_snapshot)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_file)
    monkeypatch.setattr(hf_source, "unreachable_reason", lambda url: None)
    monkeypatch.setattr(hf_source, "offline_mode", lambda: False)
    entry = get_model("qwen-image-gguf-q4_k_m")
    models_dir = tmp_path / "models"
    monkeypatch.setattr(model_registry.registry, "_existing_copy", lambda e, d: None)
    path = model_registry.download(entry.id, "hf", models_dir=models_dir)
    repo, allow = calls["snapshot"]
    assert repo == "Qwen/Qwen-Image" and "transformer/config.json" in allow
    assert not any(p.startswith("transformer/") and p != "transformer/config.json" for p in allow)
    assert calls["file"] == (entry.gguf.repo, entry.gguf.file)
    assert sorted(p.name for p in (path / "transformer").iterdir()) == ["config.json", "qwen-image-Q4_K_M.gguf"]
    from model_registry.local import local_copy

    assert local_copy(entry, models_dir) == path

    # the pipeline builds from it with the transformer as GGUF blocks
    from engine.generation.pipelines.managed import build_pipeline
    from engine.generation.settings import vram_config_for

    pipe = build_pipeline(path, vram_config_for(False, False, "cpu", "gguf"), 0)
    transformer = pipe.components["transformer"] if hasattr(pipe, "components") else pipe.pipe.transformer
    masters = [s for r in runtime_of(transformer).layers for s in r.masters.values()]
    assert any(isinstance(s, GgufStored) for s in masters)
    pipe.close()


# --- FLUX GGUFs keep BFL's names ---------------------------------------------------------------------
def bfl_state(model) -> dict[str, np.ndarray]:
    """FLUX's diffusers state dict under BFL's names, written out by hand (fused qkv, qkv+mlp,
    [shift, scale]): the layout the published FLUX GGUFs keep."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    cat = lambda *names: np.concatenate([sd[n] for n in names])  # noqa: E731
    for kind in ("weight", "bias"):
        for a, b in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in")):
            out[f"{b}.in_layer.{kind}"] = sd[f"time_text_embed.{a}.linear_1.{kind}"]
            out[f"{b}.out_layer.{kind}"] = sd[f"time_text_embed.{a}.linear_2.{kind}"]
        out[f"txt_in.{kind}"] = sd[f"context_embedder.{kind}"]
        out[f"img_in.{kind}"] = sd[f"x_embedder.{kind}"]
        out[f"final_layer.linear.{kind}"] = sd[f"proj_out.{kind}"]
        scale, shift = np.split(sd[f"norm_out.linear.{kind}"], 2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = np.concatenate([shift, scale])
    for i in range(model.config.num_layers):
        t, s = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[s + f"img_mod.lin.{kind}"] = sd[t + f"norm1.linear.{kind}"]
            out[s + f"txt_mod.lin.{kind}"] = sd[t + f"norm1_context.linear.{kind}"]
            out[s + f"img_attn.qkv.{kind}"] = cat(*(t + f"attn.to_{x}.{kind}" for x in "qkv"))
            out[s + f"txt_attn.qkv.{kind}"] = cat(*(t + f"attn.add_{x}_proj.{kind}" for x in "qkv"))
            out[s + f"img_mlp.0.{kind}"] = sd[t + f"ff.net.0.proj.{kind}"]
            out[s + f"img_mlp.2.{kind}"] = sd[t + f"ff.net.2.{kind}"]
            out[s + f"txt_mlp.0.{kind}"] = sd[t + f"ff_context.net.0.proj.{kind}"]
            out[s + f"txt_mlp.2.{kind}"] = sd[t + f"ff_context.net.2.{kind}"]
            out[s + f"img_attn.proj.{kind}"] = sd[t + f"attn.to_out.0.{kind}"]
            out[s + f"txt_attn.proj.{kind}"] = sd[t + f"attn.to_add_out.{kind}"]
        out[s + "img_attn.norm.query_norm.scale"] = sd[t + "attn.norm_q.weight"]
        out[s + "img_attn.norm.key_norm.scale"] = sd[t + "attn.norm_k.weight"]
        out[s + "txt_attn.norm.query_norm.scale"] = sd[t + "attn.norm_added_q.weight"]
        out[s + "txt_attn.norm.key_norm.scale"] = sd[t + "attn.norm_added_k.weight"]
    for i in range(model.config.num_single_layers):
        t, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[s + f"modulation.lin.{kind}"] = sd[t + f"norm.linear.{kind}"]
            out[s + f"linear1.{kind}"] = cat(t + f"attn.to_q.{kind}", t + f"attn.to_k.{kind}", t + f"attn.to_v.{kind}", t + f"proj_mlp.{kind}")
            out[s + f"linear2.{kind}"] = sd[t + f"proj_out.{kind}"]
        out[s + "norm.query_norm.scale"] = sd[t + "attn.norm_q.weight"]
        out[s + "norm.key_norm.scale"] = sd[t + "attn.norm_k.weight"]
    assert sum(v.size for v in out.values()) == sum(v.size for v in sd.values())
    return out


def test_flux_gguf_with_bfl_names_is_split_by_rows_and_bitwise(tmp_path):
    from tests.fixtures.tiny_models import tiny_model

    plain, inputs = tiny_model("FluxTransformer2DModel", torch.bfloat16)
    bfl = bfl_state(plain)
    qtypes = {k: ("Q8_0" if i % 2 else "Q4_0") for i, (k, v) in enumerate(bfl.items()) if v.ndim == 2 and v.shape[1] % 32 == 0}
    path = write_gguf(tmp_path / "flux1-tiny-Q4_0.gguf", bfl, qtypes, "flux", prefix="model.diffusion_model.")
    plain.save_config(tmp_path)
    # the reference: the gguf package's dequantization, then BFL -> diffusers by hand (as above, inverted)
    reader = gguf.GGUFReader(path)
    deq = {t.name.removeprefix("model.diffusion_model."): np.array(gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    del reader
    back = {}
    for i in range(plain.config.num_layers):
        t, s = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            for x, part in zip("qkv", np.split(deq[s + f"img_attn.qkv.{kind}"], 3)):
                back[t + f"attn.to_{x}.{kind}"] = part
    expected_state = dict(plain.state_dict())
    loaded_plain = load_model(type(plain), path, vram_config={"offload_dtype": "bfloat16", "computation_device": "cpu", "computation_dtype": "bfloat16"})
    # what we load (dequantized at load into bf16) equals the hand-inverted dequantized file on the
    # split qkv and on the swapped final modulation
    from engine import disable_vram_management

    ours = dict(disable_vram_management(loaded_plain).state_dict())
    for name, value in back.items():
        assert torch.equal(ours[name], torch.from_numpy(value).to(torch.bfloat16).reshape(ours[name].shape)), name
    shift, scale = np.split(deq["final_layer.adaLN_modulation.1.weight"], 2)
    assert torch.equal(ours["norm_out.linear.weight"], torch.from_numpy(np.concatenate([scale, shift])).to(torch.bfloat16))
    assert set(ours) == set(expected_state)
    # and as GGUF blocks (RAM and disk): the same bits as the dequantized model, at every limit
    expected = run_model(enable_plain(ours, plain), inputs)
    for config in (gguf_config(), DISK):
        for limit in (None, 0):
            model = load_model(type(plain), path, vram_config=config, vram_limit=limit)
            assert torch.equal(run_model(model, inputs), expected)
    model = load_model(type(plain), path, vram_config=DISK, vram_limit=0)
    masters = {r.name: r.masters for r in runtime_of(model).layers}
    assert isinstance(masters["transformer_blocks.0.attn.to_q"]["weight"], GgufDiskStored)  # a row range of the file
    assert isinstance(masters["norm_out.linear"]["weight"], GgufStored)  # swapped halves: kept in RAM


def enable_plain(state, like):
    model = copy.deepcopy(like)
    model.load_state_dict(state)
    return model


def test_streamed_gguf_step_adds_no_host_synchronising_op(gguf_checkpoint):
    """Issue 25, point 7: diffusers' dequantizers build their shift tables with
    `torch.tensor([...], device=blocks.device)` per call, a pageable copy that stalls the host on
    a GPU. Cached per device, a streamed GGUF step makes no more host-synchronising ops than the
    plain model's own forward (every layer dequantized, every step)."""
    from diffusers.quantizers.gguf.utils import dequantize_functions

    from engine.transfer.devices import CpuBackend
    from tests.fixtures.host_syncs import HostSyncCounter

    cls, directory, path, plain, inputs = gguf_checkpoint
    # the counter sees what the uncached helpers do (else this test could not fail)
    blocks = torch.from_numpy(random_blocks("Q4_K", 4, 256))
    with HostSyncCounter() as raw:
        dequantize_functions[gguf.GGMLQuantizationType.Q4_K](blocks.reshape(-1, 144), 256, 144, torch.float32)
    assert raw.count > 0
    with HostSyncCounter() as reference:
        expected = run_model(plain, inputs)
    model = load_model(cls, path, vram_config=gguf_config(), vram_limit=0)
    runtime_of(model).use_scheduler(CpuBackend())
    run_model(model, inputs)  # the first call per device makes the constants
    with HostSyncCounter() as streamed:
        out = run_model(model, inputs)
    assert torch.equal(out, expected)
    assert runtime_of(model).stats.streamed_layers > 0 and runtime_of(model).scheduler.groups
    assert streamed.count <= reference.count, (streamed.seen, reference.seen)
