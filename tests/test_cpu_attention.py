"""ldmkit.accel.cpu_attention (the bf16 AMX and fp32 AVX-512 flash-attention kernels) and
ldmkit.accel.native.

Each kernel's error against an fp64 reference is bounded by PyTorch's own attention error at
the same precision on the same inputs, for shapes with ragged query and key tails, several
head dims (including SD 1.5's 40), strided views as the fused QKV projection makes them, and
cross-attention with few keys.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ldmkit.accel import cpu_attention, native
from ldmkit.nn import layers

DTYPES = [
    pytest.param(
        dt,
        marks=pytest.mark.skipif(
            not cpu_attention.available(dt),
            reason=f"needs an x86-64 CPU with {need} and a C compiler",
        ),
    )
    for dt, need in (
        (torch.bfloat16, "AMX-BF16 (Sapphire Rapids or later)"),
        (torch.float32, "AVX-512"),
    )
]
needs_amx = pytest.mark.skipif(
    not cpu_attention.available(torch.bfloat16),
    reason="needs an x86-64 CPU with AMX-BF16 (Sapphire Rapids or later) and a C compiler",
)


def _qkv(b, h, n, s, d, seed=0, dtype=torch.bfloat16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, m, d, generator=g).to(dtype) for m in (n, s, s)]


# Allowed (mean, max) error relative to PyTorch's. In fp32 both are at rounding level (about
# 3e-8 here), where the summation order alone moves the mean error by up to a third.
TOLERANCE = {torch.bfloat16: (1.1, 1.5), torch.float32: (1.5, 1.5)}


def _errors(q, k, v) -> tuple[float, float, float, float]:
    """(max, mean) abs error of the kernel and of PyTorch's SDPA against fp64."""
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = cpu_attention.attention(q, k, v).double() - ref
    torchs = F.scaled_dot_product_attention(q, k, v).double() - ref
    return ours.abs().max(), ours.abs().mean(), torchs.abs().max(), torchs.abs().mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,h,n,s,d",
    [
        (2, 8, 300, 300, 40),  # SD 1.5 head dim, ragged query (QB 32) and key (KB 256) tails
        (1, 2, 33, 600, 64),  # several key blocks, one query row past a block
        (2, 3, 517, 77, 40),  # cross-attention: 77 text tokens
        (1, 2, 64, 129, 80),  # head dim 80: padded to 96 for q k^T, 80 for p v
        (1, 1, 40, 50, 160),  # the largest head dim the bf16 dispatch takes
        (1, 2, 5, 3, 2),  # tiny everything
        (1, 2, 70, 90, 24),  # a head dim that is not a multiple of 16
    ],
)
def test_matches_fp64_as_closely_as_pytorchs_attention(b, h, n, s, d, dtype):
    q, k, v = _qkv(b, h, n, s, d, dtype=dtype)
    ours_max, ours_mean, torch_max, torch_mean = _errors(q, k, v)
    mean_tol, max_tol = TOLERANCE[dtype]
    assert ours_mean <= mean_tol * torch_mean
    assert ours_max <= max_tol * torch_max


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_scores_and_strided_views_from_a_fused_projection(dtype):
    """Views into a [B, L, 3, H, D] projection (row stride 3 H D), scores spread far apart
    (softmax nearly one-hot: the online rescaling must not overflow or lose rows), and the
    output laid out [B, L, H, D] so merging heads is free."""
    g = torch.Generator().manual_seed(1)
    b, n, h, d = 2, 270, 4, 40
    qkv = (torch.randn(b, n, 3, h, d, generator=g) * 4).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    ours_max, ours_mean, torch_max, torch_mean = _errors(q, k, v)
    mean_tol, max_tol = TOLERANCE[dtype]
    assert ours_mean <= mean_tol * torch_mean and ours_max <= max_tol * torch_max
    out = cpu_attention.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    scale = 0.3  # an explicit scale
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    err = (cpu_attention.attention(q, k, v, scale=scale).double() - ref).abs().max()
    assert err <= max_tol * (F.scaled_dot_product_attention(q, k, v, scale=scale) - ref).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [40, 64])  # bf16: row sums from a ones column in v, or not
