"""ldmkit.accel.amx_attention (the AMX flash-attention kernel) and ldmkit.accel.native.

The kernel's error against an fp64 reference is bounded by PyTorch's own bf16 attention error
on the same inputs, for shapes with ragged query and key tails, several head dims (including
SD 1.5's 40 and odd multiples of 16), strided views as the fused QKV projection makes them,
and cross-attention with few keys.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ldmkit.accel import amx_attention, native
from ldmkit.nn import layers

needs_amx = pytest.mark.skipif(
    not amx_attention.available(),
    reason="needs an x86-64 CPU with AMX-BF16 (Sapphire Rapids or later) and a C compiler",
)


def _qkv(b: int, h: int, n: int, s: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, m, d, generator=g).bfloat16() for m in (n, s, s)]


def _errors(q, k, v) -> tuple[float, float, float, float]:
    """(max, mean) abs error of the kernel and of PyTorch's bf16 SDPA against fp64."""
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = amx_attention.attention(q, k, v).double() - ref
    torchs = F.scaled_dot_product_attention(q, k, v).double() - ref
    return ours.abs().max(), ours.abs().mean(), torchs.abs().max(), torchs.abs().mean()


@needs_amx
@pytest.mark.parametrize(
    "b,h,n,s,d",
    [
        (2, 8, 300, 300, 40),  # SD 1.5 head dim, ragged query (QB 32) and key (KB 256) tails
        (1, 2, 33, 600, 64),  # several key blocks, one query row past a block
        (2, 3, 517, 77, 40),  # cross-attention: 77 text tokens
        (1, 2, 64, 129, 80),  # head dim 80: padded to 96 for q k^T, 80 for p v
        (1, 1, 40, 50, 160),  # largest head dim taken
        (1, 2, 5, 3, 2),  # tiny everything
    ],
)
def test_matches_fp64_as_closely_as_pytorchs_bf16_attention(b, h, n, s, d):
    q, k, v = _qkv(b, h, n, s, d)
    ours_max, ours_mean, torch_max, torch_mean = _errors(q, k, v)
    assert ours_mean <= 1.1 * torch_mean
    assert ours_max <= 1.5 * torch_max


@needs_amx
def test_large_scores_and_strided_views_from_a_fused_projection():
    """Views into a [B, L, 3, H, D] projection (row stride 3 H D), scores spread far apart
    (softmax nearly one-hot: the online rescaling must not overflow or lose rows), and the
    output laid out [B, L, H, D] so merging heads is free."""
    g = torch.Generator().manual_seed(1)
    b, n, h, d = 2, 270, 4, 40
    qkv = (torch.randn(b, n, 3, h, d, generator=g) * 4).bfloat16()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    ours_max, ours_mean, torch_max, torch_mean = _errors(q, k, v)
    assert ours_mean <= 1.1 * torch_mean and ours_max <= 1.5 * torch_max
    out = amx_attention.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    scale = 0.3  # an explicit scale
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    err = (amx_attention.attention(q, k, v, scale=scale).double() - ref).abs().max()
    assert err <= 1.5 * (F.scaled_dot_product_attention(q, k, v, scale=scale) - ref).abs().max()


@needs_amx
def test_same_output_whatever_the_thread_count():
    q, k, v = _qkv(2, 3, 200, 300, 64, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = amx_attention.attention(q, k, v)
        torch.set_num_threads(max(2, threads))
        many = amx_attention.attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_amx
def test_onednn_amx_matmuls_are_still_right_after_the_kernel():
    """The kernel loads its own AMX tile configuration on PyTorch's threads and restores the
    previous one: oneDNN's bf16 kernels run before and after it must agree."""
    g = torch.Generator().manual_seed(3)
    a, w = torch.randn(256, 512, generator=g).bfloat16(), torch.randn(512, 384, generator=g)
    w = w.bfloat16()
    before = a @ w
    amx_attention.attention(*_qkv(1, 2, 256, 256, 64))
    assert torch.equal(a @ w, before)


@needs_amx
def test_sdpa_dispatch_only_for_bf16_inference_without_mask(monkeypatch):
    calls = []
    real = amx_attention.attention
    monkeypatch.setattr(amx_attention, "attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv(1, 2, 256, 256, 40)
    with torch.inference_mode():
        layers.sdpa(q, k, v)
        assert len(calls) == 1
        layers.sdpa(q.float(), k.float(), v.float())  # fp32: PyTorch's kernel
        layers.sdpa(q, k, v, attn_mask=torch.ones(256, 256, dtype=torch.bool))
        layers.sdpa(q[..., :8, :], k[..., :8, :], v[..., :8, :])  # too short to pay off
    assert len(calls) == 1
    qg = q.clone().requires_grad_()
    layers.sdpa(qg, k, v).float().sum().backward()  # autograd: PyTorch's kernel
    assert len(calls) == 1 and qg.grad is not None


def test_supports_rejects_what_the_kernel_cannot_run():
    q, k, v = _qkv(1, 2, 256, 256, 40)
    assert not amx_attention.supports(q.float(), k.float(), v.float())
    assert not amx_attention.supports(q[..., :39], k[..., :39], v[..., :39])  # odd head dim
    big = _qkv(1, 1, 256, 256, 256)
    assert not amx_attention.supports(*big)  # head dim above MAX_HEAD_DIM
    assert not amx_attention.supports(q, k[:, :1], v[:, :1])  # broadcast heads
    assert not amx_attention.supports(q, k, v, torch.ones(256, 256, dtype=torch.bool))


def test_native_build_is_cached_and_a_failing_build_warns_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE_DIR", str(tmp_path))
    (tmp_path / "src").mkdir()
    monkeypatch.setattr(native, "SOURCES", tmp_path / "src")
    (tmp_path / "src" / "answer.c").write_text("int answer(void) { return 42; }\n")
    if native._compiler() is None:
        pytest.skip("needs a C compiler")
    first = native.build("answer", ("-O2",))
    mtime = first.stat().st_mtime_ns
    assert native.build("answer", ("-O2",)) == first and first.stat().st_mtime_ns == mtime
    assert native.build("answer", ("-O1",)) != first  # flags are part of the key
    native.load.cache_clear()
    try:
        assert native.load("answer", ("-O2",)).answer() == 42
        with pytest.warns(RuntimeWarning, match="unavailable"):
            assert native.load("answer", ("-fno-such-flag",)) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.load("answer", ("-fno-such-flag",)) is None  # cached: no new warning
        monkeypatch.setenv("LDMKIT_NATIVE", "0")
        assert native.load("answer", ("-O3",)) is None
    finally:
        native.load.cache_clear()
    built = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert len(built) == 2 and all(name.startswith("answer-") for name in built)  # no temp files
