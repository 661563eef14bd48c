"""Parameter counts of real model components, computed on the meta device.

Building a component from its published config under `torch.device("meta")` allocates no
memory, so even a 20B transformer can be counted on a laptop in seconds. The numbers are
what the weights really are, not what a model card rounds them to; `tools/measure_sizes.py`
stores them in models.json and the tests rebuild a few to keep the stored numbers honest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS_FILE = Path(__file__).with_name("component_configs.json")


@dataclass(frozen=True)
class ComponentSize:
    """Parameters (tied weights counted once) and bytes of the weights stored in bf16."""

    parameters: int
    bytes_bf16: int


def load_component_configs() -> dict[str, dict[str, Any]]:
    """The real component configs, keyed by config id: component_configs.json's, then the
    `component_configs` of the family files' own catalogue JSON (a config id appears once)."""
    from .families import catalogue_files

    data = json.loads(CONFIGS_FILE.read_text(encoding="utf-8"))
    configs = {key: value for key, value in data.items() if not key.startswith("_")}
    for path in catalogue_files():
        extra = json.loads(path.read_text(encoding="utf-8")).get("component_configs", {})
        if twice := sorted(set(extra) & set(configs)):
            raise ValueError(f"{path}: config ids {twice} are defined already (component_configs.json or another family's JSON)")
        configs.update(extra)
    return configs


def build_on_meta(library: str, class_name: str, config: dict[str, Any]) -> Any:
    """Instantiate `class_name` from `config` without allocating weights."""
    import torch

    with torch.device("meta"):
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            clean = {k: v for k, v in config.items() if not k.startswith("_")}
            return cls.from_config(clean)
        if library == "transformers":
            import transformers
            from transformers import AutoConfig

            clean = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
            hf_config = AutoConfig.for_model(config["model_type"], **clean)
            return getattr(transformers, class_name)._from_config(hf_config)
    raise ValueError(f"unknown library {library!r} for {class_name}")


def count_module(module: Any) -> ComponentSize:
    """Count a built module: parameters plus the floating buffers a checkpoint stores."""
    parameters = sum(p.numel() for p in module.parameters())
    stored_buffers = 0
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is None or name in sub._non_persistent_buffers_set:
                continue
            if buf.is_floating_point():
                stored_buffers += buf.numel()
    return ComponentSize(parameters=parameters, bytes_bf16=2 * (parameters + stored_buffers))


def measure(library: str, class_name: str, config: dict[str, Any]) -> ComponentSize:
    """Build one component on the meta device and count it."""
    return count_module(build_on_meta(library, class_name, config))
