"""Parameterization wrappers: every network answers ``denoise(x, sigma, cond) -> x0_hat``.

The contract is the one of Karras et al. 2022 (EDM) and k-diffusion: ``x = x0 + sigma * eps``
(variance-exploding form) and the wrapper returns the denoised estimate

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))   (EDM Eq. 7)

where ``F`` is the raw network. The parameterization (eps, v, x0, EDM, rectified flow) lives
entirely in the four scalings; samplers and guidance only ever see ``D``.

Training uses the same scalings (EDM Eq. 8): the raw network is regressed onto

    F_target = (x0 - c_skip * x) / c_out          (``prediction_target``)

and ``|D - x0|^2 = c_out^2 * |F - F_target|^2``. So a plain MSE on the network output equals an
MSE on x0 weighted by ``1 / c_out^2``; that x0-space weight is ``loss_weight(sigma)``. An
objective that wants the x0-space weighting ``w(sigma)`` (min-SNR, EDM, ...) therefore multiplies
the network-space MSE by ``w(sigma) / loss_weight(sigma)`` (see ``objectives.py``).

Conditioning ``cond`` is a dict: ``crossattn`` [B, L, D] -> ``context``, ``crossattn_mask``
[B, L] -> ``context_mask``, ``vector`` [B, D] or class labels ``class`` [B] (Long) -> ``y``,
``concat`` [B, C, *S] -> concatenated on channels to the *scaled* input ``c_in * x``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor, nn

# Finite stand-in for sigma = inf (abar = 0, flow t = 1), sigma ~ 4096 as diffusers uses.
from ldmkit.diffusion.schedules import SIGMA_INF_CLAMP

Cond = dict[str, Tensor]

COND_KEYS = ("crossattn", "crossattn_mask", "vector", "class", "concat")


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample tensor [B] to [B, 1, ..., 1] with ``ndim`` dims in total."""
    return v.reshape(v.shape[0], *([1] * (ndim - v.ndim)))


