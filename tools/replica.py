"""Real-size sparse replicas of the catalogue models.

    python -m tools.replica write qwen-image models/          # models/qwen-image/ (the app finds it)
    python -m tools.replica check --all /tmp/replicas        # every catalogue model: write + verify

A replica is a pipeline folder in the real repository layout: model_index.json, scheduler/,
tokenizer files (built locally, small vocabularies), and for every weighted component its real
config.json (model_registry/component_configs.json) and its weights as .safetensors shards with
every tensor at its real checkpoint name, shape and dtype, split into the real repository's shard
count with the index file the real repository ships. The shards hold only their headers: the data
is a file hole (`truncate`), so a 41 GB transformer costs no disk and reads give zeros. Zero
weights are fine for memory and speed measurements; they say nothing about numerics.

Checkpoint names are what the libraries write: a meta-device build's state dict, tied weights
removed, and for transformers the library's own reverse conversion (`revert_weight_conversion`,
as `save_pretrained` does), so Qwen2.5-VL keeps its on-disk `model.layers.*` / `visual.*` names.

A GGUF entry (models.json `gguf`) is laid out as `download_gguf` assembles a download: the base
repository's components, and a denoiser folder with the base config.json and the entry's .gguf
file (its `gguf.file` name), written by tools/gguf_replica.py in the published files' names,
architecture and (approximately) quantization types, its data a hole too.

`check` proves for each model: the configs build, the engine's loader (`engine.load_model`, with
disk offload, which reads no weight) finds no missing, unexpected or mis-shaped key, and the
stored sizes in models.json equal the replica's bytes; for a GGUF denoiser, that it is loaded from
the .gguf (every tensor), that its tensors hold the catalogue's parameter count, and the file's
size against the catalogue's `gguf.bytes` (reported as a ratio: the replica's type mix is an
approximation of llama.cpp's).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ST_DTYPES = {
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float64": "F64",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
    "torch.float8_e4m3fn": "F8_E4M3",
}
ST_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}

#: Shard counts of the real repositories (files as listed on the hub; 1 = a single file without
#: an index). SDXL ships every component as one file, in an fp32 main and an fp16 variant.
SHARDS: dict[tuple[str, str], int] = {
    ("qwen-image", "text_encoder"): 4,
    ("qwen-image", "transformer"): 9,
    ("qwen-image", "vae"): 1,
    ("z-image-turbo", "text_encoder"): 3,
    ("z-image-turbo", "transformer"): 3,
    ("z-image-turbo", "vae"): 1,
    ("flux1-schnell", "text_encoder"): 1,
    ("flux1-schnell", "text_encoder_2"): 2,
    ("flux1-schnell", "transformer"): 3,
    ("flux1-schnell", "vae"): 1,
    ("flux1-dev", "text_encoder"): 1,
    ("flux1-dev", "text_encoder_2"): 2,
    ("flux1-dev", "transformer"): 3,
    ("flux1-dev", "vae"): 1,
    ("flux2-klein-4b", "text_encoder"): 2,
    ("flux2-klein-4b", "transformer"): 2,
    ("flux2-klein-4b", "vae"): 1,
    # the edit repositories hold the same models at the same sizes as their text-to-image
    # siblings, saved the same way: their shard counts are taken from those (not confirmed
    # against the hub, which this machine cannot reach)
    ("qwen-image-edit-2509", "text_encoder"): 4,
    ("qwen-image-edit-2509", "transformer"): 9,
    ("qwen-image-edit-2509", "vae"): 1,
    ("flux1-kontext-dev", "text_encoder"): 1,
    ("flux1-kontext-dev", "text_encoder_2"): 2,
    ("flux1-kontext-dev", "transformer"): 3,
    ("flux1-kontext-dev", "vae"): 1,
    # issue #23's models, none confirmed against the hub (no network here): the updates of a model
    # (Qwen-Image-2512, Qwen-Image-Edit-2511, Z-Image base) keep their predecessor's files and
    # sizes, so its shard counts; FLUX.2 [klein] 9B is saved like the 4B (~5 GB shards)
    ("qwen-image-2512", "text_encoder"): 4,
    ("qwen-image-2512", "transformer"): 9,
    ("qwen-image-2512", "vae"): 1,
    ("qwen-image-edit-2511", "text_encoder"): 4,
    ("qwen-image-edit-2511", "transformer"): 9,
    ("qwen-image-edit-2511", "vae"): 1,
    ("z-image", "text_encoder"): 3,
    ("z-image", "transformer"): 3,
    ("z-image", "vae"): 1,
    ("flux2-klein-9b", "text_encoder"): 4,
    ("flux2-klein-9b", "transformer"): 4,
    ("flux2-klein-9b", "vae"): 1,
    # FLUX.2 [dev]: the 24B Mistral text encoder in 10 files, the 32B transformer in 7 (from memory)
    ("flux2-dev", "text_encoder"): 10,
    ("flux2-dev", "transformer"): 7,
    ("flux2-dev", "vae"): 1,
    # Krea 2: no hub repo to read (diffusers 0.42.1: "no hub repo yet"); Qwen3-VL-4B's own 2 files and
    # diffusers' 10 GB default shards for the 25.6 GB transformer
    ("krea2", "text_encoder"): 2,
    ("krea2", "transformer"): 3,
    ("krea2", "vae"): 1,
    # HunyuanImage-2.1's diffusers conversion: Qwen2.5-VL-7B as Qwen-Image ships it, the 35 GB
    # transformer in diffusers' 10 GB default shards (from memory, not confirmed)
    ("hunyuanimage-2.1", "text_encoder"): 4,
    ("hunyuanimage-2.1", "text_encoder_2"): 1,
    ("hunyuanimage-2.1", "transformer"): 4,
    ("hunyuanimage-2.1", "vae"): 1,
    # Qwen-Image-2.1: Qwen3-VL-8B's own 4 files, the 14 GB transformer in diffusers' 10 GB default
    # shards (guesses: no files to read here)
    ("qwen-image-2.1", "text_encoder"): 4,
    ("qwen-image-2.1", "transformer"): 2,
    ("qwen-image-2.1", "vae"): 1,
}
#: Stored dtype of the floating tensors where it is not bf16.
DTYPES: dict[tuple[str, str], str] = {
    ("flux1-schnell", "text_encoder"): "BF16",
    ("flux1-dev", "text_encoder"): "BF16",
    ("flux1-kontext-dev", "text_encoder"): "BF16",
}
SDXL_VARIANTS = (("fp16", "F16"), (None, "F32"))
#: the vram_config `check` loads with: every weight stays in its file (nothing is read)
DISK_OFFLOAD: dict[str, Any] = {
    "offload_dtype": "disk", "offload_device": "disk", "onload_dtype": "disk", "onload_device": "disk",
    "preparing_dtype": "bfloat16", "preparing_device": "cpu", "computation_dtype": "bfloat16", "computation_device": "cpu",
}
MARKER = "REPLICA.txt"
MARKER_TEXT = "sparse replica written by tools/replica.py: weights are file holes (zeros)\n"


def base_id(model_id: str) -> str:
    """The catalogue entry whose repository a GGUF entry takes its other components from (the
    entry itself for any other): its files are that repository's, so are their shard counts."""
    from model_registry import get_model, list_models

    entry = get_model(model_id)
    if entry.gguf is None:
        return model_id
    return next((e.id for e in list_models() if e.gguf is None and e.hf_repo == entry.hf_repo and not e.is_demo), model_id)


