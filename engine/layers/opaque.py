"""A managed layer's whole eager step as one opaque operator, for compiled code.

Under `torch.compile` a managed layer must not be traced into: its forward reads Python state that
moves between steps (residency after `set_vram_limit`, the trace list of the first step, LoRA
factors, the scheduler's slots), and every read would become a guard, so each change would
recompile, or a graph break per layer. Here the layer's step (fetch its computation weights from
wherever they are: resident, a scheduler slot, a quantized master dequantized, a file on disk;
compute; add its LoRA; all the state and ledger bookkeeping) is one `torch.library` custom op,
`lowvram::layer_step(index, x, kind)`. The compiler sees an extern call with a tensor handle
and an input; what it guards on is the handle's and the input's metadata, which no VRAM limit,
LoRA, prompt or seed changes. Inside, the step runs exactly the eager route (the same code), so
streaming, prefetch and the ledger behave as without compile, and a layer's output is bitwise the
eager one.

The handle is a 0-dim int64 tensor on the layer's module (`_vram_index`, a plain attribute: not
a buffer, so state dicts are unchanged), indexing a registry of live layers. The fake (meta)
implementation gives the output's shape and dtype by running the layer's own forward on fake
weights of one representative layer of the same `kind` (class and parameter shapes), so the
repeated blocks of a model share one compiled graph.

Only leaf layers called with one tensor argument take the op; anything else (a container with
its own parameters, several inputs) runs its eager route behind `torch.compiler.disable`.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.layers.state import ManagedLayer

# weak references to the layers' modules (a ManagedLayer has __slots__ and no weakref slot)
_LAYERS: dict[int, "weakref.ref[torch.nn.Module]"] = {}
_KINDS: dict[str, "weakref.WeakSet[torch.nn.Module]"] = {}
_NEXT = itertools.count(1)


def register(layer: "ManagedLayer") -> None:
    """Give the layer a handle for compiled code (at enable time; cheap: one 0-dim tensor)."""
    index = next(_NEXT)
    module = layer.module
    _LAYERS[index] = weakref.ref(module)
    # what decides the output's shape and dtype: the class, its settings (a convolution's stride and
    # padding, a norm's eps: extra_repr), its parameters as computed with, the computation dtype
    original = getattr(type(module), "_vram_original_class", type(module))
    shapes = ",".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in sorted(layer.placeholders.items()))
    kind = f"{original.__module__}.{original.__qualname__}({module.extra_repr()})[{shapes}]|{layer.component.comp_dtype}"
    _KINDS.setdefault(kind, weakref.WeakSet()).add(module)
    # a container's forward runs its children: it is no single step (takes_the_op leaves it out)
    module.__dict__["_vram_index"] = torch.tensor(index, dtype=torch.int64) if layer.is_leaf else None
    module.__dict__["_vram_kind"] = kind


def unregister(layer: "ManagedLayer") -> None:
    module = layer.module
    handle = module.__dict__.pop("_vram_index", None)
    kind = module.__dict__.pop("_vram_kind", None)
    if kind in _KINDS:
        _KINDS[kind].discard(module)
    if handle is not None:
        _LAYERS.pop(int(handle), None)


def _layer(index: torch.Tensor) -> "ManagedLayer":
    ref = _LAYERS.get(int(index))
    module = ref() if ref is not None else None
    layer = module.__dict__.get("_vram") if module is not None else None
    if layer is None:
        raise RuntimeError(
            "a compiled graph called a managed layer that is no longer managed (the model left VRAM "
            "management after it was compiled): compile it again with engine.compile_model"
        )
    return layer


@torch.library.custom_op("lowvram::layer_step", mutates_args=())
def layer_step(index: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The managed layer's eager forward on `x` (its weights fetched by its route, LoRA added)."""
    layer = _layer(index)
    out = layer.module._vram_eager_forward((x,), {})
    if out is x:  # an op's output may not alias its input
        out = out.clone()
    return out


@layer_step.register_fake
def _layer_step_fake(index: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    layer = next((m.__dict__["_vram"] for m in list(_KINDS.get(kind, ())) if "_vram" in m.__dict__), None)
    if layer is None:
        raise RuntimeError(f"no managed layer of kind {kind!r} is alive to describe the compiled call")
    # the layer's own computation on fake weights as its placeholders describe them (computation
    # dtype and shape, whatever form the masters are stored in): shape and dtype only
    params = {name: torch.empty(t.shape, dtype=t.dtype, device=x.device) for name, t in layer.placeholders.items()}
    return layer.module._vram_fake(params, (x,))


def takes_the_op(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Does this call go through the opaque op (a leaf layer with one tensor argument)?"""
    return not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) and getattr(module, "_vram_index", None) is not None
