"""ldmkit against diffusers on the same Stable Diffusion weights, interleaved in one process.

Random weights with a fixed seed are built once in ldmkit's layout and loaded into diffusers
through ldmkit's converter, so both run identical numbers (the script checks the outputs
match). Each case alternates the contenders (A, B, C, A, B, C, ...) after a warm-up, and
reports per contender the min and median seconds, the median of the per-repetition ratios
to diffusers (so host drift cancels), the fraction of this CPU's measured peak FLOP/s, the
peak resident memory and the max abs difference of the output from diffusers' fp32 output.

Contenders: ``diffusers`` (eager, ``.to(dtype)``), ``ldmkit`` (eager, its default fast paths:
pre-packed oneDNN weights, channels-last for bf16/fp16), ``ldmkit+compile`` (with
``--compile``: opt-in ``torch.compile`` as ``pipe.compile()`` does it, with dynamic shapes and
frozen weights; its one-off compile time is reported), and with ``--runtimes`` the UNet in
OpenVINO (fp32 and bf16 precision hints) and ONNX Runtime (fp32), converted from the same
weights (``runtimes.py``; conversion time reported).

    python benchmarks/speed.py                       # SD 1.5 UNet 256 px, small UNet, VAE 256 px
    python benchmarks/speed.py --sizes 256 512 --compile --runtimes --repeats 5
    python benchmarks/speed.py --cases train --repeats 7   # only the training step

Writes benchmarks/results/speed.json and speed.md. The host is shared and noisy (see
../shared/BENCHMARKING.md): trust the paired ratios more than absolute seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).parent / "results"
SD15 = dict(
    in_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_levels=(0, 1, 2), num_heads=8, context_dim=768,
)  # fmt: skip
SMALL = dict(
    in_channels=4, model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
    attention_levels=(1, 2), num_head_channels=32, context_dim=256, use_linear_in_transformer=True,
)  # fmt: skip
SD_VAE = dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4)


def peak_rss_reset() -> None:
    """Reset this process's peak-RSS counter (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory in GiB from /proc/self/status (``VmHWM``: its peak,
    which unlike ru_maxrss is reset by exec); nan where that file does not exist."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return rss_gib("VmHWM")


