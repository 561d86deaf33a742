import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ldmkit.autoencoders import perceptual
from ldmkit.autoencoders.losses import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldmkit.autoencoders.perceptual import LPIPS, load_perceptual, save_perceptual

# ---------------------------------------------------------------- perceptual


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    torch.manual_seed(0)
    module = LPIPS()
    for k in range(5):
        w = getattr(module, f"lin{k}").model[1].weight
        w.data.abs_()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_perceptual(module, path)
    return path


def test_lpips_properties(lpips_file):
    d = load_perceptual(str(lpips_file))
    assert not d.training and not any(p.requires_grad for p in d.parameters())
    d.train()
    assert not d.training
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    dxy = d(x, y)
    assert dxy.shape == (2,) and (dxy > 0).all()
    torch.testing.assert_close(d(y, x), dxy)
    assert torch.equal(d(y, y), torch.zeros(2))
    dxy.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_lpips_key_errors(lpips_file, tmp_path):
    state = load_file(str(lpips_file))
    assert "net.features.28.weight" in state and "lin4.model.1.weight" in state
    assert len(state) == 31
    bad = dict(state)
    del bad["lin2.model.1.weight"]
    bad["extra.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="lin2.model.1.weight") as err:
        load_perceptual(tmp_path / "bad.safetensors")
    assert "extra.weight" in str(err.value)


def test_lpips_pickle_policy(lpips_file, tmp_path):
    path = tmp_path / "lpips.pth"
    torch.save(load_file(str(lpips_file)), path)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_perceptual(path)
    assert isinstance(load_perceptual(path, allow_pickle=True), LPIPS)
    with pytest.raises(ValueError, match="unsupported"):
        load_perceptual(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError):
        load_perceptual(tmp_path / "missing.safetensors")


def test_lpips_off_notice_once(caplog, monkeypatch):
    monkeypatch.setattr(perceptual, "_notice_logged", False)
    with caplog.at_level(logging.INFO, logger="ldmkit.autoencoders"):
        assert load_perceptual(None) is None
        assert load_perceptual(None) is None
    assert len([r for r in caplog.records if "perceptual" in r.getMessage()]) == 1


# ---------------------------------------------------------------- discriminator pieces


def test_patch_discriminator_shapes_and_independence():
    torch.manual_seed(0)
    d = PatchDiscriminator(3, channels=8, n_layers=3)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    x = torch.randn(3, 3, 64, 64)
    out = d(x)
    assert out.shape == (3, 1, 6, 6)
    torch.testing.assert_close(d(x[:1]), out[:1])  # no batch coupling
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.003


def test_gan_losses():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
    sp = F.softplus
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    torch.testing.assert_close(vanilla_d_loss(real, fake), expected)


def test_adaptive_weight_matches_manual():
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 1)
    out = layer(torch.randn(2, 2, 4, 4))
    nll, g = out.abs().mean(), -(out**3).mean()
    gn = torch.autograd.grad(nll, layer.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, layer.weight, retain_graph=True)[0].norm()
    w = adaptive_weight(nll, g, layer.weight)
    torch.testing.assert_close(w, gn / (gg + 1e-4))
    assert not w.requires_grad
    assert adaptive_weight(nll, g, layer.weight, max_weight=1e-3).item() == pytest.approx(1e-3)
    with torch.no_grad():
        out = layer(torch.randn(2, 2, 4, 4))
        assert adaptive_weight(out.mean(), out.mean(), layer.weight).item() == 0.0


# ---------------------------------------------------------------- AutoencoderLoss


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, 4, 1)
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, h):
        return self.conv_out(torch.tanh(self.pre(h)))


def _setup(size=32, **cfg_kw):
    torch.manual_seed(0)
    kw = {"perceptual_weight": 0.0, "disc_channels": 8, "disc_start": 10, **cfg_kw}
    cfg = AutoencoderLossConfig(**kw)
    loss = AutoencoderLoss(cfg)
    dec = TinyDecoder()
    x = torch.rand(2, 3, size, size) * 2 - 1
    recon = dec(x + 0.1 * torch.randn_like(x))
    return cfg, loss, dec, x, recon


