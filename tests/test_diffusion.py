"""Parameterization wrappers and training objectives: analytic checks on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ldmkit.diffusion.denoiser import (
    DiscreteVPDenoiser,
    EDMDenoiser,
    FlowDenoiser,
    build_denoiser,
)
from ldmkit.diffusion.objectives import (
    DiffusionObjectiveConfig,
    diffusion_loss,
    loss_weights,
    sample_sigmas,
)
from ldmkit.utils.random import seeded_generators

KINDS = ("eps", "v", "x0", "edm", "flow")


def sd_schedule(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """SD's "scaled linear" schedule: (train sigmas, alphas_cumprod), float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, n) ** 2
    abar = np.cumprod(1 - betas)
    return torch.from_numpy(np.sqrt((1 - abar) / abar)), torch.from_numpy(abar)


class FixedNet(nn.Module):
    """Returns a preset output and records what it was called with."""

    def __init__(self, out: torch.Tensor | None = None):
        super().__init__()
        self.out = out
        self.calls: list[tuple] = []

    def forward(self, x, t, context=None, y=None, **kw):
        self.calls.append((x, t, context, y, kw))
        return self.out if self.out is not None else torch.zeros_like(x)


def make(kind: str, net: nn.Module, **kw):
    if kind in ("eps", "v", "x0"):
        kw.setdefault("train_sigmas", sd_schedule()[0])
    return build_denoiser(kind, net, **kw)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_exact_target_gives_x0(kind):
    g = gen(1)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    d = make(kind, FixedNet())
    if kind in ("eps", "v", "x0"):
        sigma = d.sigmas[torch.tensor([0, 10, 200, 500, 900, 999])].double()
    else:
        sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    d.net.out = d.prediction_target(x0, noise, sigma)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(d(x, sigma), x0, atol=1e-10, rtol=1e-10)


def test_zero_terminal_snr_v_prediction():
    sigmas = sd_schedule()[0].clone()
    sigmas[-1] = math.inf
    d = DiscreteVPDenoiser(FixedNet(), sigmas, prediction="v")
    assert d.sigma_max == pytest.approx(4096, rel=1e-3)
    c_skip, c_out, _ = d.scalings(torch.tensor([d.sigma_max]))
    assert c_skip.item() < 1e-7 and c_out.item() == pytest.approx(-1, abs=1e-6)
    assert d.sigma_to_t(torch.tensor([d.sigma_max])).item() == pytest.approx(999)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiscreteVPDenoiser(FixedNet(), sigmas, prediction="eps")


def test_sigma_t_maps_invert():
    sigmas = sd_schedule()[0]
    d = DiscreteVPDenoiser(FixedNet(), sigmas)
    torch.testing.assert_close(d.sigma_to_t(d.sigmas), torch.arange(1000.0))
    t = torch.tensor([0.0, 0.25, 17.5, 500.7, 998.9, 999.0])
    torch.testing.assert_close(d.sigma_to_t(d.t_to_sigma(t)), t, atol=2e-3, rtol=0)
    s = torch.tensor([0.03, 0.5, 1.0, 7.0, 14.0])
    torch.testing.assert_close(d.t_to_sigma(d.sigma_to_t(s)), s, rtol=1e-4, atol=0)
    assert d.sigma_to_t(s, quantize=True).equal(d.sigma_to_t(s).round())
    # Out-of-range sigmas clamp to the ends of the training grid.
    assert d.sigma_to_t(torch.tensor([0.0, 1e3])).tolist() == [0.0, 999.0]
    t = torch.tensor([1e-3, 0.3, 0.5, 0.999])
    torch.testing.assert_close(FlowDenoiser.sigma_to_t(FlowDenoiser.t_to_sigma(t)), t)


