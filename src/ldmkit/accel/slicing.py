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

All of ldmkit's attention goes through ``ldmkit.nn.layers.sdpa``, which reads the slice size
from a ``ContextVar`` (``ldmkit.nn.layers.QUERY_SLICE``): ``attention_slicing`` sets it for
the duration of a ``with`` block, in the current thread or async task only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ldmkit.nn.layers import QUERY_SLICE


@contextmanager
def attention_slicing(slice_size: int | None) -> Iterator[None]:
    """Within the block, every ldmkit attention runs on chunks of ``slice_size`` query rows.

    Outputs are unchanged up to float rounding; the peak size of the attention scores falls
    from L x L to ``slice_size`` x L per head (with kernels that materialise them; see the
    module docstring). ``None`` turns slicing off inside the block. Blocks nest (the innermost
    size applies) and the previous setting returns on exit, also after an exception.

    Example::

        with attention_slicing(1024):
            images = vae.decode(z)
    """
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"slice_size must be >= 1 or None, got {slice_size}")
    token = QUERY_SLICE.set(slice_size)
    try:
        yield
    finally:
        QUERY_SLICE.reset(token)
