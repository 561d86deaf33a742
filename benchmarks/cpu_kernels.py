"""ldmkit's own CPU kernels against the PyTorch kernels they replace, on SD 1.5 shapes.

- attention (``ldmkit.accel.cpu_attention``) against ``F.scaled_dot_product_attention``, in
  bf16 (AMX) and fp32 (AVX-512): the UNet's self-attention at 512 px (4096 tokens) and 256 px
  (1024), and its cross-attention to 77 text tokens; batch 2, 8 heads of 40;
- fp32 3x3 convolutions by Winograd F(2x2, 3x3) (``ldmkit.accel.winograd``) against the
  pre-packed oneDNN convolution that ``PackedConv2d`` otherwise runs, at the UNet's levels;
- bf16 channels-last GroupNorm + SiLU (``ldmkit.accel.group_norm``) against ``F.group_norm``
  then ``F.silu`` on the same tensor;
- the bf16 GEGLU feed-forward projection with the gating fused (``ldmkit.accel.amx_gemm``)
  against what ``GEGLU`` runs otherwise: the pre-packed oneDNN linear layer, ``chunk``, gelu
  and the product, at the UNet's four levels (batch 2);
- bf16 3x3 convolutions as ldmkit's AMX implicit GEMM (``amx_gemm.conv3x3``, opt-in through
  ``PackedConv2d.amx``) against the pre-packed oneDNN convolution, channels-last, at the UNet's
  levels.

Contenders alternate (A, B, A, B, ...) after a warm-up; the table has the min of each and
the max abs error of each against an fp64 reference. Writes benchmarks/results/cpu_kernels.json
and cpu_kernels.md. (Not named kernels.py: diffusers probes for the Hugging Face ``kernels``
package, and a script directory on ``sys.path`` would shadow it.)

    python benchmarks/cpu_kernels.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.accel import amx_gemm, cpu_attention, group_norm, winograd

RESULTS = Path(__file__).parent / "results"
ATTENTION = [  # (label, batch, heads, queries, keys, head dim)
    ("self-attention, 512 px", 2, 8, 4096, 4096, 40),
    ("self-attention, 256 px", 2, 8, 1024, 1024, 40),
    ("cross-attention, 512 px", 2, 8, 4096, 77, 40),
    ("cross-attention, 256 px", 2, 8, 1024, 77, 40),
]
GEGLUS = [(8192, 320, 1280), (2048, 640, 2560), (512, 1280, 5120), (128, 1280, 5120)]  # fmt: skip
# (rows = batch 2 x tokens at 512 px, channels in, GEGLU inner width)  # rows, in, inner
NORMS = [(2, 128, 16, 16), (2, 320, 32, 32), (2, 640, 16, 16), (2, 320, 64, 64)]
CONVS = [  # (batch, in channels, out channels, size)
    (2, 320, 320, 32), (2, 640, 640, 16), (2, 1280, 1280, 8), (2, 2560, 1280, 8),
    (2, 640, 640, 32), (2, 960, 320, 64), (2, 320, 320, 64),
]  # fmt: skip


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Min seconds of each callable, alternating them after one warm-up call each."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure(fns: dict, exact: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """(min seconds, max abs error against ``exact``) of each callable, under inference mode."""
    with torch.inference_mode():
        best = interleaved(fns, repeats)
        err = {name: float((fn().double() - exact).abs().max()) for name, fn in fns.items()}
    return best, err


def onednn_conv3x3(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> partial:
    """The pre-packed oneDNN 3x3 convolution (padding 1) that ``PackedConv2d`` runs."""
    args = ([1, 1], [1, 1], [1, 1], 1)
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, *args, list(x.shape))
    return partial(torch.ops.mkldnn._convolution_pointwise, x, packed, bias, *args, "none", [], "")


def conv3x3_case(
    g: torch.Generator,
    b: int,
    c: int,
    k: int,
    size: int,
    dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple:
    """(x, weight, bias, fp64 output, GFLOP, label) of a padding-1 3x3 convolution."""
    x = torch.randn(b, c, size, size, generator=g).to(dtype).contiguous(memory_format=memory_format)
    w = (torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)).to(dtype)
    bias = torch.randn(k, generator=g).to(dtype)
    exact = F.conv2d(x.double(), w.double(), bias.double(), padding=1)
    gflop = 2 * b * k * c * 9 * size * size / 1e9
    return x, w, bias, exact, gflop, f"3x3 conv {c}->{k} at {size}x{size}, batch {b}"


def attention_rows(repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for label, b, h, n, s, d in ATTENTION:
        q, k, v = (torch.randn(b, h, m, d, generator=g) for m in (n, s, s))
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        for dtype in (torch.bfloat16, torch.float32):
            if not cpu_attention.available(dtype):
                continue
            qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
            fns = {
                "PyTorch SDPA": partial(F.scaled_dot_product_attention, qd, kd, vd),
                "ldmkit": partial(cpu_attention.attention, qd, kd, vd),
            }
            best, err = measure(fns, exact, repeats)
            gflop = 4 * b * h * n * s * d / 1e9
            rows.append(
                _row("attention", f"{label} [{b}x{h}x{n}x{s}x{d}]", dtype, best, err, gflop)
            )
    return rows


def conv_rows(repeats: int) -> list[dict]:
    rows = []
    if not winograd.available():
        return rows
    g = torch.Generator().manual_seed(0)
    for b, c, k, size in CONVS:
        x, w, bias, exact, gflop, label = conv3x3_case(g, b, c, k, size, torch.float32)
        u = winograd.transform_weight(w)
        fns = {
            "oneDNN (pre-packed)": onednn_conv3x3(x, w, bias),
            "ldmkit Winograd": partial(winograd.conv3x3, x, u, bias),
        }
        best, err = measure(fns, exact, repeats)
        taken = winograd.worth_it(torch.nn.Conv2d(c, k, 3, padding=1), x)
        label += "" if taken else " (not taken)"
        rows.append(_row("conv", label, torch.float32, best, err, gflop))
    return rows


def amx_conv_rows(repeats: int) -> list[dict]:
    rows = []
    if not amx_gemm.available():
        return rows
    g = torch.Generator().manual_seed(0)
    for b, c, k, size in CONVS:
        if size < 16:  # the 8x8 level runs as im2col + GEMM in bf16 (PackedConv2d)
            continue
        cl = torch.channels_last
        x, w, bias, exact, gflop, label = conv3x3_case(g, b, c, k, size, torch.bfloat16, cl)
        u = amx_gemm.pack_conv3x3(w)
        fns = {
            "oneDNN (pre-packed)": onednn_conv3x3(x, w.contiguous(memory_format=cl), bias),
            "ldmkit AMX implicit GEMM": partial(amx_gemm.conv3x3, x, u, k, bias),
        }
        best, err = measure(fns, exact, repeats)
        rows.append(_row("amx_conv", label, torch.bfloat16, best, err, gflop))
    return rows


def group_norm_rows(repeats: int) -> list[dict]:
    rows = []
    if not group_norm.available():
        return rows
    g = torch.Generator().manual_seed(0)
    for shape in NORMS:
        x = (
            torch.randn(*shape, generator=g)
            .bfloat16()
            .contiguous(memory_format=torch.channels_last)
        )
        w, b = torch.randn(shape[1], generator=g).bfloat16(), torch.randn(shape[1], generator=g)
        b = b.bfloat16()
        exact = F.silu(F.group_norm(x.double(), 32, w.double(), b.double(), 1e-5))
        fns = {
            "PyTorch GroupNorm + SiLU": lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)),  # noqa: B023
            "ldmkit": partial(group_norm.group_norm, x, 32, w, b, 1e-5, True),
        }
        best, err = measure(fns, exact, repeats)
        label = f"GroupNorm(32) + SiLU, channels-last {list(shape)}"
        rows.append(_row("group_norm", label, torch.bfloat16, best, err, 0.0))
    return rows


def geglu_rows(repeats: int) -> list[dict]:
    rows = []
    if not amx_gemm.available():
        return rows
    g = torch.Generator().manual_seed(0)
    ops = torch.ops.mkldnn
    for m, k, inner in GEGLUS:
        x = torch.randn(m, k, generator=g).bfloat16()
        w = (torch.randn(2 * inner, k, generator=g) / k**0.5).bfloat16()
        b = torch.randn(2 * inner, generator=g).bfloat16()
        y = F.linear(x.double(), w.double(), b.double())
        exact = y[:, :inner] * F.gelu(y[:, inner:])
        packed_onednn = ops._reorder_linear_weight(w, m)
        packed = amx_gemm.pack(w, amx_gemm.GEGLU)

        def three_steps(x=x, p=packed_onednn, b=b):
            a, gate = ops._linear_pointwise(x, p, b, "none", [], "").chunk(2, -1)
            return a * F.gelu(gate)

        fns = {
            "oneDNN linear + gelu + mul": three_steps,
            "ldmkit": partial(amx_gemm.geglu, x, packed, 2 * inner, b),
        }
        best, err = measure(fns, exact, repeats)
        label = f"GEGLU {k}->2x{inner}, {m} tokens"
        rows.append(_row("geglu", label, torch.bfloat16, best, err, 2 * m * k * 2 * inner / 1e9))
    return rows


def _row(kind: str, label: str, dtype, best: dict, err: dict, gflop: float) -> dict:
    base, ours = list(best)
    return {
        "kind": kind,
        "case": label,
        "dtype": str(dtype).replace("torch.", ""),
        "baseline": base,
        "baseline_ms": best[base] * 1e3,
        "ldmkit_ms": best[ours] * 1e3,
        "speedup": best[base] / best[ours],
        "gflop": gflop,
        "baseline_max_err": err[base],
        "ldmkit_max_err": err[ours],
    }


def markdown(res: dict) -> str:
    lines = [
        f"Measured {res['date']} on {res['machine']}, torch {res['torch']}, "
        f"{res['threads']} threads. Command: `{res['command']}`.",
        "",
        "| kernel | dtype | baseline | baseline ms | ldmkit ms | speed-up | ldmkit GFLOP/s (conv: "
        "direct-convolution FLOPs; GEGLU: the projection's) "
        "| max abs err vs fp64 (baseline / ldmkit) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        rate = f"{r['gflop'] / r['ldmkit_ms'] * 1e3:.0f}" if r["gflop"] else "—"
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['baseline']} | {r['baseline_ms']:.2f} | "
            f"{r['ldmkit_ms']:.2f} | {r['speedup']:.2f}x | {rate} | "
            f"{r['baseline_max_err']:.1e} / {r['ldmkit_max_err']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "command": f"python benchmarks/cpu_kernels.py --repeats {args.repeats} --threads "
        f"{args.threads}" + ("" if args.out == RESULTS else f" --out {args.out}"),
        "rows": attention_rows(args.repeats)
        + conv_rows(args.repeats)
        + group_norm_rows(args.repeats)
        + geglu_rows(args.repeats)
        + amx_conv_rows(args.repeats),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_kernels.json").write_text(json.dumps(res, indent=2))
    (args.out / "cpu_kernels.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
