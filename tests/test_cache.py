"""Feature caching wrappers (ldmkit.accel.cache) on tiny random UNets and DiTs.

Exactness where nothing is cached, proof that cached calls skip the deep blocks (forward-hook
counts), and measured bounds on how far a cached sampler run drifts from the exact one.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import perturb, psnr, randn
from ldmkit.accel.cache import DeepCacheUNet, FirstBlockCacheDiT, deepcache, first_block_cache
from ldmkit.denoisers.dit import DiT, DiTConfig
from ldmkit.denoisers.unet import UNet, UNetConfig
from ldmkit.diffusion import schedules as sch
from ldmkit.diffusion.denoiser import build_denoiser
from ldmkit.interop.pipeline import _CastNet
from ldmkit.samplers import SAMPLERS, CFGDenoiser

TRAIN_SIGMAS = sch.vp_sigmas(sch.alphas_cumprod(sch.betas_linear()))
GRID = sch.get_sigmas("discrete", 20, train_sigmas=TRAIN_SIGMAS, spacing="trailing")


def tiny_unet(scale: float = 0.05) -> UNet:
    """4 input / 4 output blocks: stem, ResBlock, Downsample, ResBlock + transformer."""
    cfg = UNetConfig(in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), num_heads=2, context_dim=8, norm_groups=4)  # fmt: skip
    torch.manual_seed(0)  # the default initialisation draws from the global generator
    return perturb(UNet(cfg), scale)


def tiny_dit(scale: float = 0.05) -> DiT:
    cfg = DiTConfig(in_channels=2, patch_size=2, hidden_size=16, depth=4, num_heads=2,
                    sample_size=8, context_dim=8)  # fmt: skip
    torch.manual_seed(0)
    return perturb(DiT(cfg), scale)


def count_calls(modules: list[torch.nn.Module]) -> list[int]:
    """A one-element counter increased by every forward of any of ``modules``."""
    n = [0]
    for m in modules:
        m.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def run(sampler: str, denoiser, cond, x, sigmas=GRID) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return SAMPLERS[sampler](lambda x, s: denoiser(x, s, cond), x, sigmas, generator=gen)


def run_guided(sampler: str, cfg: CFGDenoiser, x, sigmas=GRID) -> torch.Tensor:
    return SAMPLERS[sampler](cfg, x, sigmas, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def unet_setup():
    net = tiny_unet()
    den = build_denoiser("eps", net, train_sigmas=TRAIN_SIGMAS)
    cond = {"crossattn": randn(2, 3, 8, seed=2)}
    return net, den, cond, randn(2, 2, 8, 8, seed=1) * GRID[0]


# -- DeepCache ------------------------------------------------------------------------------
@torch.no_grad()
def test_deepcache_passthrough_and_validation(unet_setup):
    net, den, _, _ = unet_setup
    w = DeepCacheUNet(net)
    assert w.config is net.config and w.input_blocks is net.input_blocks
    assert {id(p) for p in w.parameters()} == {id(p) for p in net.parameters()}  # no copy
    with pytest.raises(TypeError):
        DeepCacheUNet(tiny_dit())
    with pytest.raises(ValueError):
        DeepCacheUNet(net, branch=len(net.output_blocks))
    with pytest.raises(ValueError):
        DeepCacheUNet(net, interval=0)
    with pytest.raises(ValueError):
        DeepCacheUNet(net, start=0.8, end=0.2)
    with deepcache(build_denoiser("flow", net)) as w:  # progress from the denoiser's range
        assert w.timestep_range == pytest.approx((1000 * 4096 / 4097, 1000 * 1e-3 / 1.001), 1e-3)
        assert w.progress(torch.tensor([500.0, 500.0])) == pytest.approx(0.5, abs=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_deepcache_interval_one_is_bit_identical(unet_setup, sampler):
    net, den, cond, x = unet_setup
    ref = run(sampler, den, cond, x)
    with deepcache(den, interval=1) as w:
        out = run(sampler, den, cond, x)
    assert torch.equal(out, ref) and w.cached_calls == 0
    assert den.net is net  # restored


@torch.no_grad()
@pytest.mark.parametrize("branch", [0, 1, 2, 3])
def test_deepcache_cached_call_skips_deep_blocks(branch):
    """A cached call on the same input as the full one reproduces it exactly (odd 7x9 size),
    while the deep blocks do not run and the shallow ones do."""
    net = tiny_unet()
    n = len(net.output_blocks)
    deep = count_calls([*net.input_blocks[branch + 1 :], net.middle_block,
                        *net.output_blocks[: n - 1 - branch]])  # fmt: skip
    shallow = count_calls([*net.input_blocks[: branch + 1], *net.output_blocks[n - 1 - branch :]])
    x, ctx, t = randn(2, 2, 7, 9, seed=0), randn(2, 3, 8, seed=1), torch.tensor([500.0, 500.0])
    ref = net(x, t, ctx)
    w = DeepCacheUNet(net, interval=3, branch=branch)
    deep[0] = shallow[0] = 0
    full, cached = w(x, t, ctx), w(x, t, ctx)
    assert torch.equal(full, ref) and torch.equal(cached, ref)
    n_deep = n - 1 - branch + (n - 1 - branch) + 1  # deep input blocks, output blocks, middle
    assert deep[0] == n_deep  # only in the full call
    assert shallow[0] == 2 * 2 * (branch + 1)  # in both calls
    assert (w.full_calls, w.cached_calls) == (1, 1)


@torch.no_grad()
def test_deepcache_schedule_counts_model_evaluations(unet_setup):
    """Full on call 0 and every ``interval`` calls: Heun's 39 evaluations at interval 3."""
    _, _, cond, x = unet_setup
    net = tiny_unet()
    den = build_denoiser("eps", net, train_sigmas=TRAIN_SIGMAS)
    middle = count_calls([net.middle_block])
    with deepcache(den, interval=3) as w:
        run("heun", den, cond, x)
    assert (w.full_calls, w.cached_calls) == (13, 26)
    assert middle[0] == w.full_calls


