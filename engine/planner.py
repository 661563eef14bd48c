"""Residency planning: which layers stay on the computation device (state "preparing").

The policy is deterministic:
1. Only layers of onloaded components are candidates, in component onload order, each
   component's layers in traced execution order (registration order before the first forward).
2. vram_limit None: every candidate is resident.
3. Otherwise the limit pays first for fixed bytes (buffers), the activation reserve and the
   streaming reserve (the largest transient a streamed layer needs, plus containers whose own
   parameters stay materialized around their children); then candidates are taken first-fit in
   order while their resident bytes fit in what is left. If every candidate fits with only the
   resident-form transients reserved, no streaming reserve is held back.
So resident + transient + fixed bytes never exceed the limit when the limit covers the reserve;
vram_limit=0 keeps nothing resident and streams every layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .budget import VramBudget
    from .runtime import LayerRecord, VramRuntime


def _reserve(candidates: list[tuple["VramRuntime", "LayerRecord"]], resident: bool) -> int:
    leaf = 0
    containers = 0
    for runtime, record in candidates:
        cost = runtime.transient_cost(record, resident)
        if record.is_leaf:
            leaf = max(leaf, cost)
        else:
            containers += cost
    return leaf + containers


def streaming_reserve(budget: "VramBudget") -> int:
    """Bytes a fully streamed run of the active components needs at its worst moment."""
    return _reserve(_candidates(budget), resident=False)


def _candidates(budget: "VramBudget") -> list[tuple["VramRuntime", "LayerRecord"]]:
    return [(m, r) for m in budget.members if m.active for r in m.planning_order()]


def choose_resident(budget: "VramBudget") -> set[int]:
    candidates = _candidates(budget)
    limit = budget.limit_bytes
    if limit is None:
        return {id(r) for _, r in candidates}
    available = limit - budget.fixed_bytes - budget.activation_reserve_bytes
    total = sum(m.resident_cost(r) for m, r in candidates)
    if total + _reserve(candidates, resident=True) <= available:
        return {id(r) for _, r in candidates}
    room = available - _reserve(candidates, resident=False)
    chosen: set[int] = set()
    used = 0
    for runtime, record in candidates:
        cost = runtime.resident_cost(record)
        if used + cost <= room:
            chosen.add(id(record))
            used += cost
    return chosen


def plan_residency(budget: "VramBudget") -> None:
    """Re-plan every member: drops copies that lost residency now, fills new ones lazily."""
    chosen = choose_resident(budget)
    # Drop first, so a growing member never sees the ledger above the limit.
    for member in budget.members:
        member.apply_plan(chosen)
