"""ldmkit.accel.compile: one compiled graph for every batch size and resolution.

The first test traces with the ``aot_eager`` backend (dynamo's guards and AOT autograd's
graph, no code generation: seconds), the second runs inductor itself (minutes on 2 cores),
which is where dynamic shapes used to fail.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from helpers import perturb
from ldmkit.accel.compile import compile_network
from ldmkit.accel.fastpaths import prepare_for_inference
from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.denoisers.dit import DiT, DiTConfig
from ldmkit.denoisers.unet import UNet, UNetConfig

CTX = 12


def unet() -> UNet:
    """A transformer at the first level, so a Downsample convolution reads its output, and a
    1x1-convolution projection (the SD 1.5 layout's)."""
    cfg = UNetConfig(in_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(0,), num_heads=2, context_dim=CTX,
                     norm_groups=8)  # fmt: skip
    torch.manual_seed(0)
    return prepare_for_inference(perturb(UNet(cfg)))


def dit() -> DiT:
    cfg = DiTConfig(in_channels=4, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                    sample_size=8, context_dim=CTX)  # fmt: skip
    torch.manual_seed(0)
    return prepare_for_inference(perturb(DiT(cfg)))


def vae() -> AutoencoderKL:
    cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                            latent_channels=4, mid_attention=True)  # fmt: skip
    torch.manual_seed(0)
    return prepare_for_inference(perturb(AutoencoderKL(cfg)))


def denoiser_args(b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(b * 1000 + h * 10 + w)
    x = torch.randn(b, 4, h, w, generator=g)
    return x, torch.full((b,), 500), torch.randn(b, 7, CTX, generator=g)


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()  # (reset keeps them)
    yield
    torch._dynamo.reset()


# batch 1 (which dynamo specialises by default), non-square, odd (UNet skips of unequal size)
SHAPES = [(2, 16, 16), (3, 24, 16), (1, 8, 40), (2, 18, 14)]


@pytest.mark.parametrize("make", [unet, dit])
def test_one_graph_serves_every_batch_size_and_resolution(make) -> None:
    net = make()
    comp = compile_network(net, backend="aot_eager")
    for shape in SHAPES:
        args = denoiser_args(*shape)
        with torch.inference_mode():
            torch.testing.assert_close(comp(*args), net(*args), atol=1e-5, rtol=1e-5)
    assert graphs() == 1
    assert comp.config is net.config  # attributes reach the wrapped network


@torch.inference_mode()
def test_one_graph_serves_every_latent_size_for_the_vae_decoder() -> None:
    model = vae()
    decode = compile_network(model.decode, backend="aot_eager")
    for b, h, w in ((1, 8, 8), (2, 12, 8), (1, 5, 9)):
        z = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(h))
        torch.testing.assert_close(decode(z), model.decode(z), atol=1e-5, rtol=1e-5)
    assert graphs() == 1


@torch.inference_mode()
def test_plain_dynamic_compile_recompiles_where_compile_network_does_not() -> None:
    """What the settings are for: without them a square first call ties height to width."""
    net = unet()
    plain = torch.compile(net, dynamic=True, backend="aot_eager")
    for shape in SHAPES[:2]:
        plain(*denoiser_args(*shape))
    assert graphs() == 2


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU backend needs g++")
@torch.inference_mode()
def test_inductor_compiles_the_unet_and_vae_decoder_once_for_new_shapes() -> None:
    """torch 2.13 inductor used to fail here ("ValueRangeError: Invalid ranges [0:-1]").
    (Inductor's convolutions also guard the batch size to 2-15: a batch of 1 or of 16+
    compiles once more, which ``aot_eager`` above does not show.)"""
    net, model = unet(), vae()
    comp = compile_network(net)  # frozen weights; unpacks the eager layers
    for shape in SHAPES[:2]:
        args = denoiser_args(*shape)
        torch.testing.assert_close(comp(*args), net(*args), atol=1e-4, rtol=1e-4)
    decode = compile_network(model.decode)
    for b, h, w in ((2, 8, 8), (3, 12, 10)):
        z = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(h))
        torch.testing.assert_close(decode(z), model.decode(z), atol=1e-4, rtol=1e-4)
    assert graphs() == 2  # one per network
