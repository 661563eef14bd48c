"""torch.compile that survives layer streaming (engine.compilation, engine.layers.opaque).

A managed tiny Flux transformer (two block lists, two block classes) is compiled regionally; the
recompile counts are Dynamo's own counters. The structural tests use the "aot_eager" backend
(Dynamo + AOTAutograd, the same graph capture inductor gets, seconds instead of minutes on 2
cores); the inductor test is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from engine import compile_model, enable_vram_management, load_model, runtime_of, set_vram_limit, uncompile_model
from engine.layers.adapters import Adapter
from engine.layers.state import LayerState
from tests.fixtures.tiny_models import run_model, save_sharded, tiny_model
from tests.test_gguf import gguf_checkpoint, gguf_config  # noqa: F401 (a fixture)

CPU = {"computation_device": "cpu", "computation_dtype": torch.bfloat16}
#: the storage forms a config names, and disk offload (the masters stay in their files)
FORMS = {
    "bf16": {"offload_dtype": torch.bfloat16},
    "fp8": {"offload_dtype": "float8_e4m3fn"},
    "int8": {"offload_dtype": "int8"},
    "nf4": {"offload_dtype": "nf4"},
    "disk": {"offload_dtype": "disk", "offload_device": "disk"},
}
LIMITS = (0, 1e-4, None)  # everything streams; a few layers resident; everything resident
#: bf16 has an 8-bit mantissa: 2**-8 relative per rounding; fused glue may round differently
BF16_TOLERANCE = 2e-2


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def flux(config: dict | None = None, limit: float | None = 0, directory=None):
    plain, inputs = tiny_model("FluxTransformer2DModel", torch.bfloat16)
    vram_config = {**CPU, **(config or FORMS["bf16"])}
    if directory is not None:
        save_sharded(plain, directory)
        model = load_model(type(plain), directory, vram_config=vram_config, vram_limit=limit)
    else:
        model = enable_vram_management(copy.deepcopy(plain), vram_config=vram_config, vram_limit=limit)
    return model, inputs


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def recompiles() -> int:
    return graphs() - 2  # one graph per block class: FluxTransformerBlock, FluxSingleTransformerBlock


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def with_seed(inputs: dict, seed: int, keys=("hidden_states",)) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)
    for key in keys:
        out[key] = torch.randn(inputs[key].shape, generator=g).to(inputs[key].dtype)
    return out


def attach_lora(model, key: int, rank: int = 2) -> int:
    """A rank-`rank` adapter on every Linear of the blocks (what engine.lora attaches)."""
    runtime = runtime_of(model)
    g = torch.Generator().manual_seed(key)
    pairs = []
    for layer in runtime.layers:
        module = layer.module
        if isinstance(module, torch.nn.Linear) and layer.block is not None:
            a = (torch.randn(rank, module.in_features, generator=g) * 0.1).to(torch.bfloat16)
            b = (torch.randn(module.out_features, rank, generator=g) * 0.1).to(torch.bfloat16)
            pairs.append((layer, Adapter(key, a, b, alpha=float(rank), divisor=float(rank))))
    runtime.attach_adapters(pairs)
    return len(pairs)


def test_regional_compile_gives_one_graph_per_block_class_and_no_graph_break():
    model, inputs = flux()
    info = compile_model(model, backend="aot_eager")
    assert info.regional and len(info.regions) == len(model.transformer_blocks) + len(model.single_transformer_blocks) > 2
    eager, _ = flux()
    out = run_model(model, inputs)
    assert graphs() == 2, dict(counters["stats"])  # the blocks share their class's graph
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(out, run_model(eager, inputs))  # aot_eager runs the same kernels
    assert compile_model(model, backend="aot_eager") is info  # same settings: nothing to do
    uncompile_model(model)
    assert runtime_of(model).compiled is None and "forward" not in model.transformer_blocks[0].__dict__
    counters.clear()
    assert torch.equal(run_model(model, inputs), out) and not counters["stats"]


def test_no_recompile_when_the_limit_a_lora_the_prompt_or_the_seed_change():
    model, inputs = flux(limit=0)
    eager, _ = flux(limit=0)
    compile_model(model, backend="aot_eager")
    run_model(model, inputs)  # warm-up: compiles
    run_model(eager, inputs)
    assert recompiles() == 0
    runtime = runtime_of(model)
    checks = 0

    def same_as_eager(step_inputs):
        nonlocal checks
        assert torch.equal(run_model(model, step_inputs), run_model(eager, step_inputs))
        checks += 1

    for limit in (None, 0, 1e-4, None, 0):  # 0 -> Auto (all fits) -> back, and a part resident
        set_vram_limit(model, limit)
        set_vram_limit(eager, limit)
        same_as_eager(inputs)
    assert runtime.stats.streamed_layers > 0
    attach_lora(model, key=7)
    assert attach_lora(eager, key=7) > 0
    same_as_eager(inputs)
    for layer in runtime.layers:
        for adapter in layer.lora.adapters if layer.lora is not None else ():
            adapter.set_strength(0.4)
    for layer in runtime_of(eager).layers:
        for adapter in layer.lora.adapters if layer.lora is not None else ():
            adapter.set_strength(0.4)
    same_as_eager(inputs)
    runtime.detach_adapters(7)
    runtime_of(eager).detach_adapters(7)
    same_as_eager(inputs)
    same_as_eager(with_seed(inputs, 1, keys=("encoder_hidden_states", "pooled_projections")))  # another prompt
    same_as_eager(with_seed(inputs, 2))  # another seed
    assert checks == 10
    assert recompiles() == 0, dict(counters["stats"])
    assert not counters["graph_break"]


def sized(inputs: dict, side: int) -> dict:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    out = dict(inputs)
    out["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(inputs["img_ids"].dtype)
    out["hidden_states"] = torch.randn(1, side * side, inputs["hidden_states"].shape[-1], generator=torch.Generator().manual_seed(side)).to(torch.bfloat16)
    return out


def test_a_new_image_size_costs_at_most_one_recompile():
    model, inputs = flux(limit=0)
    compile_model(model, backend="aot_eager")
    run_model(model, inputs)
    assert recompiles() == 0
    run_model(model, sized(inputs, 6))
    after_one = recompiles()
    assert after_one <= 2  # at most one per block class (each class's graph turns dynamic)
    for side in (5, 7):
        run_model(model, sized(inputs, side))
    assert recompiles() == after_one, dict(counters["stats"])  # a dynamic graph serves every size


def test_streaming_prefetch_and_the_ledger_run_as_in_eager():
    """The op runs the eager route: the same layers stream, the same trace is taken, the same
    ledger peak is reached, and no layer is left in computation."""
    model, inputs = flux(limit=1e-4)
    eager, _ = flux(limit=1e-4)
    compile_model(model, backend="aot_eager")
    for m in (model, eager):
        for _ in range(2):
            run_model(m, inputs)
    ours, theirs = runtime_of(model), runtime_of(eager)
    assert [layer.name for layer in ours.execution_order] == [layer.name for layer in theirs.execution_order]
    assert ours.stats.streamed_layers == theirs.stats.streamed_layers > 0
    assert ours.stats.streamed_bytes == theirs.stats.streamed_bytes
    assert ours.ledger.peak_bytes == theirs.ledger.peak_bytes
    assert ours.state_counts() == theirs.state_counts()
    assert all(layer.state is not LayerState.COMPUTATION for layer in ours.layers)


@pytest.mark.parametrize("form", list(FORMS))
def test_every_storage_form_is_bitwise_equal_across_limits_under_compile(form, tmp_path):
    model, inputs = flux(FORMS[form], limit=0, directory=tmp_path if form == "disk" else None)
    eager, _ = flux(FORMS[form], limit=0, directory=tmp_path / "eager" if form == "disk" else None)
    compile_model(model, backend="aot_eager")
    outs = []
    for limit in LIMITS:
        set_vram_limit(model, limit)
        set_vram_limit(eager, limit)
        outs.append(run_model(model, inputs))
        assert relative_error(outs[-1], run_model(eager, inputs)) < BF16_TOLERANCE
    assert all(torch.equal(out, outs[0]) for out in outs), form
    assert recompiles() == 0


def test_a_model_left_unmanaged_after_compile_says_what_to_do():
    from engine import disable_vram_management

    model, inputs = flux(limit=0)
    compile_model(model, backend="aot_eager")
    run_model(model, inputs)
    handle = model.transformer_blocks[0].attn.to_q._vram_index
    uncompile_model(model)
    disable_vram_management(model)
    assert "_vram_index" not in model.transformer_blocks[0].attn.to_q.__dict__
    with pytest.raises(RuntimeError, match="compile it again"):
        torch.ops.lowvram.layer_step(handle, torch.zeros(1, 4), "x")


def test_the_compile_errors_the_studio_falls_back_on():
    from torch._dynamo.exc import BackendCompilerFailed

    from engine.compilation import failure_reason, is_compile_failure

    try:
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("gcc: command not found\nmore lines"), None)
    except BackendCompilerFailed as exc:
        error = exc
    assert is_compile_failure(error) and not is_compile_failure(ValueError("bad prompt"))
    reason = failure_reason(error)
    assert "\n" not in reason and reason == "RuntimeError: gcc: command not found"  # the backend's own error


@pytest.mark.slow
def test_inductor_matches_eager_within_bf16_and_is_bitwise_across_limits():
    model, inputs = flux(FORMS["fp8"], limit=0)
    eager, _ = flux(FORMS["fp8"], limit=0)
    compile_model(model, backend="inductor")
    outs = []
    for limit in (0, None, 0):
        set_vram_limit(model, limit)
        outs.append(run_model(model, inputs))
    reference = run_model(eager, inputs)
    error = relative_error(outs[0], reference)
    print(f"inductor vs eager, tiny Flux fp8: max relative error {error:.2e}")
    assert error < BF16_TOLERANCE
    assert all(torch.equal(out, outs[0]) for out in outs)
    assert recompiles() == 0


class Plain(torch.nn.Module):
    """A model with no registered block list: compile_model compiles its whole forward."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.proj_in = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.proj_out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj_out(torch.nn.functional.gelu(self.norm(self.proj_in(x))))


