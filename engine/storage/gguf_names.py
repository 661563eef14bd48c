"""GGUF tensor names -> the diffusers model's names, without touching the file's bytes.

The published image-model GGUFs keep the names of the checkpoint they were converted from:
diffusers' own names (Qwen-Image), or a family's original layout (FLUX: BFL's; Z-Image: the
original Z-Image / ComfyUI Lumina2 NextDiT names), often behind a ComfyUI prefix. An original
layout is a table, derived from the model's config, of diffusers name -> row ranges of the file's
tensors (`OriginalLayout`): a fused qkv becomes three row ranges of the same bytes (GGUF blocks
never cross a row), so the parts still stream from the file; a target that is no single byte
range (FLUX's swapped final modulation) is `joined`: its row ranges are concatenated at load.
Each table follows diffusers' converter for that layout (named in its docstring), which the tests
use as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from engine.storage.disk import CheckpointError, TensorEntry
from engine.storage.gguf import GgufEntry, GgufFile

#: prefixes ComfyUI-style files put before the model's own names
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
#: `general.architecture` values the published image-model GGUFs use (city96's convert.py and
#: the files derived from it), per diffusers class; another value is another architecture
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "QwenImageTransformer2DModel": ("qwen_image", "qwenimage"),
    "FluxTransformer2DModel": ("flux",),
    "ZImageTransformer2DModel": ("lumina2", "z_image", "zimage"),
    "Flux2Transformer2DModel": ("flux2",),
    "UNet2DConditionModel": ("sdxl", "sd1"),
}

#: diffusers name -> [(source name, first row, end row or -1 for all rows)]
SourceTable = dict[str, list[tuple[str, int, int]]]
Mapped = tuple[dict[str, TensorEntry], dict[str, list[TensorEntry]]]


def check_architecture(file: GgufFile, model_class: type) -> None:
    """A GGUF whose `general.architecture` names another model than `model_class` is refused
    before anything is read (the key check would catch it too, less clearly)."""
    arch = getattr(file, "architecture", None)
    wanted = ARCHITECTURES.get(model_class.__name__)
    if arch is None or wanted is None:
        return
    if arch.lower() not in wanted:
        owners = [cls for cls, names in ARCHITECTURES.items() if arch.lower() in names]
        hint = f" (a {owners[0]} checkpoint)" if owners else ""
        raise CheckpointError(
            f"{file.path}: this GGUF is for architecture {arch!r}{hint}, not {model_class.__name__} "
            f"(expected general.architecture {' or '.join(map(repr, wanted))}): choose the GGUF file made for this model"
        )


def strip_prefix(key: str) -> str:
    """`key` without a ComfyUI-style prefix (the first of PREFIXES it starts with)."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def slice_rows(entry: TensorEntry, r0: int, r1: int) -> TensorEntry:
    """The entry of rows r0:r1 (first dimension) of `entry`: rows are contiguous in the file,
    and GGUF blocks never cross a row, so a row range is a byte range of the same type."""
    rows = entry.logical_shape[0] if isinstance(entry, GgufEntry) else entry.shape[0]
    if not 0 <= r0 < r1 <= rows:
        raise CheckpointError(f"{entry.file.path}: tensor {entry.key!r} has {rows} rows, cannot take rows {r0}:{r1}")
    if (r0, r1) == (0, rows):
        return entry
    row_bytes = entry.length // rows
    key = f"{entry.key}[{r0}:{r1}]"
    offset, length = entry.offset + r0 * row_bytes, (r1 - r0) * row_bytes
    if isinstance(entry, GgufEntry):
        return GgufEntry(entry.file, key, torch.uint8, (r1 - r0, row_bytes), offset, length, entry.qtype,
                         (r1 - r0,) + tuple(entry.logical_shape[1:]))
    return TensorEntry(entry.file, key, entry.dtype, (r1 - r0,) + tuple(entry.shape[1:]), offset, length)


