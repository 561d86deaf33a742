"""What DeepCache costs and saves on a trained ``shapes`` text-to-image model.

    python benchmarks/cache_adherence.py runs/t2i_shapes_unet --n 128 --configs 2 3 4@0.3

For the run's default sampler, steps and guidance it samples ``--n`` fresh 1-object and 2-object
prompts (the prompts of ``ldmkit eval diffusion``) without caching and with
``ldmkit.accel.cache.deepcache`` in each configuration, on the same seeds, and reports the wall
time of the sampling (speed-up against uncached), the full/cached network calls, the verifier's
adherence, and the PSNR of the cached images against the uncached ones. A configuration is
``INTERVAL[@START[-END]][/BRANCH]``: ``4@0.3`` caches with interval 4 only from progress 0.3
on (the noisiest 30% of the timestep range always runs in full), ``3@0.2-0.9/1`` uses window
[0.2, 0.9] and skip branch 1 (see ``DeepCacheUNet``). Writes
``benchmarks/results/cache_adherence_<run>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from ldmkit.accel.cache import deepcache
from ldmkit.data.shapes import make_prompts
from ldmkit.eval.diffusion import PROMPT_SEED
from ldmkit.eval.shapes_verifier import adherence
from ldmkit.pipelines import load_pipeline


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def parse_config(text: str) -> dict:
    """``"4@0.3-0.9/1"`` -> interval 4, start 0.3, end 0.9, branch 1 (see the module doc)."""
    m = re.fullmatch(r"(\d+)(?:@([\d.]+)(?:-([\d.]+))?)?(?:/(\d+))?", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected INTERVAL[@START[-END]][/BRANCH], got {text!r}")
    interval, start, end, branch = m.groups()
    return {"interval": int(interval), "start": float(start or 0), "end": float(end or 1),
            "branch": int(branch or 0), "label": text}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="a shapes text-to-image run folder")
    p.add_argument("--n", type=int, default=128, help="prompts per group (1 and 2 objects)")
    p.add_argument(
        "--configs",
        type=parse_config,
        nargs="+",
        default=[parse_config("2"), parse_config("3")],
        help="DeepCache settings, INTERVAL[@START[-END]][/BRANCH] each (default: 2 3)",
    )
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    pipe = load_pipeline(args.run)
    groups = {k: make_prompts(args.n, seed=PROMPT_SEED + k, num_objects=k) for k in (1, 2)}

    def sample(prompts: list[str]) -> torch.Tensor:
        return pipe(prompts, seed=0, steps=args.steps, output="tensor", progress=False)

    rows, reference = [], {}
    for config in [parse_config("1"), *args.configs]:  # interval 1: the uncached reference
        row: dict = {**config, "seconds": 0.0}
        options = {k: config[k] for k in ("interval", "start", "end", "branch")}
        for k, prompts in groups.items():
            t0 = time.perf_counter()
            if config["interval"] == 1:
                images = sample(prompts)
                reference[k] = images
            else:
                with deepcache(pipe, **options) as cached:
                    images = sample(prompts)
                row["cached_calls"] = row.get("cached_calls", 0) + cached.cached_calls
                row["full_calls"] = row.get("full_calls", 0) + cached.full_calls
            row["seconds"] += time.perf_counter() - t0
            row[f"{k}_object"] = adherence(images, prompts)["accuracy"]
            row[f"psnr_{k}_object"] = psnr(images, reference[k])
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    name = Path(args.run).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = pipe.config
    steps = args.steps or cfg.steps
    meta = {"run": args.run, "n": args.n, "sampler": cfg.sampler, "steps": steps,
            "guidance": cfg.guidance, "date": time.strftime("%Y-%m-%d"), "rows": rows}  # fmt: skip
    stem = f"cache_adherence_{name}" + (f"_{args.steps}steps" if args.steps else "")
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        f"`python benchmarks/cache_adherence.py {args.run} --n {args.n}"
        + (f" --steps {args.steps}" if args.steps else "")
        + f" --configs {' '.join(c['label'] for c in args.configs)}` ({meta['date']}; "
        f"{cfg.sampler}, {steps} steps, CFG {cfg.guidance}; {args.n} prompts per group)",
        "",
        "| DeepCache (interval@window/branch) | full / cached calls | sampling s | speed-up "
        "| 1 object | 2 objects | PSNR vs uncached (1 / 2 obj.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = "off" if r["interval"] == 1 else r["label"]
        calls = f"{r['full_calls']} / {r['cached_calls']}" if "full_calls" in r else "—"
        lines.append(
            f"| {label} | {calls} | {r['seconds']:.1f} | {r['speedup']:.2f}x "
            f"| {100 * r['1_object']:.1f}% "
            f"| {100 * r['2_object']:.1f}% | {r['psnr_1_object']:.1f} / "
            f"{r['psnr_2_object']:.1f} dB |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
