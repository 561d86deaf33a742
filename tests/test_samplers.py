"""Samplers, sigma grids and classifier-free guidance, checked against closed forms and oracles.

The exact denoiser E[x0 | x0 + sigma eps] of a Gaussian mixture is closed form, so every sampler
can be run on it and its samples compared with the mixture (weights, means, covariances).
k-diffusion and diffusers, when installed (test extra), serve as reference implementations.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

from ldmkit.diffusion import schedules as sch
from ldmkit.samplers import SAMPLERS, CFGDenoiser, get_sampler, rescale_guidance
from ldmkit.utils.random import randn, seeded_generators

F64 = torch.float64


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, C_k) in 2-D, with its exact denoiser as ``__call__``."""

    def __init__(self) -> None:
        self.w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
        self.mu = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.5, -2.5]], dtype=F64)
        self.cov = torch.tensor(
            [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.1]]],
            dtype=F64,
        )

    def sample(self, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.w, n, replacement=True, generator=gen)
        z = torch.randn(n, 2, 1, generator=gen, dtype=F64)
        return self.mu[k] + (torch.linalg.cholesky(self.cov)[k] @ z)[..., 0]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        # x | k ~ N(mu_k, C_k + sigma^2 I): responsibilities times the Wiener filter per component
        s = self.cov + sigma.to(F64).reshape(-1, 1, 1, 1) ** 2 * torch.eye(2, dtype=F64)
        diff = x.to(F64)[:, None] - self.mu
        sol = torch.linalg.solve(s, diff[..., None])[..., 0]
        logp = self.w.log() - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(s)
        post = self.mu + (self.cov @ sol[..., None])[..., 0]
        return (logp.softmax(1)[..., None] * post).sum(1).to(x.dtype)


GMM = GaussianMixture()
N = 4000


