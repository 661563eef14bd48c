"""The four states, the honest budget and re-planning, on small hand-made models."""

import copy

import pytest
import torch
from torch import nn

from engine import (
    ManagedLinear,
    ManagedModule,
    enable_vram_management,
    is_managed,
    layer_state_bytes,
    layer_state_counts,
    offload_model,
    onload_model,
    runtime_of,
    set_vram_limit,
    vram_budget,
)

CPU = {"computation_device": "cpu", "computation_dtype": "bfloat16"}
# fp32 masters force a real conversion on every streamed forward
CPU_FP32_MASTERS = dict(CPU, offload_dtype="float32", onload_dtype="float32")
GB = 1024**3


class Probe(nn.Module):
    """A layer with a weight that records the model's state counts while it computes."""

    def __init__(self, dim: int, root: list):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.root = root
        self.seen: list[dict] = []

    def forward(self, x):
        if is_managed(self.root[0]):
            self.seen.append(layer_state_counts(self.root[0]))
        return x * self.weight


class Net(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 4):
        super().__init__()
        self.root: list = []
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim), nn.LayerNorm(dim)) for _ in range(depth))
        self.probe = Probe(dim, self.root)
        self.head = nn.Linear(dim, dim, bias=False)
        self.pad = nn.Parameter(torch.randn(1, dim))

    def forward(self, x):
        x = x + self.pad
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.probe(x))


def make_net(dtype=torch.bfloat16, seed=0, **kw) -> Net:
    torch.manual_seed(seed)
    net = Net(**kw).to(dtype).eval()
    net.root.append(net)
    return net


def managed(net: Net, **kw) -> Net:
    net = copy.deepcopy(net)
    enable_vram_management(net, **kw)
    return net


X = torch.randn(3, 32).to(torch.bfloat16)


def n_managed(net: nn.Module) -> int:
    return sum(isinstance(m, ManagedModule) for m in net.modules())


def test_every_parameter_holder_is_wrapped_and_keys_unchanged():
    plain = make_net()
    net = managed(plain, vram_config=CPU)
    # 4 blocks x (2 Linear + LayerNorm) + probe + head + root (pad) = 15
    assert n_managed(net) == 15
    assert isinstance(net.blocks[0][0], ManagedLinear) and isinstance(net.blocks[0][0], nn.Linear)
    assert isinstance(net.blocks[0][3], nn.LayerNorm)
    assert list(net.state_dict()) == list(plain.state_dict())
    # the class shows the engine is in the call (tracebacks, repr), and what it manages
    assert type(net.blocks[0][0]).__name__ == "ManagedLinear[Linear]"
    assert type(net.blocks[0][3]).__name__ == "ManagedModule[LayerNorm]"
    assert repr(net.blocks[0][0]).startswith("ManagedLinear[Linear](in_features=")


def test_state_transitions():
    net = managed(make_net(), vram_config=CPU_FP32_MASTERS, vram_limit=None)
    n = n_managed(net)
    assert layer_state_counts(net) == {"offload": 0, "onload": n, "preparing": 0, "computation": 0}
    net(X)
    # preparing is filled at the first forward: all resident under an unlimited budget
    assert layer_state_counts(net) == {"offload": 0, "onload": 0, "preparing": n, "computation": 0}
    # in the first forward the head had not run yet when the probe looked: still onload
    assert net.probe.seen[-1] == {"offload": 0, "onload": 1, "preparing": n - 3, "computation": 2}
    net(X)
    # computation is transient: the probe sees itself and the root (whose pad is in use) computing
    assert net.probe.seen[-1] == {"offload": 0, "onload": 0, "preparing": n - 2, "computation": 2}
    offload_model(net)
    assert layer_state_counts(net) == {"offload": n, "onload": 0, "preparing": 0, "computation": 0}
    assert vram_budget(net).resident_bytes == 0
    onload_model(net)
    assert layer_state_counts(net)["onload"] == n