def test_flow_ve_mapping_equals_direct_flow_formula():
    g = gen(2)
    x0, eps, v = (torch.randn(5, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)
    net = FixedNet(v)  # an arbitrary velocity, not the true one
    d = FlowDenoiser(net, t_scale=1000.0)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    sigma = t / (1 - t)
    out = d(x_t / (1 - t.view(-1, 1, 1)), sigma)
    torch.testing.assert_close(out, x_t - t.view(-1, 1, 1) * v)
    x_in, c_noise = net.calls[-1][:2]
    torch.testing.assert_close(x_in, x_t)
    torch.testing.assert_close(c_noise, 1000 * t)
    assert d.sigma_min == 1e-3 and d.sigma_max == pytest.approx(4096, rel=1e-3)


@pytest.mark.parametrize("kind,sigma_data", [("eps", 1.0), ("v", 1.0), ("edm", 0.5)])
def test_c_in_gives_unit_input_variance(kind, sigma_data):
    d = make(kind, FixedNet())
    assert d.sigma_data == sigma_data
    sigma = torch.tensor([0.05, 0.5, 2.0, 14.0], dtype=torch.float64)
    c_in = d.scalings(sigma)[2]
    torch.testing.assert_close(c_in**2 * (sigma_data**2 + sigma**2), torch.ones(4).double())
    g = gen(3)
    x0 = sigma_data * torch.randn(4, 20000, generator=g, dtype=torch.float64)
    x = x0 + sigma[:, None] * torch.randn(4, 20000, generator=g, dtype=torch.float64)
    var = (c_in[:, None] * x).var(dim=1)
    torch.testing.assert_close(var, torch.ones(4).double(), atol=0.05, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_vp_conversions_match_diffusers(prediction):
    sigmas, abar = sd_schedule()
    g = gen(4)
    x0, noise, f = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 400, 999])
    a_t = abar[t].view(-1, 1, 1, 1)
    beta_prod_t = 1 - a_t
    sample = a_t**0.5 * x0 + beta_prod_t**0.5 * noise  # DDPMScheduler.add_noise
    # DDPMScheduler.step: pred_original_sample for each prediction_type.
    expected = {
        "eps": (sample - beta_prod_t**0.5 * f) / a_t**0.5,
        "v": a_t**0.5 * sample - beta_prod_t**0.5 * f,
        "x0": f,
    }[prediction]
    target = {  # training targets; "v" is DDPMScheduler.get_velocity
        "eps": noise,
        "v": a_t**0.5 * noise - beta_prod_t**0.5 * x0,
        "x0": x0,
    }[prediction]
    net = FixedNet(f)
    d = DiscreteVPDenoiser(net, sigmas, prediction=prediction)
    sigma = sigmas[t]
    torch.testing.assert_close(d(sample / a_t**0.5, sigma), expected)
    x_in, c_noise = net.calls[-1][:2]
    torch.testing.assert_close(x_in, sample)
    torch.testing.assert_close(c_noise, t.double())
    torch.testing.assert_close(d.prediction_target(x0, noise, sigma), target)


def test_conditioning_is_routed_to_the_network():
    net = FixedNet()
    d = EDMDenoiser(net)
    x = torch.randn(2, 3, 4, 4)
    ctx, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    concat, labels = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    cond = {"crossattn": ctx, "crossattn_mask": mask, "class": labels, "concat": concat}
    d.net.out = torch.zeros(2, 3, 4, 4)
    d(x, 1.5, cond)  # scalar sigma broadcasts
    x_in, c_noise, context, y, kw = net.calls[-1]
    c_in = 1 / math.sqrt(1.5**2 + 0.25)
    torch.testing.assert_close(x_in, torch.cat([c_in * x, concat], dim=1))
    torch.testing.assert_close(c_noise, torch.full((2,), math.log(1.5) / 4))
    assert context is ctx and y is labels and kw["context_mask"] is mask
    d(x, torch.ones(2), None)
    assert net.calls[-1][2:] == (None, None, {})
    with pytest.raises(KeyError, match="unknown cond keys"):
        d(x, 1.0, {"text": ctx})
    with pytest.raises(TypeError, match="train_sigmas"):
        build_denoiser("v", net)
    with pytest.raises(ValueError, match="unknown denoiser kind"):
        build_denoiser("ddpm", net)