def compute_dtype(x: Tensor) -> torch.dtype:
    """Scalings are computed in float32 (float64 when ``x`` is float64), never in half."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` as a [B] tensor on ``x``'s device in the compute dtype (scalars broadcast)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=compute_dtype(x))
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or [B]={x.shape[0]}, got {tuple(sigma.shape)}")
    return sigma


def network_kwargs(cond: Cond | None) -> dict[str, Any]:
    """Map a cond dict to the keyword arguments of ``net(x, c_noise, context=, y=, ...)``."""
    cond = cond or {}
    unknown = set(cond) - set(COND_KEYS)
    if unknown:
        raise KeyError(f"unknown cond keys {sorted(unknown)}; known: {', '.join(COND_KEYS)}")
    if "class" in cond and "vector" in cond:
        raise ValueError("cond has both 'class' and 'vector'; the network takes one y")
    kwargs: dict[str, Any] = {
        "context": cond.get("crossattn"),
        "y": cond.get("class", cond.get("vector")),
    }
    if "crossattn_mask" in cond:  # only passed when present, so simple nets need not accept it
        kwargs["context_mask"] = cond["crossattn_mask"]
    return kwargs


class Denoiser(nn.Module, ABC):
    """A network wrapped into the EDM denoiser ``D(x, sigma, cond) -> x0_hat`` (EDM Eq. 7).

    Subclasses define ``scalings`` (c_skip, c_out, c_in) and ``noise_input`` (c_noise).
    ``[sigma_min, sigma_max]`` is the finite noise range the model knows: sampling grids start
    at ``x = sigma_max * eps`` and end at ``sigma_min`` (then 0). ``sigma_data`` is the data std
    the input scaling assumes (1 for VP and flow models, whose latents have unit variance).
    """

    parameterization: str
    sigma_data: float = 1.0

    def __init__(self, net: nn.Module, sigma_min: float, sigma_max: float):
        super().__init__()
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        self.net = net
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    @abstractmethod
    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` for a [B] tensor of noise levels, each [B]."""

    @abstractmethod
    def noise_input(self, sigma: Tensor) -> Tensor:
        """``c_noise``: what the network receives as its timestep, [B]."""

    def prediction_target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """What ``F`` should output for ``x = x0 + sigma * noise`` (EDM Eq. 8)."""
        sigma = batch_sigma(sigma, x0)
        c_skip, c_out, _ = (append_dims(c, x0.ndim) for c in self.scalings(sigma))
        x = x0 + append_dims(sigma, x0.ndim) * noise
        return (x0 - c_skip * x) / c_out

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """x0-space weight ``1 / c_out^2`` implied by a plain MSE on the network output.

        ``MSE(F, F_target) = loss_weight * MSE(D, x0)``; for EDM this is Karras' lambda(sigma)
        (``lambda * c_out^2 = 1``), for eps-prediction it is the SNR ``1 / sigma^2``.
        """
        return self.scalings(sigma)[1].pow(-2)

    def model_output(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        """The raw network output ``F(c_in * x [cat concat], c_noise, ...)``."""
        sigma = batch_sigma(sigma, x)
        c_in = append_dims(self.scalings(sigma)[2], x.ndim)
        x_in = (c_in * x.to(sigma.dtype)).to(x.dtype)
        if cond and "concat" in cond:
            x_in = torch.cat([x_in, cond["concat"].to(x_in.dtype)], dim=1)
        return self.net(x_in, self.noise_input(sigma), **network_kwargs(cond))

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        """``x0_hat = c_skip * x + c_out * F`` (EDM Eq. 7), in ``x``'s dtype."""
        sigma = batch_sigma(sigma, x)
        c_skip, c_out, _ = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        out = self.model_output(x, sigma, cond).to(sigma.dtype)
        return (c_skip * x.to(sigma.dtype) + c_out * out).to(x.dtype)


class DiscreteVPDenoiser(Denoiser):
    """A discrete-time VP model (DDPM/LDM/SD) trained on timesteps t in {0, ..., n-1}.

    With ``abar_t`` the cumulative alphas, ``sigma_t = sqrt((1 - abar_t) / abar_t)`` and the VP
    state is ``x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps = x / sqrt(sigma^2 + 1)``, so
    ``c_in = 1 / sqrt(sigma^2 + 1)`` for every prediction type. Writing ``a = sqrt(abar)``,
    ``s = sqrt(1 - abar)``:

    - ``eps`` (Ho et al. 2020, Eq. 14): ``x0 = (x_vp - s F) / a = x - sigma F``, so
      ``c_skip = 1, c_out = -sigma``; target ``eps``.
    - ``v`` (Salimans & Ho 2022, §4 / App. D): ``v = a eps - s x0`` and ``x0 = a x_vp - s F``
      ``= x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) F``, so ``c_skip = 1 / (sigma^2 + 1)``,
      ``c_out = -sigma / sqrt(sigma^2 + 1)``.
    - ``x0``: ``F`` is the clean sample itself, ``c_skip = 0, c_out = 1`` (input still VP-scaled).

    ``c_noise`` is the fractional timestep of ``sigma``, by linear interpolation of log-sigma over
    ``train_sigmas`` (k-diffusion ``DiscreteSchedule.sigma_to_t``), rounded if
    ``quantize_timesteps``.

    Zero terminal SNR (Lin et al. 2024): an infinite last training sigma (``abar_T = 0``) is
    replaced by the finite stand-in of diffusers (``abar_T = 2**-24``, sigma ~ 4096), so
    ``sigma_max`` stays finite and samplers can start at ``sigma_max * eps``. There, for ``v``,
    ``c_skip ~ 6e-8`` and ``c_out ~ -1``: D is minus the network output, which the training target
    ``v ~ -x0`` makes the data mean given pure noise (Lin et al. §3.2). ``eps``-prediction is
    refused on such schedules: it cannot recover x0 from pure noise (Lin et al. §3.2).
    """

    def __init__(
        self,
        net: nn.Module,
        train_sigmas: Tensor,
        prediction: Literal["eps", "v", "x0"] = "eps",
        quantize_timesteps: bool = False,
    ):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
        sigmas = torch.as_tensor(train_sigmas, dtype=torch.float64).flatten().clone()
        if len(sigmas) < 2 or not (sigmas[0] > 0 and (sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("train_sigmas must be positive and strictly increasing, length >= 2")
        if math.isinf(sigmas[-1]):
            if prediction == "eps":
                raise ValueError(
                    "zero-terminal-SNR schedule (last sigma infinite) needs prediction='v' or 'x0'"
                )
            sigmas[-1] = SIGMA_INF_CLAMP
        if not torch.isfinite(sigmas).all():
            raise ValueError("only the last training sigma may be infinite")
        super().__init__(net, float(sigmas[0]), float(sigmas[-1]))
        self.parameterization = prediction
        self.quantize_timesteps = quantize_timesteps
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        # Same float32 log as in sigma_to_t, so a training sigma maps to its exact integer t.
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None) -> Tensor:
        """Fractional timestep of ``sigma`` (log-sigma interpolation, clamped to [0, n-1])."""
        quantize = self.quantize_timesteps if quantize is None else quantize
        log_sigmas = self.log_sigmas.to(sigma.dtype)
        log_sigma = sigma.log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(
            0, len(log_sigmas) - 2
        )
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        t = low.to(sigma.dtype) + w
        return t.round() if quantize else t

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of ``sigma_to_t``: log-linear interpolation of ``train_sigmas`` at ``t``."""
        t = t.float().clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return log_sigma.exp()

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = (sigma**2 + 1).rsqrt()
        if self.parameterization == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        if self.parameterization == "v":
            return c_in**2, -sigma * c_in, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def noise_input(self, sigma: Tensor) -> Tensor:
        return self.sigma_to_t(sigma)

    def prediction_target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """eps: ``noise``; v: ``a noise - s x0`` (Salimans & Ho 2022, §4); x0: ``x0``."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x0
        sigma = append_dims(batch_sigma(sigma, x0), x0.ndim)
        a = (sigma**2 + 1).rsqrt()  # sqrt(abar)
        return a * noise - sigma * a * x0  # sqrt(1 - abar) = sigma * sqrt(abar)


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours" column).

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4`` with ``sd = sigma_data``.
    ``c_in`` gives the network unit-variance input and ``c_out`` a unit-variance target.
    """

    parameterization = "edm"

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ):
        super().__init__(net, sigma_min, sigma_max)
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_in = (sigma**2 + sd2).rsqrt()
        return sd2 * c_in**2, sigma * self.sigma_data * c_in, c_in

    def noise_input(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4


class FlowDenoiser(Denoiser):
    """Rectified flow (Liu et al. 2022; Esser et al. 2024, SD3 §2): velocity prediction.

    The flow state is ``x_t = (1 - t) x0 + t eps`` and the network predicts ``v = eps - x0``, so
    ``x0 = x_t - t v``. In the VE contract ``sigma = t / (1 - t)`` and ``x = x_t / (1 - t)``
    (``= x0 + sigma eps``); hence ``t = sigma / (1 + sigma)``, ``x_t = x / (1 + sigma)`` and

        c_in = 1 / (1 + sigma),  c_skip = 1 / (1 + sigma),  c_out = -sigma / (1 + sigma) = -t,
        c_noise = t_scale * t   (SD3 feeds t * 1000).

    Unlike VP/EDM, ``c_in`` does not give unit input variance: ``Var(x_t) = (1-t)^2 + t^2``.
    t = 1 (pure noise) is sigma = inf; the default ``sigma_max`` is the finite stand-in
    ``SIGMA_INF_CLAMP`` ~ 4096 (t = 1 - 2.4e-4), ``sigma_min`` ~ t = 1e-3 as in diffusers.
    Timestep shift (SD3 §5.3.2) is ``sigma -> shift * sigma``: a property of the sigma grid or of
    training noise sampling, not of this wrapper.
    """

    parameterization = "flow"

    def __init__(
        self,
        net: nn.Module,
        t_scale: float = 1000.0,
        sigma_min: float = 1e-3,
        sigma_max: float = SIGMA_INF_CLAMP,
    ):
        super().__init__(net, sigma_min, sigma_max)
        self.t_scale = float(t_scale)

    @staticmethod
    def sigma_to_t(sigma: Tensor) -> Tensor:
        return sigma / (1 + sigma)

    @staticmethod
    def t_to_sigma(t: Tensor) -> Tensor:
        return t / (1 - t)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = 1 / (1 + sigma)
        return c_in, -sigma * c_in, c_in

    def noise_input(self, sigma: Tensor) -> Tensor:
        return self.t_scale * self.sigma_to_t(sigma)

    def prediction_target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """The velocity ``v = eps - x0`` (independent of sigma)."""
        return noise - x0


DENOISER_KINDS = ("eps", "v", "x0", "edm", "flow")


def build_denoiser(kind: str, net: nn.Module, **kwargs: Any) -> Denoiser:
    """Wrap ``net``: ``eps``/``v``/``x0`` need ``train_sigmas=``; ``edm`` and ``flow`` take
    their own options (``sigma_data``, ``t_scale`` ...)."""
    if kind in ("eps", "v", "x0"):
        if "train_sigmas" not in kwargs:
            raise TypeError(f"a discrete VP denoiser ({kind!r}) needs train_sigmas=")
        return DiscreteVPDenoiser(net, prediction=kind, **kwargs)
    if kind == "edm":
        return EDMDenoiser(net, **kwargs)
    if kind == "flow":
        return FlowDenoiser(net, **kwargs)
    raise ValueError(f"unknown denoiser kind {kind!r}; choose one of {', '.join(DENOISER_KINDS)}")
