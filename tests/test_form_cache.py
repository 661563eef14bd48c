"""The stored-form cache (engine.storage.form_cache): what it is keyed by, what it refuses, and
that a load from it, or disk offload streaming it, computes bitwise what quantizing at load does.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import load_model, runtime_of
from engine.storage import form_cache
from engine.storage.disk import DiskStored, SafetensorsFile
from engine.storage.form_cache import CachedDiskStored, list_cached, remove_cached
from engine.storage.stored import Codec
from tests.fixtures.tiny_models import _cast_floats, run_model, save_sharded, tiny_model

CPU = {"computation_dtype": torch.bfloat16, "computation_device": "cpu"}
DISK = {"offload_dtype": "disk", "offload_device": "disk", **CPU}
FORMS = {"fp8": "float8_e4m3fn", "int8": "int8", "nf4": "nf4"}


def ram(form: str) -> dict:
    return {"offload_dtype": FORMS.get(form, torch.bfloat16), "offload_device": "cpu", **CPU}


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Z-Image transformer saved in float32 (as Z-Image-Turbo is published), sharded."""
    model, inputs = tiny_model("ZImageTransformer2DModel", torch.float32)
    directory = save_sharded(model, tmp_path / "model" / "transformer")
    return type(model), directory, _cast_floats(inputs, torch.bfloat16), tmp_path / "cache"


def _load(cls, directory, config, cache, **kw):
    model = load_model(cls, directory, vram_config=config, vram_limit=0, cache_dir=cache, **kw)
    writer = getattr(model, "_vram_form_cache", None)
    if writer is not None:
        assert writer.join(60)
    return model


def _masters(model):
    return {(r.name, p): s for r in runtime_of(model).layers for p, s in r.masters.items()}


def _same_parts(a, b) -> bool:
    pa, pb = a.parts(), b.parts()
    return len(pa) == len(pb) and all(
        x[0] == y[0] and x[1].dtype == y[1].dtype and torch.equal(x[1].view(torch.uint8), y[1].view(torch.uint8)) for x, y in zip(pa, pb)
    )


class NoQuantizing:
    """Fails the test if any codec quantizes (a load from the cache takes the stored form as is)."""

    def __init__(self, monkeypatch):
        from engine.storage import fp8, int8, nf4

        for codec in (fp8.CODEC, int8.CODEC, nf4.CODEC):
            monkeypatch.setattr(type(codec), "quantize_rows_into", self._fail)

    @staticmethod
    def _fail(*a, **k):
        raise AssertionError("quantized although the stored form is cached")


def _files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.safetensors"))


@pytest.mark.parametrize("form", ["fp8", "int8", "nf4", "bf16"])
def test_cached_load_is_bitwise_quantize_at_load(checkpoint, form, monkeypatch):
    cls, directory, inputs, cache = checkpoint
    reference = _load(cls, directory, ram(form), False)
    assert not cache.exists()
    first = _load(cls, directory, ram(form), cache)  # quantizes, writes in the background
    files = _files(cache)
    assert len(files) == 1 and f".{form}." in files[0].name
    with monkeypatch.context() as m:
        NoQuantizing(m)
        second = _load(cls, directory, ram(form), cache)
    ref_masters, second_masters = _masters(reference), _masters(second)
    assert ref_masters.keys() == second_masters.keys()
    assert all(_same_parts(ref_masters[k], second_masters[k]) for k in ref_masters)
    out = run_model(reference, inputs)
    assert torch.equal(run_model(first, inputs), out)
    assert torch.equal(run_model(second, inputs), out)
    assert _files(cache) == files  # read, not rewritten


