"""ldmkit.accel.winograd: F(2x2, 3x3) fp32 convolutions, and their use by PackedConv2d.

Outputs are bounded against an fp64 convolution as tightly as PyTorch's own fp32 convolution
is (the transforms only add and subtract), for even and odd image sizes, with and without a
bias, non-contiguous inputs, and a weight changed after the first call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.accel import winograd
from ldmkit.accel.prepack import prepack

pytestmark = pytest.mark.skipif(not winograd.available(), reason="needs a C compiler")


def _case(n: int, c: int, k: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)
    return x, weight, torch.randn(k, generator=g)


def _bound(out: torch.Tensor, x, weight, bias) -> None:
    exact = F.conv2d(
        x.double(), weight.double(), None if bias is None else bias.double(), padding=1
    )
    plain = F.conv2d(x, weight, bias, padding=1).double() - exact
    assert out.shape == exact.shape and out.dtype == torch.float32
    assert (out.double() - exact).abs().max() <= 1.5 * plain.abs().max() + 1e-7


@pytest.mark.parametrize(
    "n,c,k,h,w,use_bias",
    [
        (2, 16, 24, 8, 8, True),
        (1, 8, 8, 7, 5, True),
        (3, 5, 4, 1, 1, False),
        (1, 32, 8, 9, 12, False),
    ],
)
def test_conv3x3_matches_fp64_as_closely_as_pytorch(n, c, k, h, w, use_bias):
    x, weight, bias = _case(n, c, k, h, w)
    bias = bias if use_bias else None
    _bound(winograd.conv3x3(x, winograd.transform_weight(weight), bias), x, weight, bias)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous input
    _bound(winograd.conv3x3(xt, winograd.transform_weight(weight), bias), xt, weight, bias)


def test_transformed_weight_is_g_g_gt():
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    g = winograd._G.double()
    u = winograd.transform_weight(weight)
    assert u.shape == (16, 3, 2)
    assert torch.allclose(u[:, 1, 0].double(), (g @ weight[1, 0] @ g.T).flatten(), atol=1e-6)


def test_worth_it_only_for_large_fp32_stride_one_convolutions():
    wide = nn.Conv2d(640, 640, 3, padding=1)
    x = torch.empty(2, 640, 16, 16)
    assert winograd.worth_it(wide, x)
    assert not winograd.worth_it(wide, x.bfloat16())
    assert not winograd.worth_it(wide, torch.empty(2, 640, 4, 4))  # 8 tiles: weight-bound
    assert not winograd.worth_it(nn.Conv2d(128, 128, 3, padding=1), torch.empty(1, 128, 64, 64))
    assert not winograd.worth_it(nn.Conv2d(640, 640, 3, stride=2, padding=1), x)
    assert not winograd.worth_it(nn.Conv2d(640, 640, 3, padding=2, dilation=2), x)
    assert not winograd.worth_it(nn.Conv2d(640, 640, 3, padding=1, groups=2), x)
    assert not winograd.worth_it(nn.Conv2d(640, 640, 1), x)
    assert not winograd.worth_it(nn.Conv2d(640, 640, 3, padding=1, padding_mode="reflect"), x)


def test_packed_conv_takes_it_and_follows_weight_changes(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_HARMONIC_CHANNELS_SMALL", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = prepack(nn.Conv2d(8, 12, 3, padding=1))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        _bound(conv(x), x, conv.weight, conv.bias)
        conv.weight.mul_(-2)  # the cached transform must be rebuilt
        _bound(conv(x), x, conv.weight, conv.bias)
    assert len(calls) == 2
    conv(x).sum().backward()  # with gradients: the plain convolution
    assert len(calls) == 2 and conv.weight.grad is not None