def shard_count(model_id: str, component: str) -> int:
    """How many files the real repository splits `component` of `model_id` into (`SHARDS`; a GGUF
    entry's denoiser is its one .gguf file)."""
    from model_registry import get_model

    entry = get_model(model_id)
    if entry.gguf is not None and component == entry.adapter.denoiser:
        return 1
    return SHARDS.get((base_id(model_id), component), 1)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ST_BYTES[self.dtype] * math.prod(self.shape)


def meta_model(library: str, class_name: str, config: dict[str, Any]) -> Any:
    from model_registry.sizes import build_on_meta

    return build_on_meta(library, class_name, config)


def checkpoint_specs(model: Any, library: str, float_dtype: str) -> list[TensorSpec]:
    """Every tensor the library would write for `model`, by its on-disk name."""
    state = model.state_dict()
    if library == "transformers":
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(state, model)
        state = revert_weight_conversion(model, state)
    out = []
    for name, t in state.items():
        dtype = float_dtype if t.is_floating_point() else ST_DTYPES[str(t.dtype)]
        out.append(TensorSpec(name, dtype, tuple(int(d) for d in t.shape)))
    return out


def split_shards(specs: list[TensorSpec], count: int) -> list[list[TensorSpec]]:
    """`count` shards of about equal bytes, tensors in name order (as save_pretrained fills them)."""
    specs = sorted(specs, key=lambda s: _natural(s.name))
    if count <= 1:
        return [specs]
    total = sum(s.nbytes for s in specs)
    target = total / count
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if size + s.nbytes > target and shards[-1] and len(shards) < count:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def write_sparse_safetensors(path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """A .safetensors file whose header is real and whose data is a hole. Returns its size."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_config(folder: Path, library: str, config: dict[str, Any]) -> None:
    """The component's config.json, as the library writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if library == "diffusers":
        import diffusers

        cfg.setdefault("_diffusers_version", diffusers.__version__)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def write_component(
    folder: Path, specs: list[TensorSpec], shards: int, library: str, config: dict[str, Any], variant: str | None = None
) -> dict[str, Any]:
    """config.json + shards (+ index) of one component."""
    write_config(folder, library, config)
    base = "diffusion_pytorch_model" if library == "diffusers" else "model"
    tag = f".{variant}" if variant else ""
    parts = split_shards(specs, shards)
    files: list[str] = []
    if len(parts) == 1:
        name = f"{base}{tag}.safetensors"
        write_sparse_safetensors(folder / name, parts[0])
        return {"files": [name], "bytes": sum(s.nbytes for s in specs)}
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts, 1):
        name = f"{base}-{i:05d}-of-{len(parts):05d}{tag}.safetensors"
        write_sparse_safetensors(folder / name, part)
        files.append(name)
        weight_map |= {s.name: name for s in part}
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": dict(sorted(weight_map.items()))}
    index_name = f"{base}.safetensors.index{tag}.json"
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"files": files, "bytes": index["metadata"]["total_size"]}


