"""First-stage autoencoder losses: reconstruction + perceptual + regulariser + patch GAN.

Follows LDM's ``LPIPSWithDiscriminator`` (Rombach et al., 2022, Sec. 3.1 and App. G; code in
``ldm/modules/losses/contperceptual.py``) for ``kind="kl"`` and taming-transformers'
``VQLPIPSWithDiscriminator`` (Esser et al., 2021, Eq. 4-7) for ``kind="vq"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from ldmkit.autoencoders.perceptual import load_perceptual

__all__ = [
    "AutoencoderLoss",
    "AutoencoderLossConfig",
    "PatchDiscriminator",
    "adaptive_weight",
    "hinge_d_loss",
    "vanilla_d_loss",
]


class PatchDiscriminator(nn.Module):
    """pix2pix ``NLayerDiscriminator`` (Isola et al., 2017): a PatchGAN returning logits
    ``[N, 1, h, w]`` (``2x2`` for 32x32 inputs, ``30x30`` for 256x256 with ``n_layers=3``).

    Normalisation is GroupNorm instead of taming's BatchNorm/ActNorm: each sample is normalised
    on its own, so logits do not depend on batch size or composition (real and fake batches
    are scored separately), train and eval modes behave identically, and no running
    statistics need syncing across data-parallel ranks. Weights use DCGAN init N(0, 0.02).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False),  # bias is redundant with norm
                nn.GroupNorm(math.gcd(32, c_out), c_out),
                nn.LeakyReLU(0.2),
            ]

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            # The last hidden block keeps the resolution (stride 1), as in pix2pix.
            layers += block(channels * prev, channels * mult, 2 if n < n_layers else 1)
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _dcgan_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``(E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss (Goodfellow et al., 2014), halved as in taming."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(
    nll_loss: Tensor, g_loss: Tensor, last_layer: nn.Parameter, max_weight: float = 1e4
) -> Tensor:
    """Adaptive GAN weight of Esser et al. (2021), Eq. 7.

    ``||grad_L nll|| / (||grad_L g|| + 1e-4)`` with ``L`` the decoder's last layer, clamped to
    ``[0, max_weight]`` and detached. Returns 0 when no graph is available (``torch.no_grad``
    or evaluation without gradients).
    """
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


