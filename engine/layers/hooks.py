"""Named hooks around a module's entry methods, in a registry that can remove them.

The engine wraps a component's `forward` (and a VAE's `encode` / `decode`) for two reasons: to
mark where a step starts and ends (engine.runtime.entry) and to batch a CFG pair into one forward
(engine.generation.pipelines.cfg). Each is a `ModelHook` with a name, registered on the module's
`HookRegistry` (diffusers' HookRegistry is the model): hooks chain in registration order, the
last registered outermost, `remove(name)` takes one out, and with none left the module's own
methods are back as they were. The wrapped method keeps the original's signature (pipelines
inspect `transformer.forward`'s parameters).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY_ATTR = "_lowvram_hooks"


class ModelHook:
    """One named wrapper. Subclasses override `call`; `methods` are the entry methods it wraps
    (those the module has)."""

    name: str = "hook"
    methods: tuple[str, ...] = ("forward",)

    def call(self, method: str, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return inner(*args, **kwargs)

    def on_remove(self, module: nn.Module) -> None:
        """Called once the hook is out of the chain."""


class _HookedMethod:
    """The instance attribute standing in for one entry method: runs the hook chain."""

    def __init__(self, registry: "HookRegistry", method: str, original: Callable[..., Any]):
        self.registry = registry
        self.method = method
        self.original = original
        functools.update_wrapper(self, original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.original
        for hook in self.registry.hooks_for(self.method):  # innermost first
            call = functools.partial(hook.call, self.method, call)
        return call(*args, **kwargs)


class HookRegistry:
    """The hooks of one module, by name, in registration order."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._hooks: dict[str, ModelHook] = {}

    @classmethod
    def of(cls, module: nn.Module, create: bool = True) -> "HookRegistry | None":
        registry = module.__dict__.get(_REGISTRY_ATTR)
        if registry is None and create:
            registry = cls(module)
            module.__dict__[_REGISTRY_ATTR] = registry
        return registry

    def register(self, hook: ModelHook) -> ModelHook:
        if hook.name in self._hooks:
            raise ValueError(f"{type(self.module).__name__} already has a hook named {hook.name!r}; remove it first")
        self._hooks[hook.name] = hook
        for method in hook.methods:
            current = self.module.__dict__.get(method)
            if isinstance(current, _HookedMethod) or not callable(getattr(self.module, method, None)):
                continue
            if current is not None:
                raise ValueError(f"{type(self.module).__name__}.{method} is already replaced by {current!r}; cannot hook it")
            self.module.__dict__[method] = _HookedMethod(self, method, getattr(self.module, method))
        return hook

    def get(self, name: str) -> ModelHook | None:
        return self._hooks.get(name)

    def names(self) -> list[str]:
        return list(self._hooks)

    def hooks_for(self, method: str) -> list[ModelHook]:
        return [hook for hook in self._hooks.values() if method in hook.methods]

    def remove(self, name: str) -> ModelHook | None:
        hook = self._hooks.pop(name, None)
        if hook is None:
            return None
        for method in hook.methods:
            if not self.hooks_for(method) and isinstance(self.module.__dict__.get(method), _HookedMethod):
                del self.module.__dict__[method]  # the class's own method shows again
        if not self._hooks:
            self.module.__dict__.pop(_REGISTRY_ATTR, None)
        hook.on_remove(self.module)
        return hook


def register_hook(module: nn.Module, hook: ModelHook) -> ModelHook:
    return HookRegistry.of(module).register(hook)  # type: ignore[union-attr]


def remove_hook(module: nn.Module, name: str) -> ModelHook | None:
    registry = HookRegistry.of(module, create=False)
    return registry.remove(name) if registry is not None else None


def get_hook(module: nn.Module, name: str) -> ModelHook | None:
    registry = HookRegistry.of(module, create=False)
    return registry.get(name) if registry is not None else None
