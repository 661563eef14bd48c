"""The managed layer classes, values of a `module_map` as in DiffSynth's developer guide.

Wrapping does not nest the layer inside another module: `ManagedModule.wrap(layer)` gives the
layer a subclass of its own class that mixes in the managed forward, named after both (an
`nn.Linear` becomes a `ManagedLinear[Linear]`, so a traceback or a repr shows that the engine is
in the call). State-dict keys, isinstance checks and attribute access stay as they were, so
checkpoint keys map 1:1 onto managed layers and model code that reads `self.proj.weight.dtype`
keeps working. `unwrap` gives the layer its own class back.

A managed layer manages its *direct* parameters only (recurse=False), so wrapping a container
with its own parameters (Z-Image's pad tokens) composes with wrapping its children. Its state
and parameter slots belong to its `ManagedLayer` (engine.layers.state), held as `_vram`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.opaque import takes_the_op

if TYPE_CHECKING:
    from engine.layers.state import ManagedLayer

_WRAPPED_CLASSES: dict[tuple[type, type], type] = {}


class ManagedModule(nn.Module):
    """Mixin for any layer with weights: its forward runs with computation-form parameters."""

    _vram: "ManagedLayer"

    @classmethod
    def wrap(cls, module: nn.Module) -> nn.Module:
        """Turn `module` into a managed layer in place (its class becomes a managed subclass)."""
        if isinstance(module, ManagedModule):
            raise ValueError(f"{type(module).__name__} is already managed")
        original = type(module)
        key = (cls, original)
        if key not in _WRAPPED_CLASSES:
            name = f"{cls.__name__}[{original.__name__}]"
            _WRAPPED_CLASSES[key] = type(
                name,
                (cls, original),
                {"__module__": cls.__module__, "__qualname__": name, "_vram_original_class": original},
            )
        module.__class__ = _WRAPPED_CLASSES[key]
        return module

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        """Give a managed layer its own class back (its `_vram` record is dropped)."""
        module.__class__ = ManagedModule.unwrap_class(module)
        module.__dict__.pop("_vram", None)
        return module

    @classmethod
    def unwrap_class(cls, module: nn.Module) -> type:
        return getattr(type(module), "_vram_original_class", type(module))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # compiled code: the layer's step is one opaque op (engine.layers.opaque), so no state
            # the step reads becomes a guard; other calls run eagerly outside the graph
            if takes_the_op(self, args, kwargs):
                return torch.ops.lowvram.layer_step(self._vram_index, args[0], self._vram_kind)
            return _eager_outside_graph(self, args, kwargs)
        return self._vram_eager_forward(args, kwargs)

    def _vram_eager_forward(self, args: tuple, kwargs: dict) -> Any:
        """The managed forward: the route the layer's state gives, then its LoRA."""
        layer = self._vram
        if layer._in_slots:
            # Resident in computation form: the parameters in place are the ones to compute with.
            # (Inline rather than through the component: this is the all-resident hot path.)
            component = layer.component
            if component.trace is not None:
                component.trace.append(layer)
            layer._computing += 1
            try:
                out = super().forward(*args, **kwargs)
            finally:
                layer._computing -= 1
        else:
            out = layer.component.forward_layer(layer, args, kwargs)
        # LoRA: one post-step for every route, from the layer's input (engine.layers.adapters)
        lora = layer.lora
        if lora is not None:
            return lora(out, args, kwargs)
        return out

    def _vram_run_in_place(self, args: tuple, kwargs: dict) -> Any:
        """The layer's own forward on whatever its slots show (the component calls this)."""
        return super().forward(*args, **kwargs)

    def _vram_compute(self, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Run the layer's own forward with `params` (computation copies) in its slots."""
        with self._vram.parameters_swapped(params):
            return super().forward(*args, **kwargs)

    def _vram_fake(self, params: dict[str, torch.Tensor], args: tuple) -> Any:
        """The layer's own forward on fake weights: the output's shape and dtype for compiled code
        (engine.layers.opaque). Kept apart from `_vram_compute`, which runs on real weights."""
        with self._vram.parameters_swapped(params):
            return super().forward(*args)


@torch.compiler.disable
def _eager_outside_graph(module: ManagedModule, args: tuple, kwargs: dict) -> Any:
    return module._vram_eager_forward(args, kwargs)


class ManagedLinear(ManagedModule):
    """nn.Linear specialised: streamed weights go straight into F.linear, no parameter swap."""

    def _vram_compute(self, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        (x,) = args if args else (kwargs["input"],)
        return F.linear(x, params["weight"], params.get("bias"))

    def _vram_fake(self, params: dict[str, torch.Tensor], args: tuple) -> Any:
        return F.linear(args[0], params["weight"], params.get("bias"))


def is_plain_linear(module: nn.Module) -> bool:
    """True when the module computes exactly like nn.Linear (so ManagedLinear's fast path is valid)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
