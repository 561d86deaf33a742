"""Low-memory fast paths (ldmkit.accel.tiling, ldmkit.accel.slicing) on tiny random networks.

Tiling: the blend weights are a partition of unity, tiling is exact for position-wise maps
and when one tile covers the input, and measured bounds on how far tiled VAE passes drift
from the full ones. Slicing: exact up to rounding on a UNet and a VAE, actually chunked, and
reversible.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ldmkit.nn.layers as layers
from helpers import perturb, psnr, randn
from ldmkit.accel.slicing import attention_slicing
from ldmkit.accel.tiling import blend_weights, run_tiled, tile_starts, tiled_decode, tiled_encode
from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.denoisers.unet import UNet, UNetConfig


def tiny_vae(mid_attention: bool = False, seed: int = 0) -> AutoencoderKL:
    """f = 2, 32/64 channels; a non-trivial latent scale so ``scaled`` matters."""
    torch.manual_seed(seed)
    cfg = AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                            latent_channels=4, mid_attention=mid_attention,
                            scaling_factor=0.5, shift_factor=0.1)  # fmt: skip
    return AutoencoderKL(cfg).eval()


# -- tile layout and blend weights ------------------------------------------------------------


@pytest.mark.parametrize("size,tile,overlap", [(10, 4, 1), (23, 12, 6), (16, 8, 0), (9, 8, 7)])
def test_tiles_cover_and_weights_sum_to_one(size: int, tile: int, overlap: int) -> None:
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    weights = blend_weights(starts, tile, size)
    total = torch.zeros(size)
    for s, w in zip(starts, weights, strict=True):
        assert w.shape == (tile,) and bool((w > 0).all())
        total[s : s + tile] += w
    torch.testing.assert_close(total, torch.ones(size), atol=1e-6, rtol=0)
    # linear ramps: tile 0 falls monotonically across its overlap with tile 1
    first = weights[0][starts[1] :]
    assert bool((first[1:] < first[:-1]).all())
    assert tile_starts(size, size, 0) == [0] and tile_starts(size, size + 5, 3) == [0]


def test_run_tiled_is_exact_for_position_wise_maps() -> None:
    """Maps without spatial context (x4 nearest upsampling, 4x4 average pooling) tile exactly."""
    x = randn(2, 3, 23, 18, seed=0)
    up = lambda t: F.interpolate(t, scale_factor=4) * 2 - 1  # noqa: E731
    out = run_tiled(up, x, tile=8, overlap=3, out_size=lambda n: 4 * n)
    torch.testing.assert_close(out, up(x), atol=1e-6, rtol=0)
    x = randn(1, 3, 44, 36, seed=1)
    out = run_tiled(lambda t: F.avg_pool2d(t, 4), x, tile=16, overlap=8, out_size=lambda n: n // 4)
    torch.testing.assert_close(out, F.avg_pool2d(x, 4), atol=1e-6, rtol=0)
    # 1-D and 3-D inputs take the same path
    x1 = randn(1, 2, 37, seed=2)
    torch.testing.assert_close(run_tiled(lambda t: t * 3, x1, 10, 4, lambda n: n), x1 * 3)
    x3 = randn(1, 2, 5, 9, 7, seed=3)
    torch.testing.assert_close(run_tiled(torch.tanh, x3, 4, 2, lambda n: n), torch.tanh(x3))


def test_bad_tiling_arguments() -> None:
    vae = tiny_vae()
    z = randn(1, 4, 8, 8, seed=0)
    with pytest.raises(ValueError, match="overlap"):
        tiled_decode(vae, z, tile=4, overlap=4)
    with pytest.raises(ValueError, match="tile"):
        tiled_decode(vae, z, tile=0, overlap=0)
    with pytest.raises(ValueError, match="multiples of f=2"):
        tiled_encode(vae, randn(1, 3, 16, 16, seed=0), tile=7, overlap=2)


# -- tiled VAE ------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("scaled", [True, False])
def test_one_tile_is_the_untiled_pass(scaled: bool) -> None:
    vae = tiny_vae(mid_attention=True)
    z = randn(1, 4, 11, 13, seed=0)
    ref = vae.decode(z, scaled=scaled)
    assert torch.equal(tiled_decode(vae, z, tile=13, overlap=4, scaled=scaled), ref)
    assert torch.equal(tiled_decode(vae, z, tile=64, overlap=16, scaled=scaled), ref)
    x = randn(1, 3, 22, 26, seed=1)
    ref = vae.encode(x, scaled=scaled)
    assert torch.equal(tiled_encode(vae, x, tile=26, overlap=8, scaled=scaled), ref)
    assert torch.equal(tiled_encode(vae, x, scaled=scaled), ref)


# Measured (torch 2.13 CPU fp32, these seeds). The drift is not confined to the seams: every
# GroupNorm normalises each tile with that tile's statistics, and random weights carry the
# tiles' zero-padded borders far. (Injecting the exact full-image statistics into every GroupNorm
# raised PSNR only from 31.8 to 35.2 dB on a 48 x 40 latent at tile 16 / overlap 8, so both
# matter; wider tiles shrink both: tile 32 / overlap 8 gave ~43 dB there.) Decoding this
# 23 x 19 latent (output range ~3) at tile 12 / overlap 6: without mid attention max |err| 0.32,
# 32.5 dB; with it 0.46, 31.4 dB. Abutting tiles (overlap 0): 0.93, 29.0 dB and 0.67, 28.5 dB.
@torch.no_grad()
@pytest.mark.parametrize("mid_attention,max_err,min_psnr", [(False, 0.5, 30.5), (True, 0.7, 29.5)])
def test_tiled_decode_drift(mid_attention: bool, max_err: float, min_psnr: float) -> None:
    vae = tiny_vae(mid_attention)
    z = randn(1, 4, 23, 19, seed=0)  # not a multiple of the tile: last tiles shifted back
    ref = vae.decode(z)
    out = tiled_decode(vae, z, tile=12, overlap=6)
    assert out.shape == ref.shape == (1, 3, 46, 38)
    assert float((out - ref).abs().max()) < max_err
    assert psnr(out, ref) > min_psnr
    # the overlap and its ramps do part of the work: abutting tiles drift further
    hard = tiled_decode(vae, z, tile=12, overlap=0)
    assert psnr(hard, ref) < psnr(out, ref) - 2
    assert float((hard - ref).abs().max()) > float((out - ref).abs().max())


# Measured as above: a 3 x 46 x 38 image at tile 24 / overlap 8 (latent range ~1): without mid
# attention max |err| 0.20, 32.3 dB; with it 0.13, 31.1 dB.
@torch.no_grad()
@pytest.mark.parametrize("mid_attention,max_err,min_psnr", [(False, 0.3, 30.5), (True, 0.2, 29.5)])
def test_tiled_encode_drift(mid_attention: bool, max_err: float, min_psnr: float) -> None:
    vae = tiny_vae(mid_attention)
    x = randn(2, 3, 46, 38, seed=1)
    ref = vae.encode(x)
    out = tiled_encode(vae, x, tile=24, overlap=8)
    assert out.shape == ref.shape == (2, 4, 23, 19)
    assert float((out - ref).abs().max()) < max_err
    assert psnr(out, ref) > min_psnr


# -- attention slicing ----------------------------------------------------------------------
# Peak memory, measured once (not asserted; peak RSS of a fresh process, CPU, 1 thread, no grad):
# one [1, 1, 4096, 64] attention under the math kernel +152 MiB, sliced at 512 rows +29 MiB; under
# the default (fused) CPU kernel +5 MiB either way, so slicing pays only where scores are
# materialised. For comparison, tiled_decode of a 256 x 256 latent with the tiny VAE below:
# +272 MiB untiled, +49 MiB at tile 64 / overlap 16 (4.2 s against 2.3 s: 25 overlapping tiles).


def tiny_unet() -> UNet:
    """Two levels with transformers (self- and cross-attention), parameters perturbed so the
    zero-initialised ``proj_out`` layers do not hide the attention."""
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(0, 1), num_heads=2, context_dim=8, norm_groups=4)  # fmt: skip
    return perturb(UNet(cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slicing_is_exact_on_unet_and_vae(dtype: torch.dtype) -> None:
    """Equal up to rounding: float64 agrees to 2e-15; in float32 the fused kernel sums in a
    different order per chunk, which the VAE decoder amplifies to ~2e-6 on outputs of ~1."""
    net, vae = tiny_unet().to(dtype), tiny_vae(mid_attention=True).to(dtype)
    x, ctx = randn(2, 4, 12, 10, seed=0).to(dtype), randn(2, 5, 8, seed=1).to(dtype)
    t = torch.tensor([10.0, 500.0], dtype=dtype)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    z = randn(1, 4, 12, 10, seed=2).to(dtype)
    with torch.no_grad():
        ref_net = net(x, t, ctx, context_mask=mask)
        ref_vae = vae.decode(z)
        with attention_slicing(7):  # 120 and 30 tokens: uneven chunks
            out_net = net(x, t, ctx, context_mask=mask)
            out_vae = vae.decode(z)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    torch.testing.assert_close(out_net, ref_net, **tol)
    torch.testing.assert_close(out_vae, ref_vae, **tol)
    # gradients too (the in-place writes of the chunks are differentiable)
    xg = x.clone().requires_grad_(True)
    net(xg, t, ctx).square().sum().backward()
    ref_grad, xg.grad = xg.grad, None
    with attention_slicing(16):
        net(xg, t, ctx).square().sum().backward()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    torch.testing.assert_close(xg.grad, ref_grad, **tol)


def test_slicing_chunks_queries_and_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel sees at most ``slice_size`` query rows; per-query masks are sliced along."""
    q, k, v = randn(2, 3, 10, 4, seed=0), randn(2, 3, 6, 4, seed=1), randn(2, 3, 6, 5, seed=2)
    mask = randn(10, 6, seed=3) > -0.5
    mask[:, 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    seen: list[tuple[int, ...]] = []
    kernel = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append((q.shape[-2], *(attn_mask.shape if attn_mask is not None else ())))
        return kernel(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad(), attention_slicing(4):
        out = layers.sdpa(q, k, v, attn_mask=mask)
    assert seen == [(4, 4, 6), (4, 4, 6), (2, 2, 6)]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # a mask broadcast over the queries is passed whole
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    seen.clear()
    with torch.no_grad(), attention_slicing(3):
        out = layers.sdpa(q, k, v, attn_mask=pad)
    assert [s[:2] for s in seen] == [(3, 2)] * 3 + [(1, 2)]
    torch.testing.assert_close(out, kernel(q, k, v, attn_mask=pad), atol=1e-6, rtol=0)


def test_slicing_is_scoped_and_nests() -> None:
    assert layers.QUERY_SLICE.get() is None
    with attention_slicing(8):
        assert layers.QUERY_SLICE.get() == 8
        with attention_slicing(2):  # nested: the inner size applies, then the outer returns
            assert layers.QUERY_SLICE.get() == 2
        with attention_slicing(None):  # off inside
            assert layers.QUERY_SLICE.get() is None
        assert layers.QUERY_SLICE.get() == 8
    assert layers.QUERY_SLICE.get() is None
    with pytest.raises(RuntimeError, match="boom"), attention_slicing(4):
        raise RuntimeError("boom")
    assert layers.QUERY_SLICE.get() is None
    with pytest.raises(ValueError, match="slice_size"), attention_slicing(0):
        pass


def test_unet_and_vae_trace_in_one_graph_for_compile() -> None:
    """``torch.compile`` must see whole networks: a graph break per attention layer (the
    slicing ContextVar once caused one) leaves most of a compiled UNet eager, and each block's
    frame then recompiles per parameter set until dynamo's limit."""
    import torch._dynamo

    from ldmkit.accel.prepack import prepack

    net, vae = tiny_unet(), tiny_vae(mid_attention=True)
    packed = prepack(tiny_unet())  # packed layers fall back to plain ops when compiled
    x, ctx, t = randn(2, 4, 12, 10, seed=0), randn(2, 5, 8, seed=1), torch.tensor([10, 500])
    z = randn(1, 4, 6, 5, seed=2)
    with torch.no_grad():
        for fn, args in ((net, (x, t, ctx)), (packed, (x, t, ctx)), (vae.decode, (z,))):
            explained = torch._dynamo.explain(fn)(*args)
            assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
