"""bf16 linear layers on AMX with a fused epilogue: the GEGLU feed-forward in one pass.

The transformer blocks of Stable Diffusion's UNet open their feed-forward with GEGLU,
``a * gelu(g)`` where ``[a, g] = proj(x)`` (``nn.attention.GEGLU``). In PyTorch that is a
linear layer writing the [tokens, 2 * inner] product, then a gelu pass and a multiply pass over
half of it: at 512 px (8192 tokens at batch 2, 320 -> 2 x 1280) the product is 42 MB, past
glibc's mmap threshold, so every call also page-faults in fresh memory. On two Sapphire Rapids
cores the three steps took 42-46 ms against 20-24 ms for ldmkit's kernel
(``csrc/gemm_amx.c``), which finishes each 32 x 32 block of products in registers (bias, the
exact-erf gelu, the product) and writes only the [tokens, inner] result, rounded to bf16 once
(so its error against fp64 is about half of the three-step path's).

``fuse(module)`` (called by ``fastpaths.prepare_for_inference`` for bf16 on CPU) turns every
``GEGLU`` into a ``FusedGEGLU`` (same parameters and ``state_dict``); its weight is packed for
the kernel on first use and cached like the other packed layers (``prepack._PackCache``). With
gradients, under ``torch.compile``/tracing, in other dtypes, or where the kernel cannot run it
computes the same function with PyTorch ops. ``unfuse`` restores plain ``GEGLU`` modules.
``linear`` (the kernel without the GEGLU epilogue) is there for the tests and benchmarks:
oneDNN's own bf16 GEMM is as fast or faster for plain linear layers.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import torch
from torch import nn

from ldmkit.accel import native
from ldmkit.accel.prepack import _PackCache
from ldmkit.nn.attention import GEGLU

_FLAGS = (
    "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mavx512bf16", "-mamx-tile",
    "-mamx-bf16", "-fopenmp",
)  # fmt: skip
_CPU_FLAGS = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl"}
PLAIN, GEGLU_EPILOGUE = 0, 1  # the kernel's epilogues (LDM_GEMM_* in csrc/gemm_amx.c)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if platform.machine() not in ("x86_64", "AMD64") or not _CPU_FLAGS.issubset(native.cpu_flags()):
        return None
    lib = native.load("gemm_amx", _FLAGS)
    if lib is None or lib.ldm_amx_request() != 0:  # the OS grants AMX on request
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ldm_gemm_pack_size.argtypes = [i64, i64]
    lib.ldm_gemm_pack_size.restype = i64
    lib.ldm_gemm_pack.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr]
    lib.ldm_gemm_pack.restype = None
    lib.ldm_gemm.argtypes = [
        ptr,
        i64,
        i64,
        i64,
        ptr,
        i64,
        ptr,
        ctypes.c_int,
        ptr,
        i64,
        ctypes.c_int,
    ]
    lib.ldm_gemm.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel runs here (Linux x86-64 with AMX-BF16, a C compiler,
    ``LDMKIT_NATIVE`` not 0). Built on the first call."""
    return _library() is not None


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """bf16 CPU input and weight, no autograd through them, not compiling or tracing."""
    params = (x, weight, bias)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and not grads
        and not native.tracing()
        and available()
    )


def pack(weight: torch.Tensor, epilogue: int = PLAIN) -> torch.Tensor:
    """``weight`` [N, K] (bf16) in the kernel's tile layout for ``epilogue``: a flat bf16
    tensor. For GEGLU, N is even: value rows first, then gate rows, as ``GEGLU.proj`` has."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX GEMM kernel is not available on this machine")
    n, k = weight.shape
    if epilogue == GEGLU_EPILOGUE and n % 2:
        raise ValueError(f"a GEGLU weight needs an even number of rows, got {n}")
    w = weight.detach()
    if w.stride(1) != 1:
        w = w.contiguous()
    packed = torch.empty(lib.ldm_gemm_pack_size(n, k), dtype=torch.bfloat16)
    lib.ldm_gemm_pack(w.data_ptr(), n, k, w.stride(0), epilogue, packed.data_ptr())
    return packed


def _run(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None, epilogue: int
) -> torch.Tensor:
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX GEMM kernel is not available on this machine")
    k = x.shape[-1]
    if packed.numel() != lib.ldm_gemm_pack_size(n, k):
        raise ValueError(f"packed weight does not match a [{n}, {k}] weight")
    a = x.reshape(-1, k)
    if a.stride(-1) != 1:
        a = a.contiguous()
    cols = n // 2 if epilogue == GEGLU_EPILOGUE else n
    out = torch.empty(a.shape[0], cols, dtype=torch.bfloat16)
    b = None if bias is None else bias.detach().float().contiguous()
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
    ``packed = pack(weight, GEGLU_EPILOGUE)`` ([n, K] weight), bf16, rounded once."""
    return _run(x, packed, n, bias, GEGLU_EPILOGUE)


class FusedGEGLU(GEGLU):
    """``GEGLU`` through the fused kernel when it applies (bf16 CPU inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        if not supports(x, w, b):
            return super().forward(x)
        packed = self._pack.get(w, ("amx_geglu",), lambda: pack(w, GEGLU_EPILOGUE))
        return geglu(x, packed, w.shape[0], b)


def fuse(module: nn.Module) -> nn.Module:
    """Every ``GEGLU`` in ``module`` to a ``FusedGEGLU`` (in place; returned). No-op where the
    kernel is unavailable."""
    if not available():
        return module
    for m in module.modules():
        if type(m) is GEGLU:
            m.__class__ = FusedGEGLU
            m._pack = _PackCache()
    return module


def unfuse(module: nn.Module) -> nn.Module:
    """Undo ``fuse``: plain ``GEGLU`` modules again, packed copies freed."""
    for m in module.modules():
        if type(m) is FusedGEGLU:
            m.__class__ = GEGLU
            del m._pack
    return module
