"""Training objectives for the denoisers of ``denoiser.py``, independent of the network.

One step (EDM Eq. 8, written for every parameterization):

1. draw a noise level ``sigma`` per sample (``sample_sigmas``) and noise ``n`` (plus offset
   noise), and form ``x = x0 + sigma * n`` (VE form; the wrapper applies its own input scaling);
2. drop the condition of some samples (classifier-free guidance training, Ho & Salimans 2021);
3. regress the raw network output ``F`` onto ``denoiser.prediction_target(x0, n, sigma)``;
4. weight each sample by ``w(sigma) / denoiser.loss_weight(sigma)``, where ``w`` is the chosen
   weighting *in x0 space* and ``loss_weight = 1 / c_out^2`` is the x0-space weight that a plain
   MSE on ``F`` already carries. "uniform" keeps the natural loss (factor 1: eps-MSE, v-MSE,
   x0-MSE, EDM's lambda, flow velocity-MSE).

All randomness comes from ``ldmkit.utils.random`` (one generator, or one per sample); uniform
variates are made from normals through the normal CDF. Losses are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from ldmkit.diffusion.denoiser import Cond, Denoiser, DiscreteVPDenoiser, append_dims
from ldmkit.utils.random import Generators, randn

# A null condition: tensors broadcast to one row, or a plain null class index.
NullCond = dict[str, Tensor | int]

# Noise-level samplers that make sense for each parameterization (see ``sample_sigmas``).
ALLOWED_SAMPLING = {
    "eps": ("uniform_t", "logit_normal"),
    "v": ("uniform_t", "logit_normal"),
    "x0": ("uniform_t", "logit_normal"),
    "edm": ("lognormal",),
    "flow": ("uniform_t", "logit_normal", "lognormal"),
}


@dataclass
class DiffusionObjectiveConfig:
    """How a diffusion model is trained.

    ``noise_sampling``: ``uniform_t`` (integer t for discrete VP, t ~ U(0, 1) for flow),
    ``lognormal`` (EDM: ``ln sigma ~ N(p_mean, p_std^2)``), ``logit_normal`` (SD3 §3.1:
    ``logit t ~ N(logit_mean, logit_std^2)``). ``time_shift`` (flow only, SD3 §5.3.2) maps
    ``t -> s t / (1 + (s - 1) t)``, i.e. ``sigma -> s sigma``. ``loss_weighting`` is ``uniform``
    (the parameterization's own loss), ``min_snr`` (Hang et al. 2023) or ``edm`` (Karras et al.
    2022). ``cond_dropout`` is the probability of the null condition (CFG); ``offset_noise`` the
    std of a per-channel constant added to the noise (Guttenberg 2023).
    """

    # None: the model's (a recipe's objective follows its model.parameterization)
    parameterization: Literal["eps", "v", "x0", "edm", "flow"] | None = None
    noise_sampling: Literal["uniform_t", "lognormal", "logit_normal"] = "uniform_t"
    p_mean: float = -1.2
    p_std: float = 1.2
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_shift: float = 1.0
    loss_weighting: Literal["uniform", "min_snr", "edm"] = "uniform"
    min_snr_gamma: float = 5.0
    cond_dropout: float = 0.1
    offset_noise: float = 0.0
    loss: Literal["l2", "l1"] = "l2"

    def validate(self) -> None:
        self._validate_common()
        if self.parameterization is None:  # checked again once the model's is known
            return
        allowed = ALLOWED_SAMPLING[self.parameterization]
        if self.noise_sampling not in allowed:
            hint = {
                "lognormal": "a discrete VP model only knows its n training sigmas",
                "uniform_t": "EDM has no time variable",
                "logit_normal": "EDM has no time variable (for flow, logit-normal t is lognormal"
                " sigma)",
            }[self.noise_sampling]
            raise ValueError(
                f"noise_sampling={self.noise_sampling!r} does not fit "
                f"parameterization={self.parameterization!r} ({hint}); use one of {allowed}"
            )
        if self.time_shift != 1.0 and self.parameterization != "flow":
            raise ValueError("time_shift applies to parameterization='flow' only")

    def _validate_common(self) -> None:
        for name in ("p_std", "logit_std", "time_shift", "min_snr_gamma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.cond_dropout <= 1:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if self.offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {self.offset_noise}")


def _check(denoiser: Denoiser, cfg: DiffusionObjectiveConfig) -> DiffusionObjectiveConfig:
    """``cfg`` for ``denoiser`` (parameterization filled in when unset), validated."""
    if cfg.parameterization is None:
        cfg = replace(cfg, parameterization=denoiser.parameterization)
    cfg.validate()
    if denoiser.parameterization != cfg.parameterization:
        raise ValueError(
            f"config parameterization {cfg.parameterization!r} but the denoiser is "
            f"{denoiser.parameterization!r}"
        )
    return cfg


def sample_sigmas(
    denoiser: Denoiser,
    batch: int,
    generator: Generators,
    cfg: DiffusionObjectiveConfig,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Training noise levels, float32 [batch]. One normal draw per sample.

    - discrete VP (eps/v/x0): ``uniform_t`` draws t uniformly from {0..n-1} (DDPM, Ho et al.
      2020, Alg. 1), ``logit_normal`` draws u = sigmoid(m + s N) and uses t = round(u (n-1));
      sigma = train_sigmas[t]. ``lognormal`` is refused (sigmas off the training grid).
    - edm: ``lognormal`` only, ``sigma = exp(p_mean + p_std N)`` (Karras et al. 2022, Table 1).
    - flow: ``uniform_t`` t ~ U(0, 1) (Liu et al. 2022); ``logit_normal`` (SD3 §3.1) and
      ``lognormal`` are the same family, since ``ln sigma = logit t``; then ``sigma *= time_shift``.
    """
    cfg = _check(denoiser, cfg)
    z = randn([batch], generator, dtype=torch.float64)
    if isinstance(denoiser, DiscreteVPDenoiser):
        n = denoiser.num_timesteps
        if cfg.noise_sampling == "uniform_t":
            t = (torch.special.ndtr(z) * n).floor().clamp(max=n - 1)
        else:
            t = (torch.sigmoid(cfg.logit_mean + cfg.logit_std * z) * (n - 1)).round()
        sigmas = denoiser.sigmas[t.long().to(denoiser.sigmas.device)]
    elif cfg.noise_sampling == "uniform_t":  # flow: u / (1 - u) via both tails, finite for any z
        sigmas = torch.special.ndtr(z) / torch.special.ndtr(-z)
    elif cfg.noise_sampling == "logit_normal":
        sigmas = torch.exp(cfg.logit_mean + cfg.logit_std * z)
    else:
        sigmas = torch.exp(cfg.p_mean + cfg.p_std * z)
    return (sigmas * cfg.time_shift).to(device=device, dtype=torch.float32)


