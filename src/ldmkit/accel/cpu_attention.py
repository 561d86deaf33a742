"""ldmkit's CPU flash-attention kernels, for inference in bf16 (AMX) and fp32 (AVX-512).

PyTorch 2.13's CPU flash attention multiplies blocks through a generic GEMM call per block
(its AMX micro-kernel path is taken only for fp16): on two Sapphire Rapids cores the SD 1.5
UNet's 4096-token self-attention (512 px, head dim 40) runs at about 240 GFLOP/s in bf16 and
136 GFLOP/s in fp32. ldmkit's kernels use the same algorithm (FlashAttention's online
softmax; fp32 scores, softmax and accumulator) with the products written for the hardware:

- bf16, ``csrc/attention_amx.c``: AMX tiles for q k^T and P v, keys and values packed once per
  head into tile layout, P rounded to bf16 (as PyTorch's bf16 kernel does);
- fp32, ``csrc/attention_f32.c``: AVX-512 register blocks, keys packed transposed once per
  head, a degree-5 exponential (fp32's own rounding error).

Both exponentials are polynomials on AVX-512 (``csrc/flash_common.h``). The tests bound
their error against an fp64 reference by PyTorch's own error at the same precision.

``nn.layers.sdpa`` uses them for CPU inference without a mask when ``supports`` says yes;
everything else (gradients, masks, other dtypes, short sequences, CPUs without the
instructions, ``LDMKIT_NATIVE=0``) keeps ``F.scaled_dot_product_attention``. Work is split
over ``torch.get_num_threads()`` of PyTorch's own OpenMP threads.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from ldmkit.accel import native

_AVX512 = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp")
# dtype -> (C source, compiler flags, CPU flags needed, entry point, packed k / v size functions)
_KERNELS = {
    torch.bfloat16: (
        "attention_amx",
        (*_AVX512, "-mavx512dq", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
        {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl", "avx512dq"},
        "ldm_attention",
        ("ldm_kp_size", "ldm_vp_size"),
    ),
    torch.float32: (
        "attention_f32",
        _AVX512,
        {"avx512f", "avx512bw", "avx512vl", "fma"},
        "ldm_attention_f32",
        ("ldm_kt_size", "ldm_vp_size"),
    ),
}

# Where the kernels beat PyTorch's SDPA (2 threads, batch 2; a grid over 16, 64 and 256
# queries against 16, 64, 77 and 256 keys, head dims 32-160, 4-10 heads). bf16: from 32
# queries (one full block) and 1024 query x key pairs, 1.06-3.3x; with 16 queries 0.64-1.86x.
# Head dims up to 160 (at 256 and 512 the fp32 accumulator no longer fits the L1 cache: as
# fast as PyTorch or slower). fp32: from 64 queries and 64 keys and 16384 pairs, 0.96-2.0x
# (smaller: 0.33-1.39x); head dims up to 64 (1.06-1.19x at 1024 x 1024 for 40-64; 0.95x at
# 80). PyTorch's kernel is slowest against 77 keys (text tokens): 2-3.3x there.
MIN_QUERIES = {torch.bfloat16: 32, torch.float32: 64}
MIN_KEYS = {torch.bfloat16: 1, torch.float32: 64}
MIN_SCORES = {torch.bfloat16: 1024, torch.float32: 128 * 128}
MAX_HEAD_DIM = {torch.bfloat16: 160, torch.float32: 64}


class _Args(ctypes.Structure):
    """The C kernels' argument struct (``ldm_attn_args`` in ``csrc/flash_common.h``)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "k", "v", "out")]
    _fields_ += [(n, ctypes.c_int64) for n in ("B", "H", "L", "S", "D")]
    _fields_ += [(f"{t}s{d}", ctypes.c_int64) for t in "qkvo" for d in "bhl"]
    _fields_ += [("scale", ctypes.c_float), ("kp", ctypes.c_void_p), ("vp", ctypes.c_void_p)]


