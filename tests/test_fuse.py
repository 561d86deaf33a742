"""Fused attention projections (ldmkit.accel.fuse): same outputs, same checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import perturb, randn
from ldmkit.accel.fuse import fuse_qkv
from ldmkit.denoisers.dit import DiT, DiTConfig
from ldmkit.denoisers.unet import UNet, UNetConfig
from ldmkit.nn.attention import Attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_unet_and_dit_match_unfused(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    unet = perturb(UNet(UNetConfig(in_channels=4, model_channels=16, channel_mult=(1, 2),
                                     num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
                                     context_dim=12, norm_groups=8)))  # fmt: skip
    dit = perturb(DiT(DiTConfig(in_channels=4, patch_size=2, hidden_size=16, depth=2,
                                  num_heads=2, sample_size=8, context_dim=16)))  # fmt: skip
    x, ctx, t = randn(2, 4, 8, 8), randn(2, 5, 12, seed=1), torch.tensor([3, 700])
    ctx16 = randn(2, 5, 16, seed=2)  # context as wide as the tokens: still cross-attention
    for net, c in ((unet, ctx), (dit, ctx16)):
        net = net.to(dtype)
        keys = list(net.state_dict())
        with torch.no_grad():
            ref = net(x.to(dtype), t, c.to(dtype))
            fused = fuse_qkv(copy.deepcopy(net))
            layers = [m for m in fused.modules() if isinstance(m, Attention)]
            assert layers and all(m.fused_weight is not None for m in layers)
            assert any(m.is_cross for m in layers) and any(not m.is_cross for m in layers)
            out = fused(x.to(dtype), t, c.to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: another rounding of each output
        assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
        assert list(fused.state_dict()) == keys  # fused copies are not saved
        fuse_qkv(fused, False)
        assert all(m.fused_weight is None for m in layers)
        with torch.no_grad():
            assert torch.equal(fused(x.to(dtype), t, c.to(dtype)), ref)


def test_fused_self_attention_refuses_a_separate_context() -> None:
    attn = Attention(8, None, heads=2, dim_head=4)
    attn.fuse_projections()
    with pytest.raises(ValueError, match="no separate context"):
        attn(randn(1, 3, 8), randn(1, 3, 8, seed=1))
