"""Export a model in a storage form, as a folder another user downloads and loads directly.

    python -m tools.quantize z-image-turbo --weights nf4 --out exports/z-image-turbo-nf4
    python -m tools.quantize /models/Qwen-Image --weights fp8 --out /exports/qwen-image-fp8

`<model>` is a catalogue id (its downloaded copy under --model-dir) or a diffusers pipeline
folder. The folder written (format version `engine.storage.form_cache.FORMAT_VERSION`,
docs/engine.md "Exported stored forms"):

    model_index.json, scheduler/, tokenizer*/ ...   copied as they are
    <component>/config.json                          copied
    <component>/lowvram.<form>.safetensors           every tensor of the component: the weight
                                                     matrices in the form (FP8/int8/NF4 data and
                                                     scales as one U8 tensor each, laid out as the
                                                     file's "lowvram.layout" metadata says), the
                                                     rest as a load keeps them
    lowvram_export.json                              format, form, source and each file's size

Loading it (`engine.load_model` on a component folder, or the app with the folder in its model
directory) needs none of the original shards: the stored form is taken as it is in RAM, or
streamed from the file with disk offload, bitwise what loading the original in that form gives.
Each tensor is quantized, written and dropped in turn: RAM stays at one tensor's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from engine.storage.form_cache import FORMAT_VERSION

WEIGHTS = ("fp8", "int8", "nf4", "bf16")


def model_folder(model: str, models_dir: Path | None) -> Path:
    """A pipeline folder, or the downloaded copy of a catalogue id (SystemExit says what to do)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return path
    from model_registry import registry

    try:
        local = registry.local_path(model, models_dir)
    except KeyError:
        raise SystemExit(f"{model!r} is neither a folder nor a catalogue model id") from None
    if local is None:
        raise SystemExit(f"{model} is not downloaded (run the app once with it, or pass its folder)")
    return Path(local)


def export(source: Path, weights: str, out: Path, log=print) -> dict:
    """Write the exported folder `out` from the pipeline folder `source` (see the module docstring)."""
    from engine.generation.pipelines.components import component_classes, is_weighted, read_model_index
    from engine.loading.loader import export_component

    if weights not in WEIGHTS:
        raise SystemExit(f"--weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty: choose a new folder")
    index = read_model_index(source)
    classes = component_classes(index)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or entry.name in classes and is_weighted(classes[entry.name]):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, symlinks=False)
        else:
            shutil.copy2(entry, out / entry.name)
    for name, cls in classes.items():
        if not is_weighted(cls):
            continue
        start = time.perf_counter()
        (out / name).mkdir()
        shutil.copy2(source / name / "config.json", out / name / "config.json")
        for extra in (source / name).glob("*.json"):  # generation_config.json and the like (not the shard index)
            if extra.name != "config.json" and not extra.name.endswith(".index.json"):
                shutil.copy2(extra, out / name / extra.name)
        path = export_component(cls, source / name, out / name / f"lowvram.{weights}.safetensors", weights)
        files[name] = {"file": f"{name}/{path.name}", "bytes": path.stat().st_size}
        log(f"{name}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
    manifest = {"format": FORMAT_VERSION, "weights": weights, "source": source.resolve().name, "components": files}
    (out / "lowvram_export.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="catalogue id (downloaded) or a diffusers pipeline folder")
    p.add_argument("--weights", required=True, choices=WEIGHTS, help="the storage form to export")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (new or empty)")
    p.add_argument("--model-dir", type=Path, default=None, help="where catalogue models are (as the app's --model-dir)")
    args = p.parse_args(argv)
    export(model_folder(args.model, args.model_dir), args.weights, args.out)
    print(f"exported to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
