"""Low-rank adapters (LoRA) of one managed layer, applied when the layer computes.

A layer's adapters are its own business: `ManagedLayer.lora` holds a `LayerAdapters` (None when
no LoRA touches the layer), and the managed forward (engine.layers.managed) calls it once on the
layer's output, whichever route computed it (in place, resident copy, scheduler slot,
synchronous). So the update is one post-step shared by every route:

    y = W x (+ b)                          the layer's own forward, from whatever form W is stored in
    y = y + B(A(x)) * scale                for each adapter, in load order

exactly as peft's `LoraLayer.forward` does it (same operations, same order, same dtype), which
is why the output equals diffusers' `load_lora_weights` bitwise where the base forward is the
same. The factors live on the computation device in the computation dtype; the base weights are
never read, copied or re-quantized for them (the stored masters stay as they are). Re-weighting
only changes `scale`, a float.

Convolutions follow peft's `Conv2d`: A is a convolution with the layer's kernel, stride and
padding, B a 1x1 convolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Adapter:
    """One LoRA's factors on one layer: down `a` (rank x in[, kh, kw]), up `b` (out x rank[, 1, 1]).

    `scale` = strength * alpha / divisor, computed in peft's order of operations (`set_scale`), so
    it is bitwise the float peft multiplies by; divisor is the rank (sqrt(rank) for rsLoRA).
    """

    key: int  # the LoRA it belongs to (engine.lora's handle id)
    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    divisor: float
    strength: float = 1.0
    b_bias: torch.Tensor | None = None  # peft's lora_bias (rare)
    scale: float = 0.0

    def __post_init__(self) -> None:
        self.set_strength(self.strength)

    def set_strength(self, strength: float) -> None:
        self.strength = float(strength)
        self.scale = self.strength * self.alpha / self.divisor

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + (self.b_bias.nbytes if self.b_bias is not None else 0)


class LayerAdapters:
    """The adapters of one layer, applied to its output in load order."""

    __slots__ = ("adapters", "conv")

    def __init__(self, module: nn.Module):
        self.adapters: list[Adapter] = []
        # peft's Conv2d: A takes the layer's kernel, stride and padding, B is 1x1
        self.conv: tuple[Any, Any] | None = (module.stride, module.padding) if isinstance(module, nn.Conv2d) else None

    def __bool__(self) -> bool:
        return bool(self.adapters)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.adapters)

    def __call__(self, out: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0] if args else kwargs["input"]
        conv = self.conv
        for adapter in self.adapters:
            if adapter.strength == 0.0:  # off: y + 0 * h is y
                continue
            a = adapter.a
            if x.dtype != a.dtype:  # peft's _cast_input_dtype
                x = x.to(a.dtype)
            if conv is None:
                h = F.linear(F.linear(x, a), adapter.b, adapter.b_bias)
            else:
                stride, padding = conv
                h = F.conv2d(F.conv2d(x, a, None, stride, padding), adapter.b, adapter.b_bias)
            out = out + h * adapter.scale
        return out
