"""Stochastic samplers: ancestral steps and SDE solvers in the variance-exploding form.

Same signature and conventions as :mod:`ldmkit.samplers.ode`. Noise comes from
``randn_like(x, generator)``; every sampler also takes ``noise_sampler(sigma, sigma_next)``
returning unit noise like ``x``, which replaces the generator (used to feed two
implementations identical noise in parity tests). ``s_noise`` scales the added noise.

k-diffusion's SDE samplers draw their noise from a ``torchsde`` Brownian tree by default, so
that noise is coherent across step sizes; here it is plain i.i.d. Gaussian noise per step,
which keeps the per-sample generator contract and has the same distribution per step.
"""

from __future__ import annotations

import torch

from ldmkit.samplers.ode import (
    Callback,
    Denoiser,
    NoiseSampler,
    _eval,
    _report,
    _steps,
    noise_sampler_for,
    to_d,
)
from ldmkit.utils.random import Generators


def ancestral_step(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the step to ``sigma_next`` into a deterministic part to ``sigma_down`` and fresh
    noise of std ``sigma_up``: sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)),
    sigma_down = sqrt(sigma'^2 - sigma_up^2) (k-diffusion's ``get_ancestral_step``).
    """
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(
        sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    )
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Ancestral DDPM of Ho et al. (2020): sample the posterior q(x_{t'} | x_t, x0_hat), Eqs. 6-7.

    For a (possibly strided) step t -> t' with abar = 1/(1 + sigma^2), Eq. 7's mean and
    variance (with alpha_t -> abar/abar', beta_t -> 1 - abar/abar', "fixed small" variance),
    divided by sqrt(abar'), become in VE space
    x' = (sigma'^2/sigma^2) x + (1 - sigma'^2/sigma^2) x0_hat + (sigma'/sigma) sqrt(sigma^2 - sigma'^2) n.
    """
    noise = noise_sampler_for(x, generator, noise_sampler)
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _eval(denoise, x, sigma)
        _report(callback, i, x, sigma, denoised)
        ratio = sigma_next**2 / sigma**2
        x = ratio * x + (1 - ratio) * denoised  # posterior mean, Eq. 7
        if sigma_next > 0:
            std = sigma_next / sigma * (sigma**2 - sigma_next**2).sqrt()  # sqrt(beta_tilde)
            x = x + std * s_noise * noise(sigma, sigma_next)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Ancestral Euler of k-diffusion (Crowson), after Song et al. (2021) ancestral sampling.

    Euler step to sigma_down, then noise of std sigma_up (:func:`ancestral_step`); eta = 1 equals
    DDPM and DDIM(eta = 1), eta = 0 equals Euler.
    """
    noise = noise_sampler_for(x, generator, noise_sampler)
    for i in _steps(sigmas, disable):
        denoised = _eval(denoise, x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: Lu et al. (2022), "DPM-Solver++ ...", Sec. 5 / App. (SDE variant),
    as in k-diffusion (``solver_type`` "midpoint" or "heun").

    With h = log(sigma/sigma'), eta_h = eta h and phi = 1 - e^{-(h + eta_h)}:
    x' = (sigma'/sigma) e^{-eta_h} x + phi D + c (D - D_prev)/r + sigma' sqrt(1 - e^{-2 eta_h}) n,
    c = phi/2 (midpoint) or 1 - phi/(h + eta_h) (heun), r = h_prev/h. The first step has no
    D_prev term; the last step to sigma = 0 returns D. eta = 0 is the ODE DPM-Solver++(2M).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise = noise_sampler_for(x, generator, noise_sampler)
    old_denoised, h_last = None, None
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _eval(denoise, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised  # final denoising step
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            phi = (-h - eta_h).expm1().neg()  # 1 - e^{-(1 + eta) h}
            x = sigma_next / sigma * (-eta_h).exp() * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = (
                    x
                    + noise(sigma, sigma_next)
                    * sigma_next
                    * (-2 * eta_h).expm1().neg().sqrt()
                    * s_noise
                )
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE as in k-diffusion: Lu et al. (2022)'s multistep data-prediction
    solver extended to third order (Taylor terms phi_2 D1 - phi_3 D2 from the last three
    denoised values) with the SDE noise of ``sample_dpmpp_2m_sde``; eta = 0 is the ODE 3M.
    """
    noise = noise_sampler_for(x, generator, noise_sampler)
    d_1 = d_2 = h_1 = h_2 = None
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _eval(denoise, x, sigma)
        _report(callback, i, x, sigma, denoised)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
            x = (-h_eta).exp() * x + (-h_eta).expm1().neg() * denoised
            phi_2 = (-h_eta).expm1() / h_eta + 1
            if h_2 is not None:  # third order
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:  # second order
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = (
                    x
                    + noise(sigma, sigma_next)
                    * sigma_next
                    * (-2 * h * eta).expm1().neg().sqrt()
                    * s_noise
                )
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_lcm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling: Song et al. (2023), "Consistency Models", Algorithm 1, in
    the form of LCM's multistep latent consistency sampling (Luo et al. 2023).

    Each step predicts x0 = D(x, sigma) and, unless sigma' = 0, re-noises it to the next level:
    x' = x0 + sigma' n (LCM's sqrt(abar') x0 + sqrt(1 - abar') n divided by sqrt(abar'); CM's
    sqrt(tau^2 - eps^2) with eps = 0).
    The consistency boundary scalings (c_skip, c_out) belong to the model's denoiser wrapper.
    Meant for consistency / distilled models; with an exact denoiser it does not converge to
    the data distribution as steps grow (each re-noise discards the posterior spread).
    """
    noise = noise_sampler_for(x, generator, noise_sampler)
    for i in _steps(sigmas, disable):
        denoised = _eval(denoise, x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
    return x
