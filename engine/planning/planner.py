"""Residency planning: which layers stay on the computation device (state "preparing").

A pure function of plain data: per-layer costs and the limits in, a `Plan` out. It imports
nothing from the runtime or the transfer path, so its policy is tested with tables
(tests/test_planner.py) and the memory pool (engine.runtime.pool) applies what it returns.

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

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

MIN_SLOTS = 2  # the group computing and at least one group in flight
PREFERRED_DEPTH = 2
MAX_DEPTH = 4


@dataclass(frozen=True)
class LayerCost:
    """What one layer costs on the computation device."""

    key: int
    resident_bytes: int  # its resident copy (the preparing form)
    transient_resident: int = 0  # bytes its forward adds beside a resident copy
    transient_streamed: int = 0  # bytes its forward adds when streamed (source form + computation form)
    is_leaf: bool = True  # a container's own weights stay materialized around its children


@dataclass(frozen=True)
class MemberCost:
    """One onloaded component: its layers in planning order, and the largest slot its transfer
    scheduler would need if every one of them streamed (None: no scheduler)."""

    key: Hashable
    layers: tuple[LayerCost, ...]
    group_bytes: int | None = None


@dataclass(frozen=True)
class Limits:
    limit_bytes: int | None  # None: unlimited
    fixed_bytes: int = 0
    activation_reserve_bytes: int = 0
    residency_cap_bytes: int | None = None  # set by OOM recovery: residency stays under it
    max_depth: int | None = None  # set by OOM recovery: prefetch at most this deep (fewer slots)


@dataclass(frozen=True)
class Plan:
    resident: frozenset[int]  # keys of the layers to keep resident
    depth: Mapping[Hashable, int] = field(default_factory=dict)  # prefetch depth per scheduled member
    smallest_feasible_limit: int = 0  # bytes: the least limit these members run within


def _layers(members: Sequence[MemberCost]) -> list[LayerCost]:
    return [layer for member in members for layer in member.layers]


def _scheduled(members: Sequence[MemberCost]) -> list[MemberCost]:
    return [m for m in members if m.group_bytes is not None]


def _reserve(members: Sequence[MemberCost], resident: bool) -> int:
    leaf = containers = 0
    for layer in _layers(members):
        cost = layer.transient_resident if resident else layer.transient_streamed
        if layer.is_leaf:
            leaf = max(leaf, cost)
        else:
            containers += cost
    slots = 0 if resident else MIN_SLOTS * sum(m.group_bytes or 0 for m in _scheduled(members))
    return leaf + containers + slots


def streaming_reserve(members: Sequence[MemberCost]) -> int:
    """Bytes a fully streamed run of these members needs at its worst moment."""
    return _reserve(members, resident=False)


def smallest_feasible_limit(members: Sequence[MemberCost], limits: Limits) -> int:
    """The smallest vram_limit (bytes) the members run within: what the planner pays before any
    residency (fixed bytes, the activation reserve, the streaming reserve). A limit below it
    still runs, streaming everything, but may use up to this much."""
    return limits.fixed_bytes + limits.activation_reserve_bytes + streaming_reserve(members)


def streams(member: MemberCost, plan: Plan) -> bool:
    """Does `member` stream any layer under `plan` (so its scheduler holds slots)?"""
    return any(layer.key not in plan.resident for layer in member.layers)


def slot_bytes(members: Sequence[MemberCost], plan: Plan) -> int:
    """The device slots the schedulers hold under `plan`, as the planner pays for them: depth + 1
    slots of the member's largest group, for each scheduled member that streams anything (the
    scheduler allocates fewer when fewer groups stream than its depth, and sizes its slots to
    the largest group that streams)."""
    return sum((plan.depth.get(m.key, 1) + 1) * (m.group_bytes or 0) for m in _scheduled(members) if streams(m, plan))


def peak_bytes(members: Sequence[MemberCost], limits: Limits, plan: Plan) -> int:
    """The most these members hold on the computation device under `plan` at their worst moment,
    in the planner's own accounting: fixed bytes, the activation reserve, the resident copies,
    the slots, and the largest transient of one layer's forward (containers' own weights stay
    materialized around their children). Within the limit whenever the limit covers
    `smallest_feasible_limit`; what a run measures (the ledger's peak) stays at or below it."""
    resident = leaf = containers = 0
    for layer in _layers(members):
        kept = layer.key in plan.resident
        resident += layer.resident_bytes if kept else 0
        cost = layer.transient_resident if kept else layer.transient_streamed
        if layer.is_leaf:
            leaf = max(leaf, cost)
        else:
            containers += cost
    return limits.fixed_bytes + limits.activation_reserve_bytes + resident + leaf + containers + slot_bytes(members, plan)


def _first_fit(layers: Sequence[LayerCost], room: int) -> frozenset[int]:
    chosen: set[int] = set()
    used = 0
    for layer in layers:
        if used + layer.resident_bytes <= room:
            chosen.add(layer.key)
            used += layer.resident_bytes
    return frozenset(chosen)


def plan(members: Sequence[MemberCost], limits: Limits) -> Plan:
    """Choose the resident layers and each scheduled member's prefetch depth."""
    layers = _layers(members)
    floor = smallest_feasible_limit(members, limits)
    nothing_streams = {m.key: 1 for m in _scheduled(members)}
    everything = frozenset(layer.key for layer in layers)
    limit, cap = limits.limit_bytes, limits.residency_cap_bytes
    if limit is None and cap is None:
        return Plan(everything, nothing_streams, floor)
    if limit is None:  # unlimited, but OOM recovery capped residency: one group in flight
        return Plan(_first_fit(layers, cap), nothing_streams, floor)  # type: ignore[arg-type]
    available = limit - limits.fixed_bytes - limits.activation_reserve_bytes
    total = sum(layer.resident_bytes for layer in layers)
    if total + _reserve(members, resident=True) <= available and (cap is None or total <= cap):
        return Plan(everything, nothing_streams, floor)
    room = available - _reserve(members, resident=False)
    if cap is not None:
        room = min(room, cap)
    streamed = _streamed_plan(members, room, floor)
    if limits.max_depth is None:
        return streamed
    depth = {key: min(d, max(1, limits.max_depth)) for key, d in streamed.depth.items()}
    return Plan(streamed.resident, depth, floor)


def _streamed_plan(members: Sequence[MemberCost], room: int, floor: int) -> Plan:
    scheduled = _scheduled(members)
    # A second group in flight absorbs jitter in copy times: it comes before residency.
    preferred = {m.key: min(PREFERRED_DEPTH - 1, max(0, room) // m.group_bytes) if m.group_bytes else 0 for m in scheduled}
    room -= sum(preferred[m.key] * (m.group_bytes or 0) for m in scheduled)
    chosen = _first_fit(_layers(members), room)
    used = sum(layer.resident_bytes for layer in _layers(members) if layer.key in chosen)
    leftover = max(0, room - used)
    depth: dict[Hashable, int] = {}
    for member in scheduled:
        gb = member.group_bytes or 0
        # whatever residency could not use deepens prefetch, one slot per group-size of bytes
        extra = min(MAX_DEPTH - 1 - preferred[member.key], leftover // gb) if gb else 0
        depth[member.key] = 1 + preferred[member.key] + extra
        leftover -= extra * gb
    return Plan(chosen, depth, floor)
