"""The storage forms' one home (engine.storage.forms): the built-in records, look-ups, the layout
behind each size factor, no import circle in engine/storage/, and a form added in one file
(tests/toy_form.py) flowing through config parsing, the ledger's sizes, the loader, the UI's and
the API's choices, the estimate, the suggestion and a generation, without another file changed."""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch

from engine.config import Place, VramConfig
from engine.storage import forms as registry
from engine.storage.forms import StorageForm, find_form, forms, get_form, register_form, registered, weights_choices
from engine.storage.stored import codec_for, store, stored_layout
from tests import toy_form

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_builtin_forms_in_order_of_preference():
    assert [f.name for f in forms()] == ["bf16", "fp8", "int8", "nf4", "gguf"]
    assert weights_choices() == ("auto", "bf16", "fp8", "int8", "nf4")  # gguf: only a GGUF model's file has it
    assert [f.quantized for f in forms()] == [False, True, True, True, True]
    assert registry.default_form().name == "bf16" and registry.file_form().name == "gguf"
    assert get_form("nf4").label == "nf4 (4-bit, groups of 32)" and get_form("fp8").title == "FP8"


def test_lookups_by_name_alias_and_vram_config_dtype():
    assert find_form("FP8") is find_form(torch.float8_e4m3fn) is find_form("float8_e4m3fn") is get_form("fp8")
    assert find_form(torch.float8_e5m2) is get_form("fp8")  # stored by the same codec, no form of its own
    assert find_form(torch.bfloat16) is get_form("bf16") and find_form(torch.int8) is get_form("int8")
    assert find_form(torch.float32) is None and find_form("disk") is None and find_form("int4") is None
    with pytest.raises(KeyError, match="registered: bf16, fp8, int8, nf4, gguf"):
        get_form("int4")


@pytest.mark.parametrize("clash", ["int8", "bfloat16", "auto", "disk"])
def test_a_taken_or_reserved_name_is_refused(clash):
    with pytest.raises(ValueError, match=clash):
        register_form(StorageForm("newform", "new", "new", 1.0, 0.0, aliases=(clash,)))
    assert find_form("newform") is None  # nothing half-registered


def test_each_size_factor_is_its_layout_per_bf16_byte():
    """The estimates' one figure per form against the bytes its codec really lays out for a
    3072-wide matrix (what the figure stands for; the vectors stay bf16 and add a little). FP8's
    0.52 and int8's 0.5 are the figures every estimate used before the registry (FP8 and int8 lay
    out the same bytes: 0.5007); each stays within 5% of its layout."""
    shape = (3072, 3072)
    for form in forms():
        if form.from_file:
            continue  # a GGUF model is sized by its file's bytes
        layout = stored_layout(shape, torch.bfloat16, form.dtype and getattr(torch, form.dtype) or form.name, torch.bfloat16)
        per_bf16_byte = sum(math.prod(s) * d.itemsize for s, d in layout) / (math.prod(shape) * 2)
        assert form.size_factor == pytest.approx(per_bf16_byte, rel=0.05), form.name


def _storage_imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "engine" / "storage").glob("*.py")):
        module = "engine.storage." + path.stem if path.stem != "__init__" else "engine.storage"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
        graph[module] = {t for t in targets if t.startswith("engine.storage.")}
    return graph


def test_no_import_circle_in_storage_and_the_base_imports_no_form():
    graph = _storage_imports()
    assert graph["engine.storage.stored"] <= {"engine.storage.forms"}  # forms import the base, never back
    assert graph["engine.storage.forms"] == set()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            assert state.get(target) != 1, "import circle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


# --- a form added in one file -----------------------------------------------------------------
@pytest.fixture
def toy():
    with registered(toy_form.FORM) as form:
        yield form
    assert find_form(toy_form.NAME) is None


def test_toy_form_in_config_and_places(toy):
    config = VramConfig.from_dict({"offload_dtype": "fp8-cast", "computation_device": "cpu"})
    assert config.offload_dtype == config.onload_dtype == "fp8cast" and config.storage_name == "fp8cast"
    assert Place(CPU, "fp8cast").is_quantized
    with pytest.raises(ValueError, match="fp8cast"):  # storage-only: never the computation dtype
        VramConfig.from_dict({"computation_dtype": "fp8cast", "computation_device": "cpu"})
    with pytest.raises(ValueError, match="int8, nf4, gguf, fp8cast"):  # listed among what is accepted
        VramConfig.from_dict({"offload_dtype": "int4", "computation_device": "cpu"})


def test_toy_form_layout_bytes_and_stored_copies(toy):
    from engine.runtime.component import bytes_at

    assert stored_layout((64, 32), torch.bfloat16, "fp8cast", torch.bfloat16) == [((64, 32), torch.float8_e4m3fn)]
    assert stored_layout((64,), torch.bfloat16, "fp8cast", torch.bfloat16) == [((64,), torch.bfloat16)]  # vectors stay
    shapes = {"weight": (torch.Size([64, 32]), torch.bfloat16), "bias": (torch.Size([64]), torch.bfloat16)}
    assert bytes_at(shapes, Place(CPU, "fp8cast"), torch.bfloat16) == 64 * 32 + 64 * 2
    w = torch.randn(64, 32)
    stored = store(w, Place(CPU, "fp8cast"), torch.bfloat16)
    assert isinstance(stored, toy_form.Fp8CastStored) and stored.nbytes == 64 * 32
    assert torch.equal(stored.materialize(CPU, torch.bfloat16), w.to(torch.float8_e4m3fn).to(torch.bfloat16))
    int8 = stored.to_place(Place(CPU, "int8"), torch.bfloat16)  # another form: requantized from its values
    assert type(int8).__name__ == "Int8Stored"
    assert isinstance(int8.to_place(Place(CPU, "fp8cast"), torch.bfloat16), toy_form.Fp8CastStored)


