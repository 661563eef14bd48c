"""Maintenance script: recompute component sizes and store them in models.json.

    python -m tools.measure_sizes          # rewrite models.json
    python -m tools.measure_sizes --check  # exit 1 if the stored numbers differ

Real components are built from component_configs.json on the meta device (no download,
no memory); the demo's components are counted from the safetensors headers of a freshly
written demo repo (model_registry.demo). Run it after adding a model or changing a config.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from model_registry.catalog import MODELS_FILE, read_catalogue_file
from model_registry.families import FAMILIES, catalogue_files
from model_registry.sizes import ComponentSize, load_component_configs, measure

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def count_safetensors_folder(folder: Path) -> ComponentSize:
    """Parameters and bf16 bytes of the floating tensors stored in a component folder."""
    numel = 0
    for path in sorted(folder.glob("*.safetensors")):
        for tensor in _header(path).values():
            if tensor["dtype"] in ("BF16", "F16", "F32", "F64"):
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                numel += count
    return ComponentSize(parameters=numel, bytes_bf16=2 * numel)


def _measure_demo(model: dict[str, Any]) -> dict[str, ComponentSize]:
    from model_registry.demo.repo import write_demo_repo

    family = FAMILIES[model["family"]]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_demo_repo(Path(tmp) / "demo")
        return {name: count_safetensors_folder(root / name) for name in family.weighted}


def measure_catalogue(data: dict[str, Any]) -> dict[tuple[str, str], ComponentSize]:
    """(model id, component) -> size for every weighted component in the catalogue."""
    configs = load_component_configs()
    cache: dict[tuple[str, str, str], ComponentSize] = {}
    sizes: dict[tuple[str, str], ComponentSize] = {}
    for model in data["models"]:
        if model.get("is_demo"):
            for name, size in _measure_demo(model).items():
                sizes[(model["id"], name)] = size
            continue
        for name, comp in model["components"].items():
            if "config" not in comp:
                continue
            key = (comp["library"], comp["class"], comp["config"])
            if key not in cache:
                print(f"  building {comp['class']} from {comp['config']} on meta", file=sys.stderr)
                cache[key] = measure(comp["library"], comp["class"], configs[comp["config"]])
            sizes[(model["id"], name)] = cache[key]
    return sizes


def _dump(value: Any, indent: int = 0) -> str:
    """JSON with flat objects/lists on one line, so models.json stays readable by eye."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {_dump(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [f"{inner}{_dump(v, indent + 2)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def main(argv: list[str] | None = None) -> int:
    """Measure, then rewrite models.json (or only compare with --check)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    changed = []
    # models.json, then the catalogue JSON next to each family file (model_registry.families)
    for path in [MODELS_FILE, *catalogue_files()]:
        data = read_catalogue_file(path)
        sizes = measure_catalogue(data)
        changed_here = []
        for model in data["models"]:
            for name, comp in model["components"].items():
                size = sizes.get((model["id"], name))
                if size is None:
                    continue
                if (comp.get("parameters"), comp.get("bytes_bf16")) != (size.parameters, size.bytes_bf16):
                    changed_here.append(f"{model['id']}/{name}: {comp.get('parameters')} -> {size.parameters}")
                comp["parameters"], comp["bytes_bf16"] = size.parameters, size.bytes_bf16
        changed += changed_here
        if not args.check:
            path.write_text(_dump(data) + "\n", encoding="utf-8")
            print(f"wrote {path} ({len(changed_here)} changed)")
    for line in changed:
        print(line)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
