"""diffusers scheduler configs as ldmkit sigma grids, step for step.

A Stable Diffusion checkpoint ships a diffusers ``scheduler_config.json`` (or its family's
defaults). ldmkit's samplers walk a sigma grid in the variance-exploding form ``x = x0 + sigma
eps``; to give the same numbers as diffusers they must walk the grid diffusers would build and
start from the noise scale diffusers would use. :func:`diffusers_grid` reproduces the three
grid rules of diffusers 0.3x-0.4x, chosen by the sampler:

* ``ddim`` (also ``ddpm``, ``plms``, ``lcm``) — ``DDIMScheduler``: integer timesteps;
  the last step goes to ``abar_0`` (sigma_0 > 0) when ``set_alpha_to_one`` is false, as in
  every Stable Diffusion scheduler config;
* ``euler``, ``euler_ancestral``, ``heun`` — ``EulerDiscreteScheduler``: float timesteps,
  sigma linearly interpolated in t, optional Karras sigmas;
* ``dpmpp_*``, ``unipc`` — ``DPMSolverMultistepScheduler``: integer timesteps on its own
  spacing formulas (``leading`` divides by ``steps + 1``), optional Karras sigmas.

A config without ``timestep_spacing`` (Stable Diffusion 1.x's own, for one) gets each
scheduler's default, as diffusers' ``from_config`` does: ``leading`` for DDIM, ``linspace``
for Euler and DPM-Solver. The noise table is computed as diffusers computes it (float32
``alphas_cumprod``), and the denoiser receives, at each grid sigma, exactly the timestep
diffusers passes to its UNet (:class:`GridTimestepDenoiser`). Known difference: diffusers' DDIM steps from ``t`` to
``t - T // steps``, which is not the next grid point for ``linspace`` spacing (or ``trailing``
when ``T % steps != 0``); ldmkit always steps to the next grid point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ldmkit.diffusion.denoiser import DiscreteVPDenoiser
from ldmkit.diffusion.schedules import SIGMA_INF_CLAMP, rescale_zero_terminal_snr

RULES = {
    "ddim": "ddim",
    "ddpm": "ddim",
    "plms": "ddim",
    "lcm": "ddim",
    "euler": "euler",
    "euler_ancestral": "euler",
    "heun": "euler",
    "dpmpp_2m": "dpm",
    "dpmpp_2m_sde": "dpm",
    "dpmpp_3m_sde": "dpm",
    "unipc": "dpm",
}


@dataclass
class SchedulerConfig:
    """The diffusers scheduler settings that decide the noise table and the sampling grid."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: absent from the file, each scheduler's default
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        """From a ``scheduler_config.json`` dict (unknown keys ignored, unsupported ones refused)."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in known and v is not None})
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler configs with trained_betas are not supported")
        cfg.validate()
        return cfg

    def to_diffusers(self, class_name: str = "DDIMScheduler") -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": class_name}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})
        if self.timestep_spacing is None:
            del out["timestep_spacing"]
        out.update(clip_sample=False, trained_betas=None)
        return out

    def validate(self) -> None:
        if self.beta_schedule not in ("scaled_linear", "linear", "squaredcos_cap_v2"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if self.timestep_spacing not in (None, "leading", "trailing", "linspace"):
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"unsupported final_sigmas_type {self.final_sigmas_type!r}")

    @property
    def prediction(self) -> str:
        """ldmkit's name of the prediction type (eps, v, x0)."""
        return {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[self.prediction_type]


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """``abar_t`` in float32, computed as diffusers computes it (so tables match bit for bit)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999
        f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)])
    if cfg.rescale_betas_zero_snr:  # Lin et al. 2024, Algorithm 1, in float32 as diffusers
        betas = rescale_zero_terminal_snr(betas)
    abar = torch.cumprod(1.0 - betas, 0)
    if cfg.rescale_betas_zero_snr:
        abar[-1] = 2**-24  # diffusers' finite stand-in for abar_T = 0
    return abar


def _sigma_table(cfg: SchedulerConfig) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) in float32, as diffusers' schedulers compute it."""
    abar = alphas_cumprod(cfg)
    return ((1 - abar) / abar) ** 0.5


def train_sigmas(cfg: SchedulerConfig) -> torch.Tensor:
    """The training sigmas (float32 arithmetic as diffusers), as float64 for the denoiser."""
    return _sigma_table(cfg).double()


def _karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5, as diffusers' ``_convert_to_karras``."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps by log-sigma interpolation (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


@dataclass
class Grid:
    """A sampling grid: ``sigmas`` (steps + 1, float32), the UNet timestep at each of the first
    ``steps`` sigmas, and the scale of the initial noise in ldmkit's VE form."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_scale: float

    @property
    def final_vp_scale(self) -> float:
        """Divide the sampler's output by this to get diffusers' (VP) latent at the last sigma."""
        return math.sqrt(1.0 + float(self.sigmas[-1]) ** 2)


def diffusers_grid(cfg: SchedulerConfig, sampler: str, steps: int) -> Grid:
    """The grid (and timesteps, and initial noise scale) diffusers uses for ``sampler``."""
    if sampler not in RULES:
        raise KeyError(f"no diffusers grid rule for sampler {sampler!r}; known: {sorted(RULES)}")
    n = cfg.num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    table = _sigma_table(cfg).numpy()  # float32, as diffusers' np.array(((1 - abar) / abar) ** 0.5)
    rule = RULES[sampler]
    # a config without timestep_spacing gets each diffusers scheduler's own default
    spacing = cfg.timestep_spacing or ("leading" if rule == "ddim" else "linspace")
    if rule == "ddim":
        if spacing == "linspace":
            ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(steps) * (n // steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
        else:
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        sigmas = table[ts].astype(np.float64)
        last = 0.0 if cfg.set_alpha_to_one else float(table[0])
        timesteps = ts.astype(np.float64)
    else:
        if rule == "euler":
            if spacing == "linspace":
                ts = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
            elif spacing == "leading":
                ts = (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float32)
                ts += cfg.steps_offset
            else:
                ts = np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
        else:  # dpm
            if spacing == "linspace":
                ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
            elif spacing == "leading":
                ratio = n // (steps + 1)
                ts = (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
                ts += cfg.steps_offset
            else:
                ts = np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
        sigmas = np.interp(ts, np.arange(n), table)
        timesteps = ts.astype(np.float64)
        if cfg.use_karras_sigmas:
            sigmas = _karras(float(sigmas[-1]), float(sigmas[0]), steps)
            timesteps = _sigma_to_t(sigmas, np.log(table))
            if rule == "dpm":
                timesteps = timesteps.round()
        last = 0.0 if cfg.final_sigmas_type == "zero" else float(table[0])
    sigmas = np.minimum(np.append(sigmas, last), SIGMA_INF_CLAMP).astype(np.float32)
    s0 = float(sigmas[0])
    # EulerDiscreteScheduler.init_noise_sigma is sigma_max for these spacings; otherwise VP
    # schedulers start from unit noise, i.e. x_ve = x_vp / sqrt(abar) = eps sqrt(1 + sigma^2)
    euler_max = rule == "euler" and spacing in ("linspace", "trailing")
    init = s0 if euler_max else math.sqrt(s0**2 + 1)
    return Grid(torch.from_numpy(sigmas), torch.from_numpy(timesteps[:steps].copy()), init)


class GridTimestepDenoiser(DiscreteVPDenoiser):
    """A discrete VP denoiser that feeds the UNet diffusers' timestep at each grid sigma.

    Between grid points (Heun's second evaluation, SDE midpoints) it falls back to log-sigma
    interpolation, as diffusers' ``_sigma_to_t`` does.
    """

    grid_sigmas: torch.Tensor | None = None
    grid_timesteps: torch.Tensor | None = None

    def use_grid(self, grid: Grid | None) -> None:
        self.grid_sigmas = None if grid is None else grid.sigmas[:-1].clone()
        self.grid_timesteps = None if grid is None else grid.timesteps.clone()

    def noise_input(self, sigma: torch.Tensor) -> torch.Tensor:
        t = self.sigma_to_t(sigma)
        if self.grid_sigmas is None:
            return t
        grid = self.grid_sigmas.to(sigma.device, sigma.dtype)
        match = sigma[:, None] == grid[None, :]
        hit = match.any(dim=1)
        if not bool(hit.any()):
            return t
        exact = self.grid_timesteps.to(sigma.device, t.dtype)[match.float().argmax(dim=1)]
        return torch.where(hit, exact, t)