def test_toy_form_through_the_loader(toy, tmp_path, monkeypatch):
    import engine.loading.loader as loader
    from engine import enable_vram_management, load_model, runtime_of
    from engine.storage.disk import SafetensorsFile
    from tests.fixtures.tiny_models import run_model, save_sharded, tiny_model

    plain, inputs = tiny_model("QwenImageTransformer2DModel", torch.bfloat16)
    directory = save_sharded(plain, tmp_path / "qwen", shards=2)
    config = {"offload_dtype": "fp8cast", "onload_dtype": "fp8cast", "computation_device": "cpu", "computation_dtype": "bfloat16"}
    monkeypatch.setattr(loader, "QUANT_CHUNK_BYTES", 4096)  # many chunks per tensor
    for shard in directory.glob("*.safetensors"):
        f = SafetensorsFile(shard)
        for key, entry in f.entries.items():
            ours, theirs = loader.read_stored(entry, Place(CPU, "fp8cast"), torch.bfloat16), store(f.read(entry), Place(CPU, "fp8cast"), torch.bfloat16)
            assert type(ours) is type(theirs) and all(torch.equal(a, b) for (_, a), (_, b) in zip(ours.parts(), theirs.parts())), key
    reference = run_model(enable_vram_management(copy.deepcopy(plain), vram_config=config, vram_limit=0), inputs)
    model = load_model(type(plain), directory, vram_config=config, vram_limit=0)
    masters = [s for layer in runtime_of(model).layers for s in layer.masters.values()]
    assert any(isinstance(s, toy_form.Fp8CastStored) for s in masters) and runtime_of(model).host_arena is not None
    assert torch.equal(run_model(model, inputs), reference)


def test_toy_form_in_the_ui_and_api_choices(toy, tmp_path):
    from engine.generation.settings import resolve_storage, vram_config_for
    from tests.browser.fake_studio import FakeStudio
    from ui import build_demo, inputs
    from ui.handlers import quantize_choices, weights_to_controls

    assert weights_choices()[-1] == "fp8cast" and inputs.weights_choice("FP8CAST") == "fp8cast"
    assert resolve_storage("fp8cast", fp8=True) == "fp8cast"  # an explicit form wins over the FP8 switch
    assert vram_config_for(False, False, "cpu", "fp8cast")["offload_dtype"] == "fp8cast"
    assert quantize_choices() == ("off", "int8", "nf4", "fp8cast") and weights_to_controls("fp8cast") == (False, "fp8cast")
    demo = build_demo(FakeStudio(tmp_path / "m", tmp_path / "o"))
    choices = {b.label: [c[1] for c in b.choices] for b in demo.blocks.values() if getattr(b, "label", None) in ("Quantize", "weights")}
    assert choices == {"Quantize": ["off", "int8", "nf4", "fp8cast"], "weights": ["auto", "bf16", "fp8", "int8", "nf4", "fp8cast"]}
    quantize = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Quantize")
    assert "fp8cast ~0.5x" in quantize.info


def test_toy_form_in_the_estimate_and_the_suggestion(toy, tmp_path):
    from engine.generation import suggest
    from engine.generation.studio import Studio
    from engine.generation.types import GenerateRequest, Machine, MemoryEstimate

    studio = Studio(tmp_path / "m", tmp_path / "o", device="cpu")
    ests = {w: studio.estimate(GenerateRequest("x", model="qwen-image", vram_limit=0, weights=w)) for w in ("bf16", "fp8", "fp8cast")}
    assert ests["fp8cast"].storage == "fp8cast (plain e4m3 cast)"
    assert ests["fp8cast"].ram_gb < ests["fp8"].ram_gb < ests["bf16"].ram_gb  # no scales: a little less than FP8
    assert ("fp8cast", False) in suggest.storage_forms() and ("fp8cast", True) in suggest.storage_forms()
    machine, work = Machine(12, 32, 500), suggest.StepWork(10 * 1024**3, 4096)
    seconds = suggest.step_seconds(MemoryEstimate(10, 10, 10, 0, True), machine, suggest.Candidate("fp8cast", False, 10), work)
    compute = 2 * work.denoiser_bytes_bf16 / 2 * work.tokens / suggest.GPU_FLOPS
    assert seconds == pytest.approx(compute + 0.5 * work.denoiser_bytes_bf16 * 3.0 / suggest.GPU_MEM_BPS)
    assert suggest.describe(suggest.Candidate("fp8cast", True, 4.0)) == "FP8 cast + disk offload + VRAM limit 4 GB"


def test_toy_form_generates_and_the_png_names_it(toy, tmp_path):
    from engine.generation.studio import Studio, parse_infotext
    from engine.generation.types import GenerateRequest, GenerationResult

    studio = Studio(tmp_path / "models", tmp_path / "outputs", device="cpu")
    result = [i for i in studio.generate(GenerateRequest("a fox", seed=3, vram_limit=0, weights="fp8cast")) if isinstance(i, GenerationResult)][0]
    fields = parse_infotext(result.parameters)
    assert fields["Weights"] == "fp8cast" and fields["FP8"] == "off"
    from engine import runtime_of

    masters = [s for m in studio.pipeline.components.values() for layer in runtime_of(m).layers for s in layer.masters.values()]
    assert any(isinstance(s, toy_form.Fp8CastStored) for s in masters)
    assert codec_for("fp8cast") is toy_form.FORM.codec
