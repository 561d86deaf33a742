"""bf16 attention on CPUs with AMX: ldmkit's flash-attention kernel (``csrc/attention_amx.c``).

PyTorch 2.13's CPU flash attention multiplies bf16 blocks through a generic GEMM call per
block (its AMX micro-kernel path is taken only for fp16), about 240 GFLOP/s on two Sapphire
Rapids cores for the SD 1.5 UNet's 4096-token self-attention (512 px). This kernel keeps the
query block in AMX tiles, packs each head's keys and values once into tile layout, and runs
the exponentials with AVX-512; same algorithm (online softmax, fp32 scores and accumulator, P
rounded to bf16), so outputs agree with PyTorch's bf16 attention to bf16 rounding
(``tests/test_amx_attention.py`` bounds the error against an fp64 reference).

``nn.layers.sdpa`` uses it for bf16 CPU inference without a mask when ``supports`` says yes;
everything else (gradients, masks, other dtypes, short sequences, no AMX, ``LDMKIT_NATIVE=0``)
keeps ``F.scaled_dot_product_attention``. Work is split over ``torch.get_num_threads()``
of PyTorch's own OpenMP threads.
"""

from __future__ import annotations

import ctypes
import functools
import math
import platform

import torch

from ldmkit.accel import native

_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
_FLAGS += ("-mamx-tile", "-mamx-bf16", "-fopenmp")
_CPU_FLAGS = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl"}

# Where the kernel beats PyTorch's (bf16, 2 threads, 16 heads): from about 128 x 128 query x
# key pairs (below, fixed costs dominate), head dims up to 160 (at 256 and 512 the fp32
# accumulator no longer fits the L1 cache and PyTorch's kernel is as fast or faster).
MIN_SCORES = 128 * 128
MAX_HEAD_DIM = 160


class _Args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "k", "v", "out")]
    _fields_ += [(n, ctypes.c_int64) for n in ("B", "H", "L", "S", "D")]
    _fields_ += [(f"{t}s{d}", ctypes.c_int64) for t in "qkvo" for d in "bhl"]
    _fields_ += [("scale", ctypes.c_float), ("kp", ctypes.c_void_p), ("vp", ctypes.c_void_p)]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def _library() -> ctypes.CDLL | None:
    if platform.machine() not in ("x86_64", "AMD64") or not _CPU_FLAGS.issubset(_cpu_flags()):
        return None
    lib = native.load("attention_amx", _FLAGS)
    if lib is None or lib.ldm_amx_request() != 0:  # the OS must grant the AMX tile state
        return None
    lib.ldm_attention.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
    lib.ldm_attention.restype = ctypes.c_int
    lib.ldm_kp_size.argtypes = lib.ldm_vp_size.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.ldm_kp_size.restype = lib.ldm_vp_size.restype = ctypes.c_int64
    return lib


def available() -> bool:
    """Whether this machine runs the kernel (Linux x86-64 with AMX-BF16, a C compiler, and
    ``LDMKIT_NATIVE`` not 0). Built on the first call."""
    return _library() is not None


def supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> bool:
    """Whether ``attention(q, k, v)`` can replace SDPA here: bf16 [B, H, L, D] CPU tensors of
    the same B and H, no mask, no autograd, an even head dim D <= ``MAX_HEAD_DIM`` with
    contiguous last dimension and even row strides, at least ``MIN_SCORES`` query x key pairs,
    outside ``torch.compile``."""
    if attn_mask is not None or q.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if q.shape[-2] * k.shape[-2] < MIN_SCORES:
        return False
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or k.shape[3] != q.shape[3]:
        return False
    if v.shape[3] != q.shape[3] or q.shape[3] % 2 or q.shape[3] > MAX_HEAD_DIM:
        return False
    if any(t.stride(3) != 1 or t.stride(2) % 2 for t in (q, k, v)):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    return available()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v for bf16 [B, H, L, D] CPU tensors (``scale`` defaults to
    1/sqrt(D)); returns [B, H, L, D] (a view of a [B, L, H, D] tensor, so merging the heads
    after ``transpose(1, 2)`` needs no copy). Check ``supports`` first."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX attention kernel is not available on this machine")
    b, h, n, d = q.shape
    s = k.shape[2]
    out = torch.empty(b, n, h, d, dtype=torch.bfloat16).transpose(1, 2)
    kp = torch.empty(b * h * lib.ldm_kp_size(s, d), dtype=torch.bfloat16)
    vp = torch.empty(b * h * lib.ldm_vp_size(s, d), dtype=torch.bfloat16)
    args = _Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, n, s, d)
    for name, t in zip("qkvo", (q, k, v, out), strict=True):
        for dim, stride in zip("bhl", t.stride()[:3], strict=True):
            setattr(args, f"{name}s{dim}", stride)
    args.scale = 1.0 / math.sqrt(d) if scale is None else scale
    args.kp, args.vp = kp.data_ptr(), vp.data_ptr()
    if lib.ldm_attention(ctypes.byref(args), torch.get_num_threads()) != 0:
        raise MemoryError("AMX attention: out of memory for its block buffers")
    return out
