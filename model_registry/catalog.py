"""The model catalogue: models.json read into typed, immutable entries.

All facts about a model (repos, licence, component sizes, defaults, limits) live in the
data file so that adding a model is an edit to one JSON entry, not to code: models.json, or the
catalogue JSON a family file may bring next to it (`<family module>.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .families import FAMILIES, Family, catalogue_files
from .types import UserFacingError

MODELS_FILE = Path(__file__).with_name("models.json")

DEFAULT_KEYS = ("steps", "guidance", "width", "height")
LIMIT_KEYS = (
    "min_width", "max_width", "min_height", "max_height", "size_multiple",
    "min_steps", "max_steps", "min_guidance", "max_guidance",
)  # fmt: skip


@dataclass(frozen=True)
class Component:
    """One pipeline component: its class and, for weighted ones, its true size."""

    name: str
    class_name: str
    library: str
    parameters: int | None = None  # None for tokenizers and schedulers
    bytes_bf16: int | None = None
    config_id: str | None = None  # key into component_configs.json

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as in models.json."""
        out: dict[str, Any] = {"class": self.class_name, "library": self.library}
        if self.config_id is not None:
            out["config"] = self.config_id
        if self.parameters is not None:
            out["parameters"] = self.parameters
            out["bytes_bf16"] = self.bytes_bf16
        return out


@dataclass(frozen=True)
class GgufSource:
    """A GGUF variant's denoiser: one file of a GGUF repo; the other components come from the
    base repo (`ModelEntry.hf_repo`). `verified` is False for repo ids and sizes written without
    network access: check them before relying on them."""

    repo: str
    file: str
    quant: str  # e.g. "Q4_K_M": the file's main quantization type
    bytes: int  # the file's size (an estimate where not verified)
    verified: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "file": self.file, "quant": self.quant, "bytes": self.bytes, "verified": self.verified}


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue entry. `defaults`/`limits` use the keys in DEFAULT_KEYS/LIMIT_KEYS."""

    id: str
    name: str
    family: str
    hf_repo: str | None
    modelscope_repo: str | None
    licence: str
    licence_url: str | None
    gated: bool
    is_demo: bool
    description: str
    defaults: dict[str, Any]
    limits: dict[str, Any]
    components: dict[str, Component] = field(default_factory=dict)
    gguf: GgufSource | None = None  # a GGUF variant: the denoiser is this file, kept as its blocks
    verified: bool = True  # False: repo ids not checked against the hub yet (written offline)

    @property
    def size_bytes(self) -> int:
        """Bytes of the weights as downloaded: bf16 components, the GGUF file for a GGUF denoiser."""
        if self.gguf is None:
            return self.bytes_bf16
        denoiser = self.adapter.denoiser
        return sum(c.bytes_bf16 or 0 for n, c in self.components.items() if n != denoiser) + self.gguf.bytes

    @property
    def adapter(self) -> Family:
        """The family: pipeline class and repo layout (file patterns), and each component's runtime role."""
        return FAMILIES[self.family]

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class that loads this model."""
        return self.adapter.pipeline_class

    @property
    def parameters(self) -> int:
        """Parameters of all weighted components."""
        return sum(c.parameters or 0 for c in self.components.values())

    @property
    def bytes_bf16(self) -> int:
        """Bytes of all weights in bf16: what the model costs in RAM/VRAM/disk unquantised."""
        return sum(c.bytes_bf16 or 0 for c in self.components.values())

    def repo_for(self, source: str) -> str | None:
        """The repo id on "hf" or "modelscope"."""
        return {"hf": self.hf_repo, "modelscope": self.modelscope_repo}.get(source)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the models.json entry plus computed totals)."""
        return {
            "id": self.id,
            "name": self.name,
            "family": self.family,
            "pipeline_class": self.pipeline_class,
            "is_demo": self.is_demo,
            "description": self.description,
            "hf_repo": self.hf_repo,
            "modelscope_repo": self.modelscope_repo,
            "licence": self.licence,
            "licence_url": self.licence_url,
            "gated": self.gated,
            "defaults": dict(self.defaults),
            "limits": dict(self.limits),
            "components": {name: c.to_dict() for name, c in self.components.items()},
            "parameters": self.parameters,
            "bytes_bf16": self.bytes_bf16,
            **({"gguf": self.gguf.to_dict()} if self.gguf is not None else {}),
            **({"verified": False} if not self.verified else {}),
        }


def _component(name: str, raw: dict[str, Any]) -> Component:
    return Component(
        name=name,
        class_name=raw["class"],
        library=raw["library"],
        parameters=raw.get("parameters"),
        bytes_bf16=raw.get("bytes_bf16"),
        config_id=raw.get("config"),
    )


def _entry(raw: dict[str, Any]) -> ModelEntry:
    return ModelEntry(
        id=raw["id"],
        name=raw["name"],
        family=raw["family"],
        hf_repo=raw.get("hf_repo"),
        modelscope_repo=raw.get("modelscope_repo"),
        licence=raw["licence"],
        licence_url=raw.get("licence_url"),
        gated=bool(raw.get("gated", False)),
        is_demo=bool(raw.get("is_demo", False)),
        description=raw.get("description", ""),
        defaults=dict(raw["defaults"]),
        limits=dict(raw["limits"]),
        components={name: _component(name, c) for name, c in raw["components"].items()},
        gguf=GgufSource(**raw["gguf"]) if raw.get("gguf") else None,
        verified=bool(raw.get("verified", True)),
    )


def read_catalogue_file(path: Path = MODELS_FILE) -> dict[str, Any]:
    """The raw JSON document (tools/measure_sizes.py rewrites it)."""
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _entries() -> tuple[ModelEntry, ...]:
    """models.json's entries, then those of the family files' own catalogue JSON
    (model_registry.families.catalogue_files); a model id appears once."""
    entries = [_entry(raw) for raw in read_catalogue_file()["models"]]
    for path in catalogue_files():
        entries += [_entry(raw) for raw in read_catalogue_file(path).get("models", [])]
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise ValueError(f"the catalogue lists the model id {entry.id!r} twice (models.json and the family files' JSON)")
        if entry.family not in FAMILIES:
            raise ValueError(f"catalogue entry {entry.id!r}: no family file defines the family {entry.family!r}")
        seen.add(entry.id)
    return tuple(entries)


def list_models() -> list[ModelEntry]:
    """All catalogue entries, demo first, in the file's order."""
    return list(_entries())


def get_model(model_id: str) -> ModelEntry:
    """The entry for `model_id`; a UserFacingError naming the known ids otherwise."""
    for entry in _entries():
        if entry.id == model_id:
            return entry
    known = ", ".join(e.id for e in _entries())
    raise UserFacingError(f"Unknown model '{model_id}'. Known models: {known}.")
