"""``shapes``: a procedural dataset of coloured geometric shapes with exact captions.

Every image shows 1 or 2 flat-coloured shapes (``SHAPES``) in ``COLORS`` on a plain light-grey
``BACKGROUND``. The image is divided into a 3x3 grid and each shape sits in its own cell
(``POSITIONS``), filling about 75% of the cell, with anti-aliased edges and a little position/size
jitter. Each image comes with a caption that states every attribute exactly, e.g.
``"a red circle at the top left and a blue square in the center"``; ``parse_caption`` inverts
``caption`` exactly, so captions can be checked against pixels (see
``ldmkit.eval.shapes_verifier``).

Items are generated on the fly and deterministically from ``(seed, split, index)`` only, so the
dataset needs no files, can be effectively infinite and any index is reproducible in any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 50, 180),
    "orange": (245, 120, 20),
}
"""Palette: saturated colours >= 80 apart (RGB distance) and >= 210 from the background."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape names; triangles point upwards."""

POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
"""Position phrase -> (row, col) cell of the 3x3 grid."""

BACKGROUND: tuple[int, int, int] = (240, 240, 240)
"""Background colour: light neutral grey, so every palette colour contrasts strongly with it."""

SHAPE_SCALE = 0.75
"""Side of a shape's bounding box as a fraction of the grid cell side (before jitter)."""

JITTER_SHIFT = 0.05
"""Maximum centre offset, per axis, as a fraction of the cell side."""

