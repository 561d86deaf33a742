"""Dimension-agnostic layers shared by every network (1-D sequences, 2-D images, 3-D video)."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldmkit.accel import cpu_attention

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


# Largest query x key count for which CPU training uses the math attention kernel (below).
_MATH_KERNEL_MAX_SCORES = 256 * 256


# Attention slicing (``ldmkit.accel.slicing.attention_slicing``): when set, ``sdpa`` runs the
# queries in chunks of this many rows. A ContextVar, so it is per thread / async task.
QUERY_SLICE: ContextVar[int | None] = ContextVar("ldmkit_attention_query_slice", default=None)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention [B, H, L, D]; in query chunks inside ``attention_slicing`` (exact: each query's
    output depends only on itself and all keys/values)."""
    # Dynamo cannot trace ContextVar.get (a graph break per attention layer, which left most of
    # a compiled UNet eager): compiled graphs never slice; inductor plans their memory itself.
    size = None if torch.compiler.is_compiling() else QUERY_SLICE.get()
    n = q.shape[-2]
    if size is None or n <= size:
        return _sdpa(q, k, v, attn_mask)
    rows_mask = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == n
    out: torch.Tensor | None = None
    for start in range(0, n, size):
        rows = slice(start, start + size)
        mask = attn_mask[..., rows, :] if rows_mask else attn_mask  # per-query masks sliced
        chunk = _sdpa(q[..., rows, :], k, v, mask)
        if out is None:  # written in place, so only one chunk is extra
            out = chunk.new_empty(*chunk.shape[:-2], n, chunk.shape[-1])
        out[..., rows, :] = chunk
    return out


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; short CPU training sequences take a math path instead
    (``_math_attention`` without a mask, PyTorch's math kernel with one), and CPU inference in
    bf16 (AMX) or fp32 (AVX-512) ldmkit's own flash kernels (``ldmkit.accel.cpu_attention``).

    On CPU with gradients the flash kernel's backward is slow for short sequences: a training
    step of the 6.8M-parameter shapes UNet (64 and 16 latent tokens, 24 text tokens) took
    0.43 s with it and 0.39 s with the math kernel in fp32, 0.74 s against 0.31 s under bf16
    autocast. Inference and long sequences keep the default (memory-efficient) choice.
    """
    if (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and q.shape[-2] * k.shape[-2] <= _MATH_KERNEL_MAX_SCORES
    ):
        if attn_mask is None:
            return _math_attention(q, k, v)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if cpu_attention.supports(q, k, v, attn_mask):
        return cpu_attention.attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out. PyTorch's math kernel also guards fully masked
    rows against NaN (an ``all`` and a ``where`` over the scores, forward and backward), which
    unmasked attention never needs. Scores and softmax are at least fp32, as in the flash
    kernel; the weighted sum of ``v`` runs in ``v``'s dtype (bf16 under autocast)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores even under autocast
        scores = torch.matmul(q.to(acc) * q.shape[-1] ** -0.5, k.to(acc).transpose(-1, -2))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def spatial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_out: nn.Module | None = None
) -> torch.Tensor:
    """Single-head self-attention over all spatial positions of [N, C, *spatial] tensors, then
    the 1x1 convolution ``proj_out`` if given."""
    n, c, *spatial = q.shape
    q, k, v = (t.reshape(n, 1, c, -1).transpose(-1, -2) for t in (q, k, v))  # [N, 1, L, C]
    return tokens_to_image(sdpa(q, k, v)[:, 0], spatial, proj_out)


def tokens_to_image(
    tokens: torch.Tensor, spatial: Sequence[int], proj: nn.Module | None = None
) -> torch.Tensor:
    """Tokens [B, L, C] as an image [B, C', *spatial] (a view), through the 1x1 convolution
    ``proj`` if given."""
    b = tokens.shape[0]
    if proj is not None and torch.compiler.is_compiling():
        # With dynamic shapes, torch 2.13 inductor cannot lower a convolution whose input is
        # this view ("ValueRangeError: Invalid ranges [0:-1]" while splitting the symbolic
        # token count): compiled graphs apply the 1x1 projection to the tokens instead.
        tokens = F.linear(tokens, proj.weight.flatten(1), proj.bias)
        proj = None
    image = tokens.transpose(1, 2).reshape(b, -1, *spatial)
    return image if proj is None else proj(image)