#: Qwen2's first special token (<|endoftext|>) in the real vocabulary: the real text-encoder
#: config's image_token_id (151655) and vision_start_token_id (151652) count from there
QWEN_FIRST_SPECIAL_ID = 151643


def qwen_vocab_at_real_ids() -> Any:
    """The small Qwen2.5-VL vocabulary with its special tokens at their real ids (the byte-level
    BPE stays small): the real config's image token must be the id the processor writes, or the
    vision tower's features meet no image tokens in the prompt."""
    from model_registry.demo.tokenizer import QwenVocab, qwen_vocab

    qv = qwen_vocab(qwen3=False)
    start = min(qv.added.values())
    added = {t: i - start + QWEN_FIRST_SPECIAL_ID for t, i in qv.added.items()}
    # in vocab.json too: the tokenizer renumbers added tokens the model vocabulary does not hold
    return QwenVocab({**qv.vocab, **added}, qv.merges, added)


def _write_pipeline_files(root: Path, family: str) -> None:
    """model_index.json, scheduler/ and tokenizers as in the real repo (tokenizers small)."""
    from model_registry.demo.repo import (
        Z_IMAGE_COMPONENTS,
        Z_IMAGE_SCHEDULER,
        quiet_libraries,
        write_index_and_scheduler,
    )
    from model_registry.demo.tokenizer import qwen_vocab, write_qwen3_tokenizer
    from tests.fixtures import tiny_repos as tr

    with quiet_libraries():
        if family == "z-image":
            write_index_and_scheduler(root, family, Z_IMAGE_COMPONENTS, Z_IMAGE_SCHEDULER)
        else:
            tr._write_index_and_scheduler(root, family)
        if family == "qwen-image":
            tr._write_qwen25vl_tokenizer(root / "tokenizer", qwen_vocab(qwen3=False))
        elif family == "qwen-image-edit":
            tr.write_qwen_image_edit_text_files(root, qwen_vocab_at_real_ids())
        elif family in ("z-image", "flux2-klein", "krea2"):
            write_qwen3_tokenizer(root / "tokenizer", qwen_vocab(qwen3=True))
        elif family == "hunyuan-image":
            tr.write_hunyuan_image_text_files(root, qwen_vocab_at_real_ids())
        elif family == "qwen-image-21":
            tr.write_qwen_image_21_text_files(root, qwen_vocab_at_real_ids())
        elif family == "flux2":
            tr.write_mistral_processor_files(root / "tokenizer")
        elif family in ("flux1", "flux1-kontext"):
            tr._write_clip_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
            tr._write_t5_tokenizer(root / "tokenizer_2")
        elif family == "sdxl":
            tr._write_clip_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
            tr._write_clip_tokenizer(root / "tokenizer_2", pad_token="!")