def test_offloaded_component_still_computes_by_streaming():
    plain = make_net()
    net = managed(plain, vram_config=CPU_FP32_MASTERS, onload=False)
    assert layer_state_counts(net)["offload"] == n_managed(net)
    assert torch.equal(net(X), plain(X))
    assert layer_state_counts(net)["offload"] == n_managed(net)
    assert runtime_of(net).stats.streamed_layers == n_managed(net)


@pytest.mark.parametrize("config", [CPU, CPU_FP32_MASTERS, dict(CPU, onload_dtype="float32", offload_dtype="float32", preparing_dtype="float32")])
@pytest.mark.parametrize("limit_fraction", [None, 0.0, 0.3, 0.7])
def test_bitwise_equal_at_every_limit(config, limit_fraction):
    plain = make_net()
    total = sum(p.numel() * 2 for p in plain.parameters())
    limit = None if limit_fraction is None else limit_fraction * total / GB
    net = managed(plain, vram_config=config, vram_limit=limit)
    for _ in range(3):  # first forward fills residency, later ones run from it
        assert torch.equal(net(X), plain(X))


def test_budget_is_never_exceeded_and_counts_its_bytes():
    plain = make_net()
    probe = managed(plain, vram_config=CPU_FP32_MASTERS, vram_limit=0)
    reserve = vram_budget(probe).streaming_reserve()
    for fraction in (0.2, 0.45):
        total = sum(p.numel() * 2 for p in plain.parameters())
        limit_bytes = reserve + int(fraction * total)
        net = managed(plain, vram_config=CPU_FP32_MASTERS, vram_limit=limit_bytes / GB)
        budget = vram_budget(net)
        for _ in range(2):
            net(X)
        snap = budget.snapshot()
        counts = layer_state_counts(net)
        assert 0 < counts["preparing"] < n_managed(net)  # a real partial plan
        assert snap.peak_resident_bytes <= snap.limit_bytes
        assert snap.peak_bytes <= snap.limit_bytes
        assert snap.transient_bytes == 0 and snap.resident_bytes == layer_state_bytes(net)["preparing"]


def test_vram_limit_zero_keeps_nothing_resident():
    net = managed(make_net(), vram_config=CPU_FP32_MASTERS, vram_limit=0)
    for _ in range(2):
        net(X)
    budget = vram_budget(net)
    assert layer_state_counts(net)["preparing"] == 0
    assert budget.peak_resident_bytes == 0
    # the only bytes ever on the computation device were one layer's transient copies at a time
    assert 0 < budget.peak_bytes <= budget.streaming_reserve()


def test_replan_without_reload():
    plain = make_net()
    net = managed(plain, vram_config=CPU_FP32_MASTERS, vram_limit=None)
    net(X)
    runtime = runtime_of(net)
    masters = {(r.name, n): (s.tensor.data_ptr(), id(s)) for r in runtime.layers for n, s in r.masters.items()}
    n = n_managed(net)
    set_vram_limit(net, 0)
    assert layer_state_counts(net)["preparing"] == 0
    assert vram_budget(net).resident_bytes == 0
    assert torch.equal(net(X), plain(X))
    set_vram_limit(net, None)
    assert torch.equal(net(X), plain(X))
    assert layer_state_counts(net)["preparing"] == n
    after = {(r.name, n): (s.tensor.data_ptr(), id(s)) for r in runtime.layers for n, s in r.masters.items()}
    assert after == masters  # the same master tensors: nothing was loaded again