JITTER_SCALE = (0.93, 1.05)
"""Range of the size multiplier drawn when jittering."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Natural preposition for each position phrase ("on the left", "in the center", "at the top").
_PREPOSITIONS = {"left": "on", "right": "on", "center": "in"}

# uint8 value -> float32 in [-1, 1].
_TO_UNIT_RANGE = np.arange(256, dtype=np.float32) / 127.5 - 1.0

# Largest number of objects a 3x3 grid can hold (one per cell).
_MAX_OBJECTS = len(POSITIONS)


@dataclass(frozen=True)
class ShapeObject:
    """One shape in an image: its colour, shape and grid position (all names from the vocab)."""

    color: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("color", self.color, tuple(COLORS)),
            ("shape", self.shape, SHAPES),
            ("position", self.position, tuple(POSITIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; allowed: {', '.join(allowed)}")


def _describe(obj: ShapeObject) -> str:
    """Caption fragment for one object, e.g. 'an orange square on the left'."""
    article = "an" if obj.color[0] in "aeiou" else "a"
    preposition = _PREPOSITIONS.get(obj.position, "at")
    return f"{article} {obj.color} {obj.shape} {preposition} the {obj.position}"


# Every possible caption fragment, for exact parsing by lookup.
_FRAGMENTS: dict[str, ShapeObject] = {
    _describe(o): o
    for o in (ShapeObject(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS)
}


def caption(objects: Sequence[ShapeObject]) -> str:
    """Describe ``objects`` in order, joined by ' and ' (inverse of ``parse_caption``)."""
    if not objects:
        raise ValueError("caption() needs at least one object")
    return " and ".join(_describe(o) for o in objects)


def parse_caption(text: str) -> list[ShapeObject]:
    """Parse a caption produced by ``caption`` back into its objects (exact inverse).

    Raises:
        ValueError: if ``text`` is not exactly a valid caption.
    """
    objects = []
    for fragment in text.split(" and "):
        if fragment not in _FRAGMENTS:
            raise ValueError(
                f"not a valid shapes caption: {text!r}; the part {fragment!r} is not of the form "
                "'a <color> <shape> <at|on|in> the <position>' (e.g. 'a red circle at the top left'"
                f"); colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; "
                f"positions: {', '.join(POSITIONS)}"
            )
        objects.append(_FRAGMENTS[fragment])
    return objects


def _uniforms(generator: torch.Generator | np.random.Generator, count: int) -> np.ndarray:
    """Draw ``count`` float64 uniforms in [0, 1) from a numpy or torch generator."""
    if isinstance(generator, torch.Generator):
        return torch.rand(count, generator=generator, dtype=torch.float64).numpy()
    return generator.random(count)


def sample_objects(
    generator: torch.Generator | np.random.Generator, min_objects: int = 1, max_objects: int = 2
) -> list[ShapeObject]:
    """Draw between ``min_objects`` and ``max_objects`` objects in distinct grid cells.

    The count, cells, colours and shapes are all uniform; colours and shapes may repeat.
    """
    if not 1 <= min_objects <= max_objects <= _MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {_MAX_OBJECTS}")
    # One batch of uniforms: [count, 9 cell keys, colour per object, shape per object].
    u = _uniforms(generator, 1 + _MAX_OBJECTS + 2 * max_objects)
    count = min_objects + int(u[0] * (max_objects - min_objects + 1))
    cells = np.argsort(u[1 : 1 + _MAX_OBJECTS])[:count]  # random permutation of the 9 cells
    colors = (u[1 + _MAX_OBJECTS :][:count] * len(COLORS)).astype(int)
    shapes = (u[1 + _MAX_OBJECTS + max_objects :][:count] * len(SHAPES)).astype(int)
    color_names, position_names = list(COLORS), list(POSITIONS)
    return [
        ShapeObject(color_names[c], SHAPES[s], position_names[p])
        for c, s, p in zip(colors, shapes, cells, strict=True)
    ]


def sample_jitter(
    generator: torch.Generator | np.random.Generator, count: int
) -> list[tuple[float, float, float]]:
    """Draw ``count`` per-object jitters ``(dy, dx, scale)`` for ``render``."""
    u = _uniforms(generator, 3 * count).reshape(count, 3)
    shift = (2 * u[:, :2] - 1) * JITTER_SHIFT
    scale = JITTER_SCALE[0] + u[:, 2] * (JITTER_SCALE[1] - JITTER_SCALE[0])
    return [(float(dy), float(dx), float(s)) for (dy, dx), s in zip(shift, scale, strict=True)]


def shape_coverage(
    shape: str, center: tuple[float, float], half_size: float, window: tuple[int, int, int, int]
) -> np.ndarray:
    """Anti-aliased coverage (float32 in [0, 1]) of a shape over a pixel window.

    Pixel ``(i, j)`` spans ``[i, i + 1) x [j, j + 1)``. ``center`` is the (y, x) centre of the
    shape's bounding box, ``half_size`` half its side, ``window`` is ``(y0, y1, x0, x1)``.
    Coverage is ``clip(0.5 - d, 0, 1)`` with ``d`` the signed distance (in pixels, negative
    inside) from the pixel centre to the shape outline: a one-pixel linear ramp across each edge,
    which matches box-filtered coverage of straight edges.
    """
    y0, y1, x0, x1 = window
    # Pixel-centre coordinates relative to the shape centre.
    y = (np.arange(y0, y1, dtype=np.float32) + 0.5 - center[0])[:, None]
    x = (np.arange(x0, x1, dtype=np.float32) + 0.5 - center[1])[None, :]
    h = half_size
    if shape == "circle":
        distance = np.sqrt(y * y + x * x) - h
    elif shape == "square":
        distance = np.maximum(np.abs(y), np.abs(x)) - h
    elif shape == "triangle":  # apex at the top centre, base along the bottom edge
        distance = np.maximum(y - h, (2 * np.abs(x) - y - h) / math.sqrt(5))
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    return np.clip(0.5 - distance, 0.0, 1.0)


def render(
    objects: Sequence[ShapeObject],
    image_size: int = 32,
    *,
    jitter: Sequence[tuple[float, float, float]] | None = None,
    background: tuple[int, int, int] = BACKGROUND,
) -> np.ndarray:
    """Draw ``objects`` into a uint8 ``[image_size, image_size, 3]`` image.

    Args:
        objects: shapes to draw, painted in order.
        image_size: side in pixels (>= 16).
        jitter: optional per-object ``(dy, dx, scale)`` (see ``sample_jitter``): centre offsets
            as fractions of the cell side and a size multiplier.
        background: background RGB.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if jitter is None:
        jitter = [(0.0, 0.0, 1.0)] * len(objects)
    if len(jitter) != len(objects):
        raise ValueError(f"got {len(jitter)} jitters for {len(objects)} objects")
    cell = image_size / 3
    image = np.empty((image_size, image_size, 3), dtype=np.float32)
    image[:] = background
    for obj, (dy, dx, scale) in zip(objects, jitter, strict=True):
        row, col = POSITIONS[obj.position]
        cy, cx = (row + 0.5 + dy) * cell, (col + 0.5 + dx) * cell
        half = 0.5 * SHAPE_SCALE * scale * cell
        # Only the pixels around the shape's bounding box need work.
        y0, x0 = max(0, math.floor(cy - half)), max(0, math.floor(cx - half))
        y1 = min(image_size, math.ceil(cy + half))
        x1 = min(image_size, math.ceil(cx + half))
        alpha = shape_coverage(obj.shape, (cy, cx), half, (y0, y1, x0, x1))[..., None]
        region = image[y0:y1, x0:x1]
        region += alpha * (np.asarray(COLORS[obj.color], dtype=np.float32) - region)
    return (image + 0.5).astype(np.uint8)