def component_specs(model_id: str) -> dict[str, tuple[Any, list[TensorSpec], str]]:
    """component -> (catalogue component, specs in the stored dtype, library), meta builds; a GGUF
    entry's denoiser is not one of them (`write_gguf_denoiser`)."""
    from model_registry import get_model
    from model_registry.sizes import load_component_configs

    entry = get_model(model_id)
    configs = load_component_configs()
    out = {}
    for name, comp in entry.components.items():
        if comp.config_id is None or (entry.gguf is not None and name == entry.adapter.denoiser):
            continue
        dtype = DTYPES.get((base_id(model_id), name), "F16" if entry.family == "sdxl" else "BF16")
        model = meta_model(comp.library, comp.class_name, configs[comp.config_id])
        out[name] = (comp, checkpoint_specs(model, comp.library, dtype), comp.library)
        del model
    return out


def write_replica(model_id: str, models_dir: str | Path) -> Path:
    """Write the replica of `model_id` into `models_dir/<model_id>/` (where the app looks)."""
    from model_registry import get_model
    from model_registry.sizes import load_component_configs

    entry = get_model(model_id)
    if entry.is_demo:
        raise ValueError("the demo is tiny already; replicas are for real models")
    root = Path(models_dir) / model_id
    if root.exists():
        if not (root / MARKER).is_file():
            raise FileExistsError(f"{root} exists and is not a replica written by this tool: not touching it")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    _write_pipeline_files(root, entry.family)
    configs = load_component_configs()
    for name, (comp, specs, library) in component_specs(model_id).items():
        config = configs[comp.config_id]
        if entry.family == "sdxl":
            for variant, dtype in SDXL_VARIANTS:
                typed = [TensorSpec(s.name, dtype if s.dtype in ("F16", "BF16", "F32") else s.dtype, s.shape) for s in specs]
                write_component(root / name, typed, 1, library, config, variant)
        else:
            write_component(root / name, specs, shard_count(model_id, name), library, config)
    if entry.gguf is not None:
        write_gguf_denoiser(model_id, root)
    return root


