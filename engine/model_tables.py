"""What the memory engine knows of a model class, as data someone registers: its tables.

The engine manages any torch model; a few things it does better when it knows the model's class:
which managed class each layer gets and which block lists group layers for streaming
(engine.layers.module_maps), which diffusers LoRA loader converts its LoRA files and under which
component prefix (engine.lora.formats), and which `general.architecture` its GGUF files carry and
in which original layout they may keep their tensors (engine.storage.gguf_names). None of that
is written into the engine: it is a `ModelTables` record per model class, registered here.

Who registers: whoever knows the models. The app's model families (model_registry/families/)
declare their tables in their spec files and the generation layer turns them into records
(engine.generation.family_tables); the public facade (`import engine`) adds that as a provider, so
`engine.enable_vram_management(transformer)` on a plain diffusers FLUX transformer still gets
FLUX's layer map without any catalogue code running until a table is first looked up. A user with
a model of their own calls `register(ModelTables(...))`. Without a record the engine falls back to
its default rules (every module with parameters managed, no block lists, no LoRA conversion, no
GGUF architecture check).

This module imports nothing of the engine and no torch: every layer may read it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

#: the values of a layer map that name the engine's managed classes without importing them
LINEAR, MODULE = "linear", "module"


class GgufLayout(Protocol):
    """An original tensor layout a model's published GGUFs keep (engine.storage.gguf_names):
    `markers`, substrings of ".name" only that layout has; `sources(model)`, diffusers name ->
    [(file name, first row, end row or -1)] for that model's config; `unused`, file tensors the
    diffusers model has no place for (dropped, not reported)."""

    description: str
    markers: tuple[str, ...]
    unused: tuple[str, ...]
    sources: Callable[[Any], dict[str, list[tuple[str, int, int]]]]


@dataclass(frozen=True)
class ModelTables:
    """The tables of one model class, keyed by its dotted path (`module.QualName`); looked up
    along a model's MRO, so a subclass shares its base's unless it has its own.

    layers: layer class (dotted path or class) -> LINEAR / MODULE (or a managed class or its
        dotted path); None: the default rule.
    blocks: attribute paths of the block lists that group layers for streaming.
    lora_loader: the diffusers LoRA loader mixin (a name in diffusers.loaders.lora_pipeline) that
        converts this model's LoRA files; lora_prefix: the component prefix those files use.
    gguf_architectures: `general.architecture` values of its GGUF files (another one is refused).
    gguf_layout: the original layout its GGUFs may keep (None: diffusers' own names).
    """

    model_class: str
    layers: Mapping[Any, Any] | None = field(default=None, hash=False)
    blocks: tuple[str, ...] = ()
    lora_loader: str | None = None
    lora_prefix: str | None = None
    gguf_architectures: tuple[str, ...] = ()
    gguf_layout: GgufLayout | None = None

    @property
    def short_name(self) -> str:
        return self.model_class.rpartition(".")[2]


_LOCK = threading.RLock()
_TABLES: dict[str, ModelTables] = {}
_PROVIDERS: list[Callable[[], Iterable[ModelTables]]] = []


def register(tables: ModelTables) -> None:
    """Register the tables of `tables.model_class`. Registering the same record again is a no-op;
    a different record for a registered class is refused (two sources disagree about a model)."""
    with _LOCK:
        known = _TABLES.get(tables.model_class)
        if known is not None and known != tables:
            raise ValueError(
                f"{tables.model_class} already has other tables registered ({known}); "
                "each model class has one record (two families sharing a denoiser class must agree)"
            )
        _TABLES[tables.model_class] = tables


register_model_tables = register  # the public facade's name (engine.register_model_tables)


def add_provider(provider: Callable[[], Iterable[ModelTables]]) -> None:
    """Register the records `provider()` returns, lazily: on the first lookup after this call."""
    with _LOCK:
        _PROVIDERS.append(provider)


def _run_providers() -> None:
    with _LOCK:
        while _PROVIDERS:
            provider = _PROVIDERS.pop(0)
            for tables in provider():
                register(tables)


def all_tables() -> dict[str, ModelTables]:
    """Every registered record, by dotted class path."""
    _run_providers()
    with _LOCK:
        return dict(_TABLES)


def dotted_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def tables_for(model_class: type) -> ModelTables | None:
    """The record of `model_class` or of its nearest registered base class; None when none is."""
    tables = all_tables()
    for klass in model_class.__mro__:
        found = tables.get(dotted_path(klass))
        if found is not None:
            return found
    return None


__all__ = ["LINEAR", "MODULE", "GgufLayout", "ModelTables", "add_provider", "all_tables", "dotted_path", "register", "register_model_tables", "tables_for"]