def calibrate(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Achievable GFLOP/s: the best of a square matmul and of two 3x3 NHWC convolutions (UNet-
    like 640 channels at 32x32, and VAE-like 256 channels at 128x128, where oneDNN's bf16
    kernels run fastest)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    cases = [(lambda: a @ b, 2 * n**3)]
    for ch, hw, batch in ((640, 32, 2), (256, 128, 1)):
        x = torch.randn(batch, ch, hw, hw, dtype=dtype).to(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(ch, ch, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
        cases.append((lambda conv=conv, x=x: conv(x), 2 * batch * ch * ch * 9 * hw * hw))
    best = 0.0
    with torch.inference_mode():
        for fn, flops in cases:
            fn()
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def differences(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max abs and relative (L2 norm) difference of ``out`` from the fp32 reference ``ref``:
    bf16 paths are judged by the relative error (one outlier element moves the max)."""
    err = out.double() - ref.double()
    return {
        "max_abs_diff_vs_diffusers_fp32": float(err.abs().max()),
        "rel_err_vs_diffusers_fp32": float(err.norm() / ref.double().norm()),
    }


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call; attention through the math kernel so that it is counted (the CPU
    flash kernel has no formula in FlopCounterMode and would be silently skipped)."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as m:
        fn()
    return m.get_total_flops()


def interleaved(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, dict]:
    """Warm up each contender, then time them in turn ``repeats`` times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    for name, fn in fns.items():
        peak_rss_reset()
        outs[name] = fn()
        peaks[name] = peak_rss_gib()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ref = times.get("diffusers")
    result = {}
    for name, ts in times.items():
        row = {"min_s": min(ts), "median_s": statistics.median(ts), "peak_rss_gib": peaks[name]}
        if ref is not None:
            row["speedup_vs_diffusers"] = statistics.median(
                r / t for r, t in zip(ref, ts, strict=True)
            )
        result[name] = row
    return result, outs


def build_unet(cfg: dict, seed: int = 0):
    from ldmkit.denoisers.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    unet = UNet(UNetConfig(**cfg))
    with torch.no_grad():  # the zero-initialised output layers get weights too
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return unet.eval()


def to_diffusers_unet(unet, sample_size: int):
    import diffusers

    from ldmkit.interop.diffusers_format import unet_config_to_diffusers, unet_keys_to_diffusers

    cfg = unet_config_to_diffusers(unet.config, sample_size=sample_size)
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**cfg)
    ref.load_state_dict(unet_keys_to_diffusers(unet.state_dict()), assign=True)
    return ref.eval()


def runtime_contenders(unet, example: tuple, dtype: torch.dtype, args) -> dict:
    """OpenVINO (f32 or bf16 precision hint) and, in fp32, ONNX Runtime versions of the fp32
    ``unet``: {name: (fn, conversion seconds)}. Their inputs and outputs stay fp32."""
    import tempfile

    from runtimes import onnxruntime_unet, openvino_unet

    precision = "f32" if dtype == torch.float32 else "bf16"
    out = {"OpenVINO": openvino_unet(unet, example, precision, args.threads)}
    if dtype == torch.float32:
        with tempfile.TemporaryDirectory() as tmp:  # the session holds the weights in memory
            out["ONNX Runtime"] = onnxruntime_unet(unet, example, Path(tmp), args.threads)
    return out


def unet_case(name: str, cfg: dict, size: int, dtype: torch.dtype, args) -> dict:
    import copy

    from ldmkit.accel.fastpaths import prepare_for_inference

    unet = build_unet(cfg)
    ref = to_diffusers_unet(unet, size // 8)
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    x = torch.randn(2, cfg["in_channels"], lat, lat, generator=g)
    ctx = torch.randn(2, 77, cfg["context_dim"], generator=g)
    t = torch.tensor([500, 500])
    with torch.inference_mode():
        exact = ref(x, t, encoder_hidden_states=ctx).sample
    flops = count_flops(lambda: ref(x, t, encoder_hidden_states=ctx))
    runtimes = runtime_contenders(unet, (x, t, ctx), dtype, args) if args.runtimes else {}
    ref.to(dtype)
    fast = prepare_for_inference(copy.deepcopy(unet) if args.compile else unet, dtype)
    xd, cd = x.to(dtype), ctx.to(dtype)
    fns = {
        "diffusers": lambda: ref(xd, t, encoder_hidden_states=cd).sample,
        "ldmkit": lambda: fast(xd, t, cd),
    }
    for rt, (fn, _) in runtimes.items():
        fns[rt] = lambda fn=fn: fn(x, t, ctx)
    compile_s = None
    if args.compile:  # as pipe.compile(): dynamic shapes, frozen weights (inductor packs them)
        from ldmkit.accel.compile import compile_network

        comp = compile_network(prepare_for_inference(unet, dtype, pack=False))
        t0 = time.perf_counter()
        with torch.inference_mode():
            comp(xd, t, cd)  # compiles here
        compile_s = time.perf_counter() - t0
        fns["ldmkit+compile"] = lambda: comp(xd, t, cd)
    with torch.inference_mode():
        rows, outs = interleaved(fns, args.repeats)
    for k, row in rows.items():
        row.update(differences(outs[k], exact))
        row["gflop"] = flops / 1e9
    if compile_s is not None:
        rows["ldmkit+compile"]["compile_s"] = compile_s
    for rt, (_, seconds) in runtimes.items():
        rows[rt]["convert_s"] = seconds
    return {"case": f"{name} UNet step, batch 2, {size} px", "dtype": str(dtype), "rows": rows}


def vae_case(size: int, dtype: torch.dtype, args, what: str = "decode") -> dict:
    """VAE decode (or encode) of one image; both VAEs in ``dtype``."""
    import diffusers

    from ldmkit.accel.fastpaths import prepare_for_inference
    from ldmkit.autoencoders.base import AutoencoderConfig
    from ldmkit.autoencoders.kl import AutoencoderKL
    from ldmkit.interop.diffusers_format import vae_config_to_diffusers, vae_keys_to_diffusers

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(**SD_VAE, scaling_factor=0.18215)).eval()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**vae_config_to_diffusers(vae.config, sample_size=size))
    ref.load_state_dict(vae_keys_to_diffusers(vae.state_dict()), assign=True)
    ref.eval()
    g = torch.Generator().manual_seed(0)
    if what == "decode":
        inp = torch.randn(1, 4, size // 8, size // 8, generator=g)
        run_ref = lambda v: ref.decode(v).sample  # noqa: E731
        run_ldm = lambda v: fast.decode(v, scaled=False)  # noqa: E731
    else:
        inp = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        run_ref = lambda v: ref.encode(v).latent_dist.mean  # noqa: E731
        run_ldm = lambda v: fast.encode(v, scaled=False)  # noqa: E731
    with torch.inference_mode():
        exact = run_ref(inp)
    flops = count_flops(lambda: run_ref(inp))
    ref.to(dtype)
    fast = prepare_for_inference(vae, dtype)
    xd = inp.to(dtype)
    fns = {"diffusers": lambda: run_ref(xd), "ldmkit": lambda: run_ldm(xd)}
    with torch.inference_mode():
        rows, outs = interleaved(fns, args.repeats)
    for k, row in rows.items():
        row.update(differences(outs[k], exact))
        row["gflop"] = flops / 1e9
    return {"case": f"VAE {what}, 1 image, {size} px", "dtype": str(dtype), "rows": rows}


def train_case(dtype: torch.dtype, args, batch: int = 8, latent: int = 32) -> dict:
    """One training step of the small UNet: forward, MSE backward, AdamW (bf16: autocast)."""
    from ldmkit.training.config import TrainConfig
    from ldmkit.training.loop import make_optimizer

    unet = build_unet(SMALL)
    ref = to_diffusers_unet(unet, latent)
    own = {k: v.clone() for k, v in ref.state_dict().items()}
    ref.load_state_dict(own, assign=True)  # its own copy: both are trained
    ref.train(), unet.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    ctx = torch.randn(batch, 77, SMALL["context_dim"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(batch, 4, latent, latent, generator=g)
    # Each side's own optimizer set-up with the same hyper-parameters: diffusers' training
    # scripts build torch.optim.AdamW with its defaults, ldmkit's loop builds it fused.
    opts = {
        "diffusers": torch.optim.AdamW(ref.parameters(), lr=1e-6, weight_decay=0.01),
        "ldmkit": make_optimizer(TrainConfig(lr=1e-6, weight_decay=0.01), list(unet.parameters())),
    }
    calls = {
        "diffusers": lambda: ref(x, t, encoder_hidden_states=ctx).sample,
        "ldmkit": lambda: unet(x, t, ctx),
    }

    def step(name: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = torch.nn.functional.mse_loss(calls[name]().float(), target)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            return loss.detach()

        return run

    flops = count_flops(lambda: calls["diffusers"]()) * 3  # forward + backward ~ 3x forward
    rows, outs = interleaved({k: step(k) for k in calls}, args.repeats)
    for k, row in rows.items():
        row.update(differences(outs[k], outs["diffusers"]))
        row["gflop"] = flops / 1e9
    return {
        "case": f"small UNet training step (fwd+bwd+AdamW), batch {batch}, {latent * 8} px",
        "dtype": str(dtype) + (" autocast" if dtype != torch.float32 else ""),
        "rows": rows,
    }


def t2i_case(size: int, dtype: torch.dtype, args) -> dict:
    """The whole text-to-image run: CLIP-L text encoder, SD 1.5 UNet, SD VAE, DPM-Solver++ 2M.

    diffusers runs every part in ``dtype`` (its pipelines take one dtype); ldmkit keeps its VAE
    in fp32 by default (against fp16 overflow), and in low precision a second ldmkit contender
    runs the VAE in ``dtype`` too, as diffusers does.
    """
    import copy

    import diffusers
    import transformers

    from ldmkit.accel.fastpaths import prepare_for_inference
    from ldmkit.autoencoders.base import AutoencoderConfig
    from ldmkit.autoencoders.kl import AutoencoderKL
    from ldmkit.interop.clip import clip_tokenizer
    from ldmkit.interop.diffusers_format import vae_config_to_diffusers, vae_keys_to_diffusers
    from ldmkit.interop.families import FAMILIES
    from ldmkit.interop.pipeline import StableDiffusionPipeline
    from ldmkit.interop.schedulers import SchedulerConfig

    unet = build_unet(SD15)
    d_unet = to_diffusers_unet(unet, size // 8)
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(**SD_VAE, scaling_factor=0.18215)).eval()
    with torch.device("meta"):
        d_vae = diffusers.AutoencoderKL(**vae_config_to_diffusers(vae.config, sample_size=size))
    d_vae.load_state_dict(vae_keys_to_diffusers(vae.state_dict()), assign=True)
    te_cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    te = transformers.CLIPTextModel(te_cfg).eval()
    d_te = transformers.CLIPTextModel(te_cfg).eval()
    d_te.load_state_dict(te.state_dict())
    tok = clip_tokenizer()
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    ref = diffusers.StableDiffusionPipeline(
        vae=d_vae.eval(), text_encoder=d_te, tokenizer=tok, unet=d_unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(dtype)  # fmt: skip
    ref.set_progress_bar_config(disable=True)

    def ldmkit_pipe(vae: torch.nn.Module) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoders=[te], tokenizers=[tok],
            encoder_specs=FAMILIES["sd1"].text_encoders, family=FAMILIES["sd1"],
            scheduler=SchedulerConfig.from_diffusers(dict(sched.config)),
        )  # fmt: skip

    prompt, steps = "a photograph of an astronaut riding a horse", args.t2i_steps

    def run(p: StableDiffusionPipeline) -> torch.Tensor:
        return p(
            prompt, steps=steps, sampler="dpmpp_2m", guidance=7.5, seed=0, height=size,
            width=size, output="tensor", progress=False,
        )  # fmt: skip

    prepare_for_inference(unet, dtype)
    te.to(dtype)
    pipe = ldmkit_pipe(vae)
    fns = {
        "diffusers": lambda: ref(
            prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
            generator=torch.Generator().manual_seed(0), output_type="pt",
        ).images * 2 - 1,
        "ldmkit": lambda: run(pipe),
    }  # fmt: skip
    if dtype != torch.float32:
        low = ldmkit_pipe(prepare_for_inference(copy.deepcopy(vae), dtype))
        fns[f"ldmkit, VAE {str(dtype)[6:]}"] = lambda: run(low)
    unet_flops = count_flops(lambda: d_unet(
        torch.zeros(2, 4, size // 8, size // 8, dtype=dtype), torch.tensor([1, 1]),
        encoder_hidden_states=torch.zeros(2, 77, 768, dtype=dtype),
    ))  # fmt: skip
    with torch.inference_mode():
        rows, outs = interleaved(fns, args.t2i_repeats)
    for k, row in rows.items():
        row.update(differences(outs[k], outs["diffusers"]))
        row["gflop"] = unet_flops * steps / 1e9  # the UNet's share; encoders and VAE not counted
    return {
        "case": f"text-to-image, {steps} steps dpmpp_2m + CFG, {size} px",
        "dtype": str(dtype),
        "rows": rows,
    }


# --cases: SD 1.5 UNet step, small UNet step, VAE decode+encode, training step, text-to-image
CASES = ("sd15", "small", "vae", "train", "t2i")


def run_case(case: str, dtype: torch.dtype, args) -> Iterator[dict]:
    """The results of one ``--cases`` entry, one table section at a time."""
    if case == "sd15":
        for size in args.sizes:
            yield unet_case("SD 1.5", SD15, size, dtype, args)
    elif case == "small":
        yield unet_case("small", SMALL, 256, dtype, args)
    elif case == "vae":
        for what in ("decode", "encode"):
            yield vae_case(args.vae_size, dtype, args, what)
    elif case == "train":
        yield train_case(dtype, args)
    elif case == "t2i" and args.t2i_steps:
        yield t2i_case(args.t2i_size, dtype, args)


def markdown(results: dict) -> str:
    lines = [
        f"Measured {results['date']} on {results['machine']}, torch {results['torch']}, "
        f"diffusers {results['diffusers']}, {results['threads']} threads. Peaks: fp32 "
        f"{results['peak_gflops']['fp32']:.0f} GFLOP/s, bf16 {results['peak_gflops']['bf16']:.0f}. "
        f"Command: `{results['command']}`.",
        "",
        "| case | dtype | contender | min s | median s | speed-up vs diffusers (paired median) "
        "| % of peak | peak RSS GiB | max abs diff vs diffusers fp32 | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        dt = case["dtype"].replace("torch.", "")
        peak = results["peak_gflops"]["bf16" if "bfloat16" in dt else "fp32"]
        for name, r in case["rows"].items():
            pct = 100 * r["gflop"] / r["min_s"] / peak
            extra = "".join(
                f" ({what} {r[key]:.0f} s)"
                for key, what in (("compile_s", "compile"), ("convert_s", "conversion"))
                if key in r
            )
            lines.append(
                f"| {case['case']} | {dt} | {name}{extra} | {r['min_s']:.3f} | {r['median_s']:.3f} "
                f"| {r.get('speedup_vs_diffusers', 1.0):.2f}x | {pct:.0f}% | "
                f"{r['peak_rss_gib']:.2f} | {r['max_abs_diff_vs_diffusers_fp32']:.1e} | "
                f"{r.get('rel_err_vs_diffusers_fp32', float('nan')):.1e} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256], help="SD 1.5 UNet image sizes")
    p.add_argument(
        "--cases", nargs="+", default=list(CASES), choices=list(CASES), help="which cases to run"
    )
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time ldmkit + torch.compile")
    p.add_argument(
        "--runtimes",
        action="store_true",
        help="also time the UNets in OpenVINO (fp32, bf16) and ONNX Runtime (fp32); needs\n"
        "pip install openvino==2026.4.1 onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2",
    )
    p.add_argument("--vae-size", type=int, default=256)
    p.add_argument("--t2i-steps", type=int, default=20, help="0 skips the text-to-image case")
    p.add_argument("--t2i-size", type=int, default=256)
    p.add_argument("--t2i-repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--recalibrate",
        type=Path,
        default=None,
        help="only re-measure the peaks, keep the best with those in this speed.json, rewrite it",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.recalibrate is not None:
        results = json.loads(args.recalibrate.read_text())
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peak = max(results["peak_gflops"][name], calibrate(dtype))
            results["peak_gflops"][name] = peak
        args.recalibrate.write_text(json.dumps(results, indent=2) + "\n")
        args.recalibrate.with_suffix(".md").write_text(markdown(results))
        return
    import diffusers

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": args.threads,
        "command": "python benchmarks/speed.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else
                                          f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
            for k, v in vars(args).items() if v is not False and v is not None
        ),
        "peak_gflops": {"fp32": calibrate(torch.float32), "bf16": calibrate(torch.bfloat16)},
        "cases": [],
    }  # fmt: skip
    for name in args.dtypes:
        dtype = dtypes[name]
        for case in args.cases:
            for result in run_case(case, dtype, args):
                results["cases"].append(result)
                print(markdown(results), flush=True)
    # the peaks again at the end, keeping the best: the host's load changes over a run
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results["peak_gflops"][name] = max(results["peak_gflops"][name], calibrate(dtype))
    # the tables printed above used the first peaks; this one is the table that is saved
    print("Final table (peaks re-measured at the end):", markdown(results), sep="\n", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "speed.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
