"""Attention slicing: compute attention for a few query rows at a time.

Attention is ``softmax(q k^T / sqrt(d)) v`` row by row: each query's output depends on that
query and on all keys and values, never on the other queries. Splitting the queries into
chunks of ``slice_size`` rows and concatenating the outputs is therefore exact (up to float
rounding), and a kernel that materialises the score matrix (PyTorch's math kernel, which
ldmkit's ``sdpa`` picks for short CPU training sequences, and which other backends fall back
to with some masks or dtypes) then holds [B, H, slice_size, L] scores instead of
[B, H, L, L]. This is diffusers' ``enable_attention_slicing``, sliced along queries rather
than along batch x heads, so it helps at batch size 1 too. The fused flash and
memory-efficient kernels never hold the full score matrix, so slicing saves little with them.

All of ldmkit's attention goes through ``ldmkit.nn.layers.sdpa``. ``attention_slicing``
swaps that function, for the duration of a ``with`` block, in every loaded ``ldmkit`` module
that refers to it: ``ldmkit.nn.layers`` (which ``spatial_attention``, and so the VAE's mid
attention, looks up at call time) and ``ldmkit.nn.attention`` (which binds the name at
import: ``from ldmkit.nn.layers import sdpa``), plus any later module that does the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

import ldmkit.nn.attention  # noqa: F401  (loaded first, so that it is patched, not stuck)
import ldmkit.nn.layers as layers

SdpaFn = Callable[..., torch.Tensor]


def sliced_sdpa(
    sdpa: SdpaFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    slice_size: int,
) -> torch.Tensor:
    """``sdpa(q, k, v, attn_mask)`` on chunks of ``slice_size`` query rows of [B, H, L, D].

    A mask with one row per query ([..., L, S]) is sliced with the queries; a mask that
    broadcasts over the queries ([..., 1, S], as ``Attention`` builds from padding) is not.
    """
    n = q.shape[-2]
    if n <= slice_size:
        return sdpa(q, k, v, attn_mask=attn_mask)
    mask_rows = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == n
    out: torch.Tensor | None = None
    for start in range(0, n, slice_size):
        rows = slice(start, start + slice_size)
        mask = attn_mask[..., rows, :] if mask_rows else attn_mask  # type: ignore[index]
        chunk = sdpa(q[..., rows, :], k, v, attn_mask=mask)
        if out is None:  # [B, H, L, Dv]: written in place, so only one chunk is extra
            out = chunk.new_empty(*chunk.shape[:-2], n, chunk.shape[-1])
        out[..., rows, :] = chunk
    assert out is not None
    return out


def _modules_using(fn: SdpaFn) -> list[ModuleType]:
    """Loaded ``ldmkit`` modules whose global ``sdpa`` is ``fn``."""
    found = []
    for name, module in list(sys.modules.items()):
        ours = name == "ldmkit" or name.startswith("ldmkit.")
        if ours and module is not None and getattr(module, "sdpa", None) is fn:
            found.append(module)
    return found


@contextmanager
def attention_slicing(slice_size: int | None) -> Iterator[None]:
    """Within the block, every ldmkit attention runs on chunks of ``slice_size`` query rows.

    Outputs are unchanged up to float rounding; the peak size of the attention scores falls
    from L x L to ``slice_size`` x L per head (with kernels that materialise them; see the
    module docstring). ``None`` leaves attention as it is. Blocks nest (the innermost size
    applies) and the original function is restored on exit, also after an exception.

    Not thread-safe: the swap is process-wide, so attention run by other threads inside the
    block is sliced too. A module that imports ``sdpa`` by name while the block is active keeps
    a wrapper that, after the block, calls the original unsliced.

    Example::

        with attention_slicing(1024):
            images = vae.decode(z)
    """
    if slice_size is None:
        yield
        return
    if slice_size < 1:
        raise ValueError(f"slice_size must be >= 1 or None, got {slice_size}")
    current: SdpaFn = layers.sdpa
    base: SdpaFn = getattr(current, "__wrapped__", current)  # the unpatched sdpa
    active = True

    def sdpa(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not active:  # kept by a module imported inside the block
            return base(q, k, v, attn_mask=attn_mask)
        return sliced_sdpa(base, q, k, v, attn_mask, slice_size=slice_size)

    sdpa.__wrapped__ = base  # type: ignore[attr-defined]
    sdpa.__doc__ = f"ldmkit.nn.layers.sdpa sliced into chunks of {slice_size} query rows."
    modules = _modules_using(current)
    for module in modules:
        module.sdpa = sdpa  # type: ignore[attr-defined]
    try:
        yield
    finally:
        active = False
        for module in modules:
            module.sdpa = current  # type: ignore[attr-defined]