def test_noise_level_samplers():
    n_draw = 20000
    edm = EDMDenoiser(FixedNet())
    s = sample_sigmas(edm, n_draw, gen(5), DiffusionObjectiveConfig("edm", "lognormal"))
    assert abs(s.log().mean() + 1.2) < 0.03 and abs(s.log().std() - 1.2) < 0.03

    flow = FlowDenoiser(FixedNet())
    t = FlowDenoiser.sigma_to_t(
        sample_sigmas(flow, n_draw, gen(6), DiffusionObjectiveConfig("flow"))
    )
    assert t.min() > 0 and t.max() < 1
    assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.003
    cfg = DiffusionObjectiveConfig("flow", "logit_normal", logit_mean=0.5, logit_std=0.8)
    logit_t = sample_sigmas(flow, n_draw, gen(7), cfg).log()  # logit(t) = log(sigma)
    assert abs(logit_t.mean() - 0.5) < 0.03 and abs(logit_t.std() - 0.8) < 0.03
    shifted = sample_sigmas(flow, 8, gen(7), DiffusionObjectiveConfig("flow", time_shift=3.0))
    torch.testing.assert_close(
        shifted, 3 * sample_sigmas(flow, 8, gen(7), DiffusionObjectiveConfig("flow"))
    )

    vp = make("eps", FixedNet())
    s = sample_sigmas(vp, n_draw, gen(8), DiffusionObjectiveConfig("eps"))
    t = vp.sigma_to_t(s)
    assert t.equal(t.round()) and t.min() == 0 and t.max() == 999
    assert abs(t.mean() - 499.5) < 8 and abs(t.std() - 1000 / 12**0.5) < 8
    t = vp.sigma_to_t(
        sample_sigmas(vp, n_draw, gen(9), DiffusionObjectiveConfig("eps", "logit_normal"))
    )
    assert t.equal(t.round()) and abs(t.mean() - 499.5) < 8 and t.std() < 250

    # Per-sample generators: a sample's sigma does not depend on the rest of the batch.
    cfg = DiffusionObjectiveConfig("edm", "lognormal")
    s4 = sample_sigmas(edm, 4, seeded_generators([0, 1, 2, 3]), cfg)
    assert s4[2] == sample_sigmas(edm, 1, seeded_generators([2]), cfg)[0]


def test_nonsense_combinations_raise():
    with pytest.raises(ValueError, match="EDM has no time variable"):
        DiffusionObjectiveConfig("edm", "uniform_t").validate()
    with pytest.raises(ValueError, match="training sigmas"):
        DiffusionObjectiveConfig("eps", "lognormal").validate()
    with pytest.raises(ValueError, match="time_shift"):
        DiffusionObjectiveConfig("v", time_shift=2.0).validate()
    with pytest.raises(ValueError, match="the denoiser is 'edm'"):
        sample_sigmas(EDMDenoiser(FixedNet()), 2, gen(), DiffusionObjectiveConfig("flow"))


def test_min_snr_and_edm_weights():
    sigma = torch.tensor([0.1, 1.0, 2.0])  # SNR = 100, 1, 0.25
    cfg = DiffusionObjectiveConfig("eps", loss_weighting="min_snr", min_snr_gamma=5.0)
    expected = {"eps": [0.05, 1.0, 1.0], "v": [5 / 101, 0.5, 0.2], "x0": [5.0, 1.0, 0.25]}
    for kind, values in expected.items():
        w = loss_weights(make(kind, FixedNet()), sigma, cfg)
        torch.testing.assert_close(w, torch.tensor(values), rtol=1e-5, atol=0)
    edm_cfg = DiffusionObjectiveConfig("edm", "lognormal", loss_weighting="edm")
    w = loss_weights(EDMDenoiser(FixedNet()), sigma, edm_cfg)  # lambda * c_out^2 = 1
    torch.testing.assert_close(w, torch.ones(3))
    uniform = loss_weights(make("v", FixedNet()), sigma, DiffusionObjectiveConfig("v"))
    assert uniform.equal(torch.ones(3))


