"""AutoencoderKL: the continuous first stage of LDM / Stable Diffusion (Rombach et al. 2022, Sec. 3.1).

The encoder predicts the mean and log-variance of a diagonal Gaussian posterior q(z|x); a
small KL penalty (weight ~1e-6) keeps the latent space close to N(0, I) without forcing
it to lose detail.
"""

from __future__ import annotations

import torch

from ldmkit.autoencoders.base import AutoencoderBase, AutoencoderConfig


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); log-variance clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements, one value per sample [N]."""
        var = self.std.pow(2)
        dims = tuple(range(1, self.mean.dim()))
        return 0.5 * (self.mean.pow(2) + var - 1.0 - self.logvar).sum(dim=dims)


class AutoencoderKL(AutoencoderBase):
    """Images <-> continuous latents with a KL-regularised bottleneck."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config, moment_channels=2 * config.latent_channels)

    def encode_posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """The (unscaled) posterior q(z|x)."""
        self.check_input(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def encode(
        self,
        x: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        scaled: bool = True,
    ) -> torch.Tensor:
        """Latent of ``x`` (posterior mean, or a sample); scaled for diffusion unless ``scaled=False``."""
        posterior = self.encode_posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_latents(z) if scaled else z

    def decode(self, z: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
        """Image from a latent (undoing the scale unless ``scaled=False``)."""
        if scaled:
            z = self.unscale_latents(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass: (reconstruction, KL per sample averaged over the batch, logs)."""
        posterior = self.encode_posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        recon = self.decode(z, scaled=False)
        return recon, posterior.kl().mean(), {}
