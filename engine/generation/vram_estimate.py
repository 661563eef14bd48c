"""The pre-flight VRAM estimate for a GPU, from the planner itself (issue #17: one source of truth).

Every weighted component is built on the meta device and managed as the loader would manage it
for a CUDA computation device (`estimate.component_cost(..., device="cuda")`: the same layers,
module map, storage forms, FP8/int8/NF4 scales, GGUF blocks and transients; the scheduler's slot,
`group_bytes`, laid out from the shapes at the place it streams from). Nothing touches CUDA,
so it runs on a host without a GPU (suggest_settings sizes GPUs this host does not have).

Each stage (encode, denoise, decode) is then planned with `engine.planning.planner.plan` under
the same `Limits` the memory pool would use on that GPU: the request's vram_limit, the fixed
bytes of every member of the pipeline (buffers live on the GPU, LoRA factors too) and the
activation reserve of the resolution. From that one `Plan`, per stage:

    peak      = planner.peak_bytes: fixed + activations + resident + slots + the worst transient
    floor     = planner.smallest_feasible_limit (what the pipeline records per stage, and the pool)
    streamed  = the stored bytes of the layers the plan does not keep resident, as their groups
                cross to the GPU (per denoiser forward; x2 a step where CFG runs as two forwards,
                `estimator.denoiser_forwards`)

and RAM on a GPU host: the process baseline, the masters in RAM (pinned in place: no second
copy), and two staging buffers of the largest group for each component the pinned budget cannot
hold whole, or whose masters stay on disk (the pool pins the denoiser first).

What it cannot know it says: the activations are a per-pixel formula
(`pipelines.managed.activation_bytes`) not yet checked on a GPU; a GGUF file is sized by
spreading its bytes over the weight matrices (its header is not read). A run measures at or below the planner's
figures (`tests/test_gpu_estimate.py`: the ledger's peak per stage, the streamed bytes).

Speed: the meta builds are cached (`component_cost` is an lru_cache), the plans too. The first
estimate of Qwen-Image (its 20B transformer, 8B text encoder and VAE built on meta and managed)
measured 3.0 s on this project's 2-core development machine; a later one at another limit, 2 ms.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine.generation.estimate import (
    PROCESS_BASELINE_BYTES,
    ComponentCost,
    component_costs,
)
from engine.planning import planner
from engine.storage.forms import get_form

GiB = 1024**3
#: stages in the order a generation runs them
STAGES = ("encode", "denoise", "decode")
#: host RAM of the CUDA context and libraries beyond the CPU process baseline: not measured by
#: this project yet (no GPU run); a round figure, so the GPU-host RAM figure is honest only to it
CUDA_HOST_BYTES = int(0.4 * GiB)


@dataclass(frozen=True)
class StagePlan:
    """One stage under the planner, in bytes on the GPU (activations included in peak and floor)."""

    peak_bytes: int
    resident_bytes: int
    slot_bytes: int
    smallest_feasible_bytes: int
    streamed_bytes_per_forward: int


@dataclass(frozen=True)
class GpuEstimate:
    """What a setting needs on a GPU host, from the planner's plans of each stage."""

    stages: Mapping[str, StagePlan]
    vram_bytes: int  # the largest stage peak
    smallest_feasible_bytes: int  # the largest stage floor
    streamed_bytes_per_step: int  # the denoiser's streamed bytes x its forwards per step
    ram_bytes: int
    masters_bytes: int  # masters in RAM (0 with disk offload)
    staging_bytes: int  # the pinned staging buffers of the components that need them
    notes: tuple[str, ...] = ()


def pinned_budget_bytes(ram_total_bytes: int | None) -> int:
    """The pinned-RAM budget the pool would hand out on that host: $LOWVRAM_PINNED_RAM_GB, else
    half of the RAM (engine.transfer.pinned: half the RAM available; for another machine, half
    its RAM); this host: the process's own budget."""
    from engine.transfer.pinned import (
        DEFAULT_PINNED_SHARE,
        PINNED_RAM_ENV,
        PROCESS_PINNED_BUDGET,
        parse_pinned_ram_gb,
    )

    env = os.environ.get(PINNED_RAM_ENV)
    if env:
        return int(parse_pinned_ram_gb(env) * GiB)
    if ram_total_bytes is None:
        return PROCESS_PINNED_BUDGET.planned_limit_bytes()
    return int(ram_total_bytes * DEFAULT_PINNED_SHARE)


def scheduled_slot_bytes(cost: ComponentCost, plan: planner.Plan) -> int:
    """The slots one component's scheduler allocates under `plan`, as `TransferScheduler.build`
    lays them out: its streamed layers in order, consecutive ones of one block forming a group;
    depth + 1 slots (the depth capped at the number of groups) of the largest group."""
    sizes: list[int] = []
    key = None
    for layer, group in zip(cost.member.layers, cost.group_keys):
        if layer.key in plan.resident:
            continue
        if group != key or not sizes:
            key = group
            sizes.append(0)
        sizes[-1] += cost.stream_bytes[layer.key]
    if not sizes or cost.member.group_bytes is None:
        return 0
    depth = max(1, min(plan.depth.get(cost.member.key, 1), planner.MAX_DEPTH, len(sizes)))
    return (depth + 1) * max(sizes)


