"""The managed layer classes, values of a `module_map` as in DiffSynth's developer guide.

Wrapping does not nest the layer inside another module: `ManagedModule.wrap(layer)` gives the
layer a subclass of its own class that mixes in the managed forward. State-dict keys, isinstance
checks and attribute access stay as they were, so checkpoint keys map 1:1 onto managed layers and
model code that reads `self.proj.weight.dtype` keeps working.

A managed layer manages its *direct* parameters only (recurse=False), so wrapping a container
with its own parameters (Z-Image's pad tokens) composes with wrapping its children.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from engine.runtime.component import LayerRecord

_WRAPPED_CLASSES: dict[tuple[type, type], type] = {}


class ManagedModule(nn.Module):
    """Mixin for any layer with weights: its forward runs with computation-form parameters."""

    _vram: "LayerRecord"

    @classmethod
    def wrap(cls, module: nn.Module) -> nn.Module:
        """Turn `module` into a managed layer in place (its class becomes a managed subclass)."""
        if isinstance(module, ManagedModule):
            raise ValueError(f"{type(module).__name__} is already managed")
        original = type(module)
        key = (cls, original)
        if key not in _WRAPPED_CLASSES:
            _WRAPPED_CLASSES[key] = type(
                original.__name__,
                (cls, original),
                {"__module__": original.__module__, "__qualname__": original.__qualname__, "_vram_original_class": original},
            )
        module.__class__ = _WRAPPED_CLASSES[key]
        return module

    @classmethod
    def unwrap_class(cls, module: nn.Module) -> type:
        return getattr(type(module), "_vram_original_class", type(module))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        record = self._vram
        if record.fast:
            # Resident in computation form: the parameters in place are the ones to compute with.
            runtime = record.runtime
            if runtime.trace is not None:
                runtime.trace.append(record)
            record.state = "computation"
            try:
                return super().forward(*args, **kwargs)
            finally:
                record.state = record.rest_state
        return record.runtime.run_streamed(self, record, args, kwargs)

    def _vram_compute(self, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Run the layer's own forward with `params` swapped in for its direct parameters."""
        slots = self._parameters
        saved = {name: slots[name] for name in params}
        try:
            for name, tensor in params.items():
                slots[name] = nn.Parameter(tensor, requires_grad=False) if tensor.is_floating_point() else tensor
            return super().forward(*args, **kwargs)
        finally:
            slots.update(saved)


class ManagedLinear(ManagedModule):
    """nn.Linear specialised: streamed weights go straight into F.linear, no parameter swap."""

    def _vram_compute(self, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        (x,) = args if args else (kwargs["input"],)
        return F.linear(x, params["weight"], params.get("bias"))


def is_plain_linear(module: nn.Module) -> bool:
    """True when the module computes exactly like nn.Linear (so ManagedLinear's fast path is valid)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
