"""Sparse .gguf replicas of a denoiser, named and typed like the published GGUF files.

The published image-model GGUFs (city96's, and the files derived from them) keep the tensor names
of the checkpoint they were converted from:

- Qwen-Image (and the other diffusers-format originals): diffusers' own module names;
- FLUX.1: BFL's names, with fused tensors: `double_blocks.N.img_attn.qkv` (q, k, v),
  `single_blocks.N.linear1` (q, k, v and the MLP's input), and `final_layer.adaLN_modulation.1`
  as [shift, scale] where diffusers keeps [scale, shift];
- Z-Image: the original (ComfyUI Lumina2) names, with each block's `attention.qkv` fused.

These layouts are not written out here a second time: `original_state` inverts the tables the
loader reads (the model class's `gguf_layout`, engine.model_tables: FLUX.1's and Z-Image's family
specs declare them; diffusers name -> original rows), each original
tensor being the union of its targets' row ranges, so a replica and the loader cannot drift apart
silently. tests/test_gguf_replica.py checks the FLUX inversion independently, with diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` (tests/test_gguf_z_image.py checks the Z-Image
table against diffusers' converter).

Types approximate the named quantization (`tensor_type`): Q8_0 -> every matrix whose rows split
into blocks of 32 in Q8_0; Q4_K_M / Q4_K_S -> every matrix whose rows split into 256 in Q4_K.
Other matrices are BF16, 1-D tensors F32. llama.cpp's _M / _S mixes also put some tensors in
Q5_K / Q6_K (more for _M): a replica of such a file is a little smaller than the real one, and
tools/replica.py reports the ratio instead of faking the size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: the GGML type of the matrices, per catalogue `quant`
MATRIX_TYPES = {"Q8_0": "Q8_0", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K"}
#: llama.cpp's `general.file_type` per catalogue `quant` (gguf.LlamaFileType values)
FILE_TYPES = {"Q8_0": 7, "Q4_K_M": 15, "Q4_K_S": 14}


def tensor_type(shape: tuple[int, ...], quant: str) -> str:
    """The GGML type a tensor of `shape` gets in a `quant` replica (see the module doc)."""
    import gguf

    if quant not in MATRIX_TYPES:
        raise ValueError(f"no replica recipe for GGUF quantization {quant!r}: known {', '.join(sorted(MATRIX_TYPES))}")
    if len(shape) < 2:
        return "F32"
    qname = MATRIX_TYPES[quant]
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qname]][0]
    return qname if shape[-1] % block == 0 else "BF16"


def original_state(state: Mapping[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """A state dict (diffusers names; any device, meta included) of a model whose published GGUFs
    keep their original layout (FLUX.1, Z-Image), under the original names, by inverting the
    table the loader reads (`gguf_layout` of the class's tables, engine.model_tables): each target's
    rows go to the rows its entry names, and an original tensor must be tiled exactly by its
    targets' row ranges."""
    layout = _tables(model).gguf_layout
    if layout is None:
        raise ValueError(f"{type(model).__name__}: its GGUFs keep diffusers' names (no original layout)")
    sources = layout.sources(model)
    unmapped = sorted(set(state) - set(sources))
    if unmapped:
        raise ValueError(f"{len(unmapped)} tensor(s) have no {layout.description} source in the engine's table, e.g. {unmapped[:3]}")
    pieces: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for target, parts in sources.items():
        if target not in state:  # e.g. the guidance embedder of a model without guidance
            continue
        tensor = state[target]
        row = 0
        for src, r0, r1 in parts:
            start, end = (0, tensor.shape[0] - row) if r1 == -1 else (r0, r1)
            pieces.setdefault(src, []).append((start, end, tensor[row : row + end - start]))
            row += end - start
        if row != tensor.shape[0]:
            raise ValueError(f"{target}: the engine's table covers {row} of its {tensor.shape[0]} rows")
    out: dict[str, torch.Tensor] = {}
    for src, ranges in pieces.items():
        ranges.sort(key=lambda r: r[0])
        end = 0
        for r0, r1, _ in ranges:
            if r0 != end:
                raise ValueError(f"{src}: rows {end}:{r0} {'overlap' if r0 < end else 'have no target'}")
            end = r1
        out[src] = ranges[0][2] if len(ranges) == 1 else torch.cat([t for _, _, t in ranges])
    return out


def denoiser_tensors(model: Any, quant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, GGML type) of every tensor of the published GGUF of `model` (a meta build),
    in natural name order (block 0, 1, 2, ... as the loader streams them)."""
    state = model.state_dict()
    if _tables(model).gguf_layout is not None:
        state = original_state(state, model)
    natural = lambda name: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]  # noqa: E731
    return [(n, tuple(int(d) for d in state[n].shape), tensor_type(tuple(state[n].shape), quant)) for n in sorted(state, key=natural)]


def _tables(model: Any) -> Any:
    """The registered tables of `model`'s class (engine.model_tables; importing any engine module
    runs the facade, which adds the model families' tables)."""
    from engine.model_tables import ModelTables, tables_for

    return tables_for(type(model)) or ModelTables(model_class=type(model).__name__)


def architecture_of(model: Any) -> str:
    """`general.architecture` as the published files of `model`'s class write it."""
    architectures = _tables(model).gguf_architectures
    if not architectures:
        raise ValueError(f"no GGUF architecture known for {type(model).__name__}")
    return architectures[0]


def write_denoiser_gguf(path: str | Path, model: Any, quant: str, name: str | None = None) -> int:
    """Write the sparse .gguf replica of `model` (a meta build) in `quant`; returns its size."""
    from tools.gguf_write import write_sparse_gguf

    tensors = denoiser_tensors(model, quant)
    return write_sparse_gguf(path, tensors, architecture_of(model), name=name, file_type=FILE_TYPES[quant])