def plan_stage(members: list[ComponentCost], limits: planner.Limits) -> tuple[StagePlan, planner.Plan]:
    """One stage's plan and what it holds (the pool's `replan` with these members onloaded). The
    peak is the planner's (`planner.peak_bytes`), with the slots as the schedulers lay them out
    for the layers the plan streams (the planner pays for its largest group whichever streams)."""
    costs = [c.member for c in members]
    plan = planner.plan(costs, limits)
    resident = sum(layer.resident_bytes for m in costs for layer in m.layers if layer.key in plan.resident)
    streamed = sum(c.stream_bytes[layer.key] for c in members for layer in c.member.layers if layer.key not in plan.resident)
    slots = sum(scheduled_slot_bytes(c, plan) for c in members)
    stage = StagePlan(
        peak_bytes=planner.peak_bytes(costs, limits, plan) - planner.slot_bytes(costs, plan) + slots,
        resident_bytes=resident,
        slot_bytes=slots,
        smallest_feasible_bytes=planner.smallest_feasible_limit(costs, limits),
        streamed_bytes_per_forward=streamed,
    )
    return stage, plan


def staging_ram(costs: Mapping[str, ComponentCost], denoiser: str, disk: bool, pinned_budget: int) -> int:
    """RAM of the pinned staging buffers, as `MemoryPool.assign_pinned` and `pin_and_stage` hand
    them out: the denoiser pins first, then the others in order; a component whose masters are on
    disk, or do not fit the pinned room left, gets a stager with two buffers of its largest group."""
    room, total = pinned_budget, 0
    for name in sorted(costs, key=lambda n: n != denoiser):
        c = costs[name]
        if disk or c.master_ram_bytes > room:
            total += 2 * max(1, c.staging_bytes)
            room -= min(room, 2 * max(1, c.staging_bytes))
        room -= min(room, c.master_ram_bytes)
    return total


def gpu_estimate(
    entry: Any,
    family: Any,
    *,
    storage: str,
    disk: bool,
    limit_bytes: int | None,
    activation_bytes: int,
    lora_bytes: int = 0,
    forwards_per_step: int = 1,
    ram_total_bytes: int | None = None,
    local_path: Any = None,
) -> GpuEstimate | None:
    """The GPU estimate of one catalogue entry (None when a component has no config: the caller
    falls back to its size formula). `ram_total_bytes`: the RAM of the machine asked about
    (None: this host); `local_path`: the model's folder, for entries without catalogued configs."""
    costs = component_costs(entry, family, storage, disk, "cuda", local_path)
    if costs is None:
        return None
    budget = pinned_budget_bytes(ram_total_bytes)
    stage_of = tuple((name, family.stage_of(name)) for name in costs)
    return _estimate(
        _Costs(costs), stage_of, family.denoiser, storage, disk, limit_bytes, activation_bytes, lora_bytes, forwards_per_step, budget
    )


class _Costs:
    """The components' costs, hashed by identity (they are the lru_cached meta builds)."""

    def __init__(self, costs: dict[str, ComponentCost]):
        self.costs = costs
        self._key = tuple((name, id(c)) for name, c in costs.items())

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Costs) and self._key == other._key


@lru_cache(maxsize=4096)
def _estimate(
    wrapped: _Costs,
    stage_of: tuple[tuple[str, str], ...],
    denoiser: str,
    storage: str,
    disk: bool,
    limit_bytes: int | None,
    act: int,
    lora: int,
    forwards: int,
    pinned: int,
) -> GpuEstimate:
    """`gpu_estimate` on hashable arguments (suggest_settings asks for the same plans many times)."""
    costs = wrapped.costs
    stage_names = dict(stage_of)
    fixed = sum(c.unmanaged_bytes for c in costs.values()) + lora  # every member's buffers stay on the GPU
    limits = planner.Limits(limit_bytes, fixed, act)
    stages: dict[str, StagePlan] = {}
    for stage in STAGES:
        members = [c for name, c in costs.items() if stage_names[name] == stage]
        if members:
            stages[stage], _ = plan_stage(members, limits)
    denoise = stages.get("denoise")
    streamed = forwards * denoise.streamed_bytes_per_forward if denoise is not None else 0
    masters = sum(c.master_ram_bytes for c in costs.values())
    staging = staging_ram(costs, denoiser, disk, pinned)
    notes = (
        f"activations (about {act / GiB:.1f} GiB at this size) are a per-pixel guess, not yet measured on a GPU",
    )
    if get_form(storage).from_file:
        notes += (f"the {get_form(storage).title} file's bytes are spread over the weight matrices by size (its header is not read)",)
    return GpuEstimate(
        stages=stages,
        vram_bytes=max(s.peak_bytes for s in stages.values()),
        smallest_feasible_bytes=max(s.smallest_feasible_bytes for s in stages.values()),
        streamed_bytes_per_step=streamed,
        ram_bytes=PROCESS_BASELINE_BYTES + CUDA_HOST_BYTES + masters + staging,
        masters_bytes=masters,
        staging_bytes=staging,
        notes=notes,
    )
