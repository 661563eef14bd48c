"""The demo model's world: procedurally drawn shapes, their captions, and which ones training never sees.

Training (tools/train_demo.py) draws its pictures here, and the tests' judge (tests/judge.py)
matches generated images against templates drawn by the same code, so what the demo learned
and what it is judged on are one definition.

A picture is one shape of one colour on a plain background: 6 shapes, 9 colours, 5 positions,
3 sizes. The caption names everything but the medium size ("a red circle on a blue background,
on the left"; "a large ..." / "a small ..."). One (colour, shape, position) triple in nine is
held out of training (`is_held_out`), while every pair of the three is still seen, so the held-out
captions test composition, not memory.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

SIZE = 64  # the demo's resolution (its catalogue default)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (130, 50, 180),
    "pink": (250, 150, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
#: position word -> (phrase in the caption, centre as fractions of the picture)
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left", (0.25, 0.5)),
    "centre": ("in the centre", (0.5, 0.5)),
    "right": ("on the right", (0.75, 0.5)),
    "top": ("at the top", (0.5, 0.25)),
    "bottom": ("at the bottom", (0.5, 0.75)),
}
#: size word -> half extent as a fraction of the picture ("" = medium, not named in the caption)
SIZES: dict[str, float] = {"small": 0.125, "": 0.17, "large": 0.215}
JITTER = 0.03  # training positions vary by up to this fraction, so the model learns regions, not pixels
SUPERSAMPLE = 4  # edges are antialiased by drawing at 4x and averaging


@dataclass(frozen=True)
class Scene:
    """One picture: what the caption says, plus an offset that the caption does not say."""

    colour: str
    shape: str
    background: str
    position: str
    size: str = ""
    dx: float = 0.0
    dy: float = 0.0
    outlined: bool = False  # the LoRA's style: only the shape's outline is coloured

    def caption(self) -> str:
        size = f"{self.size} " if self.size else ""
        return f"a {size}{self.colour} {self.shape} on a {self.background} background, {POSITIONS[self.position][0]}"


def is_held_out(colour: str, shape: str, position: str) -> bool:
    """One (colour, shape, position) triple in nine, chosen by a hash (stable across runs)."""
    return zlib.crc32(f"{colour}|{shape}|{position}".encode()) % 9 == 0


def held_out_scenes(count: int, seed: int = 1) -> list[Scene]:
    """`count` held-out captions (no jitter), backgrounds and sizes drawn with `seed`."""
    rng = np.random.default_rng(seed)
    triples = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS if is_held_out(c, s, p)]
    order = rng.permutation(len(triples))
    scenes = []
    for i in range(count):
        c, s, p = triples[order[i % len(triples)]]
        backgrounds = [b for b in COLOURS if b != c]
        scenes.append(Scene(c, s, backgrounds[rng.integers(len(backgrounds))], p, list(SIZES)[rng.integers(len(SIZES))]))
    return scenes


def random_scene(rng: np.random.Generator, *, outlined: bool = False, held_out: bool = False) -> Scene:
    """A training scene (held-out triples excluded), or with `held_out` only held-out ones."""
    while True:
        c = list(COLOURS)[rng.integers(len(COLOURS))]
        s = SHAPES[rng.integers(len(SHAPES))]
        p = list(POSITIONS)[rng.integers(len(POSITIONS))]
        if is_held_out(c, s, p) == held_out:
            break
    backgrounds = [b for b in COLOURS if b != c]
    b = backgrounds[rng.integers(len(backgrounds))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    dx, dy = rng.uniform(-JITTER, JITTER, 2)
    return Scene(c, s, b, p, size, float(dx), float(dy), outlined)


def _unit_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape of half extent 1 centred at 0 (u right, v down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))
    if shape == "triangle":  # apex up
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8 * 0.95)
    if shape == "star":  # five points, apex up
        r = np.hypot(u, v)
        a = np.arctan2(u, -v)  # 0 at the top
        k = np.pi / 5
        m = np.abs(((a + k) % (2 * k)) - k)  # angle to the nearest point's axis
        inner, outer = 0.5, 1.0
        # radius of the star's edge between a point (angle 0, outer) and a notch (angle k, inner)
        edge = inner * outer * np.sin(k) / (outer * np.sin(m) + inner * np.sin(k - m) + 1e-9)
        return r <= edge
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_mask(scene: Scene, size: int = SIZE) -> np.ndarray:
    """float32 [size, size] coverage in 0..1 of the scene's shape (its outline if `outlined`)."""
    n = size * SUPERSAMPLE
    px = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(px, px)
    cx, cy = POSITIONS[scene.position][1]
    half = SIZES[scene.size]
    u, v = (x - cx - scene.dx) / half, (y - cy - scene.dy) / half
    inside = _unit_mask(scene.shape, u, v)
    if scene.outlined:
        inner = _unit_mask(scene.shape, u / 0.6, v / 0.6 - (0.1 if scene.shape == "triangle" else 0.0))
        inside = inside & ~inner
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def draw(scene: Scene, size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3] RGB picture of the scene."""
    m = shape_mask(scene, size)[..., None]
    fg = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(COLOURS[scene.background], np.float32)
    return np.rint(m * fg + (1 - m) * bg).astype(np.uint8)