@dataclass(frozen=True)
class OriginalLayout:
    """A model family's own tensor layout, which its published GGUFs keep.

    `markers`: substrings of ".name" found only in this layout (how a file is recognised);
    `sources(model)`: the table for that model's config; `unused`: source tensors the diffusers
    model has no place for and diffusers' converter drops (not reported as unexpected)."""

    description: str
    markers: tuple[str, ...]
    sources: Callable[[torch.nn.Module], SourceTable]
    unused: tuple[str, ...] = ()

    def matches(self, keys: Iterable[str]) -> bool:
        return any(m in "." + k for k in keys for m in self.markers)

    def map(self, entries: dict[str, TensorEntry], model: torch.nn.Module) -> Mapped:
        """File tensors -> diffusers names: `direct` (one entry each, a row range where the table
        says so) and `joined` (row ranges to concatenate at load). Source tensors no target uses
        stay under their own names (reported as unexpected), `unused` ones are dropped; targets
        whose sources are missing are left out (reported as missing)."""
        stripped = {strip_prefix(key): entry for key, entry in entries.items()}
        direct: dict[str, TensorEntry] = {}
        joined: dict[str, list[TensorEntry]] = {}
        used: set[str] = set(self.unused)
        for target, parts in self.sources(model).items():
            if not all(src in stripped for src, _, _ in parts):
                continue
            pieces = []
            for src, r0, r1 in parts:
                entry = stripped[src]
                rows = entry.logical_shape[0] if isinstance(entry, GgufEntry) else entry.shape[0]
                pieces.append(slice_rows(entry, r0, rows if r1 == -1 else r1))
                used.add(src)
            if len(pieces) == 1:
                direct[target] = pieces[0]
            else:
                joined[target] = pieces
        for name, entry in stripped.items():
            if name not in used:
                direct.setdefault(name, entry)
        return direct, joined

    def names_for(self, model: torch.nn.Module, targets: Iterable[str]) -> list[str]:
        """The file names the table reads `targets` from (for a missing-key message)."""
        table = self.sources(model)
        return sorted({src for t in targets for src, _, _ in table.get(t, ())})


