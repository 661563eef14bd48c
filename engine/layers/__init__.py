"""Managed layers: the per-layer state machine, the managed layer classes, module maps, hooks."""

from engine.layers.managed import ManagedLinear, ManagedModule

__all__ = ["ManagedLinear", "ManagedModule"]
