"""oneDNN/MKL weight pre-packing (ldmkit.accel.prepack): exactness, cache invalidation, fallbacks.

The packed kernels compute the same products as the plain layers, rounded in an order that may
differ (PyTorch picks another fp32 kernel for small or grouped convolutions): every output is
bounded against a float64 reference as tightly as the plain layer's own output is.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from helpers import perturb, randn
from ldmkit.accel import amx_gemm
from ldmkit.accel import prepack as pk
from ldmkit.accel.fastpaths import prepare_for_inference
from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.denoisers.unet import UNet, UNetConfig

DTYPES = [d for d in (torch.float32, torch.bfloat16) if pk.available(d)]
pytestmark = pytest.mark.skipif(not pk.available(torch.float32), reason="no oneDNN in this build")


def assert_rounds_like(out: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    """``out`` is no further from ``exact`` (float64) than the plain layer's ``plain`` is, up to
    50% and a few fp32 ulps."""
    assert out.shape == plain.shape and out.dtype == plain.dtype
    err = (out.double() - exact).abs().max()
    plain_err = (plain.double() - exact).abs().max()
    assert err <= 1.5 * plain_err + 4e-7 * exact.abs().max(), (err, plain_err)


CONVS = [  # (in, out, kernel, stride, padding, dilation, groups, bias)
    (8, 16, 3, 1, 1, 1, 1, True),
    (8, 8, 3, 2, 1, 1, 1, True),  # Downsample
    (8, 16, 1, 1, 0, 1, 1, False),  # 1x1 skip / proj_in
    (8, 8, 3, 1, 2, 2, 4, True),  # dilated, grouped
    (6, 12, (3, 1), (1, 2), (1, 0), 1, 3, True),  # rectangular
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_conv_rounds_like_conv2d(
    spec: tuple, dtype: torch.dtype, channels_last: bool
) -> None:
    cin, cout, k, s, p, d, g, bias = spec
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain.to(memory_format=fmt)
    packed = pk.prepack(copy.deepcopy(plain))
    exact = copy.deepcopy(plain).double()
    assert type(packed) is pk.PackedConv2d
    with torch.no_grad():
        for hw in (9, 12, 9):  # a new input shape repacks; going back repacks again
            x = randn(2, cin, hw, hw + 3).to(dtype).contiguous(memory_format=fmt)
            out = packed(x)
            assert packed._pack.packed is not None  # the packed kernel really ran
            assert_rounds_like(out, plain(x), exact(x.double()))


@pytest.mark.skipif(not pk.available(torch.bfloat16), reason="no bf16 oneDNN kernels")
@pytest.mark.parametrize("hw", [(1, 1), (4, 4), (8, 5), (3, 9)])
@pytest.mark.parametrize("kernel", [3, 1, (3, 1)])
def test_small_low_precision_convs_run_as_one_gemm(hw: tuple, kernel) -> None:
    """At <= ``im2col_max_positions`` output positions, bf16 convolutions become im2col + GEMM."""
    torch.manual_seed(0)
    pad = (1, 0) if kernel == (3, 1) else (kernel // 2)
    plain = nn.Conv2d(24, 16, kernel, padding=pad).bfloat16().to(memory_format=torch.channels_last)
    packed = pk.prepack(copy.deepcopy(plain))
    exact = copy.deepcopy(plain).double()
    x = randn(2, 24, *hw).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = packed(x)
        assert packed._pack.key[3][0] in ("gemm", "amx")  # "amx": <= AMX_MAX_ROWS rows
        assert_rounds_like(out, plain(x), exact(x.double()))


@pytest.mark.skipif(not amx_gemm.available(), reason="needs AMX-BF16 and a C compiler")
@pytest.mark.parametrize("rows", [1, 2, 17, 32])
def test_skinny_low_precision_gemms_run_on_ldmkits_amx_kernel(rows: int, monkeypatch) -> None:
    """Linear layers and im2col convolutions of at most ``AMX_MAX_ROWS`` rows take ldmkit's
    AMX GEMM (one pack for every row count), rounded like the plain layer; more rows, or
    ``AMX_MAX_ROWS = 0``, take oneDNN's packed linear."""
    torch.manual_seed(0)
    lin = nn.Linear(1100, 70).bfloat16()  # ragged K and N: padded tiles
    conv = nn.Conv2d(40, 36, 3, padding=1).bfloat16()
    packed_lin, packed_conv = pk.prepack(copy.deepcopy(lin)), pk.prepack(copy.deepcopy(conv))
    exact_lin, exact_conv = copy.deepcopy(lin).double(), copy.deepcopy(conv).double()
    x = randn(rows, 1100).bfloat16()
    img = randn(rows, 40, 1, 1).bfloat16()  # one position per image: `rows` GEMM rows
    with torch.no_grad():
        for layer, plain, exact, inp in (
            (packed_lin, lin, exact_lin, x),
            (packed_conv, conv, exact_conv, img),
        ):
            out = layer(inp)
            assert layer._pack.key[3] == ("amx",)
            assert_rounds_like(out, plain(inp), exact(inp.double()))
        big = randn(pk.AMX_MAX_ROWS + 1, 1100).bfloat16()
        assert_rounds_like(packed_lin(big), lin(big), exact_lin(big.double()))
        assert packed_lin._pack.key[3] == ("gemm", pk.AMX_MAX_ROWS + 1)
        monkeypatch.setattr(pk, "AMX_MAX_ROWS", 0)
        packed_lin(x)
        assert packed_lin._pack.key[3] == ("gemm", rows)