@pytest.mark.parametrize("jump", [2.5, 25.0])  # exp(later scores): 2^32-2^41 / 2^325-2^410 x
def test_later_key_blocks_with_far_larger_scores(dtype, d, jump):
    """Key blocks past the first with far larger scores: the online softmax rescales the
    output and the row sums (for bf16 with head dim 40 these are a column of P v) by
    about 2^-40, or flushes them to 0."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 40, d, generator=g).abs() + 1  # every score grows with k
    k = torch.randn(1, 2, 600, d, generator=g) * 0.5
    k[:, :, 256:] += jump * 40 / d  # keys past the first block of 256
    v = torch.randn(1, 2, 600, d, generator=g)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    ours_max, ours_mean, torch_max, torch_mean = _errors(q, k, v)
    assert torch.isfinite(cpu_attention.attention(q, k, v)).all()
    mean_tol, max_tol = TOLERANCE[dtype]
    assert ours_mean <= mean_tol * torch_mean and ours_max <= max_tol * torch_max


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_output_whatever_the_thread_count(dtype):
    q, k, v = _qkv(2, 3, 200, 300, 64, seed=2, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.attention(q, k, v)
        torch.set_num_threads(max(2, threads))
        many = cpu_attention.attention(q, k, v)
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
    cpu_attention.attention(*_qkv(1, 2, 256, 256, 64))
    assert torch.equal(a @ w, before)


@needs_amx
def test_sdpa_dispatch_only_for_inference_without_mask(monkeypatch):
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv(1, 2, 256, 256, 40)
    with torch.inference_mode():
        layers.sdpa(q, k, v)
        layers.sdpa(q.float(), k.float(), v.float())
        assert len(calls) == 2
        layers.sdpa(q.half(), k.half(), v.half())  # fp16: PyTorch's kernel
        layers.sdpa(q, k, v, attn_mask=torch.ones(256, 256, dtype=torch.bool))
        layers.sdpa(q[..., :8, :], k[..., :8, :], v[..., :8, :])  # too short to pay off
    assert len(calls) == 2
    qg = q.clone().requires_grad_()
    layers.sdpa(qg, k, v).float().sum().backward()  # autograd: PyTorch's kernel
    assert len(calls) == 2 and qg.grad is not None


def test_supports_rejects_what_the_kernel_cannot_run():
    q, k, v = _qkv(1, 2, 256, 256, 40)
    assert not cpu_attention.supports(q.half(), k.half(), v.half())
    assert not cpu_attention.supports(q.float(), k, v)  # mixed dtypes
    assert not cpu_attention.supports(q[..., :39], k[..., :39], v[..., :39])  # odd bf16 head dim
    big = _qkv(1, 1, 256, 256, 256)
    assert not cpu_attention.supports(*big)  # head dim above MAX_HEAD_DIM
    assert not cpu_attention.supports(*(t.float() for t in _qkv(1, 1, 256, 256, 80)))
    assert not cpu_attention.supports(q, k[:, :1], v[:, :1])  # broadcast heads
    assert not cpu_attention.supports(q, k, v, torch.ones(256, 256, dtype=torch.bool))
    assert not cpu_attention.supports(*_qkv(1, 2, 16, 256, 40))  # under a bf16 query block
    assert not cpu_attention.supports(*(t.float() for t in _qkv(1, 2, 256, 32, 40)))  # few keys
    text = _qkv(1, 2, 64, 77, 40)  # cross-attention against 77 text tokens
    assert cpu_attention.supports(*text) == cpu_attention.available(torch.bfloat16)


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_traced_graph_gets_sdpa_not_the_opaque_kernel(dtype):
    """torch.jit.trace (OpenVINO's converter, the TorchScript ONNX exporter) cannot see into a
    C call: a trace taken through the kernel would replay stale outputs for new inputs."""
    q, k, v = _qkv(1, 2, 256, 256, 40, dtype=dtype)
    with torch.no_grad():
        traced = torch.jit.trace(layers.sdpa, (q, k, v), check_trace=False)
        q2, k2, v2 = _qkv(1, 2, 256, 256, 40, seed=5, dtype=dtype)
        assert torch.allclose(traced(q2, k2, v2), F.scaled_dot_product_attention(q2, k2, v2))
