"""ldmkit.accel.group_norm: the bf16 channels-last GroupNorm (+ SiLU) kernel and its fusion.

The kernel is bounded against fp64 by PyTorch's own bf16 error on the same input (it rounds
once, after the SiLU, so it is closer), including a mean far above the spread (the shifted
sums must not cancel), channel counts that are not multiples of 16 and no affine parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import perturb
from ldmkit.accel import group_norm as gn
from ldmkit.accel.fastpaths import prepare_for_inference
from ldmkit.denoisers.unet import UNet, UNetConfig

pytestmark = pytest.mark.skipif(
    not gn.available(), reason="needs an x86-64 CPU with AVX-512 BF16 and a C compiler"
)


def _input(shape, offset=0.0, scale=1.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale + offset
    return x.bfloat16().contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(
    "shape,groups,offset,affine",
    [
        ((2, 64, 8, 8), 32, 0.0, True),
        ((1, 40, 5, 7), 4, 0.0, True),  # 40 channels: a masked tail of 8
        ((2, 32, 6, 6), 8, 200.0, True),  # mean 200, spread 1: bf16 spacing ~1 up there
        ((1, 4, 3, 3), 2, 0.5, False),  # no affine, tiny
    ],
)
def test_matches_fp64_at_least_as_closely_as_pytorch(shape, groups, offset, affine, silu):
    x = _input(shape, offset)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape[1], generator=g).bfloat16() if affine else None
    b = torch.randn(shape[1], generator=g).bfloat16() if affine else None

    def ref(t, w, b):
        y = F.group_norm(t, groups, w, b, 1e-5)
        return F.silu(y) if silu else y

    exact = ref(x.double(), None if w is None else w.double(), None if b is None else b.double())
    with torch.inference_mode():
        ours = gn.group_norm(x, groups, w, b, 1e-5, silu)
        torchs = ref(x, w, b)
    assert ours.is_contiguous(memory_format=torch.channels_last) and ours.dtype == torch.bfloat16
    err, terr = (ours.double() - exact).abs(), (torchs.double() - exact).abs()
    assert err.mean() <= 1.05 * terr.mean() + 1e-6
    assert err.max() <= 1.5 * terr.max() + 1e-6


def test_supports_only_bf16_channels_last_inference():
    x = _input((1, 8, 4, 4))
    with torch.inference_mode():
        assert gn.supports(x)
        assert not gn.supports(x.contiguous())  # NCHW
        assert not gn.supports(x.float().contiguous(memory_format=torch.channels_last))
    xg = x.clone().requires_grad_()
    assert not gn.supports(xg)
    weight = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    assert not gn.supports(x, weight)  # a trainable weight: autograd must see the op
    with torch.no_grad():
        assert gn.supports(x, weight)


def test_fuse_keeps_state_and_function_and_unfuse_restores():
    cfg = UNetConfig(in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), num_heads=2, context_dim=12)  # fmt: skip
    torch.manual_seed(0)
    net = perturb(UNet(cfg))
    keys = list(net.state_dict())
    ref = prepare_for_inference(UNet(cfg), torch.bfloat16)
    ref.load_state_dict(net.state_dict())
    gn.unfuse(ref)
    fused = prepare_for_inference(net, torch.bfloat16)  # fuses (bf16, CPU)
    norms = [m for m in fused.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(m) is gn.NativeGroupNorm for m in norms)
    assert any(m.fused_silu for m in norms)
    assert sum(type(m) is gn.FusedSiLU for m in fused.modules()) == sum(m.fused_silu for m in norms)
    assert list(fused.state_dict()) == keys
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g).bfloat16()
    t, ctx = torch.tensor([10, 500]), torch.randn(2, 7, 12, generator=g).bfloat16()
    with torch.inference_mode():
        a, b = fused(x, t, ctx).float(), ref(x, t, ctx).float()
    assert (a - b).abs().mean() <= 0.02 * b.abs().mean()  # bf16: rounding-level differences
    gn.unfuse(fused)
    assert not any(type(m) in (gn.NativeGroupNorm, gn.FusedSiLU) for m in fused.modules())
    with torch.inference_mode():
        assert torch.equal(fused(x, t, ctx), ref(x, t, ctx))


def test_fallback_path_applies_the_fused_silu():
    norm = nn.GroupNorm(4, 8)
    act = nn.SiLU()
    gn.fuse(nn.Sequential(norm, act))
    assert type(norm) is gn.NativeGroupNorm and norm.fused_silu and type(act) is gn.FusedSiLU
    x = torch.randn(2, 8, 3, 3, requires_grad=True)  # fp32 with gradients: PyTorch's ops
    y = act(norm(x))
    assert torch.allclose(y, F.silu(F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)))
    y.sum().backward()
    assert x.grad is not None
