"""Deterministic samplers: solvers of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

Every sampler has the signature
``fn(denoise, x, sigmas, *, generator=None, callback=None, disable=True, **options) -> x``:
``denoise(x, sigma) -> x0_hat`` with ``sigma`` of shape [B], ``x`` enters as noise scaled by
``sigmas[0]``, ``sigmas`` is decreasing and ends at 0 (finite everywhere, see
:mod:`ldmkit.diffusion.schedules`). ``callback(dict(i=, x=, sigma=, denoised=))`` runs after each
model evaluation of step ``i``. Noise, where any is drawn, comes from
:func:`ldmkit.utils.random.randn_like` so per-sample generators make a sample independent of its
batch. ``disable=False`` shows a tqdm progress bar.

In this variance-exploding form one Euler step from sigma to sigma' is
``x' = D + (sigma'/sigma)(x - D)``, which is also the DDIM (eta = 0) step of a VP model and the
Euler step of a rectified-flow model; the three coincide, so ``sample_euler`` serves all three.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import trange

from ldmkit.utils.random import Generators, randn_like

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _eval(denoise: Denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Call the denoiser with sigma broadcast to shape [B]."""
    return denoise(x, sigma * x.new_ones(x.shape[0]))


def _steps(sigmas: torch.Tensor, disable: bool) -> Iterable[int]:
    return trange(len(sigmas) - 1, disable=disable)


def _report(callback: Callback | None, i: int, x, sigma, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def noise_sampler_for(
    x: torch.Tensor, generator: Generators, noise_sampler: NoiseSampler | None = None
) -> NoiseSampler:
    """``noise_sampler(sigma, sigma_next) -> unit noise like x``; default draws from ``generator``."""
    if noise_sampler is not None:
        return noise_sampler
    return lambda sigma, sigma_next: randn_like(x, generator)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE slope dx/dsigma = (x - D) / sigma (Karras et al. 2022, Alg. 2 line 7)."""
    return (x - denoised) / sigma


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, generator):
    """Karras Alg. 2 lines 4-6: raise sigma to sigma_hat = (1 + gamma) sigma by adding noise."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + randn_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler steps of Karras et al. (2022), "Elucidating the Design Space ...", Algorithm 2.

    With ``s_churn = 0`` (default) it is deterministic and equals DDIM (eta = 0).
    """
    for i in _steps(sigmas, disable):
        x, sigma_hat = _churn(
            x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, generator
        )
        denoised = _eval(denoise, x, sigma_hat)
        _report(callback, i, x, sigmas[i], denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)  # Alg. 2 line 8
    return x


@torch.no_grad()
def sample_heun(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's 2nd-order method of Karras et al. (2022), Algorithm 2 (2 evaluations per step).

    The last step to sigma = 0 is a plain Euler step (Alg. 2 line 9).
    """
    for i in _steps(sigmas, disable):
        x, sigma_hat = _churn(
            x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, generator
        )
        denoised = _eval(denoise, x, sigma_hat)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt  # Alg. 2 line 8: Euler predictor
        d_2 = to_d(x_2, sigmas[i + 1], _eval(denoise, x_2, sigmas[i + 1]))
        x = x + (d + d_2) / 2 * dt  # Alg. 2 line 11: trapezoidal corrector
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) of Lu et al. (2022), "DPM-Solver++ ...", Algorithm 2 (data prediction).

    With lambda = -log sigma and h = lambda' - lambda:
    x' = (sigma'/sigma) x - expm1(-h) D_r, where D_r = (1 + 1/2r) D_i - (1/2r) D_{i-1} and
    r = h_{i-1} / h (first order on the first step and on the final step to sigma = 0).
    """
    old_denoised = None
    for i in _steps(sigmas, disable):
        denoised = _eval(denoise, x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        d = denoised
        if old_denoised is not None and sigmas[i + 1] > 0:
            r = (t - (-sigmas[i - 1].log())) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DDIM of Song et al. (2021), "Denoising Diffusion Implicit Models", Eq. 12 with Eq. 16.

    The VP step x'_vp = sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps + s n, with
    s = eta sqrt((1 - abar')/(1 - abar)) sqrt(1 - abar/abar'), divided by sqrt(abar') and with
    abar = 1/(1 + sigma^2), reads in VE space
    x' = x0 + sqrt(sigma'^2 - sigma_up^2) eps + sigma_up n, sigma_up = eta sigma' sqrt(1 - sigma'^2/sigma^2).
    eta = 0 is deterministic and equals ``sample_euler``; eta = 1 is the DDPM posterior.
    ``noise_sampler(sigma, sigma_next)`` may replace the generator (for parity tests).
    """
    noise = noise_sampler_for(x, generator, noise_sampler)
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _eval(denoise, x, sigma)
        _report(callback, i, x, sigma, denoised)
        eps = (x - denoised) / sigma  # Eq. 12: predicted noise
        sigma_up = (eta * sigma_next * (1 - sigma_next**2 / sigma**2).clamp(min=0).sqrt()).clamp(
            max=sigma_next
        )
        x = denoised + (sigma_next**2 - sigma_up**2).sqrt() * eps  # "direction pointing to x_t"
        if eta and sigma_next > 0:
            x = x + sigma_up * noise(sigma, sigma_next)  # random noise term of Eq. 12
    return x