class ShapesDataset(Dataset):
    """Map-style dataset of ``{"image": float32 [3, H, W] in [-1, 1], "text": caption}``.

    Item ``i`` depends only on ``(seed, split, i)``; the splits use disjoint random streams.

    Args:
        size: number of items; ``None`` means effectively infinite (``2**31 - 1``).
        image_size: image side in pixels (>= 16).
        seed: base seed (non-negative).
        split: one of ``"train"``, ``"val"``, ``"test"``.
        min_objects: fewest shapes per image.
        max_objects: most shapes per image.
        jitter: whether to jitter each shape's position and size slightly.
    """

    def __init__(
        self,
        size: int | None = None,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        min_objects: int = 1,
        max_objects: int = 2,
        jitter: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if size is not None and size < 0:
            raise ValueError(f"size must be >= 0 or None, got {size}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 1 <= min_objects <= max_objects <= _MAX_OBJECTS:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {_MAX_OBJECTS}")
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.jitter = jitter

    def __len__(self) -> int:
        return 2**31 - 1 if self.size is None else self.size

    def _rng(self, index: int) -> np.random.Generator:
        """The random stream of item ``index`` (negative indices count from the end)."""
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for dataset of length {length}")
        index %= length
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index])

    def _sample(self, index: int) -> tuple[list[ShapeObject], np.random.Generator]:
        """Objects of item ``index`` and its random stream, positioned after them."""
        rng = self._rng(index)
        return sample_objects(rng, self.min_objects, self.max_objects), rng

    def objects(self, index: int) -> list[ShapeObject]:
        """The exact objects (attributes) of item ``index``, in caption order."""
        return self._sample(index)[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        objects, rng = self._sample(index)
        jitter = sample_jitter(rng, len(objects)) if self.jitter else None
        pixels = render(objects, self.image_size, jitter=jitter)
        # Channels first and scaled to [-1, 1] in one lookup.
        image = torch.from_numpy(np.take(_TO_UNIT_RANGE, pixels.transpose(2, 0, 1)))
        return {"image": image, "text": caption(objects)}


def make_prompts(n: int, *, seed: int = 0, num_objects: int = 1) -> list[str]:
    """``n`` random valid captions with ``num_objects`` objects each (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    return [caption(sample_objects(rng, num_objects, num_objects)) for _ in range(n)]