@functools.cache
def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    if dtype not in _KERNELS:
        return None
    name, flags, cpu, entry, sizes = _KERNELS[dtype]
    lib = native.load_for_cpu(name, flags, cpu, amx=dtype == torch.bfloat16)
    if lib is None:
        return None
    getattr(lib, entry).argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
    getattr(lib, entry).restype = ctypes.c_int
    for fn in sizes:
        getattr(lib, fn).argtypes = [ctypes.c_int64, ctypes.c_int64]
        getattr(lib, fn).restype = ctypes.c_int64
    return lib


def available(dtype: torch.dtype) -> bool:
    """Whether this machine runs the ``dtype`` kernel (Linux x86-64 with AVX-512, and AMX-BF16
    for bf16; a C compiler; ``LDMKIT_NATIVE`` not 0). Built on the first call."""
    return _library(dtype) is not None


def supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> bool:
    """Whether ``attention(q, k, v)`` can replace SDPA here: bf16 or fp32 [B, H, L, D] CPU
    tensors of the same dtype, B and H, no mask, no autograd, a head dim D up to
    ``MAX_HEAD_DIM[dtype]`` (even for bf16) with contiguous last dimension (and even row
    strides for bf16), at least ``MIN_QUERIES[dtype]`` queries, ``MIN_KEYS[dtype]`` keys and
    ``MIN_SCORES[dtype]`` query x key pairs, outside ``torch.compile``."""
    if attn_mask is not None or q.device.type != "cpu" or native.tracing():
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dtype not in _KERNELS:
        return False
    n, s = q.shape[-2], k.shape[-2]
    if n < MIN_QUERIES[q.dtype] or s < MIN_KEYS[q.dtype] or n * s < MIN_SCORES[q.dtype]:
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or k.shape[3] != q.shape[3]:
        return False
    if v.shape[3] != q.shape[3] or q.shape[3] > MAX_HEAD_DIM[q.dtype]:
        return False
    if any(t.stride(3) != 1 for t in (q, k, v)):
        return False
    if q.dtype == torch.bfloat16 and (q.shape[3] % 2 or any(t.stride(2) % 2 for t in (q, k, v))):
        return False  # the bf16 packing reads pairs of elements
    if q.dtype == torch.bfloat16 and 16 * k.stride(2) >= 2**31:
        return False  # it gathers 16 key rows with 32-bit offsets
    if native.needs_grad(q, k, v):
        return False
    return available(q.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v for [B, H, L, D] CPU tensors (``scale`` defaults to
    1/sqrt(D)); returns [B, H, L, D] (a view of a [B, L, H, D] tensor, so merging the heads
    after ``transpose(1, 2)`` needs no copy). Check ``supports`` first."""
    lib = _library(q.dtype)
    if lib is None:
        raise RuntimeError(f"no CPU attention kernel for {q.dtype} on this machine")
    _, _, _, entry, (k_size, v_size) = _KERNELS[q.dtype]
    b, h, n, d = q.shape
    s = k.shape[2]
    out = torch.empty(b, n, h, d, dtype=q.dtype).transpose(1, 2)
    kp = torch.empty(b * h * getattr(lib, k_size)(s, d), dtype=q.dtype)
    vp = torch.empty(b * h * getattr(lib, v_size)(s, d), dtype=q.dtype)
    args = _Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, n, s, d)
    for name, t in zip("qkvo", (q, k, v, out), strict=True):
        for dim, stride in zip("bhl", t.stride()[:3], strict=True):
            setattr(args, f"{name}s{dim}", stride)
    args.scale = 1.0 / math.sqrt(d) if scale is None else scale
    args.kp, args.vp = kp.data_ptr(), vp.data_ptr()
    if getattr(lib, entry)(ctypes.byref(args), torch.get_num_threads()) != 0:
        raise MemoryError("CPU attention: out of memory for its block buffers")
    return out
