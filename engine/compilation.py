"""Regional compilation of a managed model: each repeated block compiled once, shared by all.

A DiT is a stack of identical blocks; compiling one block's code and reusing the graph for every
block (diffusers' `compile_repeated_blocks`) costs one block's compile time, not the model's.
The engine knows each model's block lists (engine.layers.module_maps), so `compile_model` needs
no model-specific argument. Inside a block every managed layer is one opaque step
(engine.layers.opaque): the weights move, stream, dequantize and carry LoRA outside the graph,
so changing the VRAM limit, a LoRA, the prompt or the seed never recompiles.

Compile errors surface at the first call (Dynamo traces lazily); `uncompile_model` undoes the
compile so the caller can run the same model eagerly (the studio does, and says why).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.layers.module_maps import block_paths_for
from engine.management import runtime_of

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Compiled:
    """What `compile_model` did to a model (kept on its runtime as `compiled`)."""

    backend: Any  # a backend's name, or a callable backend
    mode: str
    dynamic: bool | None
    regions: list[str] = field(default_factory=list)  # dotted paths of the compiled modules

    @property
    def regional(self) -> bool:
        return self.regions != [""]


def _resolve(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def compile_model(model: nn.Module, mode: str = "default", dynamic: bool | None = None, backend: Any = "inductor") -> Compiled:
    """Compile each repeated block of a managed `model` in place (its whole forward when the
    engine knows no block list for its class). Returns what was compiled; a second call with the
    same settings does nothing, other settings recompile."""
    runtime = runtime_of(model)
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    current = getattr(runtime, "compiled", None)
    if current is not None:
        if (current.backend, current.mode, current.dynamic) == (backend, mode, dynamic):
            return current
        uncompile_model(model)
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
    if backend == "inductor":
        options["mode"] = mode
    info = Compiled(backend, mode, dynamic)
    for path in block_paths_for(model):
        blocks = _resolve(model, path)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            continue
        for index, block in enumerate(blocks):
            _compile_forward(block, options)
            info.regions.append(f"{path}.{index}")
    if not info.regions:
        log.info("%s: no block list known, compiling the whole forward", type(model).__name__)
        model.compile(**options)  # its __call__: the engine's hooks on its forward are traced through
        info.regions.append("")
    runtime.compiled = info
    return info


def _own_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's tensor inputs that are views or have other than row-major strides are given as
    row-major tensors of their own. Dynamo guards a view input through its base once shapes are
    dynamic, and guards strides, so the first block (fed a view by an eager layer) and the others
    (fed a compiled block's output; Flux's single blocks return slices of their joint sequence)
    would need two graphs per size (measured: 3 graphs for 3 sizes instead of 2, and a recompile
    under inductor at the first single block). Only such inputs are copied: one activation."""
    return tuple(_row_major(a) for a in args), {k: _row_major(v) for k, v in kwargs.items()}


def _row_major(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    expected, stride = [], 1
    for size in reversed(value.shape):
        expected.append(stride)
        stride *= size
    if value._base is None and tuple(reversed(expected)) == value.stride():
        return value
    return value.clone(memory_format=torch.contiguous_format)


def _compile_forward(module: nn.Module, options: dict[str, Any]) -> None:
    """Compile the module's forward (not its __call__: the hooks, the engine's step entry among
    them, run eagerly). One code object for every block, so the blocks share the graphs."""
    previous = module.__dict__.get("forward")  # a hook's wrapper (engine.layers.hooks), kept for uncompile
    module._vram_compile_saved = previous
    module.forward = torch.compile(module.forward, **options)
    module._vram_compile_hook = module.register_forward_pre_hook(_own_inputs, with_kwargs=True)


def uncompile_model(model: nn.Module) -> None:
    """Undo `compile_model`: the model runs eagerly again (compiled graphs are dropped)."""
    runtime = runtime_of(model)
    info = getattr(runtime, "compiled", None)
    if info is None:
        return
    for path in info.regions:
        module = model if path == "" else _resolve(model, path)
        if module is None:
            continue
        if path == "":
            module._compiled_call_impl = None
            continue
        module.__dict__.pop("forward", None)
        saved = module.__dict__.pop("_vram_compile_saved", None)
        if saved is not None:
            module.__dict__["forward"] = saved
        handle = module.__dict__.pop("_vram_compile_hook", None)
        if handle is not None:
            handle.remove()
    runtime.compiled = None


def is_compiled(model: nn.Module) -> bool:
    return getattr(runtime_of(model), "compiled", None) is not None


def use_cache_dir(folder: str | os.PathLike) -> Path:
    """Keep inductor's compiled code in `folder` (TORCHINDUCTOR_CACHE_DIR), so a restart reuses
    it. Must run before the first compile of the process; returns the folder."""
    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def is_compile_failure(exc: BaseException) -> bool:
    """Did this error come from the compiler (Dynamo, AOTAutograd, inductor, a C compiler), so the
    same run can go on eagerly?"""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - torch without Dynamo
        return False
    if isinstance(exc, TorchDynamoException):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))


def failure_reason(exc: BaseException) -> str:
    """One line saying why compile could not run (the compiler's messages are pages long); a
    backend's failure names the backend's own error."""
    inner = getattr(exc, "inner_exception", None)
    if isinstance(inner, BaseException):
        return failure_reason(inner)
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(exc).__name__)
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}"
