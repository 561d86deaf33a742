"""Pixel-only verifier for ``shapes`` images (see ``ldmkit.data.shapes``).

Given an image and a caption, it checks whether every named object is drawn with the right
colour, shape and position, looking only at pixels. It is meant to judge text-to-image samples, so
it is robust to mild noise, blur and colour shifts and uses numpy only.

Detection works per cell of the 3x3 grid:

1. Foreground: pixels whose RGB distance from ``BACKGROUND`` exceeds half the smallest
   palette-to-background distance (the "core", roughly coverage > 0.5). A cell holds an object
   when its core covers at least ``MIN_CORE_FRACTION`` of the cell.
2. Colour: palette colour nearest to the median of the most saturated half of the core pixels
   (allowing for some mixing with the background), or ``UNKNOWN`` if even the nearest is more
   than ``MAX_COLOR_DISTANCE`` away.
3. Coverage: each pixel's offset from the background projected onto the object's colour gives a
   soft alpha in [0, 1], kept only on the core and its one-pixel neighbourhood (drops stray noise).
4. Shape: for each shape, a template with the observed area and centroid is drawn with the
   dataset's renderer; the shape whose template is closest (squared error) to the alpha wins,
   unless even its error exceeds ``MAX_SHAPE_ERROR`` times the area (e.g. an elongated blob or a
   cross), which gives ``UNKNOWN``.

Dataset images are judged right at 16-128 pixels, also with Gaussian noise (sigma 0.1 in [0, 1]
units), and with a 3x3 blur from 32 pixels up. Limitations: a blob that spreads over several
cells is seen as one partial object per cell, and a cell holding two objects as one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ldmkit.data.shapes import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    ShapeObject,
    parse_caption,
    shape_coverage,
)

ImageLike = Image.Image | np.ndarray | torch.Tensor
"""PIL image, uint8 [H, W, 3] array, or float tensor [3, H, W] in [-1, 1]."""

MIN_CORE_FRACTION = 0.06
"""Smallest core area, as a fraction of the cell, that counts as an object."""

MAX_COLOR_DISTANCE = 60.0
"""Largest RGB distance (0-255 units) from the nearest palette colour, allowing for mixing with
the background, still given its name."""

MAX_SHAPE_ERROR = 0.2
"""Largest template-fit squared error, relative to the object's area, still given a shape name
(dataset images stay below ~0.1 even blurred; a 2:1 ellipse scores ~0.25-0.35)."""

UNKNOWN = "unknown"
"""Colour or shape of a detection that matches nothing in the vocabulary."""

_BACKGROUND = np.asarray(BACKGROUND, dtype=np.float32)
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)
_CORE_DISTANCE = 0.5 * float(np.linalg.norm(_PALETTE - _BACKGROUND, axis=1).min())
_CELL_TO_POSITION = {cell: name for name, cell in POSITIONS.items()}
# Template area in units of half_size**2: circle pi*h^2, square (2h)^2, triangle (2h)^2 / 2.
_AREA_FACTOR = {"circle": math.pi, "square": 4.0, "triangle": 2.0}


@dataclass(frozen=True)
class Detection:
    """An object found in one grid cell.

    Attributes:
        color, shape, position: classified attributes (vocabulary of ``ldmkit.data.shapes``);
            ``color`` and ``shape`` may be ``UNKNOWN``.
        area: soft foreground area as a fraction of the cell area.
        confidence: shape-fit margin in [0, 1]: ``1 - best_error / second_best_error``.
    """

    color: str
    shape: str
    position: str
    area: float
    confidence: float

    def matches(self, obj: ShapeObject) -> bool:
        """Whether this detection is ``obj`` (same colour, shape and position)."""
        return (self.color, self.shape, self.position) == (obj.color, obj.shape, obj.position)


@dataclass
class VerifyResult:
    """Outcome of ``verify``.

    Attributes:
        objects: each object named in the caption with whether it was found exactly.
        correct: all named objects found.
        extra: detections in grid cells that the caption does not mention.
        detections: everything ``detect`` found.
    """

    objects: list[tuple[ShapeObject, bool]]
    correct: bool
    extra: int
    detections: list[Detection] = field(default_factory=list)


def _to_rgb(image: ImageLike) -> np.ndarray:
    """Convert an accepted image type to float32 RGB [H, W, 3] in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"expected a float tensor [3, H, W], got {tuple(image.shape)}")
        pixels = (image.detach().float().cpu() + 1.0) * 127.5
        return pixels.clamp(0.0, 255.0).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 array [H, W, 3], got {image.dtype} {image.shape}")
        return image.astype(np.float32)
    raise TypeError(f"unsupported image type {type(image).__name__}")


def _cell_edges(length: int) -> list[int]:
    """Pixel boundaries of the 3 grid cells: pixel i is in the cell holding its centre."""
    return [math.ceil(k * length / 3 - 0.5) for k in range(4)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary 3x3 dilation."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _classify_shape(
    alpha: np.ndarray, window: tuple[int, int, int, int]
) -> tuple[str, float, float]:
    """Best-fitting shape for a soft mask over ``window``: (shape, area in pixels, confidence).

    The shape is ``UNKNOWN`` when no template fits within ``MAX_SHAPE_ERROR``.
    """
    y0, y1, x0, x1 = window
    area = float(alpha.sum())
    # Centroid in image pixel coordinates (pixel centres at i + 0.5).
    cy = float((alpha.sum(axis=1) * (np.arange(y0, y1) + 0.5)).sum()) / area
    cx = float((alpha.sum(axis=0) * (np.arange(x0, x1) + 0.5)).sum()) / area
    errors = {}
    for shape in SHAPES:
        half = math.sqrt(area / _AREA_FACTOR[shape])
        # A triangle's centroid lies a third of its half size below its bounding-box centre.
        center_y = cy - half / 3 if shape == "triangle" else cy
        template = shape_coverage(shape, (center_y, cx), half, window)
        errors[shape] = float(((alpha - template) ** 2).sum())
    best, second = sorted(errors, key=errors.get)[:2]
    confidence = 1.0 - errors[best] / errors[second] if errors[second] > 0 else 0.0
    if errors[best] > MAX_SHAPE_ERROR * area:
        best = UNKNOWN
    return best, area, confidence


