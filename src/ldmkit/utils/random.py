"""Noise that does not depend on batch size or device.

A generator may be one ``torch.Generator`` (one stream for the whole batch) or a list with
one generator per sample: then sample ``i`` is drawn from its own stream, so a seed gives
the same image whatever the batch it is in. Noise is drawn on the CPU and moved, so the
same seed gives the same noise on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise of ``shape``; per-sample streams when ``generator`` is a list."""
    shape = tuple(shape)
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack(
            [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator]
        )
    else:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
