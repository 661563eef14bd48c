"""Input images of a request: read, checked and brought to a size the model takes (no torch).

`prepare_images(sources, ...)` accepts PIL images, bytes, or file paths and returns RGB images
at a valid size, with notes for the user (what was converted or resized) and, per image, what the
PNG infotext records (original and used size, a hash). Anything unusable raises
UserFacingError with a message that says what to do:

* not an image / a format Pillow cannot read, a truncated or damaged file;
* a file over MAX_IMAGE_BYTES (the upload limit, also Gradio's max_file_size);
* sides under MIN_IMAGE_SIDE pixels, or more than MAX_IMAGE_PIXELS pixels (checked from the
  header, before anything is decoded: a 20000x20000 PNG is refused without decoding it).

Palette, alpha, CMYK, greyscale and 16-bit images are converted to 8-bit RGB (alpha flattened
onto white) with a note saying so.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_registry.types import UserFacingError

#: the largest input file accepted (bytes); the app's upload limit is the same (ui.MAX_UPLOAD)
MAX_IMAGE_BYTES = 20 * 1024 * 1024
#: the most pixels an input image may have (checked before decoding)
MAX_IMAGE_PIXELS = 64_000_000
#: the shortest side an input image may have
MIN_IMAGE_SIDE = 16


@dataclass(frozen=True)
class InputImage:
    """One prepared input: the RGB image the model gets and what the infotext records."""

    image: Any  # PIL.Image.Image, RGB, at `size`
    original_size: tuple[int, int]
    size: tuple[int, int]
    sha256: str  # of the file's bytes (of the pixels for an image given as an object)

    def describe(self) -> str:
        """The infotext value (no commas: infotext pairs are comma-separated)."""
        (w0, h0), (w, h) = self.original_size, self.size
        resized = f" resized to {w}x{h}" if (w0, h0) != (w, h) else ""
        return f"{w0}x{h0}{resized} sha256 {self.sha256[:16]}"


@dataclass(frozen=True)
class PreparedImages:
    images: tuple[InputImage, ...] = ()
    notes: tuple[str, ...] = field(default=())
    size: tuple[int, int] | None = None  # the output size the first image suggests


def _label(i: int, n: int) -> str:
    return "The input image" if n == 1 else f"Input image {i + 1}"


def _open(source: Any, label: str) -> tuple[Any, str]:
    """A lazily opened PIL image and the sha256 of its bytes."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source, hashlib.sha256(source.tobytes()).hexdigest()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError:
            raise UserFacingError(f"{label} could not be read ({path.name} is not there any more): upload it again.") from None
        if size > MAX_IMAGE_BYTES:
            raise UserFacingError(
                f"{label} is {size / 1024**2:.1f} MB; the limit is {MAX_IMAGE_BYTES // 1024**2} MB. Save it smaller (JPEG, or fewer pixels)."
            )
        data = path.read_bytes()
    else:
        raise UserFacingError(f"{label} must be an image file (PNG, JPEG, WebP, ...); got {type(source).__name__}.")
    if len(data) > MAX_IMAGE_BYTES:
        raise UserFacingError(
            f"{label} is {len(data) / 1024**2:.1f} MB; the limit is {MAX_IMAGE_BYTES // 1024**2} MB. Save it smaller (JPEG, or fewer pixels)."
        )
    if not data:
        raise UserFacingError(f"{label} is an empty file: choose an image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UserFacingError(f"{label} has far too many pixels (over {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels): make it smaller.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UserFacingError(f"{label} is not an image Pillow can read (PNG, JPEG, WebP, BMP, TIFF, GIF ...): choose an image file.") from None
    return image, hashlib.sha256(data).hexdigest()


def _to_rgb(image: Any, label: str) -> tuple[Any, list[str]]:
    """8-bit RGB, and notes for every conversion."""
    from PIL import Image, ImageOps

    notes: list[str] = []
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # a broken EXIF block is no reason to refuse the picture
        pass
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype("uint8"), "L")
        notes.append(f"{label} has 16 bits (or more) per channel: reduced to 8 bits.")
        mode = "L"
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        notes.append(f"{label} is a palette image: converted to RGB.")
        mode = image.mode
    elif mode in ("L", "1"):
        image = image.convert("RGB")
        mode = "RGB"
    elif mode == "CMYK":
        image = image.convert("RGB")
        notes.append(f"{label} is CMYK: converted to RGB (colours may shift slightly).")
        mode = "RGB"
    if mode in ("RGBA", "LA", "RGBa", "La") or (mode == "RGB" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
        notes.append(f"{label} has transparency: flattened onto white.")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    return image, notes


def fit_size(width: int, height: int, limits: dict[str, Any]) -> tuple[int, int]:
    """The size nearest width x height's aspect that the model takes: both sides inside the
    model's range, multiples of its size multiple."""
    m = int(limits.get("size_multiple", 16) or 16)
    lo_w, hi_w = int(limits.get("min_width", m)), int(limits.get("max_width", 4096))
    lo_h, hi_h = int(limits.get("min_height", m)), int(limits.get("max_height", 4096))
    scale = min(1.0, hi_w / width, hi_h / height)
    scale = max(scale, lo_w / width, lo_h / height)  # too small: scale up (the minimum wins)
    w, h = width * scale, height * scale

    def snap(v: float, lo: int, hi: int) -> int:
        first, last = -(-lo // m) * m, hi // m * m
        return int(min(max(round(v / m) * m, first), last))

    return snap(w, lo_w, hi_w), snap(h, lo_h, hi_h)


def prepare_images(
    sources: Sequence[Any],
    *,
    model_name: str,
    max_images: int,
    limits: dict[str, Any],
    size: tuple[int, int] | None = None,
    resize_all_to_size: bool = False,
) -> PreparedImages:
    """Read and check `sources`; RGB images at valid sizes, with notes. `size`: the output size
    asked for (None: the first image's, fitted); `resize_all_to_size`: image-to-image, where the
    input is the starting point of the output and so takes its size."""
    from PIL import Image

    sources = list(sources)
    if not sources:
        return PreparedImages()
    if max_images <= 0:
        raise UserFacingError(f"{model_name} takes no input image: remove it, or choose a model that edits or does image-to-image.")
    if len(sources) > max_images:
        raise UserFacingError(
            f"{model_name} takes at most {max_images} input image{'s' if max_images != 1 else ''}; got {len(sources)}. Remove {len(sources) - max_images}."
        )
    n = len(sources)
    opened: list[tuple[Any, str, str]] = []
    for i, source in enumerate(sources):
        label = _label(i, n)
        image, digest = _open(source, label)
        w, h = image.size
        if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
            raise UserFacingError(f"{label} is {w}x{h} pixels: too small to start from (at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}).")
        if w * h > MAX_IMAGE_PIXELS:
            raise UserFacingError(
                f"{label} is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels); the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: make it smaller."
            )
        opened.append((image, digest, label))
    notes: list[str] = []
    out: list[InputImage] = []
    first = opened[0][0].size
    target = size if size is not None else fit_size(*first, limits)
    for image, digest, label in opened:
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, EOFError):
            raise UserFacingError(f"{label} is truncated or damaged: it could not be decoded. Save it again and upload the new file.") from None
        original = image.size
        rgb, converted = _to_rgb(image, label)
        notes += converted
        want = target if resize_all_to_size else fit_size(*rgb.size, limits)
        if rgb.size != tuple(want):
            rgb = rgb.resize(tuple(want), Image.LANCZOS)
            m = int(limits.get("size_multiple", 16) or 16)
            notes.append(
                f"{label} ({original[0]}x{original[1]}) was resized to {want[0]}x{want[1]}"
                + (" to match the output size." if resize_all_to_size else f": {model_name} takes sides that are multiples of {m} within its size range.")
            )
        out.append(InputImage(rgb, original, tuple(want), digest))
    return PreparedImages(tuple(out), tuple(notes), target)


def resize_first(prepared: PreparedImages, size: tuple[int, int]) -> PreparedImages:
    """`prepared` with its first image at `size` (image-to-image: the output's), with a note."""
    from dataclasses import replace

    from PIL import Image

    first = prepared.images[0]
    if first.size == tuple(size):
        return prepared
    label = _label(0, len(prepared.images))
    moved = replace(first, image=first.image.resize(tuple(size), Image.LANCZOS), size=tuple(size))
    w0, h0 = first.original_size
    note = f"{label} ({w0}x{h0}) was resized to {size[0]}x{size[1]}, the output size."
    notes = tuple(n for n in prepared.notes if not n.startswith(f"{label} ({w0}x{h0}) was resized")) + (note,)
    return PreparedImages((moved,) + prepared.images[1:], notes, tuple(size))


def source_count(value: Any) -> int:
    return 0 if value is None else len(value) if isinstance(value, (list, tuple)) else 1


def finite_strength(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise UserFacingError(f"Strength must be a number from 0 to 1 (0 keeps the input image, 1 ignores it); got {value!r}.")
    return float(value)