@dataclass
class AutoencoderLossConfig:
    """Hyper-parameters of :class:`AutoencoderLoss` (defaults follow the LDM KL-f8 config)."""

    kind: Literal["kl", "vq"] = "kl"
    pixel_loss: Literal["l1", "l2"] = "l1"
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_path: str | None = None
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    learn_logvar: bool = True
    logvar_init: float = 0.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    adaptive_max: float = 1e4


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives for KL or VQ first-stage training.

    Reductions follow the reference code so that the default weights mean what they mean there:

    * ``kind="kl"`` (LDM): ``nll = (rec / exp(logvar) + logvar)`` per pixel, **summed over
      C, H, W and averaged over the batch**; the regulariser ``reg_loss`` (``posterior.kl()``,
      shape ``[N]``) is likewise summed and divided by ``N`` (a 0-dim value is used as given).
      With these sums ``kl_weight = 1e-6`` is the paper's setting.
    * ``kind="vq"`` (taming): ``nll = mean(rec)`` over all elements, no ``logvar``; ``reg_loss``
      (the quantiser loss) is averaged and scaled by ``codebook_weight``.

    ``rec = pixel_weight * |x - x_rec|^p + perceptual_weight * lpips(x, x_rec)`` (LPIPS is
    broadcast over pixels). The frozen perceptual network is kept out of this module's state
    dict (it is a fixed, separately stored file), so checkpoints stay small.
    """

    def __init__(self, cfg: AutoencoderLossConfig, image_channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.discriminator = PatchDiscriminator(image_channels, cfg.disc_channels, cfg.disc_layers)
        self.d_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
        # A tuple, so the frozen network is not registered (not saved in every checkpoint).
        self._perceptual = (
            (load_perceptual(cfg.perceptual_path) if cfg.perceptual_weight > 0 else None),
        )
        if cfg.kind == "kl":
            logvar = torch.full((), float(cfg.logvar_init))
            if cfg.learn_logvar:
                self.logvar = nn.Parameter(logvar)
            else:
                self.register_buffer("logvar", logvar)

    @property
    def perceptual(self) -> nn.Module | None:
        return self._perceptual[0]

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Keep the unregistered perceptual network on the same device/dtype as the rest.
        if self.perceptual is not None:
            self.perceptual._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def disc_parameters(self) -> list[nn.Parameter]:
        """Parameters for the discriminator optimiser."""
        return list(self.discriminator.parameters())

    def generator_parameters(self) -> list[nn.Parameter]:
        """Trainable loss parameters for the generator optimiser (the KL ``logvar``)."""
        logvar = getattr(self, "logvar", None)
        return [logvar] if isinstance(logvar, nn.Parameter) else []

    def _disc_on(self, step: int) -> bool:
        return step >= self.cfg.disc_start

    def _frozen_disc(self, x: Tensor) -> Tensor:
        # Detached parameters: the generator update puts no gradient on the discriminator.
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (x,))

    def generator_loss(
        self,
        inputs: Tensor,
        recon: Tensor,
        *,
        reg_loss: Tensor,
        last_layer: nn.Parameter,
        step: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder (generator) objective; LDM ``optimizer_idx == 0``.

        ``total = nll + w_reg * reg + [step >= disc_start] * disc_factor * disc_weight *
        adaptive_weight * g`` with ``g = -mean(D(recon))``. Before ``disc_start`` the
        discriminator is not run and ``g``/``d_weight`` are logged as 0.
        """
        cfg = self.cfg
        n = inputs.shape[0]
        diff = inputs - recon
        pixel = diff.abs() if cfg.pixel_loss == "l1" else diff.pow(2)
        rec = cfg.pixel_weight * pixel
        logs: dict[str, Tensor] = {}
        if self.perceptual is not None:
            p_loss = self.perceptual(inputs.contiguous(), recon.contiguous())
            rec = rec + cfg.perceptual_weight * p_loss.view(n, *([1] * (inputs.ndim - 1)))
            logs["perceptual"] = p_loss.detach().mean()

        if cfg.kind == "kl":
            nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / n
            reg = reg_loss.sum() / n if reg_loss.ndim > 0 else reg_loss
            total = nll + cfg.kl_weight * reg
            logs["logvar"] = self.logvar.detach().clone()
        else:
            nll = rec.mean()
            reg = reg_loss.mean()
            total = nll + cfg.codebook_weight * reg

        zero = torch.zeros((), device=inputs.device)
        g_loss, d_weight = zero, zero
        if self._disc_on(step):
            g_loss = -self._frozen_disc(recon.contiguous()).mean()
            d_weight = cfg.disc_weight * adaptive_weight(nll, g_loss, last_layer, cfg.adaptive_max)
            total = total + cfg.disc_factor * d_weight * g_loss

        logs.update(
            loss=total.detach(),
            rec=rec.detach().mean(),
            nll=nll.detach(),
            reg=reg.detach(),
            g=g_loss.detach(),
            d_weight=d_weight.detach(),
        )
        return total, logs

    def discriminator_loss(
        self, inputs: Tensor, recon: Tensor, *, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator objective on ``inputs`` vs detached ``recon``; LDM ``optimizer_idx == 1``.

        Before ``disc_start`` returns a zero that still depends on the discriminator parameters,
        so ``backward()`` and optimiser steps work uniformly (and leave weights unchanged under
        plain SGD/Adam with zero grads and no weight decay).
        """
        if not self._disc_on(step):
            zero = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            z = zero.detach()
            return zero, {"d": z, "logits_real": z, "logits_fake": z}
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(recon.contiguous().detach())
        d_loss = self.cfg.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        logs = {
            "d": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