@pytest.mark.skipif(not pk.available(torch.bfloat16), reason="no bf16 oneDNN kernels")
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_low_precision_pointwise_convs_run_as_one_gemm_at_any_size(fmt, monkeypatch) -> None:
    """1x1 convolutions (stride 1, no padding) are a GEMM over the pixels at any size."""
    torch.manual_seed(0)
    plain = nn.Conv2d(32, 24, 1).bfloat16().to(memory_format=torch.channels_last)
    packed = pk.prepack(copy.deepcopy(plain))
    exact = copy.deepcopy(plain).double()
    x = randn(2, 32, 16, 20).bfloat16().contiguous(memory_format=fmt)  # 320 > 64 positions
    with torch.no_grad():
        out = packed(x)
        assert packed._pack.key[3][0] == "gemm"
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_rounds_like(out, plain(x), exact(x.double()))
        monkeypatch.setattr(pk.PackedConv2d, "gemm_pointwise", False)
        packed(x)
        assert packed._pack.key[3] == tuple(x.shape)  # oneDNN's convolution again


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_rounds_like_the_plain_layer(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Linear(48, 40, bias=bias)
    plain.to(dtype)
    exact_w = copy.deepcopy(plain)
    packed = pk.prepack(copy.deepcopy(plain))
    x = randn(3, 17, 48).to(dtype)
    exact = exact_w.double()
    with torch.no_grad():
        for xin in (x, x[:, ::2], x.transpose(0, 1)):  # 3-D, strided and transposed inputs
            out = packed(xin)
            assert packed._pack.packed is not None
            assert out.shape == (*xin.shape[:-1], 40)
            assert_rounds_like(out, plain(xin), exact(xin.double()))


def test_unpacked_restores_the_packed_layers() -> None:
    net = pk.prepack(nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 1), nn.Conv1d(2, 2, 1)))
    with pk.unpacked(net):
        assert [type(m) for m in net] == [nn.Linear, nn.Conv2d, nn.Conv1d]
    assert [type(m) for m in net] == [pk.PackedLinear, pk.PackedConv2d, nn.Conv1d]
    assert net[0]._pack.packed is None


