"""What a memory pool and its members know of each other: two small protocols and one enum.

Coordination runs one way. The pool (engine.runtime.pool.MemoryPool) reads its members through
`PoolMember` (plain numbers and costs), plans, and hands each member its part of the plan. A
member (engine.runtime.component.VramRuntime) never plans and never calls into the pool's
planning: when something about it changes that the plan depends on, it says so through the one
path back, `Coordinator.member_changed(member, change)`, and the pool decides what follows.

    ONLOADED       a member made its onload copies: the pool pins waiting members by priority
                   (if this one waits), re-plans
    OFFLOADED      a member dropped every copy but its masters: re-plans
    STREAMING      a member started a transfer scheduler: pins waiting members (if this one is
                   onloaded and waits), re-plans
    FIXED          a member's fixed bytes changed (LoRA factors attached or removed): re-reads
                   every member's fixed bytes into the ledger, re-plans
    NEEDED         a layer of an offloaded member runs: asks its owner's stage switch
                   (`MemoryPool.on_demand`)
    OUT_OF_MEMORY  a step ran out of device memory: drops every member's slots and partial
                   trace (engine.runtime.oom then asks for one of the two below, or lowers the
                   peak itself)
    FEWER_SLOTS    a retry needs a lower peak: prefetch one group ahead only, re-plans
    LESS_RESIDENT  a retry needs a lower peak: residency capped at half of what it is, re-plans

Neither side imports the other (tests/test_layering.py checks every module of a package for
import circles): both import this module.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from engine.planning.ledger import VramLedger
from engine.planning.planner import MemberCost
from engine.transfer.pinned import PinnedBudget


class Change(Enum):
    """Something about a member that the pool's plan depends on (see the table above)."""

    ONLOADED = "onloaded"
    OFFLOADED = "offloaded"
    STREAMING = "streaming"
    FIXED = "fixed"
    NEEDED = "needed"
    OUT_OF_MEMORY = "out_of_memory"
    FEWER_SLOTS = "fewer_slots"
    LESS_RESIDENT = "less_resident"


class PoolMember(Protocol):
    """What the pool reads of a member and asks it to do (engine.runtime.component.VramRuntime)."""

    name: str
    active: bool  # onloaded by its owner (the pipeline's stage switch)
    pin_priority: int  # lower is pinned first (a pipeline gives its denoiser 0)

    @property
    def fixed_bytes(self) -> int:
        """Bytes it keeps on the computation device whatever the plan: buffers, parameters a
        module map leaves out, and its layers' LoRA factors."""

    @property
    def computes_on_cpu(self) -> bool:
        """Is its computation device the CPU (so its "device" copies are RAM)?"""

    def ram_held_bytes(self) -> int:
        """Of what the planner counts for it, the bytes already in RAM (so no longer in
        MemAvailable): its resident copies, or, where a resident copy is its RAM master itself,
        the resident cost of its layers while it is onloaded (engine.runtime.ram)."""

    def costs(self) -> MemberCost: ...

    def apply_plan(self, resident: frozenset[int], depth: int) -> None: ...

    def needs_pinning(self) -> bool: ...

    def pin_masters(self, budget: PinnedBudget) -> None:
        """Pin its host masters within `budget` (its own budget, when it was given one, wins)."""

    def drop_schedule(self) -> None: ...

    def abandon_trace(self) -> None: ...


class Coordinator(Protocol):
    """What a member may use of the pool it belongs to: the ledger it enters its copies in, the
    residency cap an out-of-memory recovery set, and the one path back, `member_changed`."""

    ledger: VramLedger
    residency_cap_bytes: int | None

    def member_changed(self, member: PoolMember, change: Change) -> None: ...
