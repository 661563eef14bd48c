"""Strict reading of the values that reach a generation (the API's JSON and the page's controls).

Every parameter is checked here, by its API name, before a request is built: a value of the
wrong type is an error that names the parameter, shows the value and says what is accepted.
Nothing is rounded (512.0 is 512, 512.5 is an error) and no string turns a feature on by
being non-empty ("no" is not true).

The API's input components pass their payload through untouched (`raw`), so Gradio's own
conversions (float() of a string, rounding to `precision`) never run before this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from engine.generation.lora_library import parse_lora_spec
from engine.generation.types import UserFacingError
from engine.generation.vram_limit import requested_vram_limit
from engine.storage.forms import FP8, weights_choices

TRUE_STRINGS = ("true", "1")
FALSE_STRINGS = ("false", "0")
SEED_MAX = 2**32 - 1


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad(name: str, value: Any, accepted: str) -> UserFacingError:
    return UserFacingError(f"{name} must be {accepted}; got {_show(value)}.")


def text(name: str, value: Any, *, required: bool = False) -> str:
    if value is None:
        if required:
            raise bad(name, value, "text describing the image")
        return ""
    if not isinstance(value, str):
        raise bad(name, value, "text (a string)" + ("" if required else " or null"))
    return value


def model_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad("model", value, "a model id (a string such as \"demo\") or null for the default model")
    return value


def _number(value: Any) -> float | int | None:
    """An int or a float from a JSON number or a numeric string (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                return float(value.strip())
            except ValueError:
                return None
    return None


def whole(name: str, value: Any, accepted: str) -> int | None:
    """None/"" -> None (the default); a whole number (512 or 512.0) -> int; anything else an error."""
    if value is None or value == "":
        return None
    number = _number(value)
    if number is None or (isinstance(number, float) and not (math.isfinite(number) and number.is_integer())):
        raise bad(name, value, accepted)
    return int(number)


def real(name: str, value: Any, accepted: str) -> float | None:
    """None/"" -> None; a finite number -> float; else an error."""
    if value is None or value == "":
        return None
    number = _number(value)
    if number is None:
        raise bad(name, value, accepted)
    number = float(number)
    if not math.isfinite(number):
        raise bad(name, value, accepted)
    return number


def seed(value: Any) -> int | None:
    accepted = f"a whole number from 0 to {SEED_MAX}, or -1 (or null) for a random seed"
    n = whole("seed", value, accepted)
    if n is None or n == -1:
        return None
    if not 0 <= n <= SEED_MAX:
        raise bad("seed", value, accepted)
    return n


def vram_limit(value: Any) -> float | None:
    """The request-level vram_limit: None = Auto, GB >= 0, Infinity = unlimited
    (engine.generation.vram_limit, the check the engine makes for Python callers too)."""
    return requested_vram_limit(value, "vram_limit")


def flag(name: str, value: Any) -> bool:
    """JSON true/false, or the strings "true"/"false"/"1"/"0"; None is the default (off)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS + FALSE_STRINGS:
        return value.strip().lower() in TRUE_STRINGS
    raise bad(name, value, 'true or false (JSON booleans, or the strings "true"/"false"/"1"/"0")')


SIZE_ACCEPTED = "a whole number of pixels (a multiple of 16), or null for the model's default"


def request_fields(
    prompt: Any, negative_prompt: Any, model: Any, width: Any, height: Any, steps: Any,
    guidance: Any, seed_value: Any, vram: Any, fp8: Any, disk_offload: Any, loras: Any = "", weights: Any = "auto",
    image: Any = None, strength_value: Any = None, compile_value: Any = False,
) -> dict[str, Any]:
    """The GenerateRequest fields, each checked; UserFacingError names the first bad one. The
    `fp8` switch (the page's checkbox, the API's `fp8`) is folded into `weights` here: below the
    UI a request carries one storage decision."""
    return dict(
        prompt=text("prompt", prompt, required=True),
        negative_prompt=text("negative_prompt", negative_prompt),
        model=model_id(model),
        width=whole("width", width, SIZE_ACCEPTED),
        height=whole("height", height, SIZE_ACCEPTED),
        steps=whole("steps", steps, "a whole number of steps, or null for the model's default"),
        guidance=real("guidance", guidance, "a number, or null for the model's default"),
        seed=seed(seed_value),
        vram_limit=vram_limit(vram),
        disk_offload=flag("disk_offload", disk_offload),
        loras=lora_list(loras),
        weights=with_fp8(weights_choice(weights), flag("fp8", fp8)),
        images=images(image),
        strength=strength(strength_value),
        compile=flag("compile", compile_value),
    )


def weights_choice(value: Any) -> str:
    """`weights`: how the weights are stored (engine.storage.forms.weights_choices())."""
    accepted = weights_choices()
    if value is None:
        return "auto"
    if not isinstance(value, str) or value.strip().lower() not in accepted:
        raise bad("weights", value, "one of " + ", ".join(f'"{w}"' for w in accepted) + ' ("auto": the fp8 switch decides)')
    return value.strip().lower()


def with_fp8(weights: str, fp8: bool) -> str:
    """The one storage decision from the page's two controls (the API's `weights` and `fp8`):
    the FP8 switch stands for "fp8" when `weights` is "auto"; an explicit form wins."""
    return FP8 if fp8 and weights == "auto" else weights


def lora_list(value: Any) -> tuple[tuple[str, float], ...]:
    """`loras`: comma-separated `id[:strength]` (engine.generation.lora_library.parse_lora_spec)."""
    if value is None:
        return ()
    if not isinstance(value, str):
        raise bad("loras", value, 'a string of comma-separated "id:strength" entries, e.g. "ink:0.8, hf:owner/repo:0.5"')
    return parse_lora_spec(value)


IMAGE_ACCEPTED = (
    "an uploaded image file (gradio_client.handle_file(path)) or a list of them, or null for none"
)


def _file_path(value: Any) -> str | None:
    """The server-side path of one uploaded file (Gradio's FileData: {"path": ...}), else None.
    A bare string is not accepted: it could name any file on the server."""
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return value["path"]
    path = getattr(value, "path", None)  # a FileData object
    return path if isinstance(path, str) and path else None


def upload_folder() -> Path:
    """Where Gradio keeps uploads (and its copies of files it served)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def images(value: Any) -> tuple[str, ...]:
    """None / [] -> no image; one uploaded file or a list of them -> their paths (read and
    checked by the engine: engine.generation.input_images). Only files inside Gradio's upload
    folder are read: a payload naming any other file on the server is refused unread."""
    if value is None or value == "" or value == []:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    paths = []
    folder = upload_folder()
    for item in items:
        path = _file_path(item)
        if path is None:
            raise bad("image", item, IMAGE_ACCEPTED)
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(folder):
            raise UserFacingError(
                "image must be a file uploaded to this app (gradio_client.handle_file(path) uploads it); "
                f"{Path(path).name!r} is not an upload."
            )
        paths.append(str(resolved))
    return tuple(paths)


def strength(value: Any) -> float | None:
    accepted = "a number from 0 (keep the input image) to 1 (ignore it), or null for the default 0.6"
    number = real("strength", value, accepted)
    if number is not None and not 0.0 <= number <= 1.0:
        raise bad("strength", value, accepted)
    return number


def raw(component: Any) -> Any:
    """`component` (a Gradio input) with its payload reaching the function unchanged: same
    front-end, same API schema, but no conversion, so the checks above see exactly what was
    sent. (An instance attribute, not a subclass: Gradio writes a .pyi beside every module
    that defines a component class.)"""
    component.preprocess = lambda payload: payload
    return component