def loss_weights(denoiser: Denoiser, sigma: Tensor, cfg: DiffusionObjectiveConfig) -> Tensor:
    """Per-sample factor on the network-space loss: ``w(sigma) / denoiser.loss_weight(sigma)``.

    x0-space weights ``w`` (SNR = 1 / sigma^2 in every parameterization):
    ``min_snr``: ``min(SNR, gamma)`` (Hang et al. 2023), which gives ``min(SNR, gamma) / SNR`` for
    eps and ``min(SNR, gamma) / (SNR + 1)`` for v; ``edm``: ``(sigma^2 + sd^2) / (sigma sd)^2``
    (Karras et al. 2022, Eq. 8 / Table 1) with ``sd = denoiser.sigma_data``.
    """
    if cfg.loss_weighting == "uniform":
        return torch.ones_like(sigma)
    if cfg.loss_weighting == "min_snr":
        w = sigma.pow(-2).clamp(max=cfg.min_snr_gamma)
    else:
        sd = denoiser.sigma_data
        w = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return w / denoiser.loss_weight(sigma)


def drop_condition(cond: Cond, null_cond: NullCond | None, drop: Tensor) -> Cond:
    """Replace the rows ``drop`` [B] (bool) of each cond tensor by the null condition.

    Keys present in ``null_cond`` are dropped (values broadcast to the rows: [1, ...], [...] or
    a plain class index). Without ``null_cond``, float ``crossattn``/``vector`` are zeroed (the
    sgm convention) and every other key is kept; class labels need an explicit null index.
    """
    out = dict(cond)
    for key, value in cond.items():
        if null_cond is not None:
            if key not in null_cond:
                continue
            null = torch.as_tensor(null_cond[key], device=value.device, dtype=value.dtype)
        elif key in ("crossattn", "vector") and value.is_floating_point():
            null = torch.zeros((), device=value.device, dtype=value.dtype)
        elif key in ("class", "vector"):
            raise ValueError(
                f"cond[{key!r}] holds class labels: pass null_cond with the null class"
            )
        else:
            continue
        out[key] = torch.where(append_dims(drop, value.ndim), null.expand_as(value), value)
    return out


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    cond: Cond | None,
    generator: Generators,
    cfg: DiffusionObjectiveConfig,
    *,
    null_cond: NullCond | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The denoising loss of one batch ``x0`` [B, C, *S] (or [B, D]) and its logs.

    Returns ``(loss, logs)``: ``loss`` is the weighted mean (see the module docstring);
    ``logs`` holds detached scalars ``loss`` and ``loss_unweighted`` (plain network-space
    loss). The noise is ``n + offset_noise * m`` with ``m`` constant over each channel.
    """
    cfg = _check(denoiser, cfg)
    x0 = x0.float()
    batch, device = x0.shape[0], x0.device
    sigma = sample_sigmas(denoiser, batch, generator, cfg, device=device)
    noise = randn(x0.shape, generator, device=device)
    if cfg.offset_noise > 0:
        shape = [batch, x0.shape[1]] + [1] * (x0.ndim - 2)
        noise = noise + cfg.offset_noise * randn(shape, generator, device=device)
    if cond and cfg.cond_dropout > 0:
        drop = torch.special.ndtr(randn([batch], generator, device=device)) < cfg.cond_dropout
        cond = drop_condition(cond, null_cond, drop)

    x = x0 + append_dims(sigma, x0.ndim) * noise
    out = denoiser.model_output(x, sigma, cond).float()
    target = denoiser.prediction_target(x0, noise, sigma).float()
    err = (out - target).abs() if cfg.loss == "l1" else (out - target) ** 2
    per_sample = err.flatten(1).mean(1)
    loss = (loss_weights(denoiser, sigma, cfg) * per_sample).mean()
    logs = {"loss": loss.detach(), "loss_unweighted": per_sample.mean().detach()}
    return loss, logs