def test_a_model_without_block_lists_is_compiled_whole_and_keeps_its_step_hook():
    torch.manual_seed(0)
    plain = Plain().to(torch.bfloat16).eval()
    model = enable_vram_management(copy.deepcopy(plain), vram_config=CPU, vram_limit=0)
    eager = enable_vram_management(copy.deepcopy(plain), vram_config=CPU, vram_limit=0)
    info = compile_model(model, backend="aot_eager")
    assert info.regions == [""] and not info.regional
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), eager(x))
        runtime = runtime_of(model)
        assert [layer.name for layer in runtime.execution_order] == ["proj_in", "norm", "proj_out"]  # traced by the ops
        assert runtime.stats.forwards == 2 and runtime.stats.streamed_layers == 6
        uncompile_model(model)
        assert torch.equal(model(x), eager(x)) and runtime.stats.forwards == 3  # the step hook is still there


def test_gguf_blocks_and_their_file_on_disk_are_bitwise_across_limits_under_compile(gguf_checkpoint):
    cls, directory, path, plain, inputs = gguf_checkpoint
    expected = run_model(plain, inputs)  # the gguf package's dequantization, eager
    for config in (gguf_config(), gguf_config(offload_device="disk", offload_dtype="disk", preparing_dtype="bfloat16")):
        model = load_model(cls, path, vram_config=config, vram_limit=0)
        compile_model(model, backend="aot_eager")
        outs = []
        for limit in (0, 0.0002, None, 0):
            set_vram_limit(model, limit)
            outs.append(run_model(model, inputs))
        assert all(torch.equal(out, outs[0]) for out in outs)
        assert relative_error(outs[0], expected) < BF16_TOLERANCE
    # one block class: one graph, shared by the second model (the storage is outside the graph)
    assert counters["stats"]["unique_graphs"] == 1


class Convs(torch.nn.Module):
    """Two convolutions with the same weight shape and other strides: their outputs differ in size."""

    def __init__(self):
        super().__init__()
        self.same = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.down = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = torch.nn.Embedding(10, 4)

    def forward(self, x, ids):
        y = self.down(torch.nn.functional.silu(self.same(x)))
        return y + self.up(ids)[:, :, None, None]


def test_layers_alike_in_weights_but_not_in_settings_are_described_apart():
    torch.manual_seed(0)
    plain = Convs().to(torch.bfloat16).eval()
    model = enable_vram_management(copy.deepcopy(plain), vram_config={**CPU, "offload_dtype": "int8"}, vram_limit=0)
    eager = enable_vram_management(copy.deepcopy(plain), vram_config={**CPU, "offload_dtype": "int8"}, vram_limit=0)
    compile_model(model, backend="aot_eager")
    x, ids = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([1, 7])
    with torch.no_grad():
        out = model(x, ids)
        assert out.shape == (2, 4, 4, 4) and torch.equal(out, eager(x, ids))
    # a whole-model compile breaks only around the step's bookkeeping, never at a layer
    assert all("VramRuntime" in reason for reason in counters["graph_break"]), dict(counters["graph_break"])
