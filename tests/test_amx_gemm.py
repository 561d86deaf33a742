"""ldmkit.accel.amx_gemm: the bf16 AMX GEMM with the GEGLU epilogue fused, and its 3x3
convolution (an implicit GEMM), through ``prepack``.

The kernel's inputs are bf16 and it accumulates and finishes in fp32, rounding once: against
an fp64 reference computed from the same bf16 inputs its error is the final rounding (half an
ulp) plus fp32 accumulation and gelu approximation error, far below that. The shapes have
ragged rows, columns and depths (the padded paths), strided rows and a missing bias.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ldmkit.accel import amx_gemm
from ldmkit.accel.fastpaths import prepare_for_inference
from ldmkit.accel.prepack import PackedConv2d, PackedGEGLU, prepack, unpack
from ldmkit.nn.attention import GEGLU, BasicTransformerBlock

pytestmark = pytest.mark.skipif(
    not amx_gemm.available(),
    reason="needs an x86-64 CPU with AMX-BF16 (Sapphire Rapids or later) and a C compiler",
)


def _data(m, k, n, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, w, b


def _exact_geglu(x, w, b):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    a, gate = y.chunk(2, -1)
    return a * F.gelu(gate)


def _check_rounded_once(out: torch.Tensor, exact: torch.Tensor) -> None:
    """Within bf16's rounding of the exact value (half an ulp of its binade: 8 significant
    bits), plus a little for fp32 accumulation and the erf approximation."""
    err = (out.double() - exact).abs()
    half_ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 8)
    bound = half_ulp + 1e-5 * (1 + exact.abs().max())
    assert bool((err <= bound).all()), float((err - bound).max())


SHAPES = [(1, 320, 2560), (31, 40, 48), (33, 70, 34), (100, 320, 640), (257, 640, 96)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_geglu_is_the_exact_value_rounded_once(m, k, n, bias):
    x, w, b = _data(m, k, n, bias=bias)
    packed = amx_gemm.pack(w, amx_gemm.GEGLU)
    out = amx_gemm.geglu(x, packed, n, b)
    assert out.shape == (m, n // 2) and out.dtype == torch.bfloat16
    exact = _exact_geglu(x, w, b)
    _check_rounded_once(out, exact)
    # and closer than PyTorch's three bf16 steps (a product, a gelu, a multiply: each rounded)
    a, gate = F.linear(x, w, b).chunk(2, -1)
    theirs = (a * F.gelu(gate)).double() - exact
    assert (out.double() - exact).norm() < theirs.norm()


def test_geglu_saturates_for_large_gates_and_leaves_denormals_on():
    """gelu(g) -> 0 for g << 0 and -> g for g >> 0 (exp(-z^2) underflows: the kernel flushes
    denormals while it runs and gives the thread's MXCSR back afterwards)."""
    x, w, _ = _data(64, 32, 64, seed=5)
    b = torch.cat([torch.zeros(32), torch.linspace(-60, 60, 32)]).bfloat16()
    out = amx_gemm.geglu(x, amx_gemm.pack(w, amx_gemm.GEGLU), 64, b)
    assert torch.isfinite(out).all()
    _check_rounded_once(out, _exact_geglu(x, w, b))
    assert (torch.tensor([1e-38]) / 100).item() != 0.0  # not flushed: MXCSR restored


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_plain_gemm_is_the_exact_value_rounded_once(m, k, n):
    x, w, b = _data(m, k, n, seed=1)
    out = amx_gemm.linear(x, amx_gemm.pack(w), n, b)
    _check_rounded_once(out, F.linear(x.double(), w.double(), b.double()))


def test_strided_rows_and_batched_inputs():
    """Rows of a wider tensor (a row stride above K) and a [B, L, K] input."""
    x, w, b = _data(64, 96, 64, seed=2)
    wide = torch.cat([x, torch.full_like(x, float("nan"))], dim=1)[:, :96]  # stride 192
    packed = amx_gemm.pack(w, amx_gemm.GEGLU)
    assert torch.equal(amx_gemm.geglu(wide, packed, 64, b), amx_gemm.geglu(x, packed, 64, b))
    batched = amx_gemm.geglu(x.view(2, 32, 96), packed, 64, b)
    assert batched.shape == (2, 32, 32)
    assert torch.equal(batched.view(64, 32), amx_gemm.geglu(x, packed, 64, b))


def test_same_output_whatever_the_thread_count():
    """Each output block is one thread's whole sum over K: no thread-dependent order."""
    x, w, b = _data(200, 320, 640, seed=3)
    packed = amx_gemm.pack(w, amx_gemm.GEGLU)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(amx_gemm.geglu(x, packed, 640, b))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_onednn_amx_matmuls_are_still_right_after_the_kernel():
    """The kernel loads its own tile configuration on PyTorch's threads and restores the
    previous one: oneDNN's bf16 matmuls before and after it must agree."""
    g = torch.Generator().manual_seed(4)
    a, w = torch.randn(256, 512, generator=g).bfloat16(), torch.randn(512, 384, generator=g)
    w = w.bfloat16()
    before = a @ w
    x, wt, b = _data(96, 320, 128)
    amx_gemm.geglu(x, amx_gemm.pack(wt, amx_gemm.GEGLU), 128, b)
    assert torch.equal(a @ w, before)


def test_bad_inputs_are_refused():
    x, w, b = _data(8, 32, 34)
    with pytest.raises(ValueError, match="even"):
        amx_gemm.pack(w[:33], amx_gemm.GEGLU)
    packed = amx_gemm.pack(w, amx_gemm.GEGLU)
    with pytest.raises(ValueError, match="does not match"):
        amx_gemm.geglu(torch.randn(8, 96).bfloat16(), packed, 34, b)


def test_supports_only_bf16_inference():
    x, w, b = _data(4, 32, 32)
    assert amx_gemm.supports(x, w, b)
    assert not amx_gemm.supports(x.float(), w.float(), b.float())
    with torch.enable_grad():
        assert not amx_gemm.supports(x, w.requires_grad_(), b)
    with torch.no_grad():
        assert amx_gemm.supports(x, w, b)


def test_packed_geglu_keeps_state_and_function_and_unpack_restores():
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 2, 32, context_dim=48).bfloat16()
    plain = copy.deepcopy(block)
    prepack(block)
    geglu = block.ff.net[0]
    assert type(geglu) is PackedGEGLU
    assert block.state_dict().keys() == plain.state_dict().keys()
    x, ctx = torch.randn(2, 40, 64).bfloat16(), torch.randn(2, 7, 48).bfloat16()
    geglu.min_rows = 1  # the kernel for any size (by default only from 256 rows)
    with torch.inference_mode():
        exact = _exact_geglu(x.view(-1, 64), geglu.proj.weight, geglu.proj.bias)
        _check_rounded_once(geglu(x).reshape(exact.shape), exact)
        assert torch.allclose(block(x, ctx).float(), plain(x, ctx).float(), atol=0.05, rtol=0.02)
    # training runs PyTorch's ops and gets gradients
    block.float().requires_grad_(True)
    geglu(x.float()).sum().backward()
    assert geglu.proj.weight.grad is not None
    unpack(block)
    assert type(block.ff.net[0]) is GEGLU and not hasattr(block.ff.net[0], "_pack")


