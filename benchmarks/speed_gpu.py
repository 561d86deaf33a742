"""GPU variant of ``speed.py``: ldmkit against diffusers on CUDA, fp16 and bf16, with compile.

Same weights as ``speed.py`` (random, fixed seed, built in ldmkit's layout and loaded into
diffusers through ldmkit's converter). Per dtype it times, interleaved after a warm-up:

- the SD 1.5 UNet step at batch 2 (CFG) for each ``--sizes``: diffusers eager, ldmkit eager
  (channels-last), ldmkit with fused QKV projections (``ldmkit.accel.fuse``), and
  ``ldmkit+compile`` (fused, ``compile_network``: ``torch.compile`` with dynamic shapes,
  compiled once);
- the SD VAE decode of one ``--vae-size`` image: diffusers, ldmkit, ldmkit with a compiled
  decoder;
- a 20-step denoising loop (DPM-Solver++ 2M on ldmkit's side; the UNet dominates).

After the timed sizes, the compiled UNet and decoder are called at another resolution and
batch size, and the number of recompilations is reported (the goal is none). Times come from
CUDA events around each call; the table gives min and median milliseconds, the paired-median
speed-up over diffusers, the fraction of the GPU's measured matmul peak and the peak CUDA
memory. It runs in about 3 minutes on one H200 (most of it compiling):

    python benchmarks/speed_gpu.py                       # CUDA, fp16 + bf16, 512 px
    python benchmarks/speed_gpu.py --device cpu --layout small --sizes 64 --no-compile  # smoke

Writes ``benchmarks/results/gpu/speed_gpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from speed import SD15, SD_VAE, SMALL, build_unet, count_flops, to_diffusers_unet

RESULTS = Path(__file__).parent / "results" / "gpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call (CUDA events on a GPU, wall clock elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Best GFLOP/s of a square matmul (a CPU smoke run uses n=1024)."""
    n = n if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    return max(2 * n**3 / timed(lambda: a @ b, device) / 1e9 for _ in range(reps))


def interleaved(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device):
    """Warm-up (two calls each), then ``repeats`` rounds of one call per contender in turn."""
    outs, peaks = {}, {}
    for name, fn in fns.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        outs[name] = fn()
        sync(device)
        peaks[name] = (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
        )
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    ref = times["diffusers"]
    rows = {
        name: {
            "min_ms": 1e3 * min(ts),
            "median_ms": 1e3 * statistics.median(ts),
            "speedup_vs_diffusers": statistics.median(r / t for r, t in zip(ref, ts, strict=True)),
            "peak_mem_gib": peaks[name],
        }
        for name, ts in times.items()
    }
    return rows, outs


