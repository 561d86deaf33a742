"""fp32 3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray 2016).

Each 2x2 output tile needs 16 multiplies per (input, output) channel pair instead of 36: the
convolution becomes 16 GEMMs [K, C] x [C, P] (``torch.bmm``, MKL) between data transforms
written in C (``csrc/winograd.c``, built at first use by ``ldmkit.accel.native``). The
filter transform G g G^T is computed once per weight in fp64 (``transform_weight``, cached by
``PackedConv2d``; shape-independent, so one per layer for every resolution). The transforms only add and subtract, so the result is as accurate as the
direct convolution in fp32: on the SD 1.5 UNet's shapes the max abs error against an fp64
convolution was 3-4e-6 here against 1-2e-5 for oneDNN's direct kernel.

Used by ``ldmkit.accel.prepack.PackedConv2d`` for fp32 CPU inference of 3x3, stride-1,
padding-1 convolutions with many channels (``worth_it``); ``LDMKIT_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from ldmkit.accel import native

_FLAGS = ("-O3", "-march=native", "-fopenmp")
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])

# Where it beats oneDNN's direct fp32 kernel (2 threads, batch 1-2): the saving grows with
# the channels' harmonic mean h = C K / (C + K) (multiplies saved per transformed value) and
# shrinks with the image (the [C, P] operands leave the caches). Measured: h 160 (320 -> 320)
# 1.23x at 32x32 but 0.95x at 64x64; h 213 (640 -> 320) 0.99x at 64x64; h 240 (960 -> 320)
# 1.16x at 64x64; h 256 (512 -> 512) 1.23x at 128x128; h 320-850 1.3-2.2x; h 64-128 (VAE's
# 128/256 channels at 128-256 px) 0.56-0.71x.
MIN_HARMONIC_CHANNELS = 240
MIN_HARMONIC_CHANNELS_SMALL = 150  # at or below SMALL_POSITIONS output positions
SMALL_POSITIONS = 32 * 32
# Fewest 2x2 tiles (batch x tiles per image): below it the GEMMs only stream the transformed
# weight, 16/9 the size of the weight (SD 1.5's 1280-channel 4x4 level, batch 2: 8 tiles, no
# gain inside the UNet, where the weights are never in cache).
MIN_TILES = 32


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load("winograd", _FLAGS)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ldm_wino_input.argtypes = [ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.ldm_wino_input.restype = ctypes.c_int
    lib.ldm_wino_output.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the transform kernels built (a C compiler, ``LDMKIT_NATIVE`` not 0)."""
    return _library() is not None


def worth_it(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` can and should run here: fp32 CPU, 3x3, stride 1, padding 1,
    dilation 1, one group, zero padding, and enough channels for its image size."""
    if x.dtype != torch.float32 or x.dim() != 4 or native.tracing():
        return False
    c, k = conv.in_channels, conv.out_channels
    h = c * k / (c + k)
    small = x.shape[-1] * x.shape[-2] <= SMALL_POSITIONS
    return (
        h >= (MIN_HARMONIC_CHANNELS_SMALL if small else MIN_HARMONIC_CHANNELS)
        and x.shape[0] * ((x.shape[-2] + 1) // 2) * ((x.shape[-1] + 1) // 2) >= MIN_TILES
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and available()
    )


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T for a [K, C, 3, 3] weight: [16, K, C] fp32 (computed in fp64)."""
    g = _G.to(torch.float64)
    u = torch.einsum("ij,kcjl,ml->imkc", g, weight.detach().to(torch.float64), g)
    return u.reshape(16, *weight.shape[:2]).to(torch.float32).contiguous()


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The convolution of fp32 ``x`` [N, C, H, W] with the filter whose ``transform_weight``
    is ``u`` (stride 1, padding 1), plus ``bias``; returns contiguous [N, K, H, W]."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the Winograd kernels are not available on this machine")
    x = x.contiguous()
    n, c, h, w = x.shape
    k = u.shape[1]
    p = n * ((h + 1) // 2) * ((w + 1) // 2)
    threads = torch.get_num_threads()
    v = torch.empty(16, c, p)
    if lib.ldm_wino_input(x.data_ptr(), v.data_ptr(), n, c, h, w, threads) != 0:
        raise MemoryError("Winograd input transform: out of memory")
    m = torch.bmm(u, v)  # [16, K, P]: the element-wise products summed over channels
    del v
    y = torch.empty(n, k, h, w)
    b = None if bias is None else bias.detach().contiguous()
    lib.ldm_wino_output(m.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                        n, k, h, w, threads)  # fmt: skip
    return y
