"""The engine's sub-packages import one way only, and the UI's types import without torch.

Every import is checked, function-level and TYPE_CHECKING ones included (a circle hidden behind
a late import is still a circle). A package may import itself and the packages below it:

    storage.forms < config < storage < layers < planning < transfer < runtime < management < loading < lora < generation

`storage.forms` (the registry of storage forms: plain records, no torch) is a layer of its own
below config, which parses the forms' names: it imports nothing of the engine. `planning` is
pure: it imports nothing of the engine but engine.config.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"

ORDER = ["storage.forms", "config", "storage", "layers", "planning", "transfer", "runtime", "management", "loading", "lora", "generation"]
RANK = {name: i for i, name in enumerate(ORDER)}
PURE = {"planning": {"config"}, "storage.forms": set()}
#: modules that are a layer of their own, apart from their package
OWN_LAYER = {"engine.storage.forms": "storage.forms"}


def _package(module: str) -> str | None:
    """engine.transfer.scheduler -> transfer; engine -> None (the lazy public facade)."""
    if module in OWN_LAYER:
        return OWN_LAYER[module]
    parts = module.split(".")
    if parts[0] != "engine" or len(parts) == 1:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: engine modules import each other by absolute name"
            module = node.module or ""
            out.append((node.lineno, module))
            if module == "engine":  # `from engine import x` names a public API name, not a package
                out[-1] = (node.lineno, "engine")
    return out


def _engine_files() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_engine_module_belongs_to_a_known_layer():
    for path in _engine_files():
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        package = _package(module)
        assert package is None or package in RANK, f"{module}: add its package to the import order in this test and docs/engine.md"


def test_imports_go_one_way():
    offences = []
    for path in _engine_files():
        rel = path.relative_to(ROOT).with_suffix("")
        source = _package(".".join(rel.parts).removesuffix(".__init__"))
        if source is None:
            continue
        for line, target_module in _imports(path):
            if target_module == "engine":
                offences.append(f"{rel}:{line} imports the public facade `engine` (import the module itself)")
                continue
            target = _package(target_module)
            if target is None or target == source:
                continue
            allowed = PURE.get(source)
            if (allowed is not None and target not in allowed) or RANK[target] > RANK[source]:
                offences.append(f"{rel}:{line}: {source} imports {target_module}")
    assert not offences, "imports against the layer order:\n" + "\n".join(offences)


def test_engine_never_imports_gradio_or_the_ui():
    for path in _engine_files():
        for line, module in _imports(path):
            assert module.split(".")[0] not in {"gradio", "ui", "app"}, f"{path.relative_to(ROOT)}:{line} imports {module}"


def test_only_the_generation_runtime_and_layer_maps_read_the_registry():
    readers = {"generation", "layers"}
    for path in _engine_files():
        rel = path.relative_to(ROOT).with_suffix("")
        source = _package(".".join(rel.parts).removesuffix(".__init__"))
        for line, module in _imports(path):
            if module.split(".")[0] == "model_registry":
                assert source in readers, f"{rel}:{line} imports {module}: only engine.generation (and the family layer maps) read model_registry"


def test_model_registry_never_imports_the_engine():
    for path in sorted((ROOT / "model_registry").rglob("*.py")):
        for line, module in _imports_any_level(path):
            assert module.split(".")[0] != "engine", f"{path.relative_to(ROOT)}:{line} imports {module}"


def _imports_any_level(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("modules", [["engine.generation.types"], ["ui.formatting", "ui.runs"], ["engine"], ["engine.storage.forms"]])
def test_light_modules_import_without_torch(modules):
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"importing {modules} loaded torch"