def test_cache_follows_weight_changes() -> None:
    torch.manual_seed(0)
    conv, lin = pk.prepack(nn.Conv2d(4, 4, 3, padding=1)), pk.prepack(nn.Linear(4, 4))
    x, t = randn(1, 4, 6, 6), randn(5, 4)
    with torch.no_grad():
        conv(x), lin(t)
        new_c = {k: v + 1 for k, v in conv.state_dict().items()}
        new_l = {k: v * 2 for k, v in lin.state_dict().items()}
        conv.load_state_dict(new_c)  # copy_ into the same storage: version counter moves
        lin.load_state_dict(new_l)
        ref_c = nn.Conv2d(4, 4, 3, padding=1)
        ref_c.load_state_dict(new_c)
        ref_l = nn.Linear(4, 4)
        ref_l.load_state_dict(new_l)
        torch.testing.assert_close(conv(x), ref_c(x))
        torch.testing.assert_close(lin(t), ref_l(t))
        conv.to(torch.float64)  # new storage and dtype: the plain path (no packed fp64 kernel)
        torch.testing.assert_close(conv(x.double()), ref_c.double()(x.double()))


def test_gradients_take_the_ordinary_path() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 2))
    ref = copy.deepcopy(net)
    pk.prepack(net)
    x = randn(2, 3, 5, 5)
    net(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert net[0]._pack.packed is None and net[2]._pack.packed is None  # nothing was packed
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_names_copies_pickles_and_unpack() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 2), nn.Conv1d(2, 2, 1))
    keys = list(net.state_dict())
    pk.prepack(net)
    x = randn(1, 3, 5, 5)
    with torch.no_grad():
        y = net[:3](x)
    assert list(net.state_dict()) == keys  # same parameter names: checkpoints are unaffected
    assert type(net[3]) is nn.Conv1d  # only 2-D convolutions and linear layers are swapped
    twin = copy.deepcopy(net)
    assert twin[0]._pack.packed is None  # copies start with an empty cache
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(twin[:3](x), y) and torch.equal(loaded[:3](x), y)
    pk.unpack(net)
    assert type(net[0]) is nn.Conv2d and type(net[2]) is nn.Linear
    assert not hasattr(net[0], "_pack")
    with torch.no_grad():
        torch.testing.assert_close(net[:3](x), y)


def _tiny_unet() -> UNet:
    cfg = UNetConfig(in_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), num_heads=2, context_dim=12, norm_groups=8)  # fmt: skip
    torch.manual_seed(0)
    return perturb(UNet(cfg))  # the zero-initialised layers get weights too


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepared_unet_and_vae_match_the_plain_networks(dtype: torch.dtype) -> None:
    """``prepare_for_inference`` (packing on) against the same dtype without packing, both
    against fp32: packing may not add error beyond the plain low-precision path's."""
    unet = _tiny_unet()
    x, ctx, t = randn(2, 4, 12, 10), randn(2, 7, 12, seed=1), torch.tensor([10, 900])
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                          norm_groups=8, latent_channels=4)).eval()  # fmt: skip
    z = randn(1, 4, 6, 5, seed=2)
    with torch.no_grad():
        exact = (unet(x, t, ctx), vae.decode(z))
        plain = [prepare_for_inference(copy.deepcopy(m), dtype, pack=False) for m in (unet, vae)]
        fast = [prepare_for_inference(copy.deepcopy(m), dtype) for m in (unet, vae)]
        assert any(type(m) is pk.PackedConv2d for m in fast[0].modules())
        for i, args in enumerate([(x.to(dtype), t, ctx.to(dtype)), (z.to(dtype),)]):
            run = (lambda m, a: m(*a)) if i == 0 else (lambda m, a: m.decode(*a))
            out, ref = run(fast[i], args).float(), run(plain[i], args).float()
            err = (out - exact[i]).abs().max()
            plain_err = (ref - exact[i]).abs().max()
            if dtype == torch.float32:
                assert err <= 1e-5
            else:
                assert err <= 1.5 * plain_err + 1e-3, (err, plain_err)
