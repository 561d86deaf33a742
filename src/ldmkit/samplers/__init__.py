"""Samplers: one plain function per algorithm, and guidance as a denoiser wrapper.

Every sampler is ``fn(denoise, x, sigmas, *, generator=None, callback=None, **options) -> x``
with ``denoise(x, sigma) -> x0_hat`` (see :mod:`ldmkit.samplers.ode` for the contract), and
``sigmas`` a grid from :mod:`ldmkit.diffusion.schedules`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldmkit.samplers.guidance import CFGDenoiser, rescale_guidance
from ldmkit.samplers.ode import (
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_plms,
    sample_unipc,
)
from ldmkit.samplers.stochastic import (
    sample_ddpm,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler_ancestral,
    sample_lcm,
)

Sampler = Callable[..., torch.Tensor]

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "unipc": sample_unipc,
    "ddpm": sample_ddpm,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "lcm": sample_lcm,
}


def get_sampler(name: str) -> Sampler:
    """The sampler registered as ``name`` (see :data:`SAMPLERS`)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise KeyError(
            f"unknown sampler {name!r}; choose from {', '.join(sorted(SAMPLERS))}"
        ) from None


__all__ = [
    "SAMPLERS",
    "CFGDenoiser",
    "get_sampler",
    "rescale_guidance",
    *(fn.__name__ for fn in SAMPLERS.values()),
]