@torch.no_grad()
@pytest.mark.parametrize(
    "sampler, bounds",  # measured PSNR (dB): dpmpp_2m 56.3 / 51.3 / 47.4; heun 56.9 / 55.9 / 50.9
    [("dpmpp_2m", (52, 47, 43)), ("heun", (52, 51, 46))],
)
def test_deepcache_drift_grows_with_interval(unet_setup, sampler, bounds):
    _, den, cond, x = unet_setup
    ref = run(sampler, den, cond, x)
    scores = []
    for interval in (2, 3, 5):
        with deepcache(den, interval=interval) as w:
            scores.append(psnr(run(sampler, den, cond, x), ref))
        assert w.cached_calls > 0
    assert scores[0] > scores[1] > scores[2]
    assert all(s > b for s, b in zip(scores, bounds, strict=True)), scores


def trace(w: DeepCacheUNet) -> list[list]:
    """[progress, ran_deep_blocks] for every call of the wrapper."""
    calls: list[list] = []
    w.register_forward_pre_hook(lambda m, args: calls.append([m.progress(args[1]), False]))
    w.unet.middle_block.register_forward_hook(lambda *_: calls[-1].__setitem__(1, True))
    return calls


@torch.no_grad()
@pytest.mark.parametrize("start, end", [(0.3, 0.7), (0.0, 0.5), (0.5, 1.0)])
def test_deepcache_window_turns_caching_off_outside(start, end):
    net = tiny_unet()
    den = build_denoiser("eps", net, train_sigmas=TRAIN_SIGMAS)
    cond = {"crossattn": randn(1, 3, 8, seed=2)}
    with deepcache(den, interval=4, start=start, end=end) as w:
        assert w.timestep_range == pytest.approx((999.0, 0.0), abs=1e-3)
        calls = trace(w)
        run("dpmpp_2m", den, cond, randn(1, 2, 5, 7, seed=1) * GRID[0])
    assert len(calls) == 20 and all(0 <= p <= 1 for p, _ in calls)
    outside = [full for p, full in calls if not start <= p <= end]
    inside = [full for p, full in calls if start <= p <= end]
    assert outside and all(outside)
    assert inside.count(False) >= len(inside) // 2  # cached 3 of every 4 once inside