def write_gguf_denoiser(model_id: str, root: Path) -> Path:
    """A GGUF entry's denoiser folder as `download_gguf` leaves it: the base config.json and the
    entry's .gguf file (sparse), named, typed and with the architecture of the published file."""
    from model_registry import get_model
    from model_registry.sizes import load_component_configs
    from tools.gguf_replica import write_denoiser_gguf

    entry = get_model(model_id)
    if entry.gguf is None:
        raise ValueError(f"{model_id} is not a GGUF entry (models.json has no `gguf` for it)")
    name = entry.adapter.denoiser
    comp = entry.components[name]
    config = load_component_configs()[comp.config_id]
    write_config(root / name, comp.library, config)
    path = root / name / entry.gguf.file
    write_denoiser_gguf(path, meta_model(comp.library, comp.class_name, config), entry.gguf.quant, name=entry.name)
    return path


def is_current_replica(model_id: str, root: Path) -> bool:
    """True when `root` is a replica of `model_id` that this version of the tool would write as it
    is (an older one left a GGUF entry's denoiser in .safetensors: rewrite it)."""
    from model_registry import get_model

    if not (root / MARKER).is_file():
        return False
    entry = get_model(model_id)
    return entry.gguf is None or (root / entry.adapter.denoiser / entry.gguf.file).is_file()


def check_replica(model_id: str, root: Path) -> dict[str, Any]:
    """Load every component with the engine's loader under disk offload (reads no weight): no
    missing/unexpected/mis-shaped keys; compare the bytes with models.json. A GGUF entry's
    denoiser is checked in its .gguf file (`check_gguf_denoiser`)."""
    from engine.generation.pipelines.components import (
        checkpoint_files,
        component_classes,
        read_model_index,
    )
    from engine.loading.loader import load_model
    from model_registry import get_model
    from model_registry.completeness import repo_problems, weight_variant
    from model_registry.families import FAMILIES

    entry = get_model(model_id)
    family = FAMILIES[entry.family]
    problems = repo_problems(root, family)
    if problems:
        raise AssertionError(f"{model_id}: replica incomplete: {problems}")
    variant = weight_variant(root, family)
    classes = component_classes(read_model_index(root))
    config = DISK_OFFLOAD
    report: dict[str, Any] = {}
    for name in family.weighted:
        t0 = time.perf_counter()
        if entry.gguf is not None and name == family.denoiser:
            report[name] = check_gguf_denoiser(model_id, root, classes[name], config)
            report[name]["load_s"] = round(time.perf_counter() - t0, 1)
            continue
        # cache_dir=False: disk offload of an F32 checkpoint would build its bf16 stored form first
        model = load_model(classes[name], checkpoint_files(root / name, variant), vram_config=config, onload=False, cache_dir=False)
        n = sum(p.numel() for p in model.parameters())  # placeholders: shapes only
        files = [f for f in (root / name).glob("*.safetensors") if (variant is None or f".{variant}." in f.name)]
        floats = 0
        for f in files:
            with f.open("rb") as fh:
                (hn,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(hn))
            header.pop("__metadata__", None)
            floats += sum(math.prod(t["shape"]) for t in header.values() if t["dtype"] in ("BF16", "F16", "F32"))
        stored = entry.components[name].bytes_bf16
        if stored is not None and 2 * floats != stored:
            raise AssertionError(f"{model_id}/{name}: replica holds {2 * floats} bf16 bytes, models.json says {stored}")
        report[name] = {
            "parameters": n, "bytes_bf16": 2 * floats, "shards": len(files), "load_s": round(time.perf_counter() - t0, 1),
            "disk_blocks_bytes": sum(f.stat().st_blocks * 512 for f in files),
        }
        del model
    return report