def test_new_weights_are_repacked():
    torch.manual_seed(1)
    geglu = prepack(GEGLU(32, 16).bfloat16().requires_grad_(False))
    geglu.min_rows = 1
    x = torch.randn(5, 32).bfloat16()
    before = geglu(x)
    geglu.load_state_dict({k: v * 2 for k, v in geglu.state_dict().items()})
    after = geglu(x)
    _check_rounded_once(after, _exact_geglu(x, geglu.proj.weight, geglu.proj.bias))
    assert not torch.equal(before, after)


def test_prepare_for_inference_takes_the_kernels_in_bf16_only(monkeypatch):
    monkeypatch.setattr(PackedConv2d, "amx", True)  # the convolution is opt-in
    calls = []
    for name in ("geglu", "conv3x3"):
        real = getattr(amx_gemm, name)
        monkeypatch.setattr(
            amx_gemm, name, lambda *a, real=real, n=name: calls.append(n) or real(*a)
        )
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Flatten(2))
    block = BasicTransformerBlock(32, 2, 16)
    x = torch.randn(1, 32, 8, 16)  # 128 positions: past the im2col GEMM path
    with torch.inference_mode():
        prepare_for_inference(copy.deepcopy(block), torch.float32)(torch.randn(1, 8, 32))
        prepare_for_inference(copy.deepcopy(net), torch.float32)(x)
        assert calls == []
        fast = prepare_for_inference(block, torch.bfloat16)
        fast(torch.randn(1, 8, 32).bfloat16())  # 8 rows: oneDNN's linear + gelu + mul
        assert calls == []
        fast(torch.randn(2, 128, 32).bfloat16())
        prepare_for_inference(net, torch.bfloat16)(x.bfloat16())
    assert calls == ["geglu", "conv3x3"]


CONVS = [(1, 32, 32, 4, 16), (2, 64, 48, 3, 32), (2, 96, 40, 16, 16), (1, 32, 16, 1, 48)]


@pytest.mark.parametrize("b,c,k,h,w", CONVS)
def test_conv3x3_is_the_exact_value_rounded_once(b, c, k, h, w):
    """Ragged output channels, one-row images, several images (the tiles of one 32-pixel
    block then span image rows), with and without bias."""
    g = torch.Generator().manual_seed(b * c + k)
    x = (
        torch.randn(b, c, h, w, generator=g)
        .bfloat16()
        .contiguous(memory_format=torch.channels_last)
    )
    weight = (torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)).bfloat16()
    bias = torch.randn(k, generator=g).bfloat16() if c != 64 else None
    packed = amx_gemm.pack_conv3x3(weight)
    out = amx_gemm.conv3x3(x, packed, k, bias)
    assert out.shape == (b, k, h, w) and out.is_contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(
        x.double(), weight.double(), None if bias is None else bias.double(), padding=1
    )
    _check_rounded_once(out, exact)
    assert torch.equal(amx_gemm.conv3x3(x.contiguous(), packed, k, bias), out)  # NCHW input


def test_conv_applies_only_where_the_kernel_computes_the_layer():
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).bfloat16().requires_grad_(False)
    x = torch.randn(1, 32, 8, 16).bfloat16()
    assert amx_gemm.conv_applies(conv, x)
    assert not amx_gemm.conv_applies(torch.nn.Conv2d(32, 16, 3, padding=1).bfloat16(), x)
    assert not amx_gemm.conv_applies(conv, x[..., :8])  # width not a multiple of 16
    assert not amx_gemm.conv_applies(conv, x.float())
    for kwargs in ({"stride": 2}, {"dilation": 2, "padding": 2}, {"groups": 2}, {"padding": 0}):
        other = torch.nn.Conv2d(32, 32, 3, **{"padding": 1, **kwargs}).bfloat16()
        assert not amx_gemm.conv_applies(other.requires_grad_(False), x)
    assert not amx_gemm.conv_applies(torch.nn.Conv2d(48, 32, 3, padding=1).bfloat16(), x)
    with pytest.raises(ValueError, match="does not match"):
        amx_gemm.conv3x3(x, amx_gemm.pack_conv3x3(conv.weight[:, :16]), 32)