def mixture_stats(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weights, means and covariances of the clusters formed by the nearest mixture mean."""
    k = torch.cdist(x.to(F64), GMM.mu).argmin(1)
    parts = [x.to(F64)[k == j] for j in range(len(GMM.mu))]
    w = torch.tensor([len(p) / len(x) for p in parts], dtype=F64)
    return w, torch.stack([p.mean(0) for p in parts]), torch.stack([torch.cov(p.T) for p in parts])


REF = mixture_stats(GMM.sample(200_000, seed=1))


def mixture_error(x: torch.Tensor) -> float:
    """Largest of: weight error, mean error (norm), covariance error (Frobenius), over clusters."""
    w, m, c = mixture_stats(x)
    return max(
        (w - REF[0]).abs().max().item(),
        (m - REF[1]).norm(dim=-1).max().item(),
        (c - REF[2]).flatten(1).norm(dim=-1).max().item(),
    )


def run(name: str, steps: int, n: int = N, denoise=GMM, **kw) -> torch.Tensor:
    sigmas = sch.karras_sigmas(steps, 0.002, 80.0)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sigmas[0]
    return get_sampler(name)(denoise, x, sigmas, generator=torch.Generator().manual_seed(3), **kw)


def replay(noises: torch.Tensor):
    """A noise sampler returning the given noises in order (to feed two samplers the same noise)."""
    it = iter(noises)
    return lambda sigma, sigma_next: next(it)


# -- 1. every sampler reproduces the mixture, better with more steps --------------------------

# Measured errors at 50 steps (10 steps): euler/ddim .064 (.38), ddpm/euler_ancestral .077 (.43),
# heun .030 (.25), dpmpp_2m .030 (.41), plms .029 (.056), unipc .029 (.39), dpmpp_2m_sde
# .034 (.71), dpmpp_3m_sde .028 (3.6). Exact samples of the same size score .036.
BOUND_50 = {"euler": 0.1, "ddim": 0.1, "ddpm": 0.12, "euler_ancestral": 0.12}


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"lcm"}))
def test_sampler_reproduces_gaussian_mixture(name):
    err_10, err_50 = mixture_error(run(name, 10)), mixture_error(run(name, 50))
    assert err_50 < err_10, (err_10, err_50)
    assert err_50 < BOUND_50.get(name, 0.05), (err_10, err_50)


@pytest.fixture(scope="module")
def ode_solution():
    return run("heun", 300, n=500)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "plms", "unipc"])
def test_ode_samplers_converge_to_the_ode_solution(name, ode_solution):
    ref = ode_solution
    errs = [(run(name, s, n=500) - ref).norm(dim=1).mean().item() for s in (10, 25, 50)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < (0.08 if name == "euler" else 0.01), errs  # euler .071, others <= .008


def test_lcm_with_an_exact_consistency_function_samples_the_mixture():
    """Multistep consistency sampling is exact at any step count when f(x, sigma) is the exact
    ODE map to sigma = 0 (here: Heun on the exact denoiser)."""

    def consistency(x, sigma):
        grid = sch.karras_sigmas(30, 0.002, float(sigma[0]))
        return SAMPLERS["heun"](GMM, x, grid)

    assert mixture_error(run("lcm", 1, denoise=consistency)) < 0.05
    assert mixture_error(run("lcm", 3, denoise=consistency)) < 0.05


def test_samplers_agree_on_identities():
    sigmas = sch.karras_sigmas(8, 0.002, 80.0)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sigmas[0]
    noises = torch.randn(8, 64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)

    def go(name, **kw):
        return SAMPLERS[name](GMM, x, sigmas, **kw)

    close = functools.partial(torch.testing.assert_close, rtol=0, atol=1e-5)  # float32 sigmas

    close(go("ddim", eta=0.0), go("euler"))
    close(go("dpmpp_2m_sde", eta=0.0), go("dpmpp_2m"))
    ancestral = go("euler_ancestral", noise_sampler=replay(noises))
    close(go("ddpm", noise_sampler=replay(noises)), ancestral)
    close(go("ddim", eta=1.0, noise_sampler=replay(noises)), ancestral)
    # one LCM step is the denoiser itself
    torch.testing.assert_close(
        SAMPLERS["lcm"](GMM, x, sigmas[[0, -1]]), GMM(x, sigmas[0].expand(64))
    )


def test_samplers_accept_any_shape_callback_and_progress_bar():
    mu, s2 = 0.5, 0.25  # x0 ~ N(mu, s2) per element: D = mu + s2/(s2 + sigma^2) (x - mu)

    def gauss(x, sigma):
        assert sigma.shape == (x.shape[0],)
        return mu + s2 / (s2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - mu)

    sigmas = sch.karras_sigmas(5, 0.01, 10.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 10.0
    for name, fn in SAMPLERS.items():
        seen = []
        out = fn(gauss, x, sigmas, generator=torch.Generator().manual_seed(0), callback=seen.append)
        assert out.shape == x.shape and out.dtype == x.dtype and out.isfinite().all(), name
        assert [d["i"] for d in seen] == list(range(5)), name
        assert set(seen[0]) == {"i", "x", "sigma", "denoised"}, name
    assert SAMPLERS["euler"](gauss, x, sigmas, disable=False).shape == x.shape
    with pytest.raises(KeyError, match="dpmpp_2m, dpmpp_2m_sde"):
        get_sampler("nope")


# -- 2. parity with k-diffusion ----------------------------------------------------------------


@pytest.fixture(scope="module")
def kdiff():
    """``k_diffusion.sampling`` without the package ``__init__``, which imports training and
    evaluation code (skimage, clip, clean-fid, dctorch, torchvision) that sampling never uses.
    Only ``k_diffusion/utils.py`` needs torchvision at import time: a stand-in module serves."""
    for dep in ("scipy", "torchdiffeq", "torchsde"):
        pytest.importorskip(dep)
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (test extra)")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            if name not in sys.modules:
                mp.setitem(sys.modules, name, types.ModuleType(name))
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        mp.setitem(sys.modules, "k_diffusion", package)
        return importlib.import_module("k_diffusion.sampling")


@pytest.mark.parametrize(
    ("ours", "theirs", "options", "noisy"),
    [
        ("euler", "sample_euler", {}, False),
        ("heun", "sample_heun", {}, False),
        ("dpmpp_2m", "sample_dpmpp_2m", {}, False),
        ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.7}, True),
        ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}, True),
        ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}, True),
        ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}, True),
    ],
)
def test_parity_with_k_diffusion(kdiff, ours, theirs, options, noisy):
    sigmas = kdiff.get_sigmas_karras(12, 0.002, 80.0)
    torch.testing.assert_close(sch.karras_sigmas(12, 0.002, 80.0), sigmas)
    sigmas = sigmas.double()  # float64 so that rounding-order differences stay far below 1e-5
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sigmas[0]
    noises = torch.randn(12, 256, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    extra = {"noise_sampler": replay(noises)} if noisy else {}
    expected = getattr(kdiff, theirs)(GMM, x, sigmas, disable=True, **options, **extra)
    extra = {"noise_sampler": replay(noises)} if noisy else {}
    got = SAMPLERS[ours](GMM, x, sigmas, **options, **extra)
    assert (got - expected).abs().max().item() <= 1e-5


# -- 3. schedules --------------------------------------------------------------------------------


def test_vp_betas_and_zero_terminal_snr():
    b = sch.betas_linear()
    assert math.isclose(b[0], 0.00085) and math.isclose(b[-1], 0.012) and len(b) == 1000
    assert b.sqrt().diff().diff().abs().max() < 1e-12  # linear in sqrt(beta)
    ldm = sch.betas_linear(1000, 0.0015, 0.0195)
    assert math.isclose(ldm[0], 0.0015) and math.isclose(ldm[-1], 0.0195)
    cos = sch.betas_cosine()
    assert cos.max() <= 0.999 and cos[-1] == 0.999 and (cos.diff() >= 0).all()
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert math.isclose(sch.alphas_cumprod(cos)[499], f(0.5) / f(0.0), rel_tol=1e-9)
    zsnr = sch.rescale_zero_terminal_snr(b)
    abar, abar_z = sch.alphas_cumprod(b), sch.alphas_cumprod(zsnr)
    assert abar_z[-1] == 0 and math.isclose(abar_z[0], abar[0])
    s = sch.vp_sigmas(abar_z)
    assert s[-1] == math.inf and (s[:-1].diff() > 0).all()
    grid = sch.discrete_sigmas(s, 10, "trailing")
    assert math.isclose(grid[0], sch.SIGMA_INF_CLAMP, rel_tol=1e-6) and grid[-1] == 0


def test_continuous_grids():
    k = sch.karras_sigmas(10, 0.002, 80.0)
    assert len(k) == 11 and k[-1] == 0 and (k.diff() < 0).all()
    assert math.isclose(k[0], 80.0, rel_tol=1e-6) and math.isclose(k[-2], 0.002, rel_tol=1e-5)
    e = sch.exponential_sigmas(5, 0.1, 10.0)
    torch.testing.assert_close(e[:-1].log().diff(), torch.full((4,), -math.log(10) / 2))
    base = sch.flow_sigmas(8)
    assert math.isclose(base[4], 1.0, rel_tol=1e-6)  # t = 1/2 is sigma = 1
    assert base[0] == np.float32(sch.SIGMA_INF_CLAMP) and base[-1] == 0
    for shift in (0.5, 1.0, 3.0):
        assert (sch.flow_sigmas(8, shift).diff() < 0).all()
    assert (sch.flow_sigmas(8, 3.0)[1:-1] > base[1:-1]).all()
    torch.testing.assert_close(sch.get_sigmas("karras", 10, sigma_min=0.002, sigma_max=80.0), k)
    with pytest.raises(KeyError, match="karras"):
        sch.get_sigmas("nope", 3)


SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def diffusers_schedulers():
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_and_sigmas_match_diffusers(diffusers_schedulers, spacing):
    d = diffusers_schedulers
    offset = 1 if spacing == "leading" else 0
    train = sch.vp_sigmas(sch.alphas_cumprod(sch.betas_linear()))
    for steps in (1, 4, 7, 10, 25, 50, 61):
        ours = sch.discrete_timesteps(1000, steps, spacing, offset)
        assert len(ours) == steps and (ours.diff() < 0).all() and ours.min() >= 0
        ddim = d.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        ddim.set_timesteps(steps)
        if len(ddim.timesteps) == steps:  # diffusers' "trailing" has one step too many for 61
            assert ours.tolist() == ddim.timesteps.tolist()
        euler = d.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
        euler.set_timesteps(steps)
        if len(euler.sigmas) == steps + 1:
            torch.testing.assert_close(
                sch.discrete_sigmas(train, steps, spacing, offset), euler.sigmas
            )


def test_vp_tables_match_diffusers(diffusers_schedulers):
    d = diffusers_schedulers
    ldm = {**SD, "beta_start": 0.0015, "beta_end": 0.0195}
    for ours, kw in [
        (sch.betas_linear(), SD),
        (sch.betas_linear(1000, 0.0015, 0.0195), ldm),
        (sch.betas_cosine(), {"beta_schedule": "squaredcos_cap_v2"}),
        (sch.rescale_zero_terminal_snr(sch.betas_linear()), {**SD, "rescale_betas_zero_snr": True}),
    ]:
        theirs = d.DDIMScheduler(**kw)
        torch.testing.assert_close(sch.alphas_cumprod(ours).float(), theirs.alphas_cumprod)
    zsnr = d.EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    zsnr.set_timesteps(20)
    train = sch.vp_sigmas(sch.alphas_cumprod(sch.rescale_zero_terminal_snr(sch.betas_linear())))
    torch.testing.assert_close(sch.discrete_sigmas(train, 20, "trailing"), zsnr.sigmas)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_matches_diffusers(diffusers_schedulers, eta):
    sched = diffusers_schedulers.DDIMScheduler(
        **SD, prediction_type="sample", clip_sample=False, timestep_spacing="trailing"
    )
    sched.set_timesteps(10)
    abar = sched.alphas_cumprod.double()
    sigmas = torch.cat([sch.vp_sigmas(abar)[sched.timesteps], torch.zeros(1, dtype=F64)])
    x_vp = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    noises = torch.randn(10, 256, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = x_vp.clone()
    for i, t in enumerate(sched.timesteps):
        x0 = GMM(x / abar[t].sqrt(), sigmas[i].expand(256))
        x = sched.step(x0, t, x, eta=eta, variance_noise=noises[i]).prev_sample
    ours = SAMPLERS["ddim"](
        GMM, x_vp / abar[999].sqrt(), sigmas, eta=eta, noise_sampler=replay(noises)
    )
    assert (ours - x).abs().max().item() <= 1e-5


def test_unipc_matches_diffusers(diffusers_schedulers):
    sched = diffusers_schedulers.UniPCMultistepScheduler(**SD, prediction_type="sample")
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double()
    x_vp = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = x_vp.clone()
    for i, t in enumerate(sched.timesteps):
        x0 = GMM(x * (1 + sigmas[i] ** 2).sqrt(), sigmas[i].expand(256))
        x = sched.step(x0, t, x).prev_sample
    ours = SAMPLERS["unipc"](GMM, x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    assert (ours - x).abs().max().item() <= 1e-5


def test_discrete_and_flow_grids_sample_correctly():
    """Finite clamped starts (zero-SNR VP, flow t = 1) still give the data distribution."""
    zsnr = sch.vp_sigmas(sch.alphas_cumprod(sch.rescale_zero_terminal_snr(sch.betas_linear())))
    for sigmas in (sch.discrete_sigmas(zsnr, 40, "trailing"), sch.flow_sigmas(40, shift=3.0)):
        x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sigmas[0]
        assert mixture_error(SAMPLERS["dpmpp_2m"](GMM, x, sigmas)) < 0.05


# -- 4. classifier-free guidance ----------------------------------------------------------------


class CountingModel:
    """model(x, sigma, cond) with a pytree cond; records the batch size of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, sigma, cond):
        self.batches.append(x.shape[0])
        shift = cond["emb"].sum(-1) + cond["extra"][0]
        shape = (-1,) + (1,) * (x.ndim - 1)
        return x / (1 + sigma.reshape(shape) ** 2) + shift.reshape(shape) * torch.sin(x)