def test_replan_shrinks_resident_set_immediately():
    plain = make_net()
    total = sum(p.numel() * 2 for p in plain.parameters())
    net = managed(plain, vram_config=CPU_FP32_MASTERS, vram_limit=None)
    net(X)
    big = vram_budget(net).resident_bytes
    reserve = vram_budget(net).streaming_reserve()
    set_vram_limit(net, (reserve + total // 3) / GB)
    assert vram_budget(net).resident_bytes <= (reserve + total // 3)
    assert vram_budget(net).resident_bytes < big
    net(X)
    assert vram_budget(net).resident_bytes <= vram_budget(net).limit_bytes


def test_planner_is_deterministic_and_follows_execution_order():
    plain = make_net()
    total = sum(p.numel() * 2 for p in plain.parameters())
    chosen = []
    for _ in range(2):
        net = managed(plain, vram_config=CPU_FP32_MASTERS, vram_limit=None)
        net(X)  # trace the execution order
        reserve = vram_budget(net).streaming_reserve()
        set_vram_limit(net, (reserve + total // 2) / GB)
        net(X)
        runtime = runtime_of(net)
        chosen.append([r.name for r in runtime.layers if r.resident is not None])
        order = [r.name for r in runtime.execution_order]
        # first-fit in execution order: the root's pad and the first block come first
        assert order[0] == "" and order[1] == "blocks.0.0"
        assert order.index(chosen[-1][0]) <= order.index(chosen[-1][-1])
    assert chosen[0] == chosen[1]
    assert "blocks.0.0" in chosen[0]


def test_state_bytes_for_fp8_and_bf16():
    plain = make_net()
    bf16 = managed(plain, vram_config=CPU, vram_limit=0)
    fp8 = managed(plain, vram_config=dict(CPU, offload_dtype="float8_e4m3fn", onload_dtype="float8_e4m3fn"), vram_limit=0)
    b16 = layer_state_bytes(bf16)["onload"]
    b8 = layer_state_bytes(fp8)["onload"]
    assert b16 == sum(p.numel() * 2 for p in plain.parameters())
    # matrices in fp8 (+ one float32 scale per row), vectors stay bf16
    matrices = sum(p.numel() for p in plain.parameters() if p.ndim >= 2)
    rows = sum(p.shape[0] for p in plain.parameters() if p.ndim >= 2)
    vectors = sum(p.numel() for p in plain.parameters() if p.ndim < 2)
    assert b8 == matrices + 4 * rows + 2 * vectors
    fp8(X)
    assert layer_state_counts(fp8)["preparing"] == 0


def test_tied_parameters_are_stored_once():
    torch.manual_seed(0)
    emb = nn.Embedding(16, 8)
    head = nn.Linear(8, 16, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head}).to(torch.bfloat16)

    class Tied(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner["head"](self.inner["emb"](ids))

    plain = Tied(model)
    net = copy.deepcopy(plain)
    enable_vram_management(net, vram_config=CPU_FP32_MASTERS, vram_limit=0)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(net(ids), plain(ids))
    assert layer_state_bytes(net)["onload"] == 16 * 8 * 4  # one fp32 master for both layers
    runtime = runtime_of(net)
    assert runtime.layers[0].masters["weight"] is runtime.layers[1].masters["weight"]


def test_buffers_move_to_the_computation_device_and_are_counted():
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("freqs", torch.arange(4.0), persistent=False)

        def forward(self, x):
            return self.lin(x) + self.freqs

    net = enable_vram_management(WithBuffer().to(torch.bfloat16), vram_config=CPU)
    assert vram_budget(net).fixed_bytes == net.freqs.nbytes > 0


def test_weight_dtype_reads_report_the_computation_dtype():
    """Model code reads `self.proj.weight.dtype` to cast inputs: it must see bf16, not fp8."""
    net = managed(make_net(), vram_config=dict(CPU, offload_dtype="float8_e4m3fn", onload_dtype="float8_e4m3fn"), vram_limit=0)
    assert net.blocks[0][0].weight.dtype == torch.bfloat16
    assert net.blocks[0][0].weight.shape == (64, 32)


def test_shared_budget_across_components():
    from engine import VramBudget

    budget = VramBudget(limit_gb=None)
    a = enable_vram_management(make_net(seed=1), vram_config=CPU, budget=budget, name="a", onload=False)
    b = enable_vram_management(make_net(seed=2), vram_config=CPU, budget=budget, name="b", onload=False)
    switched = []

    def switch(runtime):
        switched.append(runtime.name)
        for member in budget.members:
            if member is not runtime:
                member.offload()
        runtime.onload()

    budget.on_demand = switch
    a(X)
    b(X)
    assert switched == ["a", "b"]
    assert layer_state_counts(a)["offload"] == n_managed(a)
    assert layer_state_counts(b)["preparing"] > 0
    assert budget.resident_bytes == layer_state_bytes(b)["preparing"]