def _x_in_loss(cfg: DiffusionObjectiveConfig, cond, null_cond=None, shape=(2000, 1)):
    net = FixedNet()
    d = make(cfg.parameterization, net)
    diffusion_loss(d, torch.zeros(shape), cond, gen(10), cfg, null_cond=null_cond)
    return net.calls[-1]


def test_cond_dropout_rate_and_null_condition():
    b, p = 4000, 0.3
    cfg = DiffusionObjectiveConfig("eps", cond_dropout=p)
    cond = {
        "crossattn": torch.ones(b, 2, 3),
        "class": torch.full((b,), 4),
        "concat": torch.ones(b, 1),
    }
    null = {"crossattn": torch.zeros(1, 2, 3), "class": 10}
    _, _, context, y, _ = _x_in_loss(cfg, cond, null, shape=(b, 1))
    dropped = context.abs().sum((1, 2)) == 0
    assert abs(dropped.float().mean() - p) < 0.03
    assert (y[dropped] == 10).all() and (y[~dropped] == 4).all()
    x_in = _x_in_loss(cfg, cond, null, shape=(b, 1))[0]
    assert (x_in[:, 1] == 1).all()  # concat is not in null_cond: never dropped
    # Default null: zero float embeddings; class labels need an explicit null index.
    _, _, context, _, _ = _x_in_loss(cfg, {"crossattn": torch.ones(b, 2, 3)}, shape=(b, 1))
    assert abs((context.abs().sum((1, 2)) == 0).float().mean() - p) < 0.03
    with pytest.raises(ValueError, match="null class"):
        _x_in_loss(cfg, {"class": torch.zeros(4, dtype=torch.long)}, shape=(4, 1))


def test_offset_noise_has_per_channel_constant():
    def channel_mean_std(offset: float) -> float:
        cfg = DiffusionObjectiveConfig("flow", offset_noise=offset)
        x_in, c_noise = _x_in_loss(cfg, None, shape=(64, 3, 16, 16))[:2]
        noise = x_in / (c_noise / 1000).view(-1, 1, 1, 1)  # x_t = t * noise for x0 = 0
        return noise.mean((2, 3)).std().item()

    assert channel_mean_std(0.0) < 0.1  # ~ 1/16 from the i.i.d. part
    assert abs(channel_mean_std(1.0) - 1.0) < 0.15


class LinearNet(nn.Module):
    def __init__(self, c_scale: float):
        super().__init__()
        self.lin, self.c_scale = nn.Linear(3, 2), c_scale

    def forward(self, x, c_noise, context=None, y=None):
        return self.lin(torch.cat([x, c_noise[:, None] / self.c_scale], dim=1))


@pytest.mark.parametrize(
    "kind,sampling,weighting",
    [
        ("eps", "uniform_t", "min_snr"),
        ("v", "uniform_t", "uniform"),
        ("edm", "lognormal", "edm"),
        ("flow", "logit_normal", "uniform"),
    ],
)
def test_linear_net_learns(kind, sampling, weighting):
    torch.manual_seed(0)
    d = make(kind, LinearNet(1.0 if kind == "edm" else 1000.0))
    cfg = DiffusionObjectiveConfig(kind, sampling, loss_weighting=weighting)
    data_gen = gen(11)
    mean, std = torch.tensor([1.0, -0.5]), torch.tensor([0.3, 0.6])

    def batch():
        return mean + std * torch.randn(256, 2, generator=data_gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return sum(diffusion_loss(d, batch(), None, gen(s), cfg)[0].item() for s in range(4))

    before = eval_loss()
    opt = torch.optim.Adam(d.parameters(), lr=0.05)
    g = gen(12)
    for _ in range(40):
        loss, logs = diffusion_loss(d, batch(), None, g, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(logs) == {"loss", "loss_unweighted"}
    assert eval_loss() < 0.8 * before
