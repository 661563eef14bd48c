"""The engine's sub-packages import one way only, and the UI's types import without torch.

Every import is checked, function-level and TYPE_CHECKING ones included (a circle hidden behind
a late import is still a circle). A package may import itself and the packages below it:

    storage.forms < config < model_tables < storage < layers < planning < transfer < runtime < management < loading < lora < generation

`storage.forms` (the registry of storage forms: plain records, no torch) is a layer of its own
below config, which parses the forms' names: it imports nothing of the engine. `planning` is
pure: it imports nothing of the engine but engine.config. `model_tables` holds what the engine
knows of particular model classes, as data registered from above; only `generation` reads the
app's catalogue (model_registry). No two engine modules import each other, whatever the packages
(late and TYPE_CHECKING imports included).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"

ORDER = ["storage.forms", "config", "model_tables", "storage", "layers", "planning", "transfer", "runtime", "management", "compilation", "loading", "lora", "generation"]
RANK = {name: i for i, name in enumerate(ORDER)}
PURE = {"planning": {"config"}, "storage.forms": set(), "model_tables": set()}
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


def test_only_the_generation_layer_reads_the_registry():
    """The memory engine below engine.generation takes module maps, LoRA formats and GGUF names as
    data (engine.model_tables); only the generation layer turns catalogue entries into them. The
    public facade (engine/__init__.py) does not read the registry either."""
    for path in _engine_files():
        rel = path.relative_to(ROOT).with_suffix("")
        source = _package(".".join(rel.parts).removesuffix(".__init__"))
        for line, module in _imports(path):
            if module.split(".")[0] == "model_registry":
                assert source == "generation", f"{rel}:{line} imports {module}: only engine.generation reads model_registry"


# Circles the storage-forms work of issue #28 removes (its registry puts the base classes where no
# form imports back). A circle that is gone must leave this table, so it cannot hide a new one.
KNOWN_CIRCLES: dict[frozenset[str], str] = {}


def _module_graph(root: Path = ROOT, package: str = "engine") -> dict[str, set[str]]:
    """module -> the modules of `package` it imports, every import counted (late and
    TYPE_CHECKING ones too). `from package import name` is an edge to the module package.name
    when there is one (importing a submodule runs its package's __init__ first, as every
    submodule import does; that is not counted as an edge to the package)."""
    files = sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
                targets.update(subs or {node.module})
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                out.append(frozenset(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_circles_between_engine_modules():
    """Within a package too (runtime's component, pool and ram once imported each other through
    TYPE_CHECKING and late imports): every engine module's imports form no circle."""
    circles = _circles(_module_graph())
    new = [sorted(c) for c in circles if c not in KNOWN_CIRCLES]
    assert not new, f"import circles between engine modules: {new}"
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in circles]
    assert not gone, f"these circles are gone: take them out of KNOWN_CIRCLES in this test: {gone}"


def test_the_circle_check_sees_late_and_type_checking_imports(tmp_path):
    """The check itself, on a package of its own: a TYPE_CHECKING import one way and a late import
    back are a circle; `from pkg import sub` is an import of pkg.sub."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import B\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.sub import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.sub.a\n")
    graph = _module_graph(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.sub.a"} and graph["pkg.c"] == {"pkg.sub.a"}
    assert _circles(graph) == [frozenset({"pkg.sub.a", "pkg.sub.b"})]
    (pkg / "sub" / "b.py").write_text("B = 1\n")
    assert _circles(_module_graph(tmp_path, "pkg")) == []


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