def recompiles() -> int:
    """Dynamo's count of compiled frames so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def try_compile(fn: Callable, example: Callable[[], object], errors: list[str]):
    """``fn`` compiled as ``pipe.compile()`` does (``ldmkit.accel.compile.compile_network``:
    dynamic shapes, frozen weights) after one successful call of it on ``example``, or ``None``
    with the error recorded (so a compiler failure costs a row, not the run)."""
    from ldmkit.accel.compile import compile_network

    comp = compile_network(fn, dynamic=True)
    try:
        with torch.inference_mode():
            example(comp)
    except Exception as exc:  # noqa: BLE001 - any compiler error is reported, not raised
        errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return None
    return comp


def unet_cases(cfg: dict, dtype: torch.dtype, device: torch.device, args) -> list[dict]:
    import copy

    from ldmkit.accel.fastpaths import prepare_for_inference
    from ldmkit.accel.fuse import fuse_qkv

    unet = build_unet(cfg)
    ref = to_diffusers_unet(unet, max(args.sizes) // 8).to(device, dtype)
    fast = prepare_for_inference(unet.to(device), dtype, pack=False)
    if device.type == "cuda":  # channels-last suits tensor-core convolutions on GPUs
        fast.to(memory_format=torch.channels_last)
    fused = fuse_qkv(copy.deepcopy(fast))
    comp, errors = None, []
    if args.compile:
        lat = args.sizes[0] // 8
        comp = try_compile(
            fused,
            lambda c: c(
                torch.randn(2, cfg["in_channels"], lat, lat, device=device, dtype=dtype),
                torch.tensor([500, 500], device=device),
                torch.randn(2, 77, cfg["context_dim"], device=device, dtype=dtype),
            ),
            errors,
        )
    cases = []
    for size in args.sizes:
        g = torch.Generator().manual_seed(0)
        lat = size // 8
        x = torch.randn(2, cfg["in_channels"], lat, lat, generator=g).to(device, dtype)
        ctx = torch.randn(2, 77, cfg["context_dim"], generator=g).to(device, dtype)
        t = torch.tensor([500, 500], device=device)
        fns = {
            "diffusers": lambda x=x, ctx=ctx, t=t: ref(x, t, encoder_hidden_states=ctx).sample,
            "ldmkit": lambda x=x, ctx=ctx, t=t: fast(x, t, ctx),
            "ldmkit, fused QKV": lambda x=x, ctx=ctx, t=t: fused(x, t, ctx),
        }
        compile_s = None
        if comp is not None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                comp(x, t, ctx)
            sync(device)
            compile_s = time.perf_counter() - t0
            fns["ldmkit+compile"] = lambda x=x, ctx=ctx, t=t: comp(x, t, ctx)
        with torch.inference_mode():
            flops = count_flops(fns["diffusers"]) if device.type == "cpu" else _flops(fns)
            rows, outs = interleaved(fns, args.repeats, device)
        for k, row in rows.items():
            row["max_abs_diff_vs_diffusers"] = float(
                (outs[k].float() - outs["diffusers"].float()).abs().max()
            )
            row["gflop"] = flops / 1e9
        if compile_s is not None:
            rows["ldmkit+compile"]["first_call_s"] = compile_s
        cases.append({"case": f"UNet step, batch 2, {size} px", "dtype": str(dtype), "rows": rows})
    if errors:
        cases[0]["compile_error"] = errors[0]
    cases.append(_loop_case(ref, fast, comp, cfg, dtype, device, args))
    if comp is not None:  # another resolution and batch size: does the compiled UNet recompile?
        before = recompiles()
        lat = args.sizes[0] // 8 + 8
        x = torch.randn(3, cfg["in_channels"], lat, lat + 16, device=device, dtype=dtype)
        ctx = torch.randn(3, 77, cfg["context_dim"], device=device, dtype=dtype)
        with torch.inference_mode():
            comp(x, torch.tensor([1, 2, 3], device=device), ctx)
        cases[0]["recompiles_on_new_shape"] = recompiles() - before
    return cases


def _flops(fns: dict) -> int:
    """FLOPs of the diffusers call, counted on the GPU (FlopCounterMode works on any device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as m:
        fns["diffusers"]()
    return m.get_total_flops()


def _loop_case(ref, fast, comp, cfg, dtype, device, args) -> dict:
    """``--steps`` UNet calls of a sampling loop at the first size (CFG batch of 2)."""
    lat = args.sizes[0] // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], lat, lat, generator=g).to(device, dtype)
    ctx = torch.randn(2, 77, cfg["context_dim"], generator=g).to(device, dtype)
    ts = torch.linspace(999, 0, args.steps).round().long().to(device)

    def loop(call: Callable) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            h = x
            for t in ts:  # Euler-like update; every contender does the same arithmetic
                h = h - 0.01 * call(h, t.expand(2))
            return h

        return run

    fns = {
        "diffusers": loop(lambda h, t: ref(h, t, encoder_hidden_states=ctx).sample),
        "ldmkit": loop(lambda h, t: fast(h, t, ctx)),
    }
    if comp is not None:
        fns["ldmkit+compile"] = loop(lambda h, t: comp(h, t, ctx))
    with torch.inference_mode():
        rows, outs = interleaved(fns, max(2, args.repeats // 4), device)
    for k, row in rows.items():
        row["max_abs_diff_vs_diffusers"] = float(
            (outs[k].float() - outs["diffusers"].float()).abs().max()
        )
    size = args.sizes[0]
    return {"case": f"{args.steps}-step UNet loop, {size} px", "dtype": str(dtype), "rows": rows}


def vae_case(dtype: torch.dtype, device: torch.device, args) -> dict:
    import diffusers

    from ldmkit.accel.fastpaths import prepare_for_inference
    from ldmkit.autoencoders.base import AutoencoderConfig
    from ldmkit.autoencoders.kl import AutoencoderKL
    from ldmkit.interop.diffusers_format import vae_config_to_diffusers, vae_keys_to_diffusers

    torch.manual_seed(0)
    cfg = dict(SD_VAE) if args.layout == "sd15" else dict(SD_VAE, base_channels=32)
    vae = AutoencoderKL(AutoencoderConfig(**cfg)).eval()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**vae_config_to_diffusers(vae.config, args.vae_size))
    ref.load_state_dict(vae_keys_to_diffusers(vae.state_dict()), assign=True)
    ref = ref.eval().to(device, dtype)
    fast = prepare_for_inference(vae.to(device), dtype, pack=False)
    if device.type == "cuda":
        fast.to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, args.vae_size // 8, args.vae_size // 8, device=device, dtype=dtype)
    fns = {
        "diffusers": lambda: ref.decode(z).sample,
        "ldmkit": lambda: fast.decode(z, scaled=False),
    }
    errors: list[str] = []
    decoder = None
    if args.compile:
        decoder = try_compile(lambda v: fast.decode(v, scaled=False), lambda c: c(z), errors)
    if decoder is not None:
        fns["ldmkit+compile"] = lambda: decoder(z)
    with torch.inference_mode():
        rows, outs = interleaved(fns, args.repeats, device)
        if decoder is not None:
            before = recompiles()
            decoder(torch.randn(2, 4, z.shape[-2] + 8, z.shape[-1], device=device, dtype=dtype))
            rows["ldmkit+compile"]["recompiles_on_new_shape"] = recompiles() - before
    for k, row in rows.items():
        row["max_abs_diff_vs_diffusers"] = float(
            (outs[k].float() - outs["diffusers"].float()).abs().max()
        )
    case = {"case": f"VAE decode, 1 image, {args.vae_size} px", "dtype": str(dtype), "rows": rows}
    if errors:
        case["compile_error"] = errors[0]
    return case


def markdown(res: dict) -> str:
    lines = [
        f"Measured {res['date']} on {res['device_name']}, torch {res['torch']}, diffusers "
        f"{res['diffusers']}. Matmul peaks (GFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in res["peak_gflops"].items())
        + f". Command: `{res['command']}`.",
        "",
        "| case | dtype | contender | min ms | median ms | speed-up vs diffusers | % of peak "
        "| peak memory GiB | max abs diff vs diffusers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    errors = [f"{c['case']}, {c['dtype']}: {c['compile_error']}" for c in res["cases"]
              if "compile_error" in c]  # fmt: skip
    for case in res["cases"]:
        dt = case["dtype"].replace("torch.", "")
        peak = res["peak_gflops"][{"float16": "fp16", "bfloat16": "bf16"}.get(dt, "fp32")]
        for name, r in case["rows"].items():
            pct = f"{100 * r['gflop'] / (r['min_ms'] / 1e3) / peak:.0f}%" if "gflop" in r else "—"
            notes = []
            if "first_call_s" in r:
                notes.append(f"first call {r['first_call_s']:.0f} s")
            recompiled = r.get("recompiles_on_new_shape", case.get("recompiles_on_new_shape"))
            if recompiled is not None and name.endswith("compile"):
                notes.append(f"{recompiled} recompiles on a new shape")
            label = name + (f" ({'; '.join(notes)})" if notes else "")
            lines.append(
                f"| {case['case']} | {dt} | {label} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | "
                f"{r['speedup_vs_diffusers']:.2f}x | {pct} | {r['peak_mem_gib']:.2f} | "
                f"{r['max_abs_diff_vs_diffusers']:.1e} |"
            )
    if errors:
        lines += ["", "torch.compile failed (no compile row): " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--layout", default="sd15", choices=["sd15", "small"])
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="UNet image sizes")
    p.add_argument("--vae-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="UNet calls in the sampling loop case")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --device cpu for a smoke run")
    import diffusers

    cfg = SD15 if args.layout == "sd15" else SMALL
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.machine()}",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "command": "python benchmarks/speed_gpu.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "compile")
        ) + ("" if args.compile else " --no-compile"),
        "peak_gflops": {name: matmul_peak(DTYPES[name], device) for name in args.dtypes},
        "cases": [],
    }  # fmt: skip
    for name in args.dtypes:
        dtype = DTYPES[name]
        res["cases"] += unet_cases(cfg, dtype, device, args)
        res["cases"].append(vae_case(dtype, device, args))
        print(markdown(res), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "speed_gpu.md").write_text(markdown(res))


if __name__ == "__main__":
    main()
