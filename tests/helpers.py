"""Small helpers shared by the tests of networks and fast paths (imported as ``helpers``)."""

from __future__ import annotations

import math

import torch


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """A standard-normal tensor from its own seeded CPU generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with the reference's value range as the peak."""
    mse = float((out - ref).pow(2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (ldmkit zero-initialises output layers and gates), in eval
    mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()
