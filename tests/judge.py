"""The judge: does a generated picture show what its caption says?

It reads a picture the way the demo model was taught to draw (tools/demo_shapes.py):
- the background is the dominant colour of the picture's border, named by the nearest palette colour;
- the shape is every pixel far from the background and nearer to the shape's colour (the median
  of the far pixels) than to the background's;
- its class and position are those of the drawn template (every shape, position and size)
  that overlaps it best (intersection over union);
- `filled` is how much of the template's inner half the shape covers (an outlined shape: little).

So a picture of noise, of the wrong colour or of a shape in the wrong place fails, whatever the
memory strategy that made it; `judge` never looks at how the picture was made.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tools.demo_shapes import COLOURS, POSITIONS, SHAPES, SIZE, SIZES, Scene, shape_mask

BORDER = 2  # pixels of frame that show the background (the largest shape keeps 3 px away from the edge)
FAR = 60.0  # RGB distance from the background that counts as shape (the closest palette pair is 82 apart)

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], np.float32)


@dataclass(frozen=True)
class Verdict:
    colour: str | None
    background: str
    shape: str | None
    position: str | None
    iou: float
    filled: float
    expected: Scene

    @property
    def ok(self) -> bool:
        """Colour, background, shape and position all as the caption says."""
        e = self.expected
        return (self.colour, self.background, self.shape, self.position) == (e.colour, e.background, e.shape, e.position)

    @property
    def colours_and_place_ok(self) -> bool:
        """Colour, background and position as the caption says (the shape's class aside)."""
        e = self.expected
        return (self.colour, self.background, self.position) == (e.colour, e.background, e.position)

    @property
    def outlined(self) -> bool:
        return self.filled < 0.5

    def __str__(self) -> str:
        seen = f"a {self.colour} {self.shape} on a {self.background} background, {self.position} (iou {self.iou:.2f}, filled {self.filled:.2f})"
        return f"{'OK ' if self.ok else 'BAD'} asked: {self.expected.caption()!r}; seen: {seen}"


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(axis=1)))]


@functools.cache
def _templates() -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(shape, size, mask drawn in the centre, its centroid (y, x))."""
    out = []
    for s in SHAPES:
        for z in SIZES:
            m = shape_mask(Scene("red", s, "blue", "centre", z)) > 0.5
            out.append((s, z, m, np.argwhere(m).mean(axis=0)))
    return out


def _position(centroid_yx: np.ndarray, shape: str, size: str) -> str:
    """The caption position whose drawn template's centroid is nearest the shape's centroid."""
    def distance(p: str) -> float:
        c = np.argwhere(shape_mask(Scene("red", shape, "blue", p, size)) > 0.5).mean(axis=0)
        return float(((c - centroid_yx) ** 2).sum())

    return min(POSITIONS, key=distance)


def as_array(image: Any) -> np.ndarray:
    """float32 [64, 64, 3] RGB of a PIL image or array (resized to the demo's size)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32)


def judge(image: Any, expected: Scene) -> Verdict:
    """What `image` shows, compared with the `expected` scene (Verdict.ok: all as asked)."""
    rgb = as_array(image)
    frame = np.ones(rgb.shape[:2], bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    bg_rgb = np.median(rgb[frame], axis=0)
    background = nearest_colour(bg_rgb)
    to_bg = np.sqrt(((rgb - bg_rgb) ** 2).sum(axis=2))
    far = to_bg > FAR
    if far.sum() < 6:
        return Verdict(None, background, None, None, 0.0, 0.0, expected)
    fg_rgb = np.median(rgb[far], axis=0)
    colour = nearest_colour(fg_rgb)
    # the shape: pixels nearer its colour than the background's (an antialiased edge pixel counts
    # when more than half covered, as the templates are drawn)
    mask = far & (np.sqrt(((rgb - fg_rgb) ** 2).sum(axis=2)) < to_bg)
    centroid = np.argwhere(mask).mean(axis=0)

    def overlap(t: tuple[str, str, np.ndarray, np.ndarray]) -> float:  # the template moved onto the shape
        dy, dx = np.rint(centroid - t[3]).astype(int)
        moved = np.roll(t[2], (dy, dx), axis=(0, 1))
        return float((mask & moved).sum() / (mask | moved).sum())

    shape, size, template, t_centroid = max(_templates(), key=overlap)
    iou = overlap((shape, size, template, t_centroid))
    position = _position(centroid, shape, size)
    dy, dx = np.rint(centroid - t_centroid).astype(int)
    inner = np.roll(template, (dy, dx), axis=(0, 1))
    core = inner & ~_dilate(~inner, int(SIZES[size] * SIZE * 0.4))
    filled = float(mask[core].mean()) if core.any() else 0.0
    return Verdict(colour, background, shape, position, iou, filled, expected)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(max(r, 0)):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def rate(verdicts: list[Verdict], part: str = "ok") -> float:
    """The fraction of verdicts right (`part`: "ok", all of it; "colours_and_place_ok")."""
    return sum(getattr(v, part) for v in verdicts) / max(len(verdicts), 1)
