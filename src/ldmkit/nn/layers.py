"""Dimension-agnostic layers shared by every network (1-D sequences, 2-D images, 3-D video)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv{dims}d``; ``dims`` is the number of spatial dimensions (1, 2 or 3)."""
    if dims not in _CONVS:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return _CONVS[dims](*args, **kwargs)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    groups = min(groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


def spatial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-head self-attention over all spatial positions of [N, C, *spatial] tensors."""
    n, c, *spatial = q.shape
    q, k, v = (t.reshape(n, 1, c, -1).transpose(-1, -2) for t in (q, k, v))  # [N, 1, L, C]
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(n, c, *spatial)