# --- FLUX: BFL's names ------------------------------------------------------------------------
def flux_sources(model) -> SourceTable:
    """diffusers name -> [(BFL name, first row, end row)] for FluxTransformer2DModel: the layout of
    BFL's own checkpoints, which the published FLUX GGUFs keep (diffusers'
    convert_flux_transformer_checkpoint_to_diffusers does the same on tensors)."""
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = model.single_transformer_blocks[0].proj_mlp.out_features if cfg.num_single_layers else 4 * inner
    out: SourceTable = {}

    def whole(target: str, source: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = [(f"{source}.{kind}", 0, -1)]

    def rows(target: str, source: str, r0: int, r1: int) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = [(f"{source}.{kind}", r0, r1)]

    for a, b in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in")):
        whole(f"time_text_embed.{a}.linear_1", f"{b}.in_layer")
        whole(f"time_text_embed.{a}.linear_2", f"{b}.out_layer")
    whole("context_embedder", "txt_in")
    whole("x_embedder", "img_in")
    for i in range(cfg.num_layers):
        t, s = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        whole(t + "norm1.linear", s + "img_mod.lin")
        whole(t + "norm1_context.linear", s + "txt_mod.lin")
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            rows(t + f"attn.{name}", s + "img_attn.qkv", j * inner, (j + 1) * inner)
        for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            rows(t + f"attn.{name}", s + "txt_attn.qkv", j * inner, (j + 1) * inner)
        for target, source in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                               ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[t + f"attn.{target}.weight"] = [(s + f"{source}.scale", 0, -1)]
        whole(t + "ff.net.0.proj", s + "img_mlp.0")
        whole(t + "ff.net.2", s + "img_mlp.2")
        whole(t + "ff_context.net.0.proj", s + "txt_mlp.0")
        whole(t + "ff_context.net.2", s + "txt_mlp.2")
        whole(t + "attn.to_out.0", s + "img_attn.proj")
        whole(t + "attn.to_add_out", s + "txt_attn.proj")
    for i in range(cfg.num_single_layers):
        t, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        whole(t + "norm.linear", s + "modulation.lin")
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            rows(t + name, s + "linear1", j * inner, (j + 1) * inner)
        rows(t + "proj_mlp", s + "linear1", 3 * inner, 3 * inner + mlp)
        out[t + "attn.norm_q.weight"] = [(s + "norm.query_norm.scale", 0, -1)]
        out[t + "attn.norm_k.weight"] = [(s + "norm.key_norm.scale", 0, -1)]
        whole(t + "proj_out", s + "linear2")
    whole("proj_out", "final_layer.linear")
    # BFL's final modulation is [shift, scale]; diffusers' AdaLayerNormContinuous wants [scale, shift]
    for kind in ("weight", "bias"):
        out[f"norm_out.linear.{kind}"] = [(f"final_layer.adaLN_modulation.1.{kind}", inner, 2 * inner),
                                          (f"final_layer.adaLN_modulation.1.{kind}", 0, inner)]
    return out


# --- Z-Image: the original / ComfyUI Lumina2 names ----------------------------------------------
#: diffusers' infix -> the original one, inside a block (`layers.N.`, `noise_refiner.N.`,
#: `context_refiner.N.`, `siglip_refiner.N.`): the inverse of the renames in diffusers'
#: convert_z_image_transformer_checkpoint_to_diffusers (loaders/single_file_utils.py); the
#: original names are those of ComfyUI's comfy/ldm/lumina/model.py (JointAttention's `qkv`, `out`,
#: `q_norm`, `k_norm`), the Z-Image code the published Z-Image GGUFs were converted from
_Z_IMAGE_BLOCK_RENAMES = (
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV = ("to_q", "to_k", "to_v")


def _z_image_sources(model) -> SourceTable:
    """diffusers name -> [(original name, first row, end row)] for ZImageTransformer2DModel.

    As diffusers' converter: `x_embedder.` / `final_layer.` are the model's one patch size's
    `all_x_embedder.{p}-{f}.` / `all_final_layer.{p}-{f}.` (the converter writes "2-1", Z-Image's
    only patch size; here it is read from the config's first entry), a block's
    `attention.qkv.weight` is [to_q; to_k; to_v] by rows (the converter's torch.chunk into 3: the
    row counts are read from the model, equal for Z-Image), `attention.out` is `to_out.0`,
    `q_norm`/`k_norm` are `norm_q`/`norm_k`; every other name (feed_forward.w1/w2/w3,
    attention_norm1/2, ffn_norm1/2, adaLN_modulation.0, t_embedder.mlp.*, cap_embedder.*,
    x_pad_token, cap_pad_token, siglip_*) is the same in both."""
    cfg = model.config
    patch = f"{cfg.all_patch_size[0]}-{cfg.all_f_patch_size[0]}"
    state = model.state_dict()
    out: SourceTable = {}
    for target in state:
        block, sep, tail = target.partition(".attention.")
        if sep and tail in tuple(f"{q}.weight" for q in _QKV):
            sizes = [state[f"{block}.attention.{q}.weight"].shape[0] for q in _QKV]
            j = _QKV.index(tail.removesuffix(".weight"))
            r0 = sum(sizes[:j])
            out[target] = [(f"{block}.attention.qkv.weight", r0, r0 + sizes[j])]
            continue
        source = target
        if target.startswith(("all_x_embedder.", "all_final_layer.")):
            group, key, rest = target.split(".", 2)
            if key != patch:
                continue  # another patch size: the original layout has one (left missing)
            source = f"{group.removeprefix('all_')}.{rest}"
        for new, old in _Z_IMAGE_BLOCK_RENAMES:
            source = source.replace(new, old)
        out[target] = [(source, 0, -1)]
    return out


#: the model classes whose GGUFs may keep their original layout, and how it is recognised
LAYOUTS: dict[str, OriginalLayout] = {
    "FluxTransformer2DModel": OriginalLayout("BFL FLUX", (".double_blocks.",), flux_sources),
    # norm_final.weight: Lumina2's unused final RMSNorm, in some files; diffusers' converter drops it
    "ZImageTransformer2DModel": OriginalLayout(
        "original Z-Image (ComfyUI Lumina2)", (".attention.qkv.", ".x_embedder.", ".final_layer."),
        _z_image_sources, unused=("norm_final.weight",),
    ),
}


def original_layout(model_class: type, keys: Iterable[str]) -> OriginalLayout | None:
    """The original layout `keys` (a file's tensor names) are in, for `model_class`; None when
    they are diffusers' names (`map_gguf_keys`)."""
    layout = LAYOUTS.get(model_class.__name__)
    return layout if layout is not None and layout.matches(keys) else None


def map_flux_keys(entries: dict[str, TensorEntry], model) -> Mapped:
    """BFL-named FLUX GGUF tensors -> diffusers names: fused qkv (and single blocks' qkv+mlp) are
    split into row ranges of the same file bytes; the final modulation's two halves swap, which
    is no single byte range: those targets come back in `joined` (see `OriginalLayout.map`)."""
    return LAYOUTS["FluxTransformer2DModel"].map(entries, model)


def map_z_image_keys(entries: dict[str, TensorEntry], model) -> Mapped:
    """Z-Image GGUF tensors under the original / ComfyUI Lumina2 names -> diffusers names: each
    block's fused `attention.qkv` is split into three row ranges of the same file bytes, the rest
    is renamed (see `_z_image_sources`); every target is one byte range, so `joined` is empty."""
    return LAYOUTS["ZImageTransformer2DModel"].map(entries, model)


def map_gguf_keys(entries: dict[str, TensorEntry], model_names: set[str]) -> dict[str, TensorEntry]:
    """GGUF tensor names -> the model's names. The published Qwen-Image GGUFs use diffusers' own
    module names (the original checkpoint is in diffusers format), some with a ComfyUI prefix
    (`model.diffusion_model.`): the prefix is dropped where that makes a model name. Names that
    match nothing are kept as they are (the loader reports them as unexpected keys). Files in an
    original layout (`original_layout`) go through `OriginalLayout.map` instead."""
    out: dict[str, TensorEntry] = {}
    for key, entry in entries.items():
        name = key
        if name not in model_names:
            for prefix in PREFIXES:
                if key.startswith(prefix) and key[len(prefix):] in model_names:
                    name = key[len(prefix):]
                    break
        if name in out:
            raise CheckpointError(f"{entry.file.path}: tensors {out[name].key!r} and {key!r} both map to {name!r}")
        out[name] = entry
    return out