def _palette_distance(offset: np.ndarray) -> np.ndarray:
    """RGB distance from a colour (given as offset from the background) to each palette colour.

    Anti-aliasing and blur mix object pixels with the background, so the distance is taken to the
    segment from half to full palette colour, ``BACKGROUND + t * (colour - BACKGROUND)`` for
    ``t`` in [0.5, 1], rather than to the palette colour itself.
    """
    directions = _PALETTE - _BACKGROUND
    t = np.clip(directions @ offset / (directions * directions).sum(axis=1), 0.5, 1.0)
    return np.linalg.norm(offset - t[:, None] * directions, axis=1)


def detect(image: ImageLike) -> list[Detection]:
    """Find the object in each grid cell of ``image`` (at most one per cell), from pixels only."""
    rgb = _to_rgb(image)
    offset = rgb - _BACKGROUND
    distance = np.linalg.norm(offset, axis=-1)
    row_edges, col_edges = _cell_edges(rgb.shape[0]), _cell_edges(rgb.shape[1])
    detections = []
    for (row, col), position in _CELL_TO_POSITION.items():
        window = (row_edges[row], row_edges[row + 1], col_edges[col], col_edges[col + 1])
        y0, y1, x0, x1 = window
        cell_offset, cell_distance = offset[y0:y1, x0:x1], distance[y0:y1, x0:x1]
        # 1. Foreground core; skip cells without enough of it.
        core = cell_distance > _CORE_DISTANCE
        if core.sum() < MIN_CORE_FRACTION * core.size:
            continue
        # 2. Colour of the most saturated half of the core.
        strong = core & (cell_distance >= np.median(cell_distance[core]))
        color = np.median(cell_offset[strong], axis=0)
        palette_distance = _palette_distance(color)
        nearest = int(palette_distance.argmin())
        color_name = _PALETTE_NAMES[nearest]
        if palette_distance[nearest] > MAX_COLOR_DISTANCE:
            color_name = UNKNOWN
        # 3. Soft coverage along the background -> object colour direction, near the core only.
        alpha = np.clip(cell_offset @ color / float(color @ color), 0.0, 1.0) * _dilate(core)
        # 4. Shape by template fit.
        shape, area, confidence = _classify_shape(alpha, window)
        detections.append(Detection(color_name, shape, position, area / core.size, confidence))
    return detections


def verify(image: ImageLike, caption: str) -> VerifyResult:
    """Check that every object named in ``caption`` is in ``image`` with the right attributes.

    Raises:
        ValueError: if ``caption`` is not a valid shapes caption.
    """
    named = parse_caption(caption)
    detections = detect(image)
    found = [(obj, any(d.matches(obj) for d in detections)) for obj in named]
    named_positions = {obj.position for obj in named}
    extra = sum(d.position not in named_positions for d in detections)
    return VerifyResult(found, all(ok for _, ok in found), extra, detections)


def adherence(images: Iterable[ImageLike], captions: Iterable[str]) -> dict[str, float]:
    """Caption adherence of ``images`` (e.g. text-to-image samples) to their ``captions``.

    Per-object metrics count each object named in a caption, judged on the detection (if any) in
    its named grid cell:

    - ``accuracy``: fraction of captions whose objects are all found exactly.
    - ``object_accuracy``: named cell holds the right colour and the right shape.
    - ``color_accuracy``: named cell holds an object of the right colour (any shape).
    - ``shape_accuracy``: named cell holds an object of the right shape (any colour).
    - ``position_accuracy``: named cell holds an object at all.
    - ``mean_extra``: mean number of detections per image in cells the caption does not name.
    - ``n``: number of captions.

    ``images`` may also be a batch tensor [N, 3, H, W] in [-1, 1].
    """
    totals = dict.fromkeys(("accuracy", "object", "color", "shape", "position", "extra"), 0)
    n_captions = n_objects = 0
    for image, text in zip(images, captions, strict=True):
        result = verify(image, text)
        by_position = {d.position: d for d in result.detections}
        for obj, ok in result.objects:
            detection = by_position.get(obj.position)
            totals["object"] += ok
            totals["color"] += detection is not None and detection.color == obj.color
            totals["shape"] += detection is not None and detection.shape == obj.shape
            totals["position"] += detection is not None
        totals["accuracy"] += result.correct
        totals["extra"] += result.extra
        n_captions += 1
        n_objects += len(result.objects)
    captions_seen, objects_seen = max(n_captions, 1), max(n_objects, 1)
    return {
        "accuracy": totals["accuracy"] / captions_seen,
        "object_accuracy": totals["object"] / objects_seen,
        "color_accuracy": totals["color"] / objects_seen,
        "shape_accuracy": totals["shape"] / objects_seen,
        "position_accuracy": totals["position"] / objects_seen,
        "mean_extra": totals["extra"] / captions_seen,
        "n": float(n_captions),
    }
