"""Residency planning: which layers stay on the computation device (state "preparing").

The policy is deterministic:
1. Only layers of onloaded components are candidates, in component onload order, each
   component's layers in traced execution order (registration order before the first forward).
2. vram_limit None: every candidate is resident.
3. Otherwise the limit pays first for fixed bytes (buffers), the activation reserve and the
   streaming reserve (the largest transient a streamed layer needs, plus containers whose own
   parameters stay materialized around their children, plus two slots of the largest group for
   components streamed by the prefetching scheduler); then candidates are taken first-fit in
   order while their resident bytes fit in what is left. If every candidate fits with only the
   resident-form transients reserved, no streaming reserve is held back. For the scheduler, a
   second group in flight (depth 2) is bought before residency when the limit allows; what
   residency leaves over deepens prefetch further, one slot per group-size of bytes, up to 4.
So resident + transient + fixed bytes never exceed the limit when the limit covers the reserve;
vram_limit=0 keeps nothing resident and streams every layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.planning.budget import VramBudget
    from engine.runtime.component import LayerRecord, VramRuntime


MIN_SLOTS = 2  # the group computing and at least one group in flight
PREFERRED_DEPTH = 2
MAX_DEPTH = 4


def _group_bytes(candidates: list[tuple["VramRuntime", "LayerRecord"]]) -> dict["VramRuntime", int]:
    """Slot size of each scheduler-driven member, as if all its candidates were streamed."""
    records: dict["VramRuntime", list["LayerRecord"]] = {}
    for runtime, record in candidates:
        if runtime.scheduler is not None:
            records.setdefault(runtime, []).append(record)
    return {runtime: runtime.scheduler.max_group_bytes(rs) for runtime, rs in records.items()}


def _reserve(candidates: list[tuple["VramRuntime", "LayerRecord"]], resident: bool) -> int:
    leaf = 0
    containers = 0
    for runtime, record in candidates:
        cost = runtime.transient_cost(record, resident)
        if record.is_leaf:
            leaf = max(leaf, cost)
        else:
            containers += cost
    slots = 0 if resident else MIN_SLOTS * sum(_group_bytes(candidates).values())
    return leaf + containers + slots


def streaming_reserve(budget: "VramBudget") -> int:
    """Bytes a fully streamed run of the active components needs at its worst moment."""
    return _reserve(_candidates(budget), resident=False)


def smallest_feasible_limit(budget: "VramBudget") -> int:
    """The smallest vram_limit (bytes) the active components run within: what the planner pays
    before any residency (fixed bytes, the activation reserve, the streaming reserve). A limit
    below it still runs, streaming everything, but may use up to this much."""
    return budget.fixed_bytes + budget.activation_reserve_bytes + streaming_reserve(budget)


def _candidates(budget: "VramBudget") -> list[tuple["VramRuntime", "LayerRecord"]]:
    return [(m, r) for m in budget.members if m.active for r in m.planning_order()]


def choose_resident(budget: "VramBudget") -> set[int]:
    candidates = _candidates(budget)
    limit = budget.limit_bytes
    cap = budget.residency_cap_bytes
    if limit is None and cap is None:
        return {id(r) for _, r in candidates}
    if limit is None:
        return _first_fit(candidates, cap)
    available = limit - budget.fixed_bytes - budget.activation_reserve_bytes
    total = sum(m.resident_cost(r) for m, r in candidates)
    if total + _reserve(candidates, resident=True) <= available and (cap is None or total <= cap):
        return {id(r) for _, r in candidates}
    room = available - _reserve(candidates, resident=False)
    if cap is not None:
        room = min(room, cap)
    group_bytes = _group_bytes(candidates)
    # A second group in flight absorbs jitter in copy times: it comes before residency.
    preferred = {m: min(PREFERRED_DEPTH - 1, max(0, room) // gb) if gb else 0 for m, gb in group_bytes.items()}
    room -= sum(n * group_bytes[m] for m, n in preferred.items())
    chosen = _first_fit(candidates, room)
    used = sum(m.resident_cost(r) for m, r in candidates if id(r) in chosen)
    leftover = max(0, room - used)
    for member, gb in group_bytes.items():
        # whatever residency could not use deepens prefetch, one slot per group-size of bytes
        extra = min(MAX_DEPTH - 1 - preferred[member], leftover // gb) if gb else 0
        member.stream_depth = 1 + preferred[member] + extra
        leftover -= extra * gb
    return chosen


def _first_fit(candidates: list[tuple["VramRuntime", "LayerRecord"]], room: int) -> set[int]:
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
    for member in budget.members:
        member.apply_plan(chosen)
