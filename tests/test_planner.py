"""The planner as a pure function: plain costs in, a plan out (no model, no runtime)."""

from __future__ import annotations

import pytest

from engine.planning.planner import MAX_DEPTH, LayerCost, Limits, MemberCost, Plan, plan, smallest_feasible_limit, streaming_reserve


def layer(key: int, resident: int, streamed: int | None = None, *, leaf: bool = True, in_place: int = 0) -> LayerCost:
    """A layer with `resident` bytes resident; streaming it adds `streamed` (default: the same)."""
    return LayerCost(key, resident, in_place, resident if streamed is None else streamed, leaf)


def member(*layers: LayerCost, key: str = "m", group: int | None = None) -> MemberCost:
    return MemberCost(key, tuple(layers), group)


THREE = member(layer(1, 4), layer(2, 4), layer(3, 4))
SIX = member(*(layer(k, 4) for k in range(1, 7)), group=4, key="s")  # 24 bytes; streamed: 4 + 2 slots of 4

# (name, members, limits, resident keys, depth per scheduled member)
CASES = [
    ("unlimited: everything resident", [THREE], Limits(None), {1, 2, 3}, {}),
    ("limit 0: nothing resident", [THREE], Limits(0), set(), {}),
    # 12 resident + 0 in-place transients fits 12: no streaming reserve is held back
    ("all fit beside in-place transients", [THREE], Limits(12), {1, 2, 3}, {}),
    # 11 < 12: stream; the reserve is the largest streamed transient (4): room 7 -> one layer
    ("first fit in order after the reserve", [THREE], Limits(11), {1}, {}),
    ("fixed and activation bytes are paid first", [THREE], Limits(15, fixed_bytes=2, activation_reserve_bytes=2), {1}, {}),
    # room 8: the 7-byte layer does not fit after the first, the last one still does
    ("first fit skips what does not fit", [member(layer(1, 2, 1), layer(2, 7, 1), layer(3, 2, 1))], Limits(9), {1, 3}, {}),
    # containers' transients add up (they stay materialized around their children), leaves take
    # the max: reserve 1 + 1 + 1 = 3, room 4 (were containers max'd too, room 6 would take two)
    (
        "containers add to the reserve",
        [member(layer(1, 3, 1, leaf=False), layer(2, 3, 1, leaf=False), layer(3, 2, 1))],
        Limits(7),
        {1},
        {},
    ),
    # scheduler: the reserve holds 2 slots of the largest group; a second group in flight
    # (depth 2) is bought before residency, then layers, then deeper prefetch
    ("depth 2 before residency", [SIX], Limits(4 + 8 + 4), set(), {"s": 2}),
    ("then residency", [SIX], Limits(4 + 8 + 4 + 4), {1}, {"s": 2}),
    (
        "leftover deepens prefetch up to MAX_DEPTH",
        [member(layer(1, 4, 1), layer(2, 64, 4), group=4, key="s")],
        Limits(4 + 8 + 20),
        {1},
        {"s": MAX_DEPTH},
    ),
    ("nothing streams: depth 1", [member(layer(1, 4), group=4, key="s")], Limits(None), {1}, {"s": 1}),
    # OOM recovery capped residency under an unlimited limit: first fit under the cap
    ("residency cap without a limit", [THREE], Limits(None, residency_cap_bytes=9), {1, 2}, {}),
    ("residency cap under a limit", [THREE], Limits(100, residency_cap_bytes=5), {1}, {}),
    (
        "members plan in order, each its own depth",
        [
            member(*(layer(k, 4, 1) for k in range(1, 5)), group=4, key="a"),
            member(*(layer(k, 4, 1) for k in range(11, 15)), group=2, key="b"),
        ],
        Limits(1 + 2 * (4 + 2) + 6),
        set(),
        {"a": 2, "b": 2},
    ),
]


@pytest.mark.parametrize("name, members, limits, resident, depth", CASES, ids=[c[0] for c in CASES])
def test_plan_table(name, members, limits, resident, depth):
    result = plan(members, limits)
    assert isinstance(result, Plan)
    assert set(result.resident) == resident
    for key, want in depth.items():
        assert result.depth[key] == want
    # the plan's own figure is the floor of these members under these limits
    assert result.smallest_feasible_limit == smallest_feasible_limit(members, limits)
    # whenever the limit covers the floor, resident bytes + the reserve stay within it
    if limits.limit_bytes is not None and limits.limit_bytes >= result.smallest_feasible_limit:
        costs = {lc.key: lc for m in members for lc in m.layers}
        kept = sum(costs[k].resident_bytes for k in result.resident)
        streamed = [m for m in members if any(lc.key not in result.resident for lc in m.layers)]
        slots = sum(((result.depth.get(m.key, 1) + 1) * (m.group_bytes or 0)) for m in streamed if m.group_bytes)
        transients = max((costs[k].transient_streamed for k in costs if k not in result.resident and costs[k].is_leaf), default=0)
        containers = sum(costs[k].transient_streamed for k in costs if not costs[k].is_leaf)
        assert kept + slots + transients + containers + limits.fixed_bytes + limits.activation_reserve_bytes <= limits.limit_bytes


def test_streaming_reserve_counts_leaves_containers_and_slots():
    members = [member(layer(1, 3, leaf=False), layer(2, 5), layer(3, 2), group=6, key="s")]
    assert streaming_reserve(members) == 3 + 5 + 2 * 6
    assert smallest_feasible_limit(members, Limits(0, fixed_bytes=7, activation_reserve_bytes=1)) == 7 + 1 + 3 + 5 + 12


def test_plan_is_deterministic_and_pure():
    members = [member(*(layer(i, (i * 37) % 11 + 1) for i in range(40)), group=12, key="s")]
    limits = Limits(90, fixed_bytes=3, activation_reserve_bytes=5)
    first = plan(members, limits)
    assert all(plan(members, limits) == first for _ in range(5))
    assert members == [member(*(layer(i, (i * 37) % 11 + 1) for i in range(40)), group=12, key="s")]  # inputs untouched


def test_peak_bytes_is_what_the_plan_holds_at_its_worst_and_fits_the_limit():
    """peak = fixed + activations + resident + slots (depth + 1 of the largest group, only for a
    member that streams) + the largest transient; within any limit that covers the floor."""
    from engine.planning.planner import peak_bytes, slot_bytes

    everything = plan([SIX], Limits(None))
    assert slot_bytes([SIX], everything) == 0 and peak_bytes([SIX], Limits(None, 1, 2), everything) == 1 + 2 + 24
    nothing = plan([SIX], Limits(0))
    assert slot_bytes([SIX], nothing) == 2 * 4  # depth 1: the group computing and one in flight
    assert peak_bytes([SIX], Limits(0), nothing) == 4 + 2 * 4 == smallest_feasible_limit([SIX], Limits(0))
    for limit in range(smallest_feasible_limit([SIX], Limits(0)), 40):
        limits = Limits(limit, 1, 1)
        if limit < smallest_feasible_limit([SIX], limits):
            continue
        chosen = plan([SIX], limits)
        held = sum(4 for key in chosen.resident)
        assert peak_bytes([SIX], limits, chosen) <= limit
        assert peak_bytes([SIX], limits, chosen) >= 1 + 1 + held
