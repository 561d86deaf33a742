"""Full-reference image metrics: PSNR and SSIM (Wang et al., 2004).

Both take batches ``[N, C, H, W]`` and return one value per image ``[N]``. The default
``data_range=2.0`` matches images scaled to ``[-1, 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim"]


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected [N, C, H, W] images, got shape {tuple(x.shape)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half precision loses too much in E[x^2] - E[x]^2; compute in at least float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio ``10 log10(R^2 / MSE)`` per image, in dB.

    Returns ``inf`` for identical images.
    """
    _check_pair(x, y)
    dtype = _compute_dtype(x)
    mse = (x.to(dtype) - y.to(dtype)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(window_size: int, sigma: float, dtype: torch.dtype, device) -> Tensor:
    coords = torch.arange(window_size, dtype=dtype, device=device) - (window_size - 1) / 2
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    return g / g.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Structural similarity index (Wang et al., 2004, Eq. 13) per image.

    Local statistics use a normalised Gaussian window (separable, ``window_size`` taps) with
    population (biased) covariances, ``K1 = 0.01``, ``K2 = 0.03``. The SSIM map is computed
    per channel over the *valid* region (no padding) and averaged over pixels and channels.
    This matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=R, channel_axis=...)``, which filters the whole
    image and then crops ``(window_size - 1) // 2`` pixels from each border.
    """
    _check_pair(x, y)
    n, c, h, w = x.shape
    if window_size > h or window_size > w:
        raise ValueError(f"window_size {window_size} exceeds image size {h}x{w}")
    dtype = _compute_dtype(x)
    x, y = x.to(dtype), y.to(dtype)
    g = _gaussian_window(window_size, sigma, dtype, x.device)
    # Depthwise separable filter: rows then columns, for all five statistics at once.
    kh = g.view(1, 1, -1, 1).repeat(5 * c, 1, 1, 1)
    kw = g.view(1, 1, 1, -1).repeat(5 * c, 1, 1, 1)
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    stats = F.conv2d(F.conv2d(stats, kh, groups=5 * c), kw, groups=5 * c)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.chunk(5, dim=1)

    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1)
