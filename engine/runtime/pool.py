"""The memory pool: the one coordinator of a pipeline's memory.

Every component of one pipeline draws on the same VRAM, so they share one pool. It owns the
members, the ledger (engine.planning.ledger) and the limits; `replan` hands the planner
(engine.planning.planner, a pure function) the members' costs and gives each member the part of
the plan that concerns it, which applies only what changed. It also hands out the pinned-RAM
budget by priority: the component streamed every step (the denoiser) is pinned first, after
loading, not whichever component happened to load first.

Only the pool plans. It reads its members through `PoolMember` (engine.runtime.member), and a
member tells it what changed through `member_changed` (the table in engine.runtime.member); the
pool never imports the member's class, the member never imports the pool.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.config import limit_to_bytes, parse_vram_limit
from engine.planning import planner
from engine.planning.ledger import LedgerSnapshot, VramLedger
from engine.runtime import ram
from engine.runtime.member import Change, PoolMember
from engine.transfer.pinned import PROCESS_PINNED_BUDGET, PinnedBudget

__all__ = ["Change", "MemoryPool", "PoolMember"]


class MemoryPool:
    """Shared by every component of one pipeline (public name: `engine.VramBudget`)."""

    def __init__(self, limit_gb: float | None = None, pinned: PinnedBudget | None = None):
        self.limit_gb = parse_vram_limit(limit_gb)
        self.ledger = VramLedger()
        self.members: list[PoolMember] = []
        self._activation_reserve_bytes = 0
        # Set by OOM recovery: resident bytes stay under this even when the limit would allow more.
        self.residency_cap_bytes: int | None = None
        # Set by OOM recovery: the schedulers prefetch at most this deep (fewer slots).
        self.depth_cap: int | None = None
        # Called when a layer of a component that is not onloaded runs: a pipeline sets it to switch
        # stages (onload that component, offload the others). None: stream from the offload place.
        self.on_demand: Callable[[PoolMember], None] | None = None
        self.pinned = pinned if pinned is not None else PROCESS_PINNED_BUDGET
        self.last_plan: planner.Plan | None = None
        # RAM the coming stage's activations take where the computation device is the CPU (the
        # pipeline sets it from the resolution); it bounds the RAM room (engine.runtime.ram).
        self.ram_activation_bytes = 0

    def __repr__(self) -> str:
        return f"MemoryPool(limit_gb={self.limit_gb}, members={[m.name for m in self.members]})"

    # --- limits -----------------------------------------------------------------------------------
    @property
    def limit_bytes(self) -> int | None:
        return limit_to_bytes(self.limit_gb)

    def set_limit(self, limit_gb: float | None) -> None:
        """GB, None = unlimited. The engine's one check of a limit (the constructor's too): the
        public functions hand theirs to the pool unparsed."""
        self.limit_gb = parse_vram_limit(limit_gb)
        self.residency_cap_bytes = self.depth_cap = None  # a new limit is a fresh start

    @property
    def activation_reserve_bytes(self) -> int:
        return self._activation_reserve_bytes

    @activation_reserve_bytes.setter
    def activation_reserve_bytes(self, nbytes: int) -> None:
        self._activation_reserve_bytes = int(nbytes)

    def set_activations(self, device_bytes: int, ram_bytes: int) -> None:
        """The coming stage's activations: reserved within the limit on the computation device
        (`device_bytes`), or taken off the RAM room where it is the CPU (`ram_bytes`); re-plans
        when either changed."""
        if int(device_bytes) != self._activation_reserve_bytes or int(ram_bytes) != self.ram_activation_bytes:
            self._activation_reserve_bytes, self.ram_activation_bytes = int(device_bytes), int(ram_bytes)
            self.replan()

    def cap_residency(self, cap_bytes: int) -> None:
        """OOM recovery: keep resident bytes under `cap_bytes` until the limit is set again."""
        self.residency_cap_bytes = cap_bytes
        self.replan()

    def cap_depth(self, depth: int) -> None:
        """OOM recovery: prefetch at most `depth` groups ahead (depth + 1 slots) until the limit
        is set again."""
        self.depth_cap = max(1, int(depth))
        self.replan()

    def ram_room_bytes(self) -> int | None:
        """Where a member computes on the CPU: the limit the RAM really available allows
        (engine.runtime.ram), from what the members say they already hold in RAM; None on a
        GPU-only pool."""
        cpu = [m for m in self.members if m.computes_on_cpu]
        if not cpu:
            return None
        return ram.ram_room(sum(m.ram_held_bytes() for m in cpu), self.ledger.fixed_bytes, self.ram_activation_bytes)

    def effective_limit_bytes(self) -> int | None:
        """The limit the planner works to: the user's, bounded on a CPU by the RAM room."""
        limit, room = self.limit_bytes, self.ram_room_bytes()
        if room is None:
            return limit
        return room if limit is None else min(limit, room)

    def limits(self) -> planner.Limits:
        return planner.Limits(
            self.effective_limit_bytes(), self.ledger.fixed_bytes, self._activation_reserve_bytes, self.residency_cap_bytes, self.depth_cap
        )

    # --- the ledger, read-only ----------------------------------------------------------------------
    resident_bytes = property(lambda self: self.ledger.resident_bytes)
    transient_bytes = property(lambda self: self.ledger.transient_bytes)
    fixed_bytes = property(lambda self: self.ledger.fixed_bytes)
    slot_bytes = property(lambda self: self.ledger.slot_bytes)
    peak_bytes = property(lambda self: self.ledger.peak_bytes)
    peak_resident_bytes = property(lambda self: self.ledger.peak_resident_bytes)

    def snapshot(self) -> LedgerSnapshot:
        return self.ledger.snapshot(self.limit_bytes)

    def reset_peak(self) -> None:
        self.ledger.reset_peak()

    # --- members ----------------------------------------------------------------------------------
    def join(self, member: PoolMember) -> None:
        self.members.append(member)
        self._count_fixed()

    def leave(self, member: PoolMember) -> None:
        """A member leaves management (engine.disable_vram_management)."""
        self.members.remove(member)
        self._count_fixed()
        self.replan()

    def _count_fixed(self) -> None:
        """The ledger's fixed bytes are what the members report: the pool is their one writer."""
        self.ledger.set_fixed(sum(m.fixed_bytes for m in self.members))

    def member_changed(self, member: PoolMember, change: Change) -> None:
        """The one path from a member back to the pool (the table in engine.runtime.member)."""
        if change is Change.NEEDED:
            if self.on_demand is not None:
                self.on_demand(member)
            return
        if change is Change.OUT_OF_MEMORY:
            self._recover_from_oom()
            return
        if change is Change.FEWER_SLOTS:
            self.cap_depth(1)
            return
        if change is Change.LESS_RESIDENT:
            self.cap_residency(self.ledger.resident_bytes // 2)
            return
        if change is Change.FIXED:
            self._count_fixed()
        if change in (Change.ONLOADED, Change.STREAMING) and member.active and member.needs_pinning():
            self.assign_pinned()
        self.replan()

    def _recover_from_oom(self) -> None:
        """Free what the failed step held: every member's slots and partial trace. What the retry
        changes to lower its peak is engine.runtime.oom's choice (`cap_depth`, `cap_residency`, ...)."""
        for member in self.members:
            member.drop_schedule()
            member.abandon_trace()

    # --- planning ---------------------------------------------------------------------------------
    def member_costs(self) -> list[planner.MemberCost]:
        """The planner's input: the onloaded members, in order."""
        return [m.costs() for m in self.members if m.active]

    def replan(self) -> planner.Plan:
        """Re-choose the resident set of every active member within the limit; each member drops
        copies that lost residency now and fills new ones lazily, at their next forward."""
        plan = planner.plan(self.member_costs(), self.limits())
        for member in self.members:
            member.apply_plan(plan.resident if member.active else frozenset(), plan.depth.get(id(member), 1))
        self.last_plan = plan
        return plan

    def streaming_reserve(self) -> int:
        return planner.streaming_reserve(self.member_costs())

    def smallest_feasible_limit(self) -> int:
        """The smallest vram_limit (bytes) the onloaded members run within (engine.planning.planner)."""
        return planner.smallest_feasible_limit(self.member_costs(), self.limits())

    # --- pinned host memory -------------------------------------------------------------------------
    def assign_pinned(self) -> None:
        """Pin the host masters of every member that streams through a scheduler and has no pinned
        arena yet, by priority: the component streamed every step first (its `pin_priority` is
        lowest), so a text encoder loaded first cannot take the pinned RAM the denoiser needs."""
        waiting = [m for m in self.members if m.needs_pinning()]
        for member in sorted(waiting, key=lambda m: m.pin_priority):
            member.pin_masters(self.pinned)