@pytest.mark.parametrize("pixel", ["l1", "l2"])
def test_kl_loss_before_disc_start(pixel):
    cfg, loss, dec, x, recon = _setup(pixel_loss=pixel, logvar_init=0.5, kl_weight=1e-3)
    kl = torch.tensor([3.0, 5.0])
    total, logs = loss.generator_loss(x, recon, reg_loss=kl, last_layer=dec.conv_out.weight, step=9)
    diff = (x - recon).detach()
    rec = diff.abs() if pixel == "l1" else diff**2
    lv = torch.tensor(0.5)
    nll = (rec / lv.exp() + lv).sum() / 2
    torch.testing.assert_close(logs["nll"], nll)
    torch.testing.assert_close(total.detach(), nll + 1e-3 * 4.0)
    torch.testing.assert_close(logs["rec"], rec.mean())
    assert logs["g"].item() == 0.0 and logs["d_weight"].item() == 0.0
    assert logs["logvar"].item() == 0.5 and logs["reg"].item() == 4.0
    assert loss.generator_parameters() == [loss.logvar]
    total.backward()
    # d nll / d logvar = -sum(rec) e^-lv / N + numel / N
    expected = -rec.sum() * torch.exp(-lv) / 2 + x[0].numel()
    torch.testing.assert_close(loss.logvar.grad, expected)
    assert all(p.grad is None for p in loss.disc_parameters())


def test_kl_loss_with_discriminator_on():
    cfg, loss, dec, x, recon = _setup(disc_weight=0.5, disc_factor=0.7)
    kl = torch.tensor([3.0, 5.0])
    total, logs = loss.generator_loss(
        x, recon, reg_loss=kl, last_layer=dec.conv_out.weight, step=10
    )
    nll = (x - recon).abs().sum() / 2  # logvar 0
    g = -loss.discriminator(recon).mean()
    last = dec.conv_out.weight
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    d_weight = 0.5 * gn / (gg + 1e-4)
    torch.testing.assert_close(logs["g"], g.detach())
    torch.testing.assert_close(logs["d_weight"], d_weight)
    expected = nll + 1e-6 * 4.0 + 0.7 * d_weight * g
    torch.testing.assert_close(total, expected)
    total.backward()
    # The generator step leaves the discriminator without gradients.
    assert all(p.grad is None for p in loss.disc_parameters())
    assert dec.pre.weight.grad is not None


def test_vq_loss_and_perceptual(lpips_file):
    cfg, loss, dec, x, recon = _setup(
        size=16,
        kind="vq",
        codebook_weight=2.0,
        perceptual_weight=0.5,
        perceptual_path=str(lpips_file),
    )
    assert loss.generator_parameters() == [] and not hasattr(loss, "logvar")
    reg = torch.tensor(0.3)
    total, logs = loss.generator_loss(
        x, recon, reg_loss=reg, last_layer=dec.conv_out.weight, step=0
    )
    p = load_perceptual(lpips_file)(x, recon).detach()
    rec = (x - recon).detach().abs() + 0.5 * p.view(2, 1, 1, 1)
    torch.testing.assert_close(logs["perceptual"], p.mean())
    torch.testing.assert_close(logs["nll"], rec.mean())
    torch.testing.assert_close(total.detach(), rec.mean() + 2.0 * 0.3)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_and_isolation(kind):
    cfg, loss, dec, x, recon = _setup(disc_loss=kind, disc_factor=0.7)
    d_loss, logs = loss.discriminator_loss(x, recon, step=9)
    assert d_loss.item() == 0.0 and d_loss.requires_grad
    d_loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in loss.disc_parameters())

    d_loss, logs = loss.discriminator_loss(x, recon, step=10)
    fn = hinge_d_loss if kind == "hinge" else vanilla_d_loss
    expected = 0.7 * fn(loss.discriminator(x), loss.discriminator(recon))
    torch.testing.assert_close(d_loss, expected)
    torch.testing.assert_close(logs["logits_fake"], loss.discriminator(recon).mean().detach())
    d_loss.backward()
    assert dec.pre.weight.grad is None and dec.conv_out.weight.grad is None
    assert any(torch.count_nonzero(p.grad) > 0 for p in loss.disc_parameters())


def test_generator_loss_eval_no_grad():
    cfg, loss, dec, x, recon = _setup()
    with torch.no_grad():
        total, logs = loss.generator_loss(
            x, recon.detach(), reg_loss=torch.zeros(2), last_layer=dec.conv_out.weight, step=20
        )
    assert logs["d_weight"].item() == 0.0
    torch.testing.assert_close(total, logs["nll"])
