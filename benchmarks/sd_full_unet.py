"""Load a full-size Stable Diffusion 1.5-layout UNet (random weights) and run one step.

Writes a 3.4 GB fp32 single-file UNet with SD 1.5's real layout (860M parameters) once, then,
in a fresh process, measures how long ``ldmkit.interop.load.load_unet`` takes, the peak
resident memory of that process against the size of the weights (the loader is built to hold
one copy: tensors are read straight into their final memory and assigned to a meta-device
module), and the time of UNet evaluations at batch 2 (classifier-free guidance) on 256 px
images (32x32 latents).

    python benchmarks/sd_full_unet.py [--file /tmp/sd15_unet.safetensors] [--threads 2]

Results go to benchmarks/results/sd_full_unet.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from speed import SD15, build_unet, peak_rss_gib

RESULTS = Path(__file__).parent / "results"


def write_weights(path: Path) -> None:
    from ldmkit.interop.files import write_safetensors

    unet = build_unet(SD15)  # speed.py's: fixed seed, every layer random
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    write_safetensors(state, path, metadata={"format": "pt"})


def measure(path: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from ldmkit.interop.load import load_unet

    rss0 = peak_rss_gib()
    t0 = time.perf_counter()
    unet = load_unet(path, family="sd1")
    load_s = time.perf_counter() - t0
    rss_load = peak_rss_gib()
    n_params = sum(p.numel() for p in unet.parameters())
    weights_gb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    times = []
    with torch.inference_mode():
        for _ in range(3):  # the first call also sets up the kernels
            t0 = time.perf_counter()
            out = unet(x, torch.tensor([500, 500]), ctx)
            times.append(time.perf_counter() - t0)
    rss_step = peak_rss_gib()
    return {
        "parameters": n_params,
        "weights_gib": round(weights_gb, 3),
        "load_s": round(load_s, 2),
        "peak_rss_after_import_gib": round(rss0, 3),
        "peak_rss_after_load_gib": round(rss_load, 3),
        "load_overhead_gib": round(rss_load - rss0 - weights_gb, 3),
        "first_step_batch2_256px_s": round(times[0], 2),
        "step_batch2_256px_s_min_of_next_2": round(min(times[1:]), 2),
        "peak_rss_after_step_gib": round(rss_step, 3),
        "output_finite": bool(torch.isfinite(out).all()),
        "threads": threads,
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--file", type=Path, default=Path("/tmp/sd15_unet_random.safetensors"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.file, args.threads)))
        return
    if not args.file.is_file():
        print(f"writing random SD 1.5-layout UNet weights to {args.file} ...", file=sys.stderr)
        write_weights(args.file)
    cmd = [sys.executable, __file__, "--child", "--file", str(args.file)]
    cmd += ["--threads", str(args.threads)]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    result["file_gib"] = round(args.file.stat().st_size / 2**30, 3)
    result["date"] = time.strftime("%Y-%m-%d")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sd_full_unet.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items())
    table = f"| measure | value |\n|---|---|\n{rows}\n"
    (RESULTS / "sd_full_unet.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
