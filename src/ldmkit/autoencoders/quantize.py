"""Vector quantisation bottleneck for VQ autoencoders.

Implements the VQ-VAE quantiser (van den Oord et al., 2017, Eq. 3) in the form used by
taming-transformers' ``VectorQuantizer2`` (``legacy=False``), with optional EMA codebook updates
(VQ-VAE appendix A.1, Laplace-smoothed as in Razavi et al., 2019), optional l2-normalised codes
(Yu et al., 2022, "Vector-quantized image modeling with improved VQGAN") and dead-code restarts
from encoder outputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["VectorQuantizer"]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook quantiser with a straight-through estimator.

    ``forward(z)`` takes ``z`` of shape ``[N, C, *spatial]`` (any number of spatial dims,
    channels at dim 1, ``C == dim``) and returns ``(z_q, loss, info)``:

    * ``z_q``: quantised tensor, same shape as ``z``; gradients pass straight through to ``z``.
    * ``loss``: ``||sg(z_q) - z||^2 * beta + ||z_q - sg(z)||^2`` (means over elements). With
      ``ema=True`` the codebook term is dropped and the codebook follows EMA cluster statistics.
    * ``info``: ``indices`` (``[N, *spatial]`` long), ``perplexity`` (exp of the entropy of this
      batch's code histogram) and ``usage`` (fraction of codes hit by this batch).

    State (codebook, running usage counts, EMA statistics, step counter) lives in the state
    dict, so training resumes exactly when the caller also restores its ``torch.Generator``.
    Buffers are only updated in training mode.

    Args:
        num_codes: codebook size K.
        dim: code dimension C.
        beta: commitment weight.
        ema: update the codebook with exponential moving averages instead of gradients.
        decay: EMA decay for the codebook statistics and for the running usage counts.
        eps: Laplace smoothing constant for the EMA cluster sizes.
        dead_code_threshold: a code is dead when its running (EMA, bias-corrected) count of
            assignments per batch is below this value.
        restart_dead_codes: re-initialise dead codes from encoder outputs of the current batch.
        restart_every: check for dead codes every this many training forward calls.
        l2_normalize: match and return l2-normalised codes and inputs (cosine similarity).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        *,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        restart_dead_codes: bool = True,
        restart_every: int = 100,
        l2_normalize: bool = False,
    ) -> None:
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.dead_code_threshold = dead_code_threshold
        self.restart_dead_codes = restart_dead_codes
        self.restart_every = restart_every
        self.l2_normalize = l2_normalize

        codebook = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if ema:
            # Codebook is not trained by the optimiser; it is a function of the EMA statistics.
            # Cluster sizes start at one so that unused codes stay where they are.
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("usage", torch.zeros(num_codes))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _codes(self) -> Tensor:
        return F.normalize(self.codebook, dim=1) if self.l2_normalize else self.codebook

    def forward(
        self, z: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if z.ndim < 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected [N, {self.dim}, ...], got shape {tuple(z.shape)}")
        in_dtype = z.dtype
        # Distances and EMA statistics are precision-sensitive: keep them in float32.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.l2_normalize:
                z = F.normalize(z, dim=1)
            z_flat = z.movedim(1, -1).reshape(-1, self.dim)
            codes = self._codes()
            with torch.no_grad():
                # ||z||^2 - 2 z.e + ||e||^2 without materialising [M, K, C].
                dist = (
                    z_flat.pow(2).sum(1, keepdim=True)
                    - 2.0 * z_flat @ codes.t()
                    + codes.pow(2).sum(1)[None, :]
                )
                indices = dist.argmin(1)
            z_q_flat = F.embedding(indices, codes)
            z_q = z_q_flat.view(*z.shape[:1], *z.shape[2:], self.dim).movedim(-1, 1)

            commitment = F.mse_loss(z, z_q.detach())
            loss = self.beta * commitment
            if not self.ema:
                loss = loss + F.mse_loss(z_q, z.detach())

            counts = torch.bincount(indices, minlength=self.num_codes).float()
            if self.training:
                with torch.no_grad():
                    self._update_state(z_flat.detach(), indices, counts, generator)

            # Straight-through estimator with the same gradient as z + (z_q - z).detach(), but
            # forward values bit-exact codebook rows (z - sg(z) is exactly zero).
            z_q = z_q.detach() + (z - z.detach())

        probs = counts / counts.sum()
        info = {
            "indices": indices.view(*z.shape[:1], *z.shape[2:]),
            "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
            "usage": (counts > 0).float().mean(),
        }
        return z_q.to(in_dtype), loss, info

    def _update_state(
        self, z_flat: Tensor, indices: Tensor, counts: Tensor, generator: torch.Generator | None
    ) -> None:
        self.step += 1
        self.usage.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, z_flat)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        # One host sync per training step to read the counter.
        if self.restart_dead_codes and int(self.step) % self.restart_every == 0:
            self._restart(z_flat, generator)

    def _running_usage(self) -> Tensor:
        """Bias-corrected EMA of per-batch assignment counts (Adam-style correction)."""
        steps = int(self.step)
        if steps == 0:
            return self.usage.clone()
        return self.usage / (1.0 - self.decay**steps)

    def _restart(self, z_flat: Tensor, generator: torch.Generator | None) -> None:
        dead = (self._running_usage() < self.dead_code_threshold).nonzero().squeeze(1)
        n_dead, m = dead.numel(), z_flat.shape[0]
        if n_dead == 0:
            return
        device = generator.device if generator is not None else z_flat.device
        if m >= n_dead:
            pick = torch.randperm(m, generator=generator, device=device)[:n_dead]
        else:
            pick = torch.randint(m, (n_dead,), generator=generator, device=device)
        new = z_flat[pick.to(z_flat.device)].to(self.codebook.dtype)
        self.codebook.data[dead] = new
        # Revived codes start exactly at the threshold so they die again only if unused.
        self.usage[dead] = self.dead_code_threshold * (1.0 - self.decay ** int(self.step))
        if self.ema:
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = new

    @torch.no_grad()
    def codebook_usage(self) -> dict[str, float]:
        """Codebook health from the running usage counts.

        Returns ``perplexity`` (exp of the entropy of the normalised running usage; K means
        uniform use) and ``dead_fraction`` (fraction of codes below ``dead_code_threshold``).
        Before any training step the usage is all zero: perplexity 1, dead fraction 1.
        """
        usage = self._running_usage()
        probs = usage / usage.sum().clamp_min(1e-10)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        dead = (usage < self.dead_code_threshold).float().mean()
        return {"perplexity": float(perplexity), "dead_fraction": float(dead)}

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes for ``indices`` ``[N, *spatial]`` as a tensor ``[N, C, *spatial]``."""
        return F.embedding(indices, self._codes()).movedim(-1, 1)

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, ema={self.ema}, "
            f"l2_normalize={self.l2_normalize}"
        )
