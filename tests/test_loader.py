"""engine.load_model: tiny real-class checkpoints in the libraries' own sharded layout.

Outputs must be bitwise those of the library's from_pretrained(bf16) for every bf16 config (RAM or
disk, any vram_limit); FP8 must be bitwise what enable_vram_management makes of the bf16 model;
key renaming (transformers v5 conversion mapping), tied weights and converters; every bad input
raises a CheckpointError (a ValueError) that names the file/tensor/keys.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from engine import CheckpointError, DiskStored, enable_vram_management, load_model, runtime_of
from engine.config import Place
from engine.storage.disk import SafetensorsFile
from engine.loading.loader import read_stored
from engine.storage.fp8 import ScaledFp8Stored
from engine.storage.stored import store
from tests.fixtures.tiny_models import run_model, save_sharded, tiny_model

RAM = {"offload_dtype": torch.bfloat16, "offload_device": "cpu", "computation_dtype": torch.bfloat16, "computation_device": "cpu"}
DISK = {"offload_dtype": "disk", "offload_device": "disk", "computation_dtype": torch.bfloat16, "computation_device": "cpu"}
FP8 = {"offload_dtype": "float8_e4m3fn", "offload_device": "cpu", "computation_dtype": torch.bfloat16, "computation_device": "cpu"}

# A subset that covers diffusers DiTs, a VAE and the transformers text encoders (renamed keys, ties,
# fp32-kept modules); the UNet is left out for time.
MODELS = [
    "QwenImageTransformer2DModel",
    "FluxTransformer2DModel",
    "ZImageTransformer2DModel",
    "AutoencoderKL",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3Model",
    "CLIPTextModel",
    "T5EncoderModel",
]


def _is_diffusers(model) -> bool:
    from diffusers import ModelMixin

    return isinstance(model, ModelMixin)


def from_pretrained_bf16(cls, directory):
    kw = {"torch_dtype": torch.bfloat16} if hasattr(cls, "load_config") else {"dtype": torch.bfloat16}
    return cls.from_pretrained(directory, **kw)


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))




@pytest.mark.parametrize("name", MODELS)
def test_bitwise_equal_to_from_pretrained_for_every_bf16_config(name, tiny_checkpoints):
    cls, directory, inputs = tiny_checkpoints(name)
    assert len(shard_files(directory)) >= 2 and list(directory.glob("*.safetensors.index.json"))
    reference = run_model(from_pretrained_bf16(cls, directory), inputs)
    half = sum(f.stat().st_size for f in shard_files(directory)) / 2 / 1024**3  # GB: some layers resident, some streamed
    configs = ((RAM, None), (RAM, 0), (DISK, 0), (DISK, half), (DISK, None)) if name == MODELS[0] else ((RAM, None), (DISK, 0))
    for config, limit in configs:
        model = load_model(cls, directory, vram_config=config, vram_limit=limit)
        first, second = run_model(model, inputs), run_model(model, inputs)
        assert torch.equal(first, reference), (name, config["offload_dtype"], limit)
        assert torch.equal(second, reference), (name, config["offload_dtype"], limit)


def test_fp32_checkpoint_converts_like_from_pretrained(tmp_path):
    model, inputs = tiny_model("Qwen3Model", torch.float32)
    directory = save_sharded(model, tmp_path)
    cls = type(model)
    reference = run_model(from_pretrained_bf16(cls, directory), inputs)
    for config, limit in ((RAM, None), (DISK, 0), (FP8, 0)):
        loaded = load_model(cls, directory, vram_config=config, vram_limit=limit)
        masters = [s for r in runtime_of(loaded).layers for s in r.masters.values()]
        if config is DISK:
            # streamed as bf16 from the stored-form cache (converted once, tests/test_form_cache.py)
            assert all(s.storage_dtype == torch.bfloat16 for s in masters)
            assert torch.equal(run_model(loaded, inputs), reference)
        elif config is RAM:
            assert all(s.storage_dtype == torch.bfloat16 for s in masters)
            assert torch.equal(run_model(loaded, inputs), reference)
        else:
            assert {s.storage_dtype for s in masters} == {torch.float8_e4m3fn, torch.bfloat16}
            assert torch.allclose(run_model(loaded, inputs).float(), reference.float(), atol=0.25, rtol=0.1)


def test_disk_masters_stay_in_the_files(tiny_checkpoints):
    cls, directory, inputs = tiny_checkpoints("QwenImageTransformer2DModel")
    files = {p.resolve() for p in shard_files(directory)}
    model = load_model(cls, directory, vram_config=DISK, vram_limit=0)
    masters = [s for r in runtime_of(model).layers for s in r.masters.values()]
    assert masters and all(isinstance(s, DiskStored) for s in masters)
    assert {s.path.resolve() for s in masters} == files
    # nothing was re-serialized: the directory holds what save_pretrained wrote
    assert {p.resolve() for p in directory.iterdir() if p.suffix == ".safetensors"} == files
    assert all(p.device.type == "meta" for p in model.parameters())  # no weight in RAM
    before = sorted(p.name for p in directory.iterdir())
    run_model(model, inputs)
    assert sorted(p.name for p in directory.iterdir()) == before


def test_fp8_is_bitwise_what_enable_vram_management_makes(tiny_checkpoints):
    cls, directory, inputs = tiny_checkpoints("FluxTransformer2DModel")
    reference = enable_vram_management(from_pretrained_bf16(cls, directory), vram_config=FP8, vram_limit=0)
    loaded = load_model(cls, directory, vram_config=FP8, vram_limit=0)
    assert torch.equal(run_model(loaded, inputs), run_model(reference, inputs))
    ref_layers = {r.name: r for r in runtime_of(reference).layers}
    n_fp8 = 0
    for record in runtime_of(loaded).layers:
        for pname, stored in record.masters.items():
            other = ref_layers[record.name].masters[pname]
            assert type(stored) is type(other)
            if isinstance(stored, ScaledFp8Stored):
                n_fp8 += 1
                assert torch.equal(stored.data.view(torch.uint8), other.data.view(torch.uint8))
                assert torch.equal(stored.scale, other.scale)
    assert n_fp8 > 0


def test_chunked_fp8_read_is_bitwise_store(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import engine.loading.loader as loader

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": (torch.randn(300, 70, generator=g) * 0.01).bfloat16(),
        "conv": torch.randn(17, 3, 3, 5, generator=g).bfloat16(),
        "zeros": torch.zeros(4, 8, dtype=torch.bfloat16),
        "fp32": torch.randn(100, 30, generator=g),
        "bias": torch.randn(30, generator=g).bfloat16(),
    }
    tensors["w"][5] = 0
    save_file(tensors, tmp_path / "q.safetensors")
    shard = SafetensorsFile(tmp_path / "q.safetensors")
    monkeypatch.setattr(loader, "QUANT_CHUNK_BYTES", 10_000)  # many chunks per tensor
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        place = Place(torch.device("cpu"), dtype)
        for key, tensor in tensors.items():
            ours, theirs = read_stored(shard.entries[key], place, torch.bfloat16), store(tensor, place, torch.bfloat16)
            assert type(ours) is type(theirs), key
            if isinstance(ours, ScaledFp8Stored):
                assert torch.equal(ours.data.view(torch.uint8), theirs.data.view(torch.uint8)), key
                assert torch.equal(ours.scale, theirs.scale), key
            else:
                assert torch.equal(ours.tensor, theirs.tensor), key


def test_list_of_files_and_directory_without_index(tiny_checkpoints, tmp_path):
    cls, directory, inputs = tiny_checkpoints("Qwen3Model")
    reference = run_model(load_model(cls, directory, vram_config=RAM), inputs)
    model = load_model(cls, [str(p) for p in shard_files(directory)], vram_config=DISK, vram_limit=0)
    assert torch.equal(run_model(model, inputs), reference)
    bare = tmp_path / "bare"
    shutil.copytree(directory, bare)
    for index in bare.glob("*.index.json"):
        index.unlink()
    assert torch.equal(run_model(load_model(cls, bare, vram_config=RAM), inputs), reference)


# --- key mapping: transformers v5 renames, ties, converters ------------------------------------
def _tied_qwen25_vl(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, inputs = tiny_model("Qwen2_5_VLForConditionalGeneration", torch.bfloat16)
    config = model.config
    config.tie_word_embeddings = True
    config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    save_sharded(tied, tmp_path)
    return Qwen2_5_VLForConditionalGeneration, tmp_path, {k: v for k, v in inputs.items() if k != "output_hidden_states"}


def test_renamed_checkpoint_keys_and_tied_weights(tmp_path):
    from safetensors import safe_open

    cls, directory, inputs = _tied_qwen25_vl(tmp_path)
    keys = set()
    for f in shard_files(directory):
        with safe_open(f, "pt") as handle:
            keys |= set(handle.keys())
    # the checkpoint has the original layout, the model the v5 one
    assert any(k.startswith("model.layers.") for k in keys) and any(k.startswith("visual.") for k in keys)
    assert not any(k.startswith("model.language_model.") for k in keys) and "lm_head.weight" not in keys
    reference = from_pretrained_bf16(cls, directory)
    with torch.no_grad():
        expected = reference(**inputs).logits
    for config, limit in ((RAM, None), (DISK, 0)):
        model = load_model(cls, directory, vram_config=config, vram_limit=limit)
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
        records = {r.name: r for r in runtime_of(model).layers}
        assert records["lm_head"].masters["weight"] is records["model.language_model.embed_tokens"].masters["weight"]
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, expected)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=128, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config).to(torch.bfloat16).eval()
    directory = save_sharded(model, tmp_path_factory.mktemp("moe"))
    return Qwen2MoeForCausalLM, directory, torch.tensor([[1, 5, 7, 9, 3, 2]])


def test_converted_keys_cannot_stay_on_disk(moe_checkpoint):
    cls, directory, ids = moe_checkpoint
    with pytest.raises(CheckpointError) as err:
        load_model(cls, directory, vram_config=DISK, vram_limit=0)
    message = str(err.value)
    assert "Qwen2MoeForCausalLM" in message and "experts.0.gate_proj.weight" in message
    assert "MergeModulelist" in message and 'disk_fallback="ram"' in message
    with torch.no_grad():
        expected = from_pretrained_bf16(cls, directory)(input_ids=ids).logits
    for config, kwargs in ((RAM, {}), (DISK, {"disk_fallback": "ram"})):
        model = load_model(cls, directory, vram_config=config, vram_limit=0, **kwargs)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, expected)
    records = {r.name: r for r in runtime_of(model).layers}
    assert isinstance(records["model.layers.0.self_attn.q_proj"].masters["weight"], DiskStored)
    assert not isinstance(records["model.layers.0.mlp.experts"].masters["gate_up_proj"], DiskStored)
    with pytest.raises(ValueError, match="disk_fallback"):
        load_model(cls, directory, vram_config=DISK, disk_fallback="maybe")


# --- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def qwen_copy(tiny_checkpoints, tmp_path):
    cls, directory, inputs = tiny_checkpoints("QwenImageTransformer2DModel")
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return cls, target


def test_pickle_files_are_never_unpickled(tmp_path, tiny_checkpoints):
    cls, directory, _ = tiny_checkpoints("QwenImageTransformer2DModel")
    repo = tmp_path / "pickled"
    repo.mkdir()
    shutil.copy(directory / "config.json", repo / "config.json")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": Boom()}, repo / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only \.safetensors.*diffusion_pytorch_model\.bin"):
        load_model(cls, repo, vram_config=RAM)
    for name in ("model.pth", "model.ckpt"):
        shutil.copy(repo / "diffusion_pytorch_model.bin", repo / name)
        with pytest.raises(CheckpointError, match=rf"only \.safetensors.*{name}"):
            load_model(cls, [repo / name], vram_config=RAM)
    assert not marker.exists()


def test_truncated_shard_names_file_and_tensor(qwen_copy):
    cls, directory = qwen_copy
    shard = shard_files(directory)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated file: tensor '[^']+'"):
        load_model(cls, directory, vram_config=DISK)


def test_corrupted_header_names_file(qwen_copy):
    cls, directory = qwen_copy
    shard = shard_files(directory)[0]
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 10] = b"#garbage!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: corrupted .safetensors header"):
        load_model(cls, directory, vram_config=RAM)
    shard.write_bytes(struct.pack("<Q", 10**12) + bytes(data[8:]))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: corrupted or truncated"):
        load_model(cls, directory, vram_config=RAM)


def test_shard_listed_in_index_but_missing(qwen_copy):
    cls, directory = qwen_copy
    shard = shard_files(directory)[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard '{shard.name}'.*missing"):
        load_model(cls, directory, vram_config=RAM)


def test_index_that_disagrees_with_the_shards(qwen_copy):
    cls, directory = qwen_copy
    index_path = next(directory.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    index["weight_map"]["not.a.tensor"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not.a.tensor"):
        load_model(cls, directory, vram_config=RAM)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_and_unexpected_keys_are_listed(qwen_copy):
    cls, directory = qwen_copy
    _edit_config(directory, num_layers=3)
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*transformer_blocks\.2\.attn\.add_k_proj\.bias.*\(32 in all\)"):
        load_model(cls, directory, vram_config=DISK)
    _edit_config(directory, num_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\).*transformer_blocks\.1\.attn\.add_k_proj\.bias"):
        load_model(cls, directory, vram_config=DISK)


def test_shape_mismatch_names_tensor_and_file(qwen_copy):
    cls, directory = qwen_copy
    _edit_config(directory, joint_attention_dim=48)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*txt_in\.weight: checkpoint \[32, 32\] in diffusion_pytorch_model-\d+-of-\d+\.safetensors vs model \[32, 48\]"):
        load_model(cls, directory, vram_config=RAM)


def fail_reading_at(monkeypatch, n: int) -> tuple[dict, list]:
    """Make the n-th SafetensorsFile.read_into fail; returns the call count and weak references
    to every destination tensor it was given."""
    import weakref

    from engine.storage import disk

    made: list[weakref.ref] = []
    original_read_into = disk.SafetensorsFile.read_into
    calls = {"n": 0}

    def failing_read_into(self, entry, out, start=0):
        calls["n"] += 1
        made.append(weakref.ref(out))
        if calls["n"] == n:
            raise disk.CheckpointError(f"{self.path}: reading tensor {entry.key!r} failed (injected)")
        return original_read_into(self, entry, out, start)

    monkeypatch.setattr(disk.SafetensorsFile, "read_into", failing_read_into)
    return calls, made


def test_failure_while_streaming_drops_everything(qwen_copy, monkeypatch):
    import gc

    cls, directory = qwen_copy
    calls, made = fail_reading_at(monkeypatch, 20)
    with pytest.raises(CheckpointError, match="injected"):
        load_model(cls, directory, vram_config=RAM)
    gc.collect()
    assert calls["n"] == 20 and sum(ref() is not None for ref in made) == 0


@pytest.mark.parametrize("config", [RAM, dict(RAM, offload_dtype=torch.float8_e4m3fn)], ids=["bf16", "fp8"])
def test_a_failed_load_releases_its_host_arena_while_the_error_is_held(qwen_copy, monkeypatch, config):
    """The caller (the UI, a log handler, `sys.last_traceback`) may keep the exception, and with it
    the traceback's frames: the partly filled host arena and its views in those frames are
    released all the same."""
    import gc
    import weakref

    from engine.loading import loader

    cls, directory = qwen_copy
    arenas: list[weakref.ref] = []

    class TrackedArena(loader.HostArena):
        def __init__(self, nbytes):
            super().__init__(nbytes)
            arenas.append(weakref.ref(self))

    monkeypatch.setattr(loader, "HostArena", TrackedArena)
    calls, views = fail_reading_at(monkeypatch, 12)
    with pytest.raises(CheckpointError, match="injected") as excinfo:
        load_model(cls, directory, vram_config=config)
    gc.collect()
    assert excinfo.value.__traceback__ is not None and calls["n"] == 12
    assert len(arenas) == 1 and arenas[0]() is None
    assert views and all(ref() is None for ref in views)


def test_real_layout_tiny_repo_components(tmp_path):
    """The qwen-image tiny repo (tests.fixtures.tiny_repos: the real repo's file layout, sharded
    with index json): text encoder (transformers, renamed keys) and DiT from their subfolders."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tests.fixtures.tiny_repos import write_tiny_repo

    repo = write_tiny_repo("qwen-image", tmp_path / "qwen-image")
    g = torch.Generator().manual_seed(0)
    text_dir = repo / "text_encoder"
    vocab = json.loads((text_dir / "config.json").read_text()).get("text_config", {}).get("vocab_size") or 64
    ids = torch.randint(0, min(vocab, 64), (1, 6), generator=g)
    with torch.no_grad():
        expected = from_pretrained_bf16(Qwen2_5_VLForConditionalGeneration, text_dir)(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        model = load_model(Qwen2_5_VLForConditionalGeneration, text_dir, vram_config=DISK, vram_limit=0)
        assert torch.equal(model(input_ids=ids, output_hidden_states=True).hidden_states[-1], expected)

    dit_dir = repo / "transformer"
    cfg = json.loads((dit_dir / "config.json").read_text())
    side = 4
    inputs = {
        "hidden_states": torch.randn(1, side * side, cfg["in_channels"], generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, 5, cfg["joint_attention_dim"], generator=g).bfloat16(),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5]).bfloat16(),
        "img_shapes": [(1, side, side)],
    }
    reference = run_model(from_pretrained_bf16(QwenImageTransformer2DModel, dit_dir), inputs)
    for config, limit in ((DISK, 0), (RAM, None)):
        assert torch.equal(run_model(load_model(QwenImageTransformer2DModel, dit_dir, vram_config=config, vram_limit=limit), inputs), reference)