@torch.no_grad()
def test_deepcache_resets_on_batch_shape_new_trajectory_and_reset(unet_setup):
    net, *_ = unet_setup
    w = DeepCacheUNet(net, interval=10)
    ctx = randn(3, 3, 8, seed=1)
    x2, x3 = randn(2, 2, 8, 8, seed=0), randn(3, 2, 8, 8, seed=0)
    w(x2, torch.tensor(500.0), ctx[:2])
    w(x2, torch.tensor(480.0), ctx[:2])  # cached
    w(x2, torch.tensor(480.0), ctx[:2])  # same noise level (Heun): still cached
    assert (w.full_calls, w.cached_calls) == (1, 2)
    out = w(x3, torch.tensor(460.0), ctx)  # new batch shape: full, exact
    assert torch.equal(out, net(x3, torch.tensor(460.0), ctx)) and w.full_calls == 2
    w(x3, torch.tensor(440.0), ctx)
    w(x3, torch.tensor(900.0), ctx)  # noise rose: a new trajectory, full
    assert (w.full_calls, w.cached_calls) == (3, 3)
    w.reset()
    w(x3, torch.tensor(100.0), ctx)
    assert w.full_calls == 4


@torch.no_grad()
def test_deepcache_second_run_in_one_context_starts_fresh(unet_setup):
    """A new trajectory (the noise level jumps back up) drops the cache by itself."""
    _, den, cond, x = unet_setup
    with deepcache(den, interval=3) as w:
        first, second = run("dpmpp_2m", den, cond, x), run("dpmpp_2m", den, cond, x)
    assert torch.equal(first, second) and (w.full_calls, w.cached_calls) == (14, 26)


@torch.no_grad()
def test_deepcache_with_cfg_and_guidance_interval():
    """CFG's cond+uncond batch is one call; a guidance interval switches the batch between
    2B and B, which resets the cache instead of mixing batches. Odd 7x9 latents."""
    net = tiny_unet()
    den = build_denoiser("eps", net, train_sigmas=TRAIN_SIGMAS)
    cond, uncond = {"crossattn": randn(2, 3, 8, seed=2)}, {"crossattn": randn(2, 3, 8, seed=4)}
    x = randn(2, 2, 7, 9, seed=1) * GRID[0]
    for interval in (None, (0.5, 5.0)):
        cfg = CFGDenoiser(den, cond, uncond, 4.0, interval=interval)
        ref = run_guided("dpmpp_2m", cfg, x)
        for cache_interval, min_psnr in ((1, math.inf), (3, 46.0)):  # measured 50.6, 51.9
            batches: list[int] = []
            with deepcache(cfg, interval=cache_interval) as w:  # found via cfg.model.net
                w.register_forward_pre_hook(lambda m, a, seen=batches: seen.append(len(a[0])))
                out = run_guided("dpmpp_2m", cfg, x)
            assert psnr(out, ref) >= min_psnr
            assert w.full_calls + w.cached_calls == 20
            assert set(batches) == ({4} if interval is None else {2, 4})
        assert w.cached_calls > 0


@torch.no_grad()
def test_deepcache_swaps_castnet_unet_and_restores():
    """The SD pipeline's ``pipe.denoiser.net`` is a ``_CastNet`` holding ``.unet``."""
    net = tiny_unet()
    cast = _CastNet(net)
    den = build_denoiser("eps", cast, train_sigmas=TRAIN_SIGMAS)
    pipe = SimpleNamespace(unet=net, denoiser=den)  # the walk must reach the UNet actually run
    cond, x = {"crossattn": randn(1, 3, 8, seed=2)}, randn(1, 2, 8, 8, seed=1) * GRID[0]
    ref = run("euler", den, cond, x)
    with deepcache(pipe, interval=2) as w:
        assert cast.unet is w and pipe.unet is net and den.net is cast
        out = run("euler", den, cond, x)
        with pytest.raises(RuntimeError, match="already"), deepcache(den):
            pass
    assert cast.unet is net
    assert (w.full_calls, w.cached_calls) == (10, 10) and psnr(out, ref) > 50  # 56.7
    with pytest.raises(TypeError), deepcache(net):
        pass


