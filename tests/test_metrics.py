import math

import numpy as np
import pytest
import torch

from ldmkit.eval.metrics import psnr, ssim


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float, win: int, sigma: float):
    """Direct Wang et al. (2004) SSIM: weighted statistics over every valid window."""
    coords = np.arange(win) - (win - 1) / 2
    g = np.exp(-0.5 * (coords / sigma) ** 2)
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for xi, yi in zip(x, y, strict=True):
        per_channel = []
        for a, b in zip(xi, yi, strict=True):
            pa = np.lib.stride_tricks.sliding_window_view(a, (win, win))
            pb = np.lib.stride_tricks.sliding_window_view(b, (win, win))
            mu_a = np.einsum("ijkl,kl->ij", pa, w)
            mu_b = np.einsum("ijkl,kl->ij", pb, w)
            var_a = np.einsum("ijkl,kl->ij", (pa - mu_a[..., None, None]) ** 2, w)
            var_b = np.einsum("ijkl,kl->ij", (pb - mu_b[..., None, None]) ** 2, w)
            cov = np.einsum(
                "ijkl,kl->ij", (pa - mu_a[..., None, None]) * (pb - mu_b[..., None, None]), w
            )
            s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
                (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
            )
            per_channel.append(s.mean())
        out.append(np.mean(per_channel))
    return np.array(out)


def _pair(seed: int = 0, shape=(2, 3, 24, 20)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return x, y


def test_psnr_known_mse_and_identity():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full_like(x, 0.1)
    y[1] = 0.2
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)])
    torch.testing.assert_close(psnr(x, y), expected, rtol=1e-5, atol=1e-4)
    assert torch.isinf(psnr(x, x)).all()
    assert psnr(x, y, data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_psnr_matches_numpy():
    x, y = _pair()
    mse = ((x.numpy() - y.numpy()) ** 2).reshape(2, -1).mean(1)
    np.testing.assert_allclose(psnr(x, y).numpy(), 10 * np.log10(4 / mse), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_matches_reference(dtype):
    x, y = _pair()
    ref = _ssim_reference(x.numpy(), y.numpy(), 2.0, 11, 1.5)
    got = ssim(x.to(dtype), y.to(dtype)).double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-10 if dtype == torch.float64 else 1e-5)
    assert got.shape == (2,)


def test_ssim_custom_window_and_range():
    x, y = _pair(1, shape=(1, 1, 16, 16))
    x01, y01 = (x + 1) / 2, (y + 1) / 2
    ref = _ssim_reference(x01.numpy(), y01.numpy(), 1.0, 7, 1.0)
    np.testing.assert_allclose(ssim(x01, y01, 1.0, 7, 1.0).numpy(), ref, atol=1e-10)


def test_ssim_identity_and_errors():
    x, _ = _pair()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError):
        ssim(x, x[:1])


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair()
    for i in range(2):
        ref = metrics.structural_similarity(
            x[i].numpy(),
            y[i].numpy(),
            data_range=2.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=0,
        )
        assert ssim(x, y)[i].item() == pytest.approx(ref, abs=1e-8)
