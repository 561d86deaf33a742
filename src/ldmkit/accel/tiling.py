"""Tiled VAE decoding and encoding: large images with activation memory bounded by the tile.

The input is cut into overlapping tiles (latent space for ``tiled_decode``, pixel space for
``tiled_encode``); each tile goes through the autoencoder on its own, and the outputs are
blended with linear ramps across every overlap, so no seam is visible. This is the scheme of
diffusers' ``AutoencoderKL.enable_tiling`` with two differences: the last tile on each axis
is aligned to the far edge (every tile is full size, so any input size works and no tile is a
thin sliver), and the blend weights are normalised to sum to one (any overlap, any number of
tiles per axis, 1-D/2-D/3-D alike).

Tiling is an approximation, not an exact rewrite of the full pass:

- a tile's border pixels see zero padding where the full pass sees neighbours (the ramps give
  them little weight, so this mostly vanishes with a wide enough overlap);
- every GroupNorm of the VAE normalises with the statistics of its tile, not of the image;
- the mid-block self-attention (``mid_attention=True``, as in Stable Diffusion's VAE) is
  global in the full pass and sees only its tile here.

The last two make tiles differ from the full pass everywhere, not just near seams; diffusers
documents the same ("tiles are decoded independently ... colour may differ slightly"). With
``tile`` at least the input size the result is exactly the untiled one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from ldmkit.autoencoders.kl import AutoencoderKL


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles of length ``min(tile, size)`` that cover ``[0, size)``.

    Consecutive tiles advance by ``tile - overlap``; the last one is moved back to end exactly
    at ``size`` (so its overlap with the previous tile may be larger than ``overlap``).
    """
    if tile >= size:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def blend_weights(starts: list[int], tile: int, size: int) -> list[torch.Tensor]:
    """Linear-ramp blend weights, one [tile] vector per tile, summing to one at every position.

    A tile's weight rises linearly across its overlap with the previous tile and falls across
    its overlap with the next one (1 in between); the weights are then normalised by their sum.
    """
    pos = torch.arange(size, dtype=torch.float64)
    raw = torch.zeros(len(starts), size, dtype=torch.float64)
    for i, start in enumerate(starts):
        end = start + tile
        w = torch.ones(size, dtype=torch.float64)
        if i > 0:  # ramp up across [start, end of the previous tile)
            ramp = starts[i - 1] + tile - start
            w = torch.minimum(w, (pos - start + 1) / (ramp + 1))
        if i < len(starts) - 1:  # ramp down across [start of the next tile, end)
            ramp = end - starts[i + 1]
            w = torch.minimum(w, (end - pos) / (ramp + 1))
        raw[i, start:end] = w[start:end]
    raw = raw / raw.sum(0)
    return [raw[i, s : s + tile].float() for i, s in enumerate(starts)]


def _check_tiling(tile: int, overlap: int) -> None:
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    out_size: Callable[[int], int],
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` [N, C, *spatial] and blend the outputs.

    ``out_size(n)`` maps an input length to the output length of ``fn`` (``n * f`` for a
    decoder, ``n // f`` for an encoder); tile starts and lengths are mapped the same way, so
    they must map to whole numbers (the caller checks). One tile per axis calls ``fn(x)``.
    """
    spatial = tuple(x.shape[2:])
    plans = [tile_starts(n, tile, overlap) for n in spatial]
    if all(len(p) == 1 for p in plans):
        return fn(x)
    tiles_in = [min(tile, n) for n in spatial]
    tiles_out = [out_size(t) for t in tiles_in]
    weights = [
        blend_weights([out_size(s) for s in p], t, out_size(n))
        for p, t, n in zip(plans, tiles_out, spatial, strict=True)
    ]
    out: torch.Tensor | None = None
    for index in itertools.product(*(range(len(p)) for p in plans)):
        starts = [p[i] for p, i in zip(plans, index, strict=True)]
        y = fn(x[(..., *(slice(s, s + t) for s, t in zip(starts, tiles_in, strict=True)))])
        if tuple(y.shape[2:]) != tuple(tiles_out):
            raise ValueError(f"tile output {tuple(y.shape)} does not match sizes {tiles_out}")
        if out is None:
            out = y.new_zeros(*y.shape[:2], *(out_size(n) for n in spatial))
        # Separable weight: the outer product of the per-axis ramps (sums to one everywhere).
        w = torch.ones((), dtype=y.dtype, device=y.device)
        for axis, (ws, i) in enumerate(zip(weights, index, strict=True)):
            shape = [1] * len(spatial)
            shape[axis] = -1
            w = w * ws[i].to(y).reshape(shape)
        window = tuple(
            slice(out_size(s), out_size(s) + t) for s, t in zip(starts, tiles_out, strict=True)
        )
        out[(..., *window)] += y * w
    assert out is not None
    return out


def tiled_decode(
    vae: AutoencoderKL,
    z: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = 16,
    scaled: bool = True,
) -> torch.Tensor:
    """``vae.decode(z, scaled=scaled)`` tile by tile: latent tiles of ``tile`` positions per axis
    overlapping by ``overlap``, outputs blended linearly across the ``overlap * f`` pixels.

    Peak activation memory is that of decoding one ``tile``-sized latent (the defaults, 64
    and 16, are 512-pixel tiles with 128-pixel overlaps for f = 8). Not exact: see the module
    docstring; ``tile`` at least the latent size gives exactly ``vae.decode``.
    """
    _check_tiling(tile, overlap)
    f = vae.downsampling_factor
    return run_tiled(lambda t: vae.decode(t, scaled=scaled), z, tile, overlap, lambda n: n * f)


def tiled_encode(
    vae: AutoencoderKL,
    x: torch.Tensor,
    *,
    tile: int = 512,
    overlap: int = 128,
    scaled: bool = True,
) -> torch.Tensor:
    """``vae.encode(x, scaled=scaled)`` (posterior mean) tile by tile: pixel tiles of ``tile``
    per axis overlapping by ``overlap``, latents blended linearly across ``overlap / f``.

    ``tile`` and ``overlap`` must be multiples of the downsampling factor f (so tiles start on
    the latent grid), as the image size already is. Returns the posterior mean only: blending
    independent per-tile samples would shrink their variance in the overlaps. Not exact: see
    the module docstring; ``tile`` at least the image size gives exactly ``vae.encode``.
    """
    _check_tiling(tile, overlap)
    f = vae.downsampling_factor
    if tile % f or overlap % f:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of f={f}")
    vae.check_input(x)
    return run_tiled(lambda t: vae.encode(t, scaled=scaled), x, tile, overlap, lambda n: n // f)
