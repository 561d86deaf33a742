"""Timestep and position embeddings shared by the denoisers.

* ``timestep_embedding``: the sinusoidal embedding of Vaswani et al. 2017 ("Attention Is All
  You Need") as used for diffusion timesteps by Ho et al. 2020 (DDPM) and the CompVis /
  diffusers Stable Diffusion code.
* ``TimestepMLP``: the Linear -> SiLU -> Linear MLP applied to it (``time_embed`` in the UNet).
* ``sincos_2d_position_embedding``: the fixed 2-D position embedding of MAE (He et al. 2022)
  used by DiT (Peebles & Xie 2023).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    max_period: float = 10000,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0,
) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] (float32) of the (possibly fractional) timesteps ``t`` [N].

    Frequencies are ``exp(-log(max_period) * i / (dim // 2 - downscale_freq_shift))`` for
    ``i = 0 .. dim // 2 - 1``. With ``flip_sin_to_cos=True`` the output is ``[cos, sin]``, which
    is the order of CompVis ``timestep_embedding`` (and diffusers with ``flip_sin_to_cos=True,
    freq_shift=0``, as Stable Diffusion uses); ``False`` gives diffusers' default ``[sin, cos]``.
    An odd ``dim`` is padded with one zero column.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * exponent / (half - downscale_freq_shift))
    args = t.float()[:, None] * freqs[None]
    parts = (
        [torch.cos(args), torch.sin(args)]
        if flip_sin_to_cos
        else [torch.sin(args), torch.cos(args)]
    )
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepMLP(nn.Sequential):
    """Linear -> SiLU -> Linear; its parameters are named ``0.*`` and ``2.*`` as in CompVis."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        hidden_dim = hidden_dim or out_dim
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))


def sincos_1d_position_embedding(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim] embedding ``[sin(p * w_i), cos(p * w_i)]``, ``w_i = 10000^(-2i/dim)``."""
    if dim % 2:
        raise ValueError(f"position embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.double().reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1).float()


def sincos_2d_position_embedding(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D embedding [height * width, dim] for a row-major grid of tokens (MAE / DiT).

    As in MAE's ``get_2d_sincos_pos_embed`` (which DiT uses), the first ``dim / 2`` channels
    encode the column index and the last ``dim / 2`` the row index, each as ``[sin, cos]``.
    """
    if dim % 4:
        raise ValueError(f"2-D position embedding dim must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    emb_cols = sincos_1d_position_embedding(dim // 2, cols)
    emb_rows = sincos_1d_position_embedding(dim // 2, rows)
    return torch.cat([emb_cols, emb_rows], dim=1)