@torch.no_grad()
def sample_plms(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> torch.Tensor:
    """PLMS of Liu et al. (2022), "Pseudo Numerical Methods for Diffusion Models on Manifolds",
    exactly as LDM's PLMSSampler runs it.

    The pseudo step is DDIM (eta = 0) with eps replaced by eps', which in VE space is
    x' = x + (sigma' - sigma) eps'. eps' (Adams-Bashforth weights, as for uniform steps):
    1st step (no history): pseudo improved Euler, eps' = (eps(x, sigma) + eps(x_ddim, sigma'))/2,
    one extra evaluation at the DDIM-predicted x_ddim (plain eps if sigma' = 0);
    then (3e_0 - e_1)/2, (23e_0 - 16e_1 + 5e_2)/12, (55e_0 - 59e_1 + 37e_2 - 9e_3)/24.
    Only the raw eps of each step (not the extra one) enters the history, as in LDM.
    """
    old_eps: list[torch.Tensor] = []
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _eval(denoise, x, sigma)
        _report(callback, i, x, sigma, denoised)
        eps = (x - denoised) / sigma
        if not old_eps:
            eps_prime = eps
            if sigma_next > 0:
                x_ddim = x + (sigma_next - sigma) * eps
                eps_next = (x_ddim - _eval(denoise, x_ddim, sigma_next)) / sigma_next
                eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + (sigma_next - sigma) * eps_prime
        old_eps = [*old_eps[-2:], eps]
    return x


def _unipc_rhos(h: torch.Tensor, rks: list[torch.Tensor]) -> torch.Tensor:
    """Solve R rho = b for UniC's weights (B(h) = expm1(-h), "bh2"; data prediction)."""
    hh = -h
    b_h = hh.expm1()
    h_phi_k = b_h / hh - 1
    factorial = 1
    rk = torch.stack(rks)
    rows, b = [], []
    for k in range(1, len(rks) + 1):
        rows.append(rk ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.linalg.solve(torch.stack(rows), torch.stack(b))


@torch.no_grad()
def sample_unipc(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> torch.Tensor:
    """UniPC-bh2, order 2, data prediction: Zhao et al. (2023), "UniPC: A Unified
    Predictor-Corrector Framework for Fast Sampling of Diffusion Models" (UniP-2 + UniC).

    As diffusers' UniPCMultistepScheduler (solver_order=2, bh2, lower_order_final): with
    lambda = -log sigma, h = lambda' - lambda and B(h) = expm1(-h),
    UniP-2: x' = (sigma'/sigma) x - expm1(-h) D_0 - B(h) rho_p D1, rho_p = 1/2,
    D1 = (D_{-1} - D_0)/r, r = (lambda_{-1} - lambda)/h (equal to DPM-Solver++(2M));
    UniC: once D' = D(x', sigma') is known, x' is recomputed with
    ``- B(h) (rho_c[:-1] D1 + rho_c[-1] (D' - D_0))`` (rho_c = 1/2 for order 1), and D' is reused
    by the next predictor, so one evaluation per step. The first and the last step are order 1,
    and there is no corrector after the last step.
    """
    n = len(sigmas) - 1
    lam = -sigmas.clamp(min=torch.finfo(sigmas.dtype).tiny).log()
    outs: list[torch.Tensor] = []
    x_prev, order_prev = x, 1
    for i in _steps(sigmas, disable):
        denoised = _eval(denoise, x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        if outs:  # UniC on the step i-1 -> i
            h = lam[i] - lam[i - 1]
            corr = 0.0
            rho_t = torch.tensor(0.5)
            if order_prev == 2:
                r = (lam[i - 2] - lam[i - 1]) / h
                rho, rho_t = _unipc_rhos(h, [r, torch.ones_like(h)])
                corr = rho * (outs[-2] - outs[-1]) / r
            x = (sigmas[i] / sigmas[i - 1]) * x_prev - (-h).expm1() * outs[-1]
            x = x - (-h).expm1() * (corr + rho_t * (denoised - outs[-1]))
        outs = [*outs[-1:], denoised]
        order = min(2, n - i, len(outs))
        x_prev = x
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = lam[i + 1] - lam[i]  # UniP on the step i -> i+1
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        if order == 2:
            r = (lam[i - 1] - lam[i]) / h
            x = x - (-h).expm1() * 0.5 * (outs[-2] - denoised) / r
        order_prev = order
    return x