# -- First-block cache ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_setup():
    dit = tiny_dit()
    den = build_denoiser("flow", dit)
    cond = {"crossattn": randn(2, 3, 8, seed=2)}
    sigmas = sch.get_sigmas("flow", 20)
    return dit, den, cond, randn(2, 2, 8, 8, seed=1) * sigmas[0], sigmas


@torch.no_grad()
def test_fbcache_threshold_zero_is_bit_identical(dit_setup):
    dit, den, cond, x, sigmas = dit_setup
    w = FirstBlockCacheDiT(dit, threshold=0.0)
    assert w.config is dit.config and w.out_channels == dit.out_channels
    t = torch.tensor([700.0, 300.0])
    assert torch.equal(w(x / 4096, t, cond["crossattn"]), dit(x / 4096, t, cond["crossattn"]))
    ref = run("heun", den, cond, x, sigmas)
    with first_block_cache(den, threshold=0.0) as w:
        assert den.net is w
        out = run("heun", den, cond, x, sigmas)
    assert den.net is dit
    assert torch.equal(out, ref) and (w.full_calls, w.cached_calls) == (39, 0)
    with pytest.raises(TypeError):
        FirstBlockCacheDiT(tiny_unet())


@torch.no_grad()
def test_fbcache_reuse_skips_remaining_blocks():
    dit = tiny_dit()
    first, rest = count_calls([dit.blocks[0]]), count_calls(list(dit.blocks[1:]))
    w = FirstBlockCacheDiT(dit, threshold=0.05)
    x, ctx, t = randn(2, 2, 8, 8, seed=0), randn(2, 3, 8, seed=1), torch.tensor(500.0)
    ref = w(x, t, ctx)
    first[0] = rest[0] = 0
    out = w(x, t, ctx)  # same input: first-block residual unchanged, reuse
    assert (w.full_calls, w.cached_calls) == (1, 1) and w.last_change == 0.0
    assert first[0] == 1 and rest[0] == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w(x[:1], t, ctx[:1])  # new batch shape: full
    w(x[:1] + 3.0, t, ctx[:1])  # a very different input: the change is large, full
    assert (w.full_calls, w.cached_calls) == (3, 1) and w.last_change > 0.05
    w.reset()
    w(x[:1], t, ctx[:1])
    assert w.full_calls == 4


@torch.no_grad()
@pytest.mark.parametrize(
    "sampler, thresholds, min_cached, min_psnr",
    # measured (cached of 20 / 39, PSNR dB): euler 0.1 -> 3, 91.6; 0.2 -> 17, 71.2;
    # heun 0.02 -> 19, 142.9 (the corrector's sigma is the next predictor's); 0.2 -> 36, 56.8
    [("euler", (0.1, 0.2), (2, 14), (80, 65)), ("heun", (0.02, 0.2), (15, 30), (100, 50))],
)
def test_fbcache_drift_and_savings_grow_with_threshold(
    dit_setup, sampler, thresholds, min_cached, min_psnr
):
    _, den, cond, x, sigmas = dit_setup
    ref = run(sampler, den, cond, x, sigmas)
    results = []
    for threshold in thresholds:
        with first_block_cache(den, threshold=threshold) as w:
            results.append((w, psnr(run(sampler, den, cond, x, sigmas), ref)))
    (w_lo, p_lo), (w_hi, p_hi) = results
    assert w_lo.cached_calls < w_hi.cached_calls and p_lo > p_hi
    assert w_lo.cached_calls >= min_cached[0] and w_hi.cached_calls >= min_cached[1], results
    assert p_lo > min_psnr[0] and p_hi > min_psnr[1], results


@torch.no_grad()
def test_fbcache_with_cfg(dit_setup):
    _, den, cond, x, sigmas = dit_setup
    cfg = CFGDenoiser(den, cond, {"crossattn": randn(2, 3, 8, seed=4)}, 3.0)
    ref = run_guided("euler", cfg, x, sigmas)
    with first_block_cache(cfg, threshold=0.2) as w:  # found via cfg.model.net
        out = run_guided("euler", cfg, x, sigmas)
    assert w.full_calls + w.cached_calls == 20 and w.cached_calls >= 10  # 15
    assert psnr(out, ref) > 60  # 69.0
