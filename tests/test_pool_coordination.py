"""The memory pool's coordination runs one way (issue #28).

* The pool plans from what its members report through `PoolMember` and nothing else: a member
  that is not a VramRuntime at all (a plain object here) is planned, pinned, counted and given a
  RAM room like any other.
* A member tells the pool what changed through one path, `member_changed`; the component's code
  uses nothing else of its pool but the ledger it enters its copies in (checked on the source).
* The ledger's writers are the code that makes the bytes: the component (resident, transient),
  its transfer scheduler (slots, transient) and the pool (the fixed bytes its members report).
  LoRA code never writes it: a LoRA's factors are the component's fixed bytes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from engine import enable_vram_management, load_lora, remove_lora, runtime_of, vram_budget
from engine.planning.planner import LayerCost, MemberCost
from engine.runtime import ram
from engine.runtime.member import Change
from engine.runtime.pool import MemoryPool
from engine.transfer.pinned import PinnedBudget
from tests.fixtures.tiny_loras import peft_lora, save_diffusers
from tests.fixtures.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3
BF16 = {"computation_dtype": torch.bfloat16}


class PlainMember:
    """A pool member that is nothing but the protocol: two layers of 100 bytes each."""

    def __init__(self, name: str, fixed: int = 0, held: int = 0, cpu: bool = False):
        self.name, self.active, self.pin_priority = name, False, 1
        self._fixed, self._held, self._cpu = fixed, held, cpu
        self.applied: list[tuple[frozenset[int], int]] = []
        self.pinned_with: PinnedBudget | None = None
        self.waiting = True
        self.dropped = 0

    fixed_bytes = property(lambda self: self._fixed)
    computes_on_cpu = property(lambda self: self._cpu)

    def ram_held_bytes(self) -> int:
        return self._held

    def costs(self) -> MemberCost:
        return MemberCost(id(self), (LayerCost(1, 100, 0, 100, True), LayerCost(2, 100, 0, 100, True)), None)

    def apply_plan(self, resident: frozenset[int], depth: int) -> None:
        self.applied.append((resident, depth))

    def needs_pinning(self) -> bool:
        return self.waiting

    def pin_masters(self, budget: PinnedBudget) -> None:
        self.pinned_with, self.waiting = budget, False

    def drop_schedule(self) -> None:
        self.dropped += 1

    def abandon_trace(self) -> None:
        pass


def test_the_pool_plans_a_member_through_the_protocol_alone(monkeypatch):
    pinned = PinnedBudget(limit_bytes=GiB)
    pool = MemoryPool(limit_gb=None, pinned=pinned)
    a, b = PlainMember("a", fixed=7), PlainMember("b", fixed=5)
    pool.join(a)
    pool.join(b)
    assert pool.fixed_bytes == 12  # the sum they report
    a.active = True
    pool.member_changed(a, Change.ONLOADED)
    assert a.pinned_with is pinned and b.pinned_with is pinned  # every waiting member, by priority
    assert a.applied[-1] == (frozenset({1, 2}), 1) and b.applied[-1] == (frozenset(), 1)  # unlimited: all of a's
    a._fixed = 9
    pool.member_changed(a, Change.FIXED)
    assert pool.fixed_bytes == 14
    needed = []
    pool.on_demand = needed.append
    pool.member_changed(b, Change.NEEDED)
    assert needed == [b]
    pool.member_changed(a, Change.OUT_OF_MEMORY)
    # frees what the failed step held; how the retry lowers its peak is engine.runtime.oom's choice
    assert a.dropped == b.dropped == 1 and pool.residency_cap_bytes is None
    pool.leave(b)
    assert pool.fixed_bytes == 9 and pool.members == [a]


def test_the_ram_room_comes_from_what_members_report(monkeypatch):
    monkeypatch.setenv("LOWVRAM_RAM_AVAILABLE_GB", "3")
    pool = MemoryPool()
    pool.join(PlainMember("gpu", held=10**9))
    assert pool.ram_room_bytes() is None  # no member computes on the CPU
    pool.join(PlainMember("cpu", fixed=100, held=1000, cpu=True))
    pool.ram_activation_bytes = 50
    assert pool.ram_room_bytes() == 3 * GiB + 1000 + 100 - 50 - ram.RAM_MARGIN_BYTES


def _calls_on(tree: ast.AST, owner: str) -> set[str]:
    """Attributes used on `<x>.{owner}` (e.g. self.pool.replan -> "replan")."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == owner:
            out.add(node.attr)
    return out


def test_a_member_uses_nothing_of_its_pool_but_the_ledger_and_the_one_path_back():
    for rel in ("engine/runtime/component.py", "engine/runtime/oom.py", "engine/runtime/entry.py"):
        used = _calls_on(ast.parse((ROOT / rel).read_text()), "pool")
        assert used <= {"member_changed", "ledger", "residency_cap_bytes"}, f"{rel} uses {sorted(used)} of its pool"


LEDGER_WRITES = {"add_resident", "remove_resident", "add_transient", "remove_transient", "add_slots", "remove_slots", "set_fixed"}
WRITERS = {
    "engine/runtime/component.py": {"add_resident", "remove_resident", "add_transient", "remove_transient"},
    "engine/transfer/scheduler.py": {"add_slots", "remove_slots", "add_transient", "remove_transient"},
    "engine/runtime/pool.py": {"set_fixed"},
}


def test_the_ledger_has_the_writers_the_design_names():
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "engine").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "engine/planning/ledger.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LEDGER_WRITES:
                found.setdefault(rel, set()).add(node.func.attr)
    assert found == WRITERS


def test_lora_factors_are_the_components_fixed_bytes(tmp_path):
    """The component counts its adapters' bytes (`fixed_bytes`); the pool's ledger is their sum."""
    plain, _ = tiny_model("CLIPTextModel", torch.bfloat16)
    sd, meta = peft_lora(plain, ["q_proj", "v_proj"])
    path = save_diffusers(sd, "text_encoder", tmp_path / "te.safetensors")
    model = enable_vram_management(plain, vram_config=BF16, vram_limit=0)
    runtime, pool = runtime_of(model), vram_budget(model)
    before = pool.fixed_bytes
    assert runtime.fixed_bytes == runtime.unmanaged_bytes == before
    handle = load_lora(model, path)
    assert runtime.adapter_bytes() == handle.nbytes > 0
    assert runtime.fixed_bytes == pool.fixed_bytes == before + handle.nbytes
    remove_lora(model, handle)
    assert runtime.fixed_bytes == pool.fixed_bytes == before and runtime.adapter_bytes() == 0
