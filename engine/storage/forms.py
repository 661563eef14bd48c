"""The storage forms: one registry of plain records, read by every layer that names a form.

A storage form is how the weight matrices of a model are held outside computation: "bf16" (as
is), "fp8" (scaled e4m3), "int8", "nf4", "gguf" (a .gguf file's own blocks), and whatever else
registers. Config parsing (`engine.config`), the loader, the ledger's sizes, the settings the UI
turns into a `vram_config`, the estimates, the suggestion's cost model and the UI's choices all
look the form up here instead of naming it.

The records are plain facts and this module imports neither torch nor the rest of the engine, so
the torch-free types the UI reads (`engine.generation.types`) and `engine.config` can use it. The
torch side of a form (how a matrix is laid out, quantized into and rebuilt: a `Codec` from
`engine.storage.stored`) is referenced lazily, as "module:attribute", and imported on first use.

Adding a form is one file: it registers its record, with its codec, when imported:

    register_form(StorageForm("half", "half (float16 matrices)", "half", size_factor=1.0,
                              dequant_traffic=4.0, codec=HalfCodec()))

(`tests/toy_form.py` does exactly that and `tests/test_storage_forms.py` follows it through
config parsing, the ledger, the loader, the UI's choices and the estimate.) The five built-in
forms are the records below; their order is the order of preference at equal cost (more
precise first), which the suggestion and the UI's lists keep.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

BF16 = "bf16"
FP8 = "fp8"
INT8 = "int8"
NF4 = "nf4"
GGUF = "gguf"
#: names a form may not take: the API's "auto" and the disk offload place
RESERVED = ("auto", "disk")


@dataclass(frozen=True)
class StorageForm:
    """One storage form, as plain facts.

    `size_factor` is the one figure the estimates use for the form's size: stored bytes of a
    model per byte of its bf16 checkpoint (weight matrices in the form, with their scales; the
    vectors stay bf16). `dequant_traffic` is the memory traffic of converting the stored bytes to
    bf16 where the layer computes, per stored byte (the suggestion's cost model: read the byte,
    write the bf16 values it holds). `codec` is the torch side ("module:attribute" or the object
    itself, an `engine.storage.stored.Codec`); None for a form that is a plain float dtype.
    `dtype` names the torch dtype a vram_config holds for the form ("float8_e4m3fn" for fp8); None
    when the form is its own name in vram_config ("int8"). `also_dtypes`: other torch dtypes the
    same codec stores (fp8's codec stores float8_e5m2 too, which stays a vram_config dtype and is
    no form of its own). `offered`: a choice of `GenerateRequest.weights` and of the UI.
    `from_file`: the form is a checkpoint file's own blocks; only a model whose file holds them
    has it (a request cannot quantize into it)."""

    name: str
    label: str  # what the estimate box and the infotext's readers see: "int8 (per channel)"
    title: str  # the form in a sentence: "int8", "FP8", "NF4" (the suggestion's reason line)
    size_factor: float
    dequant_traffic: float
    codec: Any = None
    dtype: str | None = None
    also_dtypes: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    offered: bool = True
    from_file: bool = False

    @property
    def quantized(self) -> bool:
        """Storage-only: the stored bytes cross to the computation device as they are and are
        converted to the computation dtype there (every form with a codec)."""
        return self.codec is not None

    @property
    def config_value(self) -> str:
        """What a vram_config's offload/onload/preparing dtype holds for this form: a torch dtype's
        name (engine.config turns it into the dtype) or the form's own name."""
        return self.dtype or self.name

    def load_codec(self) -> Any:
        """The torch side (imported on first use); None for a plain float form."""
        if self.codec is None or not isinstance(self.codec, str):
            return self.codec
        codec = _codecs.get(self.name)
        if codec is None:
            module, _, attribute = self.codec.partition(":")
            codec = _codecs[self.name] = getattr(importlib.import_module(module), attribute)
        return codec


_forms: dict[str, StorageForm] = {}  # by name, in order of preference
_names: dict[str, str] = {}  # every name, alias and dtype name (lower case) -> form name
_by_value: dict[Any, StorageForm | None] = {}  # look-up cache (torch dtypes, strings)
_codecs: dict[str, Any] = {}


def _key(value: Any) -> str:
    """A name, alias or torch dtype as the registry keys it: "torch.float8_e4m3fn" -> "float8_e4m3fn"."""
    return str(value).strip().lower().removeprefix("torch.")