@pytest.mark.parametrize("form", ["fp8", "int8", "nf4", "bf16"])
def test_disk_offload_streams_the_cached_form_bitwise(checkpoint, form):
    cls, directory, inputs, cache = checkpoint
    reference = run_model(_load(cls, directory, ram(form), False), inputs)
    model = _load(cls, directory, DISK, cache, disk_form=form)
    masters = list(_masters(model).values())
    assert masters and all(isinstance(s, DiskStored) for s in masters)
    cache_files = {p.resolve() for p in _files(cache)}
    assert {s.path.resolve() for s in masters} == cache_files  # nothing from the F32 shards
    if form != "bf16":
        assert any(isinstance(s, CachedDiskStored) for s in masters)
    else:
        assert all(s.storage_dtype == torch.bfloat16 for s in masters)
    assert torch.equal(run_model(model, inputs), reference)
    # a second disk load finds the file and builds nothing
    again = _load(cls, directory, DISK, cache, disk_form=form)
    assert _files(cache) == sorted(cache_files)
    assert torch.equal(run_model(again, inputs), reference)


def _read_counter(monkeypatch) -> dict:
    counted = {"bytes": 0}
    original = SafetensorsFile.read_into

    def counting(self, entry, out, start=0):
        counted["bytes"] += out.nbytes
        return original(self, entry, out, start)

    monkeypatch.setattr(SafetensorsFile, "read_into", counting)
    return counted


def test_bytes_read_per_step_are_the_stored_forms(checkpoint, monkeypatch):
    """One forward under disk offload reads the bytes of the form it streams: the F32 file's
    bytes without the cache; bf16 (0.5x), FP8/int8 (~0.25x + scales) and NF4 (~0.14x) of them
    from it; and exactly what the masters say they stream (what the planner counts)."""
    cls, directory, inputs, cache = checkpoint
    counted = _read_counter(monkeypatch)
    read = {}
    for form in ("source", "bf16", "fp8", "int8", "nf4"):
        model = _load(cls, directory, DISK, False if form == "source" else cache, **({} if form == "source" else {"disk_form": form}))
        run_model(model, inputs)  # first forward: traces the order
        counted["bytes"] = 0
        stats = runtime_of(model).stats
        before = stats.streamed_bytes
        run_model(model, inputs)
        read[form] = counted["bytes"]
        assert read[form] == sum(s.nbytes for s in _masters(model).values())
        assert stats.streamed_bytes - before == read[form]  # what the live panel shows
    f32 = read["source"]
    assert read["bf16"] == f32 // 2
    assert 0.24 < read["fp8"] / f32 < 0.33 and read["int8"] == read["fp8"]
    assert 0.12 < read["nf4"] / f32 < read["fp8"] / f32


