"""The CPU runtimes people pick for Stable Diffusion on CPUs, as contenders against eager ldmkit.

``openvino_unet`` converts an ldmkit UNet with ``openvino.convert_model`` and compiles it for
the CPU (fp32 or bf16 inference precision); ``onnxruntime_unet`` exports it with the dynamo
ONNX exporter (weights as external data, so the 3.4 GB SD 1.5 UNet fits) and opens an
``InferenceSession``. Both return ``fn(x, timesteps, context) -> torch.Tensor`` (float32 out)
and the one-off conversion seconds. Shapes are those of the example: OpenVINO's model is made
static to them (``static=False`` keeps it dynamic), the ONNX export is static.

Run as a script it compares them with eager ldmkit on the same random-weight UNet, interleaved
(eager, runtime, eager, runtime, ... on the same inputs), and prints a Markdown table of the
paired speed-ups over eager ldmkit at the same precision (median and range of the
per-repetition ratios), the max abs difference from eager fp32, and the RSS each one added.
Needs ``pip install openvino==2026.4.1 onnx onnxruntime onnxscript``. Only repetitions during
which other processes used < 0.3 cores count for the ratios when two or more were that quiet.
A busy core hurts eager PyTorch far more than the runtimes: with 2 threads and another
process on one core, the small UNet went from 0.1 s to 0.5-4.5 s a step eager, while OpenVINO
and ONNX Runtime only slowed about 1.5x; use ``--threads 1`` on such a host.

    python benchmarks/runtimes.py --layout small --size 256 --repeats 5
    python benchmarks/runtimes.py --layout sd15 --size 256 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from speed import rss_gib

if TYPE_CHECKING:
    import openvino as ov

Fn = Callable[..., torch.Tensor]
Example = tuple[torch.Tensor, ...]
OV_PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16"}


def _feeds(
    x: torch.Tensor, t: torch.Tensor | float, ctx: torch.Tensor, t_dtype: torch.dtype
) -> list[np.ndarray]:
    """The three inputs as contiguous numpy arrays (float32 latents/context, ``t_dtype`` t)."""
    t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).to(t_dtype)
    return [a.detach().contiguous().numpy() for a in (x.float(), t, ctx.float())]


def openvino_convert(
    unet: torch.nn.Module, example: tuple[torch.Tensor, ...], static: bool = True
) -> ov.Model:
    """``openvino.convert_model`` of ``unet`` traced on ``example`` (x, t, ctx); the weights stay
    shared with ``unet`` until the model is compiled.

    Traced under ``torch.no_grad()``: with gradients on, the tracer's sanity check fails
    ("Graphs differed across invocations") because ldmkit's ``sdpa`` picks the math kernel
    for short sequences only when gradients are enabled.
    """
    import openvino as ov

    from ldmkit.accel.prepack import unpacked

    unet.eval()
    with torch.no_grad(), unpacked(unet):
        model = ov.convert_model(unet, example_input=tuple(example))
    if static:
        model.reshape({i: list(e.shape) for i, e in zip(model.inputs, example, strict=True)})
    return model


def openvino_compile(
    model: ov.Model, example: tuple[torch.Tensor, ...], precision: str, threads: int = 2
) -> Fn:
    """Compile an OpenVINO model for the CPU with the given inference precision hint."""
    import openvino as ov

    if precision not in OV_PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(OV_PRECISIONS)}, got {precision!r}")
    config = {
        "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    t_dtype = example[1].dtype

    def fn(x: torch.Tensor, t: torch.Tensor | float, ctx: torch.Tensor) -> torch.Tensor:
        out = request.infer(_feeds(x, t, ctx, t_dtype), share_inputs=True, share_outputs=False)
        return torch.from_numpy(out[0])

    return fn


def openvino_unet(
    unet: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    precision: str,
    threads: int = 2,
    static: bool = True,
) -> tuple[Fn, float]:
    """OpenVINO CPU version of ``unet``: (``fn(x, t, ctx)``, conversion + compile seconds).

    ``precision``: ``"f32"`` or ``"bf16"`` (``INFERENCE_PRECISION_HINT``; inputs and output stay
    float32). ``t`` is fed in the example's dtype: an int64 example truncates fractional
    timesteps, so pass a float one for samplers with continuous ``c_noise``. Only the compiled
    model is kept (the converted model, which shares ``unet``'s weights, is dropped).
    """
    t0 = time.perf_counter()
    model = openvino_convert(unet, example, static)
    fn = openvino_compile(model, example, precision, threads)
    del model
    gc.collect()
    return fn, time.perf_counter() - t0


def onnxruntime_unet(
    unet: torch.nn.Module, example: tuple[torch.Tensor, ...], workdir: Path, threads: int = 2
) -> tuple[Fn, float]:
    """ONNX Runtime (CPUExecutionProvider, fp32) version of ``unet``: (``fn``, export + load s).

    Exported with ``torch.onnx.export(..., dynamo=True, external_data=True)`` to
    ``workdir/unet.onnx`` (+ ``unet.onnx.data``; the files stay for the caller to remove) with
    the example's static shapes; ``t`` is fed in the example's dtype. The session spins no
    idle threads (``allow_spinning=0``), so it takes no CPU from whatever runs next.
    """
    import onnxruntime as ort

    from ldmkit.accel.prepack import unpacked

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "unet.onnx"
    t0 = time.perf_counter()
    unet.eval()
    with torch.no_grad(), unpacked(unet):
        program = torch.onnx.export(
            unet,
            tuple(example),
            str(path),
            input_names=["x", "t", "context"],
            output_names=["out"],
            dynamo=True,
            external_data=True,
            verbose=False,
        )
    del program  # holds an in-memory copy of the graph and views of the weights
    gc.collect()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    t_dtype = example[1].dtype

    def fn(x: torch.Tensor, t: torch.Tensor | float, ctx: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(names, _feeds(x, t, ctx, t_dtype), strict=True))
        return torch.from_numpy(session.run(None, feeds)[0])

    return fn, time.perf_counter() - t0


# --- the comparison -------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from /proc."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # less idle and iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds of one call, cores used by other processes meanwhile)."""
    b0, o0 = _cpu_ticks()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    b1, o1 = _cpu_ticks()
    return dt, max(0.0, (b1 - b0) - (o1 - o0)) / os.sysconf("SC_CLK_TCK") / dt


QUIET_LOAD = 0.3  # cores used by other processes below which a repetition counts as quiet


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Warm each up (twice), then call them in turn ``repeats`` times.

    Per contender: min and median seconds and the paired ratios ``first / it`` (the first
    contender is the reference), their median and range taken over the quiet repetitions
    (other processes below ``QUIET_LOAD`` cores during every call of the repetition) when at
    least two were quiet, else over all (``quiet`` says how many were).
    """
    for fn in fns.values():
        fn(), fn()
    secs: dict[str, list[float]] = {k: [] for k in fns}
    loads: list[float] = []
    for _ in range(repeats):
        load = 0.0
        for name, fn in fns.items():
            s, other = timed(fn)
            secs[name].append(s)
            load = max(load, other)
        loads.append(load)
    quiet = [i for i, ld in enumerate(loads) if ld < QUIET_LOAD]
    use = quiet if len(quiet) >= 2 else list(range(repeats))
    ref = next(iter(secs.values()))
    rows = {}
    for name, ss in secs.items():
        ratios = [ref[i] / ss[i] for i in use]
        rows[name] = {
            "min_s": min(ss),
            "median_s": statistics.median(ss),
            "speedup": statistics.median(ratios),
            "speedup_range": (min(ratios), max(ratios)),
            "quiet": len(quiet),
            "other_load_max": max(loads),
        }
    return rows


def _build(
    make: Callable[[], tuple[Fn, float]], example: Example, exact: torch.Tensor
) -> tuple[Fn, dict]:
    """(fn, its figures): one-off seconds, RSS added, max abs diff from ``exact``."""
    gc.collect()
    rss0 = rss_gib()
    fn, seconds = make()
    gc.collect()
    with torch.inference_mode():
        out = fn(*example)
    diff = float((out.float() - exact).abs().max())
    return fn, {"convert_s": seconds, "rss_added_gib": rss_gib() - rss0, "max_abs_diff": diff}


def _fp32_case(
    unet: torch.nn.Module,
    ov_model: ov.Model,
    convert_s: float,
    example: Example,
    exact: torch.Tensor,
    args: argparse.Namespace,
) -> dict:
    """Eager fp32 against OpenVINO f32 and ONNX Runtime, interleaved."""
    from speed import calibrate

    ov, ov_info = _build(
        lambda: (openvino_compile(ov_model, example, "f32", args.threads), convert_s),
        example,
        exact,
    )
    ort, ort_info = _build(
        lambda: onnxruntime_unet(unet, example, args.workdir, args.threads), example, exact
    )
    peak = calibrate(torch.float32)
    with torch.inference_mode():
        rows = interleaved(
            {
                "ldmkit eager": lambda: unet(*example),
                "OpenVINO": lambda: ov(*example),
                "ONNX Runtime": lambda: ort(*example),
            },
            args.repeats,
        )
    rows["ldmkit eager"]["max_abs_diff"] = 0.0
    rows["OpenVINO"].update(ov_info)
    rows["ONNX Runtime"].update(ort_info)
    return {"peak_gflops": peak, "rows": rows}


def _bf16_case(
    unet: torch.nn.Module,
    ov: Fn,
    ov_info: dict,
    example: Example,
    exact: torch.Tensor,
    args: argparse.Namespace,
) -> dict:
    """Eager bf16 (``prepare_for_inference``, converts ``unet`` in place) against OpenVINO bf16."""
    from speed import calibrate

    from ldmkit.accel.fastpaths import prepare_for_inference

    bf16 = prepare_for_inference(unet, torch.bfloat16)
    x, t, ctx = example
    xb, cb = x.bfloat16(), ctx.bfloat16()
    peak = calibrate(torch.bfloat16)
    with torch.inference_mode():
        diff = float((bf16(xb, t, cb).float() - exact).abs().max())
        rows = interleaved(
            {"ldmkit eager": lambda: bf16(xb, t, cb), "OpenVINO": lambda: ov(*example)},
            args.repeats,
        )
    rows["ldmkit eager"]["max_abs_diff"] = diff
    rows["OpenVINO"].update(ov_info)
    return {"peak_gflops": peak, "rows": rows}


def compare(args: argparse.Namespace) -> dict:
    """Eager ldmkit fp32 vs OpenVINO f32 vs ONNX Runtime; then eager bf16 vs OpenVINO bf16.

    One OpenVINO conversion serves both precisions; each case's runtimes are freed before the
    next is built.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from speed import SD15, SMALL, build_unet

    from ldmkit.accel.fastpaths import prepare_for_inference

    cfg = {"small": SMALL, "sd15": SD15}[args.layout]
    unet = prepare_for_inference(build_unet(cfg), torch.float32)
    g = torch.Generator().manual_seed(0)
    lat = args.size // 8
    x = torch.randn(2, cfg["in_channels"], lat, lat, generator=g)
    ctx = torch.randn(2, 77, cfg["context_dim"], generator=g)
    example = (x, torch.tensor([500, 500]), ctx)
    with torch.inference_mode():
        exact = unet(*example)
    t0 = time.perf_counter()
    ov_model = openvino_convert(unet, example)
    convert_s = time.perf_counter() - t0
    cases = {}
    if "fp32" in args.precisions:
        cases["fp32"] = _fp32_case(unet, ov_model, convert_s, example, exact, args)
        gc.collect()
    if "bf16" in args.precisions:
        ov, ov_info = _build(
            lambda: (openvino_compile(ov_model, example, "bf16", args.threads), convert_s),
            example,
            exact,
        )
        del ov_model  # it shares the fp32 weights that the bf16 conversion below replaces
        gc.collect()
        cases["bf16"] = _bf16_case(unet, ov, ov_info, example, exact, args)
    return {"layout": args.layout, "size": args.size, "repeats": args.repeats,
            "threads": args.threads, "cases": cases, "peak_rss_gib": rss_gib("VmHWM")}  # fmt: skip


def markdown(res: dict, command: str) -> str:
    """The comparison as a Markdown table."""
    import onnxruntime
    import openvino

    peaks = ", ".join(f"{k} {c['peak_gflops']:.0f}" for k, c in res["cases"].items())
    lines = [
        f"{res['layout']} UNet, batch 2, {res['size']} px ({res['size'] // 8}x{res['size'] // 8} "
        f"latent), {res['threads']} threads, {res['repeats']} interleaved repetitions; torch "
        f"{torch.__version__}, OpenVINO {openvino.__version__.split('-')[0]}, ONNX Runtime "
        f"{onnxruntime.__version__}. Matmul/conv calibration (GFLOP/s): {peaks}. Peak RSS "
        f"of the run {res['peak_rss_gib']:.1f} GiB. "
        f"Command: `{command}`.",
        "",
        "| precision | contender | min s | median s | speed-up vs eager (paired median, range) "
        "| quiet reps | one-off convert s | RSS added GiB | max abs diff vs eager fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for prec, case in res["cases"].items():
        for name, r in case["rows"].items():
            lo, hi = r["speedup_range"]
            conv = f"{r['convert_s']:.1f}" if "convert_s" in r else "—"
            rss = f"{r['rss_added_gib']:.2f}" if "rss_added_gib" in r else "—"
            lines.append(
                f"| {prec} | {name} | {r['min_s']:.3f} | {r['median_s']:.3f} | "
                f"{r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['quiet']}/{res['repeats']} | "
                f"{conv} | {rss} | {r['max_abs_diff']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layout", choices=["small", "sd15"], default="small")
    p.add_argument("--size", type=int, default=256, help="image size in px (latent = size / 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--workdir", type=Path, default=None, help="for the ONNX files (default: tmp)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/runtimes.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="ldmkit-onnx-") as tmp:
        args.workdir = args.workdir or Path(tmp)
        res = compare(args)
    print(markdown(res, command), flush=True)


if __name__ == "__main__":
    main()
