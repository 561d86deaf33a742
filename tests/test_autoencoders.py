import pytest
import torch

from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.autoencoders.kl import AutoencoderKL, DiagonalGaussian
from ldmkit.autoencoders.vq import VQAutoencoder


def tiny(**kw) -> AutoencoderConfig:
    base = dict(base_channels=8, num_res_blocks=1, latent_channels=3, norm_groups=4)
    base.update(kw)
    return AutoencoderConfig(**base)


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5])
def test_kl_shapes_for_every_factor(levels):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny(channel_mult=(1,) * levels))
    f = model.downsampling_factor
    assert f == 2 ** (levels - 1)
    x = torch.randn(2, 3, 32, 48)
    z = model.encode(x)
    assert z.shape == (2, 3, 32 // f, 48 // f)
    assert model.decode(z).shape == x.shape


@pytest.mark.parametrize("dims", [1, 3])
def test_other_dimensionalities(dims):
    model = AutoencoderKL(tiny(channel_mult=(1, 2), dims=dims, in_channels=2, out_channels=2))
    x = torch.randn(1, 2, *([8] * dims))
    recon, kl, _ = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and kl.ndim == 0


def test_bad_inputs_have_clear_errors():
    model = AutoencoderKL(tiny(channel_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="multiple of f=4"):
        model.encode(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"expected input \[N, 3, S, S\]"):
        model.encode(torch.randn(1, 1, 32, 32))


def test_diagonal_gaussian_kl_matches_closed_form():
    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), expected, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    s1, s2 = post.sample(g), post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.mode())


def test_latent_scale_and_shift_round_trip():
    model = AutoencoderKL(tiny(channel_mult=(1, 2), scaling_factor=0.5, shift_factor=0.25))
    x = torch.randn(1, 3, 16, 16)
    raw = model.encode(x, scaled=False)
    torch.testing.assert_close(model.encode(x), (raw - 0.25) * 0.5)
    torch.testing.assert_close(model.decode(model.encode(x)), model.decode(raw, scaled=False))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny(channel_mult=(1, 2)))
    x = torch.randn(2, 3, 16, 16)

    def grads():
        model.zero_grad()
        recon, _, _ = model(x, sample=False)
        recon.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_vq_autoencoder_decodes_through_the_codebook():
    torch.manual_seed(0)
    model = VQAutoencoder(tiny(kind="vq", channel_mult=(1, 2), codebook_size=16))
    x = torch.randn(2, 3, 16, 16)
    recon, loss, logs = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and loss.ndim == 0
    assert 1.0 <= float(logs["perplexity"]) <= 16.0
    model.eval()
    h = model.encode(x, scaled=False)
    _, _, info = model.quantize(h)
    torch.testing.assert_close(model.decode(h, scaled=False), model.decode_indices(info["indices"]))


def test_layout_matches_the_stable_diffusion_vae_names():
    """Key names follow CompVis' layout, so SD VAE weights map one-to-one later."""
    model = AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 4, 4)))
    keys = set(model.state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.block_2.norm1.weight",
        "encoder.norm_out.bias",
        "decoder.up.3.block.2.conv1.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.mid.attn_1.proj_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in keys, key
    assert "encoder.down.3.downsample.conv.weight" not in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys
    assert model.state_dict()["quant_conv.weight"].shape == (8, 8, 1, 1)