def _cfg_setup():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=gen)
    cond = {"emb": torch.randn(3, 5, generator=gen), "extra": [torch.randn(3, generator=gen)]}
    uncond = {"emb": torch.zeros(3, 5), "extra": [torch.zeros(3)]}
    model, sigma = CountingModel(), torch.full((3,), 2.0)
    d_c, d_u = model(x, sigma, cond), model(x, sigma, uncond)
    model.batches.clear()
    return x, sigma, model, functools.partial(CFGDenoiser, model, cond, uncond), d_c, d_u


def test_cfg_scales_and_batching():
    x, sigma, model, cfg, d_c, d_u = _cfg_setup()
    torch.testing.assert_close(cfg(1.0)(x, sigma), d_c)
    assert model.batches == [3]  # scale 1: no unconditional pass
    torch.testing.assert_close(cfg(0.0)(x, sigma), d_u)
    torch.testing.assert_close(cfg(4.0)(x, sigma), d_u + 4 * (d_c - d_u))
    assert model.batches == [3, 6, 6]
    eps = lambda d: (x - d) / 2.0  # noqa: E731  (the same guidance on eps, for a fixed sigma)
    torch.testing.assert_close(eps(cfg(4.0)(x, 2.0)), eps(d_u) + 4 * (eps(d_c) - eps(d_u)))