def check_gguf_denoiser(model_id: str, root: Path, model_class: type, vram_config: dict[str, Any]) -> dict[str, Any]:
    """A GGUF entry's denoiser: its .gguf file is there (the only weights of the folder), the
    engine's loader maps every tensor of it onto the model with none missing (disk offload: the
    blocks stay in the file, but for FLUX's final modulation, whose swapped halves are read: ~10
    MB), the file holds the catalogue's parameters; its size is compared with the catalogue's
    `gguf.bytes` (a ratio: the replica's type mix approximates llama.cpp's)."""
    from collections import Counter

    import torch

    from engine.loading.loader import load_model
    from engine.management import runtime_of
    from engine.storage.disk import DiskStored
    from engine.storage.gguf import GgufDiskStored, GgufEntry, GgufFile
    from model_registry import get_model

    entry = get_model(model_id)
    if entry.gguf is None:
        raise ValueError(f"{model_id} is not a GGUF entry (models.json has no `gguf` for it)")
    name = entry.adapter.denoiser
    folder = root / name
    path = folder / entry.gguf.file
    if not path.is_file():
        raise AssertionError(f"{model_id}/{name}: the GGUF denoiser {entry.gguf.file} is missing from {folder}")
    others = sorted(f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".gguf", ".bin") and f != path)
    if others:
        raise AssertionError(f"{model_id}/{name}: weights beside {entry.gguf.file}: {others}")
    model = load_model(model_class, folder, vram_config=vram_config, onload=False, cache_dir=False)  # raises on missing/unexpected/mis-shaped
    masters = [s for layer in runtime_of(model).layers for s in layer.masters.values()]
    in_file = [s for s in masters if isinstance(s, DiskStored)]
    if not any(isinstance(s, GgufDiskStored) for s in in_file) or any(s.entry.file.path != path for s in in_file):
        raise AssertionError(f"{model_id}/{name}: the denoiser was not streamed from {path.name}")
    parameters = sum(p.numel() for p in model.parameters())
    del model, masters, in_file
    gguf = GgufFile(path)
    shapes = {k: (e.logical_shape if isinstance(e, GgufEntry) else e.shape) for k, e in gguf.entries.items()}
    elements = sum(math.prod(s) for s in shapes.values())
    comp = entry.components[name]
    if comp.parameters is not None and elements != comp.parameters:
        raise AssertionError(f"{model_id}/{name}: {path.name} holds {elements} values, models.json says {comp.parameters} parameters")
    size = path.stat().st_size
    floats = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    types = Counter(e.qtype if isinstance(e, GgufEntry) else floats[e.dtype] for e in gguf.entries.values())
    return {
        "format": "gguf", "file": path.name, "architecture": gguf.architecture, "parameters": parameters, "tensors": len(shapes),
        "bytes_bf16": 2 * elements, "shards": 1, "file_bytes": size, "catalogue_bytes": entry.gguf.bytes,
        "ratio": size / entry.gguf.bytes, "types": dict(sorted(types.items())), "disk_blocks_bytes": path.stat().st_blocks * 512,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write one replica into MODELS_DIR/<id>/")
    w.add_argument("model_id")
    w.add_argument("models_dir")
    c = sub.add_parser("check", help="write and verify replicas")
    c.add_argument("models_dir")
    c.add_argument("model_ids", nargs="*")
    c.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "write":
        print(write_replica(args.model_id, args.models_dir))
        return 0
    from model_registry import list_models

    ids = [e.id for e in list_models() if not e.is_demo] if args.all or not args.model_ids else args.model_ids
    failed = 0
    for model_id in ids:
        try:
            root = write_replica(model_id, args.models_dir)
            for name, r in check_replica(model_id, root).items():
                where = f"{r['shards']} shard(s)"
                if r.get("format") == "gguf":
                    types = ", ".join(f"{n} {t}" for t, n in r["types"].items())
                    where = (f"{r['file']} ({r['architecture']}; {types}) {r['file_bytes'] / 1e9:.2f} GB = {r['ratio']:.3f}x "
                             f"the catalogue's {r['catalogue_bytes'] / 1e9:.2f} GB")
                print(f"{model_id:24s} {name:16s} {r['parameters']:>14,d} params  {where}  loaded (disk) in {r['load_s']} s")
        except Exception as exc:  # report every model, then fail
            failed += 1
            print(f"{model_id}: FAILED: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
