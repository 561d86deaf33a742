"""PIL <-> tensor helpers shared by the datasets and the command-line tools.

Tensors follow the ldmkit convention: float32 ``[C, H, W]`` with values in ``[-1, 1]``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["load_image", "make_grid", "resize_and_crop", "to_pil", "to_tensor"]

Background = int | Sequence[int]

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_GRAY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def _rgb(background: Background) -> tuple[int, int, int]:
    """Normalise a background colour given as a gray level or an RGB triple."""
    if isinstance(background, int):
        return (background,) * 3
    rgb = tuple(int(c) for c in background)
    if len(rgb) != 3:
        raise ValueError(f"background must be an int or an RGB triple, got {background!r}")
    return rgb  # type: ignore[return-value]


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit integer) grayscale to 8 bits; PIL's convert("L") would clip."""
    arr = np.asarray(img).astype(np.int64)
    if img.mode != "I" or arr.max(initial=0) > 255:
        arr = arr >> 8  # treat as 16-bit data
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def load_image(
    path_or_pil: str | os.PathLike[str] | Image.Image,
    *,
    channels: int = 3,
    background: Background = (255, 255, 255),
) -> Image.Image:
    """Open and fully decode an image, returning a new ``RGB`` (channels=3) or ``L`` image.

    The EXIF orientation is applied. Transparent images (RGBA, LA, palette or colour-keyed
    transparency) are alpha-composited on ``background``. Raises whatever PIL raises for
    unreadable or truncated files (``OSError`` / ``PIL.UnidentifiedImageError`` mostly).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if isinstance(path_or_pil, Image.Image):
        path_or_pil.load()
        img = ImageOps.exif_transpose(path_or_pil)  # always a new image
    else:
        with Image.open(path_or_pil) as src:
            src.load()
            img = ImageOps.exif_transpose(src)
    if img.mode in _HIGH_DEPTH_GRAY:
        img = _to_8bit_gray(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*_rgb(background), 255))
        img = Image.alpha_composite(canvas, rgba)
    target = "RGB" if channels == 3 else "L"
    return img if img.mode == target else img.convert(target)


def resize_and_crop(
    img: Image.Image,
    size: int,
    *,
    center_crop: bool = True,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Resize the shorter side to ``size`` and center-crop to ``size x size``.

    With ``center_crop=False`` the whole image is resized to ``size x size`` (aspect ratio
    is not kept). The crop and the resize happen in one resampling step.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if img.size == (size, size):
        return img.copy()
    w, h = img.size
    box: tuple[float, float, float, float] = (0, 0, w, h)
    if center_crop and w != h:
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        box = (left, top, left + side, top + side)
    return img.resize((size, size), resample=resample, box=box)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an ``L``, ``RGB`` or ``RGBA`` image to float32 ``[C, H, W]`` in ``[-1, 1]``."""
    if img.mode not in ("L", "RGB", "RGBA"):
        raise ValueError(f"unsupported image mode {img.mode!r}; use load_image() first")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor`: ``[C, H, W]`` (C = 1, 3 or 4) in ``[-1, 1]`` to a PIL image.

    Values outside ``[-1, 1]`` are clipped. A 2-D ``[H, W]`` tensor is treated as grayscale.
    """
    x = tensor.detach().to("cpu", torch.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected [C, H, W] with C in (1, 3, 4), got {tuple(tensor.shape)}")
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr, mode="RGB" if arr.shape[2] == 3 else "RGBA")


def make_grid(
    images: torch.Tensor, nrow: int, padding: int = 2, *, pad_value: float = -1.0
) -> Image.Image:
    """Tile ``[N, C, H, W]`` images in ``[-1, 1]`` into one PIL image, ``nrow`` per row.

    Same layout as ``torchvision.utils.make_grid``: the grid is
    ``rows * (H + padding) + padding`` high and ``min(nrow, N) * (W + padding) + padding``
    wide, the gaps filled with ``pad_value`` (default -1, black).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, C, H, W] tensor, got {tuple(images.shape)}")
    if nrow <= 0 or padding < 0:
        raise ValueError(f"need nrow > 0 and padding >= 0, got nrow={nrow}, padding={padding}")
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = images.new_full(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value
    )
    for i in range(n):
        top = (i // cols) * (h + padding) + padding
        left = (i % cols) * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = images[i]
    return to_pil(grid)
