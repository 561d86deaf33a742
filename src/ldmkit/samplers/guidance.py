"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans, 2022).

``CFGDenoiser(model, cond, uncond, scale)`` turns ``model(x, sigma, cond) -> x0_hat`` into the
sampler contract ``denoise(x, sigma) -> x0_hat``. It evaluates the conditional and the
unconditional branch in one batched call on ``cat([x, x])`` and returns
``D_u + scale (D_c - D_u)``: scale 1 is the conditional model (and skips the unconditional
pass), scale 0 the unconditional one. A negative prompt is just a different ``uncond``.

Guidance on x0 equals guidance on eps (and on v) for a fixed sigma: eps = (x - D)/sigma is affine
in D with the same x for both branches, and the weights (1 - s, s) sum to 1, so
eps_u + s (eps_c - eps_u) = (x - [D_u + s (D_c - D_u)])/sigma.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
RescaleSpace = Literal["x0", "eps", "v"]


def tree_cat(a: Any, b: Any) -> Any:
    """Concatenate two pytrees (dicts, lists, tuples of tensors) along dim 0, leaf by leaf.

    Non-tensor leaves (None, ints, strings) must be equal in both and are kept as they are.
    """
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"cond and uncond have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: tree_cat(a[k], b[k]) for k in a}
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            raise ValueError("cond and uncond have different lengths")
        return type(a)(tree_cat(u, v) for u, v in zip(a, b, strict=True))
    if a != b:
        raise ValueError(f"cond and uncond differ in a non-tensor leaf: {a!r} vs {b!r}")
    return a


def _affine(space: RescaleSpace, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with prediction = a x + b x0 in ``space``, for VE x = x0 + sigma eps.

    eps = (x - x0)/sigma; v = alpha eps - sigma_vp x0 = (x - (1 + sigma^2) x0) / (sigma sqrt(1 + sigma^2)).
    """
    if space == "x0":
        return torch.zeros_like(sigma), torch.ones_like(sigma)
    if space == "eps":
        return 1 / sigma, -1 / sigma
    if space == "v":
        root = (1 + sigma**2).sqrt()
        return 1 / (sigma * root), -root / sigma
    raise ValueError(f"rescale_space must be 'x0', 'eps' or 'v', got {space!r}")


def rescale_guidance(
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: torch.Tensor,
    guided: torch.Tensor,
    phi: float,
    space: RescaleSpace = "x0",
) -> torch.Tensor:
    """Guidance rescale of Lin et al. (2023), "Common Diffusion Noise Schedules ...", Sec. 3.4.

    In ``space``: p_final = phi * p_cfg * std(p_cond)/std(p_cfg) + (1 - phi) p_cfg, with the std
    taken per sample over all non-batch dims; returned mapped back to an x0 prediction.
    ``sigma`` has shape [B].
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    a, b = (t.reshape(shape).to(x.dtype) for t in _affine(space, sigma))
    p_cond, p_cfg = a * x + b * cond, a * x + b * guided
    dims = tuple(range(1, x.ndim))
    ratio = p_cond.std(dims, keepdim=True) / p_cfg.std(dims, keepdim=True)
    p_final = p_cfg * (phi * ratio + (1 - phi))  # x_rescaled, then x_final, fused
    return (p_final - a * x) / b


class CFGDenoiser:
    """Classifier-free guidance around ``model(x, sigma, cond) -> x0_hat``.

    Args:
        model: the conditional denoiser.
        cond, uncond: conditioning pytrees (dicts, lists, tuples of tensors, batched on dim 0),
            concatenated as ``cat(cond, uncond)`` for the single batched call.
        scale: guidance scale s; the result is D_u + s (D_c - D_u). s = 1 skips the
            unconditional pass (one call of batch B).
        rescale: guidance-rescale phi in [0, 1] (Lin et al. 2023); 0 is plain CFG.
        rescale_space: where the std ratio is measured. The paper writes the rule on its model's
            prediction of x; "x0" (default) applies it to x0, "v" does it on v (as ComfyUI's
            RescaleCFG), "eps" on eps (as diffusers' ``rescale_noise_cfg`` for eps models).
        interval: ``(sigma_lo, sigma_hi)``: guide only where sigma_lo < sigma <= sigma_hi
            (Kynkäänniemi et al. 2024); elsewhere return the conditional prediction, computed
            with one call of batch B when no sample of the batch is inside the interval.
    """

    def __init__(
        self,
        model: Model,
        cond: Any,
        uncond: Any,
        scale: float,
        *,
        rescale: float = 0.0,
        rescale_space: RescaleSpace = "x0",
        interval: tuple[float, float] | None = None,
    ) -> None:
        _affine(rescale_space, torch.ones(1))  # validate early
        self.model, self.cond, self.uncond, self.scale = model, cond, uncond, scale
        self.rescale, self.rescale_space, self.interval = rescale, rescale_space, interval
        self._both = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        inside = torch.ones_like(sigma, dtype=torch.bool)
        if self.interval is not None:
            lo, hi = self.interval
            inside = (sigma > lo) & (sigma <= hi)
        if self.scale == 1 or not bool(inside.any()):
            return self.model(x, sigma, self.cond)
        if self._both is None:
            self._both = tree_cat(self.cond, self.uncond)
        d_cond, d_uncond = self.model(
            torch.cat([x, x]), torch.cat([sigma, sigma]), self._both
        ).chunk(2)
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        if self.rescale:
            guided = rescale_guidance(x, sigma, d_cond, guided, self.rescale, self.rescale_space)
        mask = inside.reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.where(mask, guided, d_cond)