def test_cache_key_changes_when_the_source_changes(checkpoint):
    cls, directory, inputs, cache = checkpoint
    _load(cls, directory, ram("fp8"), cache)
    (first,) = _files(cache)
    _load(cls, directory, ram("int8"), cache)  # another form: another file
    assert len(_files(cache)) == 2
    # the same bytes, a newer mtime: another key (the old file is never read for it)
    shard = sorted(directory.glob("*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _load(cls, directory, ram("fp8"), cache)
    assert len(_files(cache)) == 3
    # other weights of the same size and shapes: another key, and the new weights are what runs
    tensors = load_file(shard)
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[name] = tensors[name] * 2 + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    changed = _load(cls, directory, ram("fp8"), cache)
    assert len(_files(cache)) == 4
    assert torch.equal(run_model(changed, inputs), run_model(_load(cls, directory, ram("fp8"), False), inputs))
    assert first in _files(cache)


def _corrupt_first_tensor(path: Path) -> None:
    shard = SafetensorsFile(path)
    entry = min(shard.entries.values(), key=lambda e: e.offset)
    shard.close()
    with open(path, "r+b") as f:
        f.seek(entry.offset)
        data = f.read(16)
        f.seek(entry.offset)
        f.write(bytes(b ^ 0x5A for b in data))


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "garbage", "partial"])
def test_damaged_cache_is_rebuilt_never_used(checkpoint, damage, monkeypatch, caplog):
    cls, directory, inputs, cache = checkpoint
    reference = run_model(_load(cls, directory, ram("nf4"), False), inputs)
    _load(cls, directory, ram("nf4"), cache)
    (path,) = _files(cache)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) - 100])
    elif damage == "corrupt":
        _corrupt_first_tensor(path)
    elif damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    else:  # a write cut short leaves a temporary file, never the cache file
        path.rename(path.with_name(path.name + ".tmp-99999999-1"))
        path.with_name(path.name + ".tmp-99999999-1").write_bytes(good[: len(good) // 2])
    counted = _read_counter(monkeypatch)
    with caplog.at_level("WARNING"):
        model = _load(cls, directory, ram("nf4"), cache)
    # the temporary file of a write whose process is gone is removed
    assert not list(path.parent.glob("*.tmp-*"))
    if damage != "partial":
        assert "not usable" in caplog.text
    assert torch.equal(run_model(model, inputs), reference)
    assert path.read_bytes() == good  # rebuilt, identical
    # and the rebuilt file is used
    with monkeypatch.context() as m:
        NoQuantizing(m)
        again = _load(cls, directory, ram("nf4"), cache)
    assert torch.equal(run_model(again, inputs), reference)
    assert counted["bytes"] > 0


def test_damaged_cache_is_never_streamed_by_disk_offload(checkpoint):
    cls, directory, inputs, cache = checkpoint
    reference = run_model(_load(cls, directory, ram("fp8"), False), inputs)
    _load(cls, directory, DISK, cache, disk_form="fp8")
    (path,) = _files(cache)
    _corrupt_first_tensor(path)
    model = _load(cls, directory, DISK, cache, disk_form="fp8")
    assert torch.equal(run_model(model, inputs), reference)


def test_unwritable_cache_folder_means_no_cache_and_the_run_goes_on(checkpoint, caplog):
    cls, directory, inputs, cache = checkpoint
    reference = run_model(_load(cls, directory, ram("fp8"), False), inputs)
    blocker = cache.parent / "a_file"
    blocker.write_text("not a folder")
    unwritable = blocker / "cache"  # mkdir fails (as it does in a read-only folder, even as root)
    with caplog.at_level("WARNING"):
        model = _load(cls, directory, ram("fp8"), unwritable)
        disk = _load(cls, directory, DISK, unwritable, disk_form="fp8")
    assert "not cached" in caplog.text
    assert torch.equal(run_model(model, inputs), reference)
    # disk offload without a cache streams the checkpoint's own files, as it does with no cache
    assert not any(isinstance(s, CachedDiskStored) for s in _masters(disk).values())
    assert torch.equal(run_model(disk, inputs), run_model(_load(cls, directory, DISK, False), inputs))


def test_full_disk_means_no_cache_and_the_run_goes_on(checkpoint, monkeypatch, caplog):
    cls, directory, inputs, cache = checkpoint
    reference = run_model(_load(cls, directory, ram("nf4"), False), inputs)
    monkeypatch.setattr(form_cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with caplog.at_level("WARNING"):
        model = _load(cls, directory, ram("nf4"), cache)
        disk = _load(cls, directory, DISK, cache, disk_form="nf4")
    assert "GiB free" in caplog.text
    assert _files(cache) == [] and not list(cache.rglob("*.tmp-*"))
    assert torch.equal(run_model(model, inputs), reference)
    assert torch.equal(run_model(disk, inputs), run_model(_load(cls, directory, DISK, False), inputs))


def test_write_error_midway_leaves_no_file(checkpoint, monkeypatch, caplog):
    cls, directory, inputs, cache = checkpoint
    calls = {"n": 0}
    original = form_cache._bytes_of

    def failing(t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return original(t)

    monkeypatch.setattr(form_cache, "_bytes_of", failing)
    with caplog.at_level("WARNING"):
        model = _load(cls, directory, ram("int8"), cache)
    assert "No space left" in caplog.text
    assert not [p for p in cache.rglob("*") if p.is_file()]
    run_model(model, inputs)


def test_listing_and_freeing_a_models_caches(checkpoint):
    cls, directory, inputs, cache = checkpoint
    _load(cls, directory, ram("fp8"), cache)
    _load(cls, directory, ram("nf4"), cache)
    listed = list_cached(directory, cache)
    assert sorted(c.form for c in listed) == ["fp8", "nf4"]
    assert all(c.component == "model" and c.nbytes == c.path.stat().st_size for c in listed)
    freed = remove_cached(directory, cache)
    assert freed == sum(c.nbytes for c in listed)
    assert list_cached(directory, cache) == []
    assert list(directory.glob("*.safetensors"))  # the checkpoint is untouched


def test_default_folder_is_next_to_the_model_or_the_environment(tmp_path, monkeypatch):
    repo = tmp_path / "models" / "Z-Image-Turbo"
    (repo / "transformer").mkdir(parents=True)
    (repo / "model_index.json").write_text("{}")
    monkeypatch.delenv(form_cache.CACHE_DIR_ENV, raising=False)
    assert form_cache.cache_dir_for(repo / "transformer") == (tmp_path / "models" / ".lowvram-cache" / "Z-Image-Turbo").resolve()
    assert form_cache.component_name(repo / "transformer") == "transformer"
    monkeypatch.setenv(form_cache.CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert form_cache.cache_dir_for(repo / "transformer") == tmp_path / "elsewhere" / "Z-Image-Turbo"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_estimate_counts_the_bytes_disk_offload_reads(checkpoint, device):
    """The estimate's streamed bytes under disk offload are the stored form's (what the cache
    streams, scales included), not the bf16 files': ~0.5x for FP8, less for NF4."""
    from engine.generation.estimate import model_cost

    cls, directory, inputs, cache = checkpoint
    streamed = {}
    for form in ("bf16", "fp8", "int8", "nf4"):
        model, _ = tiny_model("ZImageTransformer2DModel", torch.float32)
        streamed[form] = sum(model_cost(model, form, True, device).stream_bytes.values())
    assert 0.45 < streamed["fp8"] / streamed["bf16"] < 0.7
    assert streamed["int8"] == streamed["fp8"]
    assert streamed["nf4"] < streamed["fp8"]
    # and what the real load streams: the estimate of FP8 is the cached masters' bytes (+ alignment)
    loaded = _load(cls, directory, DISK, cache, disk_form="fp8")
    real = sum(s.nbytes for s in _masters(loaded).values())
    assert real <= streamed["fp8"] < real * 1.3


def test_the_page_lists_cached_forms_and_frees_them(checkpoint, tmp_path, monkeypatch):
    """The model picker's label names the cached forms and their size; "Free disk space"
    removes them (the checkpoint stays); the first quantized load says it quantizes once."""
    from engine.generation.session import first_load_note
    from engine.generation.studio import Studio
    from ui import formatting
    from ui.handlers import Handlers

    cls, directory, inputs, _ = checkpoint
    repo = directory.parent
    (repo / "model_index.json").write_text("{}")
    monkeypatch.delenv(form_cache.CACHE_DIR_ENV, raising=False)
    studio = Studio(tmp_path / "models", tmp_path / "outputs")
    monkeypatch.setattr(studio.registry, "local_path", lambda model_id, models_dir=None: repo if model_id == "zimage" else None)
    assert first_load_note(repo, "nf4") == "quantizing to NF4 (once), then cached"
    assert first_load_note(repo, "bf16") == ""
    _load(cls, directory, ram("nf4"), None)  # the default folder: next to the model
    cached = studio.cached_forms("zimage")
    assert [(c.component, c.form) for c in cached] == [("transformer", "nf4")]
    assert cached[0].path.parent == (repo.parent / ".lowvram-cache" / repo.name).resolve()
    assert first_load_note(repo, "nf4") == ""  # the second load reads the cache
    label = formatting.model_label(studio.list_models()[0], cached)
    assert label.endswith(f" · cached: NF4 {cached[0].nbytes / 1e9:.1f} GB")
    update = Handlers(studio).free_disk_space("zimage")
    assert update["value"] == "zimage"
    assert studio.cached_forms("zimage") == [] and list(directory.glob("*.safetensors"))
    assert first_load_note(repo, "nf4") == "quantizing to NF4 (once), then cached"


@pytest.mark.parametrize("form", ["nf4", "fp8"])
def test_an_exported_model_loads_without_the_original_shards(checkpoint, tmp_path, form):
    """tools.quantize writes a folder that loads on its own, bitwise what loading the original in
    that form gives, in RAM and streamed from its file with disk offload."""
    import json

    from tools.quantize import export

    cls, directory, inputs, cache = checkpoint
    repo = directory.parent
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline", "transformer": ["diffusers", cls.__name__]}))
    reference = run_model(_load(cls, directory, ram(form), False), inputs)
    out = tmp_path / "exported"
    manifest = export(repo, form, out, log=lambda *_: None)
    assert manifest["format"] == form_cache.FORMAT_VERSION and manifest["weights"] == form
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()
    assert [p.name for p in (out / "transformer").glob("*.safetensors")] == [f"lowvram.{form}.safetensors"]
    shutil.rmtree(repo)  # the original shards are gone
    loaded = _load(cls, out / "transformer", ram(form), cache)
    assert torch.equal(run_model(loaded, inputs), reference)
    disk = _load(cls, out / "transformer", DISK, cache)
    masters = list(_masters(disk).values())
    assert all(isinstance(s, DiskStored) for s in masters) and any(isinstance(s, CachedDiskStored) for s in masters)
    assert torch.equal(run_model(disk, inputs), reference)
    assert not cache.exists()  # an exported form needs no cache
    # another form than the exported one is converted from it (and runs)
    other = _load(cls, out / "transformer", ram("bf16"), cache)
    assert run_model(other, inputs).shape == reference.shape


def test_a_damaged_export_is_refused_with_what_to_do(checkpoint, tmp_path):
    import json

    from engine.storage.disk import CheckpointError
    from tools.quantize import export

    cls, directory, inputs, _ = checkpoint
    repo = directory.parent
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline", "transformer": ["diffusers", cls.__name__]}))
    out = tmp_path / "exported"
    export(repo, "int8", out, log=lambda *_: None)
    (path,) = (out / "transformer").glob("*.safetensors")
    _corrupt_first_tensor(path)
    with pytest.raises(CheckpointError, match="export it again"):
        load_model(cls, out / "transformer", vram_config=ram("int8"))


@pytest.mark.parametrize("form", ["fp8", "nf4"])
def test_staged_disk_offload_streams_the_cached_form_bitwise(tmp_path, form):
    """The transfer scheduler's path (GPU logic on the recording backend): the stager reads each
    cached stored tensor into the staging buffers as it is, and the layer rebuilds it from the
    slot view, bitwise the RAM form."""
    from diffusers import QwenImageTransformer2DModel

    from engine.transfer.pinned import PinnedBudget
    from tests.test_disk_staging import forward
    from tests.test_scheduler import PinningBackend

    model, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    directory = save_sharded(model, tmp_path / "qwen")
    cache = tmp_path / "cache"
    reference = run_model(_load(QwenImageTransformer2DModel, directory, ram(form), False), inputs)
    loaded = _load(QwenImageTransformer2DModel, directory, DISK, cache, disk_form=form)
    runtime = runtime_of(loaded)
    runtime.use_scheduler(PinningBackend(), PinnedBudget(limit_bytes=1024**3))
    assert torch.equal(run_model(loaded, inputs), reference)  # traces the order
    stager = runtime.scheduler.stager
    staged = []
    for _ in range(3):
        assert torch.equal(forward(loaded, inputs), reference)
        staged.append(stager.read_bytes)
    per_forward = sum(g.disk_bytes for g in runtime.scheduler.groups)
    assert [b - a for a, b in zip(staged, staged[1:])] == [per_forward] * 2
    cached = sum(s.nbytes for s in _masters(loaded).values() if isinstance(s, CachedDiskStored))
    assert cached and per_forward == sum(s.nbytes for s in _masters(loaded).values())
