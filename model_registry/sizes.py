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
    """The real component configs, keyed by config id (see component_configs.json)."""
    data = json.loads(CONFIGS_FILE.read_text(encoding="utf-8"))
    return {key: value for key, value in data.items() if not key.startswith("_")}


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