def register_form(form: StorageForm) -> StorageForm:
    """Add a form (appended: it comes after the registered ones at equal cost). Raises ValueError
    when a name, alias or dtype is taken or a figure makes no sense."""
    names = [form.name, *form.aliases, *([form.dtype] if form.dtype else []), *form.also_dtypes]
    keys = [_key(n) for n in names]
    if not form.name or form.name != _key(form.name):
        raise ValueError(f"storage form name {form.name!r}: use a lower-case name without spaces")
    if any(k in RESERVED for k in keys):
        raise ValueError(f"storage form {form.name!r}: {', '.join(RESERVED)} are reserved names")
    taken = [k for k in keys if k in _names]
    if taken:
        raise ValueError(f"storage form {form.name!r}: {', '.join(taken)} already name the form {_names[taken[0]]!r}")
    if not form.size_factor > 0 or not form.dequant_traffic >= 0:
        raise ValueError(f"storage form {form.name!r}: size_factor must be > 0 and dequant_traffic >= 0")
    _forms[form.name] = form
    for k in keys:
        _names[k] = form.name
    _by_value.clear()
    return form


def unregister_form(name: str) -> None:
    """Remove a form that `register_form` added (a plug-in unloading, a test cleaning up)."""
    form = _forms.pop(name)
    for k in [k for k, v in _names.items() if v == form.name]:
        del _names[k]
    _codecs.pop(name, None)
    _by_value.clear()


@contextmanager
def registered(form: StorageForm) -> Iterator[StorageForm]:
    """`register_form` for the duration of a block."""
    register_form(form)
    try:
        yield form
    finally:
        unregister_form(form.name)


def forms() -> tuple[StorageForm, ...]:
    """Every registered form, in order of preference at equal cost (more precise first)."""
    return tuple(_forms.values())


def get_form(name: str) -> StorageForm:
    """The form called `name` (a name, alias or dtype name); KeyError listing the forms otherwise."""
    form = find_form(name)
    if form is None:
        raise KeyError(f"no storage form {name!r}; registered: {', '.join(_forms)}")
    return form


def find_form(value: Any) -> StorageForm | None:
    """The form a name, an alias or a vram_config dtype (a torch dtype or its name) stands for,
    or None (float32, "disk", ...)."""
    try:
        return _by_value[value]
    except (KeyError, TypeError):
        pass
    name = _names.get(_key(value))
    form = _forms[name] if name is not None else None
    try:
        _by_value[value] = form
    except TypeError:  # unhashable: not cached
        pass
    return form


def offered_forms() -> tuple[StorageForm, ...]:
    """The forms a request may ask for (`GenerateRequest.weights`, the UI's choices)."""
    return tuple(f for f in _forms.values() if f.offered)


def weights_choices() -> tuple[str, ...]:
    """Accepted values of `GenerateRequest.weights` and the API's `weights`: "auto" (the default
    form: bf16; a GGUF entry keeps its file's blocks whatever is asked) and every offered form."""
    return ("auto",) + tuple(f.name for f in offered_forms())


def default_form() -> StorageForm:
    """What "auto" stores: the first form, the computation dtype as is (bf16)."""
    return next(iter(_forms.values()))


def file_form() -> StorageForm | None:
    """The form a checkpoint file's own blocks take (gguf), if one is registered."""
    return next((f for f in _forms.values() if f.from_file), None)


# --- the built-in forms ------------------------------------------------------------------------
# size factors: stored bytes per bf16 byte. fp8's 0.52 is the figure every estimate used (FP8
# matrices, one float32 scale per row, the bf16 vectors); int8's 0.5 and nf4's 0.29 are the
# settings' figures (nf4's layout: 4.5 bits a weight, 0.28x). int8 stores the same bytes as fp8;
# its smaller factor makes its dequantization a little cheaper in the suggestion's cost model,
# which the suggestion's tests pin (docs/engine.md, "Settings that fit"). A GGUF model is sized
# by its file's bytes, not by a factor. dequant_traffic: docs/engine.md, "Settings that fit".
register_form(StorageForm(BF16, "bf16", "bf16", size_factor=1.0, dequant_traffic=0.0, dtype="bfloat16"))
register_form(StorageForm(
    FP8, "fp8 (scaled e4m3)", "FP8", size_factor=0.52, dequant_traffic=3.0, codec="engine.storage.fp8:CODEC",
    dtype="float8_e4m3fn", also_dtypes=("float8_e5m2",),
))
register_form(StorageForm(INT8, "int8 (per channel)", "int8", size_factor=0.5, dequant_traffic=3.0, codec="engine.storage.int8:CODEC"))
register_form(StorageForm(NF4, "nf4 (4-bit, groups of 32)", "NF4", size_factor=0.29, dequant_traffic=6.0, codec="engine.storage.nf4:CODEC"))
register_form(StorageForm(
    GGUF, "gguf (file's blocks)", "GGUF", size_factor=1.0, dequant_traffic=6.0, codec="engine.storage.gguf:CODEC",
    offered=False, from_file=True,
))
