"""ldmkit's bf16 GEMM on AMX tiles (``csrc/gemm_amx.c``): the GEGLU feed-forward in one pass,
skinny GEMMs that stream their weights, and 3x3 convolutions as an implicit GEMM.

GEGLU: the transformer blocks of Stable Diffusion's UNet open their feed-forward with
``a * gelu(g)``, ``[a, g] = proj(x)`` (``nn.attention.GEGLU``). In PyTorch that is a linear
layer writing the [tokens, 2 x inner] product, then a gelu pass and a multiply pass over half
of it: at 512 px (8192 tokens at batch 2, 320 -> 2 x 1280) the product is 42 MB, past glibc's
mmap threshold, so every call also page-faults in fresh memory. On two Sapphire Rapids cores
the three steps took 42-46 ms against 20-24 ms for ``geglu``, which finishes each 32 x 32 block
of products in registers (bias, the exact-erf gelu, the product) and writes only the
[tokens, inner] result, rounded to bf16 once (its error against fp64 is about half of the
three-step path's).

3x3 convolutions: ``conv3x3`` runs a stride-1, padding-1 convolution on a zero-padded NHWC
copy of the input, each 16-row A tile being 16 neighbouring output pixels of one image row at
one of the nine taps (loaded in place, row stride = channels), K the taps times the channels.

Skinny GEMMs: with few rows a GEMM mostly reads its weight from memory; the kernel requests
the weight ahead of its tile loads where it comes from memory, which oneDNN's packed linear
does not match at these sizes.

``prepack`` uses the GEGLU for bf16 CPU inference (``PackedGEGLU``), ``linear`` for bf16 GEMMs
of at most ``prepack.AMX_MAX_ROWS`` rows (linear layers and small convolutions as im2col
GEMMs; with more rows oneDNN's bf16 GEMM is as fast or faster), and the convolution when
``PackedConv2d.amx`` is set (opt-in: not measured faster than oneDNN's here); the weights are
packed on first use and cached with the layer.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.accel import native

_FLAGS = (
    "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mavx512bf16", "-mamx-tile",
    "-mamx-bf16", "-fopenmp",
)  # fmt: skip
_CPU_FLAGS = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl"}
PLAIN, GEGLU = 0, 1  # the kernel's epilogues (LDM_GEMM_* in csrc/gemm_amx.c)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load_for_cpu("gemm_amx", _FLAGS, _CPU_FLAGS, amx=True)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ldm_gemm_pack_size.argtypes = [i64, i64]
    lib.ldm_gemm_pack_size.restype = i64
    lib.ldm_gemm_pack.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr]
    lib.ldm_gemm_pack.restype = None
    lib.ldm_gemm.argtypes = [
        ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int, ptr, i64, ctypes.c_int,
    ]  # fmt: skip
    lib.ldm_gemm.restype = ctypes.c_int
    lib.ldm_conv3x3.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.ldm_conv3x3.restype = ctypes.c_int
    return lib


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX GEMM kernel is not available on this machine")
    return lib


def available() -> bool:
    """Whether the kernel runs here (Linux x86-64 with AMX-BF16, a C compiler,
    ``LDMKIT_NATIVE`` not 0). Built on the first call."""
    return _library() is not None


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """bf16 CPU input and weight, no autograd through them, not compiling or tracing."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and not native.needs_grad(x, weight, bias)
        and not native.tracing()
        and available()
    )


def pack(weight: torch.Tensor, epilogue: int = PLAIN) -> torch.Tensor:
    """``weight`` [N, K] (bf16) in the kernel's tile layout for ``epilogue``: a flat bf16
    tensor. For GEGLU, N is even: value rows first, then gate rows, as ``GEGLU.proj`` has."""
    lib = _require()
    if weight.dim() != 2:
        raise ValueError(f"pack takes a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if epilogue == GEGLU and n % 2:
        raise ValueError(f"a GEGLU weight needs an even number of rows, got {n}")
    w = weight.detach()
    if w.stride(1) != 1:
        w = w.contiguous()
    packed = torch.empty(lib.ldm_gemm_pack_size(n, k), dtype=torch.bfloat16)
    lib.ldm_gemm_pack(w.data_ptr(), n, k, w.stride(0), epilogue, packed.data_ptr())
    return packed


def _bias32(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the kernel reads it: contiguous fp32 (the epilogue adds it in fp32)."""
    return None if bias is None else bias.detach().float().contiguous()


def _run(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None, epilogue: int
) -> torch.Tensor:
    lib = _require()
    k = x.shape[-1]
    if packed.numel() != lib.ldm_gemm_pack_size(n, k):
        raise ValueError(f"packed weight does not match a [{n}, {k}] weight")
    a = x.reshape(-1, k)
    if a.stride(-1) != 1:
        a = a.contiguous()
    cols = n // 2 if epilogue == GEGLU else n
    out = torch.empty(a.shape[0], cols, dtype=torch.bfloat16)
    b = _bias32(bias)
    rc = lib.ldm_gemm(
        a.data_ptr(), a.shape[0], k, a.stride(0), packed.data_ptr(), n,
        None if b is None else b.data_ptr(), epilogue, out.data_ptr(), cols,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("AMX GEMM kernel: out of memory")
    return out.view(*x.shape[:-1], cols)


def linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``packed = pack(weight)`` ([n, K] weight), bf16."""
    return _run(x, packed, n, bias, PLAIN)


def geglu(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``a * F.gelu(g)`` with ``[a, g] = F.linear(x, weight, bias).chunk(2, -1)``, for
    ``packed = pack(weight, GEGLU)`` ([n, K] weight), bf16, rounded once."""
    return _run(x, packed, n, bias, GEGLU)


def conv_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv3x3`` computes ``conv(x)``: a 3x3, stride 1, padding 1 convolution without
    groups or dilation, input channels a multiple of 32, at least 32 output channels, a bf16
    input with a width that is a multiple of 16 (whole 16-pixel tile rows)."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.out_channels >= 32  # narrower outputs would waste most of a 32-column block
        and x.dim() == 4
        and x.shape[1] % 32 == 0
        and x.shape[3] % 16 == 0
        and supports(x, conv.weight, conv.bias)
    )


def pack_conv3x3(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in, 3, 3] bf16 weight packed for ``conv3x3`` (the GEMM weight [out, 9 * in],
    tap-major)."""
    return pack(weight.detach().permute(0, 2, 3, 1).reshape(weight.shape[0], -1))


def conv3x3(
    x: torch.Tensor, packed: torch.Tensor, out_channels: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``packed = pack_conv3x3(weight)`` as an
    implicit GEMM on AMX tiles (each tile row an output pixel, K the nine taps of the zero-
    padded NHWC input). Returns a channels-last tensor."""
    lib = _require()
    b, c, h, w = x.shape
    if packed.numel() != lib.ldm_gemm_pack_size(out_channels, 9 * c):
        raise ValueError(f"packed weight does not match a [{out_channels}, {c}, 3, 3] weight")
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()  # [B, H+2, W+2, C]
    y = torch.empty(b, h, w, out_channels, dtype=torch.bfloat16)
    bf = _bias32(bias)
    rc = lib.ldm_conv3x3(
        xp.data_ptr(), b, h, w, c, packed.data_ptr(), out_channels,
        None if bf is None else bf.data_ptr(), y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise ValueError(f"conv3x3 needs channels % 32 == 0 and width % 16 == 0, got {x.shape}")
    if rc != 0:
        raise MemoryError("AMX GEMM kernel: out of memory")
    return y.permute(0, 3, 1, 2)
