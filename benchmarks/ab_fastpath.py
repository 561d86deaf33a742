"""One fast path on or off, on the same prepared UNet: interleaved A/B of whole UNet steps.

The host this project is measured on changes speed by 2-4x within minutes (another tenant
shares the cores and, it seems, their AMX units), so a fast path's gain is measured by
toggling it on one model in one process and alternating (on, off, on, off, ...) after a
warm-up call in each state; the table has the fastest step of each state and their ratio.
Also prints each state's relative (L2) error against the fp32 UNet.

Fast paths (``--path``):
  geglu       PackedGEGLU (one AMX GEMM pass, ``ldmkit.accel.amx_gemm``) vs plain GEGLU
  amx-conv    PackedConv2d.amx (3x3 convolutions as AMX implicit GEMMs) vs oneDNN's
  group-norm  ldmkit's GroupNorm + SiLU kernel (``group_norm.fuse``) vs PyTorch's
  attention   ldmkit's bf16 flash attention (``ldmkit.accel.cpu_attention``) vs PyTorch's SDPA
  pointwise   1x1 convolutions as packed GEMMs (``PackedConv2d.gemm_pointwise``) vs oneDNN's
              convolution
  skinny      GEMMs of at most ``prepack.AMX_MAX_ROWS`` rows on ldmkit's AMX GEMM vs oneDNN's

    python benchmarks/ab_fastpath.py --path geglu --size 512 --repeats 6

With ``--layer-rows N`` it also times, by forward hooks, the convolutions and linear layers
whose GEMM has at most N rows (batch x output positions, or tokens), summed per step: a fast
path that touches only those layers shows there above the whole step's noise.

    python benchmarks/ab_fastpath.py --path skinny --size 256 --repeats 8 --layer-rows 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from speed import SD15, SMALL, build_unet

from ldmkit.accel import cpu_attention, group_norm, prepack
from ldmkit.accel.fastpaths import prepare_for_inference
from ldmkit.accel.prepack import PackedConv2d, PackedGEGLU
from ldmkit.nn.attention import GEGLU


def _geglu(unet: torch.nn.Module, on: bool) -> None:
    # prepare_for_inference made them PackedGEGLU (with their pack cache); a plain GEGLU
    # ignores the cache, so switching the class back and forth is enough
    for m in unet.modules():
        if isinstance(m, GEGLU):
            m.__class__ = PackedGEGLU if on else GEGLU


def _amx_conv(unet: torch.nn.Module, on: bool) -> None:
    PackedConv2d.amx = on


def _group_norm(unet: torch.nn.Module, on: bool) -> None:
    (group_norm.fuse if on else group_norm.unfuse)(unet)


def _pointwise(unet: torch.nn.Module, on: bool) -> None:
    PackedConv2d.gemm_pointwise = on


_MAX_ROWS = prepack.AMX_MAX_ROWS


def _skinny(unet: torch.nn.Module, on: bool) -> None:
    prepack.AMX_MAX_ROWS = _MAX_ROWS if on else 0


_SUPPORTS = cpu_attention.supports


def _attention(unet: torch.nn.Module, on: bool) -> None:
    # ``nn.layers._sdpa`` asks ``cpu_attention.supports`` on every call; off, it says no, and
    # every attention runs PyTorch's SDPA
    cpu_attention.supports = _SUPPORTS if on else (lambda *args, **kwargs: False)


TOGGLES: dict[str, Callable[[torch.nn.Module, bool], None]] = {
    "geglu": _geglu,
    "amx-conv": _amx_conv,
    "group-norm": _group_norm,
    "attention": _attention,
    "pointwise": _pointwise,
    "skinny": _skinny,
}


def _time_small_layers(unet: torch.nn.Module, max_rows: int) -> list[float]:
    """Hooks that add the seconds of each conv / linear layer with at most ``max_rows`` GEMM
    rows to the returned one-element list."""
    total, starts = [0.0], {}

    def pre(m: torch.nn.Module, inputs: tuple) -> None:
        starts[m] = time.perf_counter()

    def post(m: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        features = out.shape[-1] if isinstance(m, torch.nn.Linear) else out.shape[1]
        if out.numel() // features <= max_rows:  # tokens, or images x output positions
            total[0] += time.perf_counter() - starts[m]

    for m in unet.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    return total


def _report(what: str, times: dict[bool, list[float]], unit: str = "s") -> str:
    on, off = times[True], times[False]
    paired = statistics.median(b / a for a, b in zip(on, off, strict=True))
    scale = 1e3 if unit == "ms" else 1.0
    return (
        f"{what}: on {min(on) * scale:.3f} {unit}, off {min(off) * scale:.3f} {unit} (fastest); "
        f"{paired:.3f}x (paired median of {len(on)})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--path", choices=sorted(TOGGLES), required=True)
    p.add_argument("--size", type=int, default=512, help="image size (latents are size / 8)")
    p.add_argument("--layout", choices=["sd15", "small"], default="sd15")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--layer-rows", type=int, default=0, help="also time layers of at most this many rows"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SD15 if args.layout == "sd15" else SMALL
    unet = build_unet(cfg)
    g = torch.Generator().manual_seed(0)
    lat = args.size // 8
    x = torch.randn(2, 4, lat, lat, generator=g)
    ctx = torch.randn(2, 77, cfg["context_dim"], generator=g)
    t = torch.tensor([500, 500])
    with torch.inference_mode():
        ref = unet(x, t, ctx).double()
    unet = prepare_for_inference(unet, torch.bfloat16)
    x, ctx = x.bfloat16(), ctx.bfloat16()
    toggle = TOGGLES[args.path]
    steps: dict[bool, list[float]] = {True: [], False: []}
    layers: dict[bool, list[float]] = {True: [], False: []}
    small = _time_small_layers(unet, args.layer_rows) if args.layer_rows else [0.0]
    with torch.inference_mode():
        for on in (True, False):
            toggle(unet, on)
            err = (unet(x, t, ctx).double() - ref).norm() / ref.norm()
            print(f"{args.path} {'on' if on else 'off'}: rel. error vs fp32 {err:.3e}")
        for _ in range(args.repeats):
            for on in (True, False):
                toggle(unet, on)
                unet(x, t, ctx)  # warm-up in this state (packs weights on a switch)
                small[0] = 0.0
                t0 = time.perf_counter()
                unet(x, t, ctx)
                steps[on].append(time.perf_counter() - t0)
                layers[on].append(small[0])
    where = f"{args.layout} UNet step, batch 2, {args.size} px, bf16, {args.threads} threads"
    print(_report(where, steps))
    if args.layer_rows:
        print(_report(f"layers of <= {args.layer_rows} rows, summed per step", layers, "ms"))


if __name__ == "__main__":
    main()
