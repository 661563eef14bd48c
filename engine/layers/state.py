"""The four states of a managed layer, and the object that owns them (one per layer).

`ManagedLayer` is the only writer of its module's parameter slots and of its state: every
change goes through one of its transitions, and each transition checks the state it starts
from (an illegal move raises `LayerStateError`, naming the layer). Derived facts (does the layer
run in place, which copy would it stream from) are properties, never stored twice.

    OFFLOAD --onload--> ONLOAD --make_resident--> PREPARING
       ^                  |  ^                       |
       +-----offload------+  +-----drop_resident-----+   (offload also from PREPARING)
    any rest state --enter_computation--> COMPUTATION --exit_computation--> the same rest state
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.config import STATES
from engine.layers.adapters import Adapter, LayerAdapters
from engine.storage.stored import StoredTensor

if TYPE_CHECKING:
    from collections.abc import Mapping


class LayerState(enum.Enum):
    """Where a layer's weights are (DiffSynth's four states)."""

    OFFLOAD = "offload"
    """Only the master copy exists, at offload_device / offload_dtype (RAM, or its .safetensors
    file for disk offload). The component will not run soon."""

    ONLOAD = "onload"
    """The component runs soon: an onload copy exists at onload_device / onload_dtype when that
    place differs from the offload place (else the master serves)."""

    PREPARING = "preparing"
    """A resident copy is kept on the computation device (preparing_device / preparing_dtype),
    within the VRAM budget, as the planner chose."""

    COMPUTATION = "computation"
    """Transient, only inside the layer's forward: the weights in computation_dtype on the
    computation device. The layer returns to its rest state when the forward ends."""


assert STATES == tuple(state.value for state in LayerState), "engine.config.STATES names the four states in order"


class LayerStateError(RuntimeError):
    """A transition was asked from a state it cannot start from (a bug in the caller)."""


def as_parameter(tensor: torch.Tensor) -> torch.Tensor:
    """What a parameter slot holds: floating tensors as frozen Parameters, others as they are."""
    if isinstance(tensor, nn.Parameter) or not tensor.is_floating_point():
        return tensor
    return nn.Parameter(tensor, requires_grad=False)


class ManagedLayer:
    """One managed layer: its stored copies, its state, and its module's parameter slots.

    `masters` are never moved (dropping a copy just frees it, so re-planning never reads weights
    again); `owned` names the masters this layer counts (a parameter shared by two layers is
    counted by the first). `placeholders` are what the slots show while the layer is not
    resident in computation form: the master itself when it already is in computation form,
    else a meta tensor of the computation dtype and shape (model code reading `weight.dtype`
    sees bfloat16, not fp8).
    """

    __slots__ = (
        "name",
        "module",
        "component",
        "masters",
        "owned",
        "placeholders",
        "is_leaf",
        "block",
        "onload_copy",
        "resident",
        "resident_bytes",
        "_rest",
        "_computing",
        "_in_slots",
        "lora",
    )

    def __init__(self, name: str, module: nn.Module, component: Any, masters: dict[str, StoredTensor], owned: set[str], placeholders: dict[str, torch.Tensor], block: str | None = None):
        self.name = name
        self.module = module
        self.component = component  # engine.runtime.component.VramRuntime
        self.masters = masters
        self.owned = frozenset(owned)
        self.placeholders = placeholders
        self.is_leaf = next(module.children(), None) is None
        self.block = block
        self.onload_copy: dict[str, StoredTensor] | None = None
        self.resident: dict[str, StoredTensor] | None = None
        self.resident_bytes = 0
        self._rest = LayerState.OFFLOAD
        self._computing = 0
        self._in_slots = False  # the slots show the resident copy (computation form)
        # LoRA factors applied to this layer's output (engine.layers.adapters); None: no LoRA.
        # They never touch the parameter slots or the masters.
        self.lora: LayerAdapters | None = None

    # --- derived facts ----------------------------------------------------------------------------
    @property
    def state(self) -> LayerState:
        return LayerState.COMPUTATION if self._computing else self._rest

    @property
    def rest_state(self) -> LayerState:
        return self._rest

    @property
    def fast(self) -> bool:
        """Resident in computation form: the parameters in the slots are the ones to compute with."""
        return self._in_slots

    def __repr__(self) -> str:
        return f"ManagedLayer({self.name or '<root>'!r}, {self.state.value})"

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            "a model under VRAM management cannot be deep-copied (its layers share streams, pinned "
            "memory and a budget): call engine.disable_vram_management(model) first, copy the plain "
            "model, then manage each copy"
        )

    def _require(self, action: str, *states: LayerState) -> None:
        if self._computing or self._rest not in states:
            raise LayerStateError(
                f"layer {self.name or '<root>'}: cannot {action} from state {self.state.value} "
                f"(only from {', '.join(s.value for s in states)})"
            )

    def _show(self, tensors: Mapping[str, torch.Tensor]) -> None:
        slots = self.module._parameters
        for name, tensor in tensors.items():
            slots[name] = tensor

    # --- installation (enable / disable) ------------------------------------------------------------
    def install(self) -> dict[str, Any]:
        """Put the placeholders in the slots. Returns the parameters they held, for the caller to
        undo a failed enable with (the layer keeps no reference: a master moved into pinned memory
        must free its old tensor)."""
        originals = {name: self.module._parameters[name] for name in self.placeholders}
        self._show(self.placeholders)
        return originals

    def uninstall(self, plain: Mapping[str, torch.Tensor]) -> None:
        """Leave management: the slots get `plain` (the original parameters, or tensors rebuilt
        from the masters)."""
        self._require("leave management", LayerState.OFFLOAD)
        self._show({name: as_parameter(t) for name, t in plain.items()})

    def repoint(self, name: str, tensor: torch.Tensor) -> None:
        """Its placeholder for `name` now lives elsewhere (a master moved into pinned memory)."""
        new = as_parameter(tensor)
        self.placeholders[name] = new
        if not self._in_slots:
            self.module._parameters[name] = new

    # --- component transitions (the pipeline's stage switch) -----------------------------------------
    def onload(self, copy: dict[str, StoredTensor] | None) -> None:
        """OFFLOAD -> ONLOAD, with the onload copy when the onload place has one of its own."""
        self._require("onload", LayerState.OFFLOAD)
        self.onload_copy = copy
        self._rest = LayerState.ONLOAD

    def offload(self) -> int:
        """ONLOAD or PREPARING -> OFFLOAD: every copy but the master is dropped. Returns the
        resident bytes freed."""
        self._require("offload", LayerState.OFFLOAD, LayerState.ONLOAD, LayerState.PREPARING)
        freed = self.drop_resident() if self._rest is LayerState.PREPARING else 0
        self.onload_copy = None
        self._rest = LayerState.OFFLOAD
        return freed

    # --- residency (the planner's choice) -----------------------------------------------------------
    def make_resident(self, copies: dict[str, StoredTensor], nbytes: int, computation_form: bool) -> None:
        """ONLOAD -> PREPARING: keep `copies` (nbytes) on the computation device; in computation
        form they go straight into the slots, so forwards run in place."""
        self._require("make resident", LayerState.ONLOAD)
        self.resident = copies
        self.resident_bytes = nbytes
        if computation_form:
            self._show({name: as_parameter(stored.tensor) for name, stored in copies.items()})  # type: ignore[attr-defined]
            self._in_slots = True
        self._rest = LayerState.PREPARING

    def drop_resident(self) -> int:
        """PREPARING -> ONLOAD: free the resident copy, placeholders back. Returns its bytes."""
        self._require("drop residency", LayerState.PREPARING)
        freed = self.resident_bytes
        self._show(self.placeholders)
        self.resident = None
        self.resident_bytes = 0
        self._in_slots = False
        self._rest = LayerState.ONLOAD
        return freed

    # --- adapters (LoRA, applied at computation time) ---------------------------------------------
    def attach_adapter(self, adapter: Adapter) -> None:
        """Apply `adapter` after the ones already attached (any state: no weight moves)."""
        if self.lora is None:
            self.lora = LayerAdapters(self.module)
        self.lora.adapters.append(adapter)

    def detach_adapters(self, key: int) -> int:
        """Remove the adapters of LoRA `key`. Returns their bytes."""
        if self.lora is None:
            return 0
        kept = [a for a in self.lora.adapters if a.key != key]
        freed = sum(a.nbytes for a in self.lora.adapters if a.key == key)
        self.lora.adapters = kept
        if not kept:
            self.lora = None
        return freed

    # --- computation --------------------------------------------------------------------------------
    def enter_computation(self) -> None:
        self._computing += 1

    def exit_computation(self) -> None:
        self._computing -= 1

    @contextmanager
    def computing(self) -> Iterator[None]:
        self._computing += 1
        try:
            yield
        finally:
            self._computing -= 1

    @contextmanager
    def parameters_swapped(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """The slots show `params` (computation copies) for the duration of one forward."""
        slots = self.module._parameters
        saved = {name: slots[name] for name in params}
        try:
            self._show({name: as_parameter(t) for name, t in params.items()})
            yield
        finally:
            self._show(saved)