def test_cfg_interval_and_rescale():
    x, sigma, model, cfg, d_c, d_u = _cfg_setup()
    plain = d_u + 5 * (d_c - d_u)
    torch.testing.assert_close(cfg(5.0, interval=(3, 9))(x, sigma), d_c)
    assert model.batches == [3]
    torch.testing.assert_close(cfg(5.0, interval=(1, 2))(x, sigma), plain)
    mixed_sigma = torch.tensor([2.0, 3.0, 2.0])
    mixed = cfg(5.0, interval=(1, 2))(x, mixed_sigma)
    torch.testing.assert_close(mixed[1], model(x, mixed_sigma, cfg.args[1])[1])
    torch.testing.assert_close(mixed[[0, 2]], plain[[0, 2]])
    # in each space, phi = 1 gives the guided prediction the std of the conditional one
    # (diffusers' rescale_noise_cfg in "eps"); phi = 0 is plain CFG; phi mixes linearly
    std = lambda t: t.std(dim=(1, 2, 3))  # noqa: E731
    spaces = {"x0": lambda d: d, "eps": lambda d: (x - d) / 2, "v": lambda d: (x - 5 * d) / 20**0.5}
    for space, to_space in spaces.items():
        torch.testing.assert_close(cfg(5.0, rescale=0.0, rescale_space=space)(x, sigma), plain)
        full = cfg(5.0, rescale=1.0, rescale_space=space)(x, sigma)
        torch.testing.assert_close(std(to_space(full)), std(to_space(d_c)))
        half = cfg(5.0, rescale=0.5, rescale_space=space)(x, sigma)
        torch.testing.assert_close(half, (full + plain) / 2)
    default = cfg(5.0, rescale=1.0)(x, sigma)  # x0 space
    torch.testing.assert_close(rescale_guidance(x, sigma, d_c, plain, 1.0, "x0"), default)


# -- 5. seeds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "lcm", "ddim"])
def test_per_sample_generators_make_samples_batch_independent(name):
    sigmas = sch.karras_sigmas(6, 0.002, 80.0)
    options = {"eta": 0.8} if name == "ddim" else {}

    def sample(seeds):
        x = randn((len(seeds), 2), seeded_generators(seeds), dtype=F64) * sigmas[0]
        return SAMPLERS[name](GMM, x, sigmas, generator=seeded_generators(seeds), **options)

    batch, alone = sample([7, 8, 9]), sample([8])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)
    assert not torch.allclose(batch[0], batch[1])
