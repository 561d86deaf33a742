"""Noise schedules: discrete VP tables and the sigma grids that samplers walk.

Everything is expressed in the variance-exploding form ``x = x0 + sigma * eps``. A discrete
VP model with cumulative product ``abar_t`` sits at ``sigma_t = sqrt((1 - abar_t) / abar_t)``;
its wrapper maps sigma back to a timestep. VP tables (betas, ``abar``, sigmas) are float64 so
that the cumulative product keeps its precision; sampler grids are float32, decreasing, and
end with a 0.

Infinite sigma. A zero-terminal-SNR schedule has ``abar_{T-1} = 0``, i.e. ``sigma = inf``, and a
flow model's ``t = 1`` is ``sigma = t / (1 - t) = inf``. :func:`vp_sigmas` reports the ``inf``
honestly, but a grid never contains it: :func:`discrete_sigmas` and :func:`flow_sigmas`
replace it by :data:`SIGMA_INF_CLAMP` = sqrt((1 - 2^-24) / 2^-24) ~ 4096, the value diffusers
uses (it sets ``abar_{T-1} = 2^-24``). At that sigma the signal is 1/4096 of the input, far
below what a model can resolve, so starting there is starting from pure noise, and every
sampler runs unchanged on finite numbers. The wrapper sees ``x / sqrt(1 + sigma^2)``, i.e. unit
noise, as the model expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

Spacing = Literal["leading", "trailing", "linspace"]

SIGMA_INF_CLAMP = math.sqrt((1.0 - 2.0**-24) / 2.0**-24)


def betas_linear(
    n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """LDM's "linear" schedule, linear in sqrt(beta) (diffusers' ``scaled_linear``).

    Defaults are Stable Diffusion's; the original LDM configs use 0.0015 .. 0.0195.
    """
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


def betas_cosine(n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021), Eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
    t = torch.arange(n + 1, dtype=torch.float64) / n
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(abar) so that abar_{T-1} = 0.

    sqrt(abar_0) is kept; the last beta becomes 1 (its sigma is inf, see the module note).
    Computed in ``betas``' dtype (float64 for this module's schedules; float32 for diffusers'
    tables, see ``ldmkit.interop.schedulers``).
    """
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s)."""
    return torch.cumprod(1 - betas.double(), 0)


def vp_sigmas(abar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0 .. n-1 (increasing; inf where abar = 0)."""
    abar = abar.double()
    return ((1 - abar) / abar).sqrt()


def _timesteps(n_train: int, steps: int, spacing: Spacing, steps_offset: int) -> np.ndarray:
    """Decreasing float timesteps as diffusers' schedulers build them (Lin et al. 2023, Tab. 2)."""
    if not 1 <= steps <= n_train:
        raise ValueError(f"steps must be in [1, {n_train}], got {steps}")
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (n_train // steps)).round()[::-1] + float(steps_offset)
    if spacing == "trailing":
        # diffusers writes np.arange(n_train, 0, -ratio), which yields one step too many for some
        # counts (e.g. 61 of 1000, ending at t = -1); the first ``steps`` values are the same.
        return np.round(n_train - np.arange(steps) * (n_train / steps)) - 1.0
    raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")


def discrete_timesteps(
    n_train: int, steps: int, spacing: Spacing = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Decreasing integer timesteps, as diffusers' ``DDIMScheduler.set_timesteps`` computes them.

    ``leading``: ``arange(steps) * (n_train // steps) + steps_offset`` (SD 1.x uses offset 1);
    ``trailing``: ``round(n_train - i * n_train / steps) - 1``, always starting at ``n_train - 1``;
    ``linspace``: ``round(linspace(0, n_train - 1, steps))``.
    """
    ts = _timesteps(n_train, steps, spacing, steps_offset)
    return torch.from_numpy(ts.round().astype(np.int64))


def discrete_sigmas(
    train_sigmas: torch.Tensor,
    steps: int,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """Sigma grid for a discrete model, as diffusers' ``EulerDiscreteScheduler`` builds it.

    ``train_sigmas`` is :func:`vp_sigmas` of the training schedule (increasing in t). The grid is
    ``train_sigmas`` at the timesteps of ``spacing`` with a 0 appended. Like diffusers' Euler,
    ``linspace`` keeps its fractional timesteps (DDIM rounds them, see
    :func:`discrete_timesteps`) and reads sigma by linear interpolation between neighbours;
    ``leading`` and ``trailing`` hit integer timesteps exactly. An infinite sigma (zero
    terminal SNR) becomes :data:`SIGMA_INF_CLAMP`.
    """
    table = train_sigmas.double().cpu().numpy()
    table = np.where(np.isfinite(table), table, SIGMA_INF_CLAMP)
    ts = _timesteps(len(table), steps, spacing, steps_offset)
    sigmas = np.interp(ts, np.arange(len(table)), table)
    return torch.from_numpy(np.append(sigmas, 0.0)).float()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), Eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas evenly spaced in log sigma, from sigma_max down to sigma_min."""
    log_s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_s.exp())


def flow_sigmas(n: int, shift: float = 1.0, sigma_max: float = SIGMA_INF_CLAMP) -> torch.Tensor:
    """Rectified-flow grid: t = 1, 1 - 1/n, ..., 1/n, shifted as in SD3 (Esser et al. 2024).

    t' = shift t / (1 + (shift - 1) t), then sigma = t' / (1 - t'), so that
    x_flow = (1 - t) x0 + t eps = (1 - t) (x0 + sigma eps). t' = 1 gives sigma = inf, which is
    replaced by ``sigma_max``. (diffusers' FlowMatchEuler instead ends its t grid at 1/1000
    before the final 0.)
    """
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1]
    t = shift * t / (1 + (shift - 1) * t)
    sigmas = torch.where(t < 1, t / (1 - t).clamp(min=1e-300), torch.inf)
    return _append_zero(sigmas.clamp(max=sigma_max))


def _discrete(steps: int, *, train_sigmas: torch.Tensor, **kw) -> torch.Tensor:
    return discrete_sigmas(train_sigmas, steps, **kw)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "flow": flow_sigmas,
    "discrete": _discrete,
}


def get_sigmas(name: str, steps: int, **kw) -> torch.Tensor:
    """Sigma grid ``name`` with ``steps`` sigmas plus the final 0.

    ``get_sigmas("karras", 30, sigma_min=0.03, sigma_max=14.6)``,
    ``get_sigmas("discrete", 30, train_sigmas=vp_sigmas(abar), spacing="trailing")``.
    """
    if name not in SCHEDULES:
        raise KeyError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[name](steps, **kw)
