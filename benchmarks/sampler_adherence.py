"""Prompt adherence on ``shapes`` for every registered sampler at several step counts.

    python benchmarks/sampler_adherence.py runs/t2i_shapes_unet --steps 10 20 50 --n 64

For each sampler and step count it samples ``--n`` fresh 1-object and ``--n`` 2-object prompts
(the prompts of ``ldmkit eval diffusion``, same seeds for every sampler) and reports the
verifier's accuracy and the network evaluations per image (NFE; one CFG call with the
conditional and unconditional halves batched counts once). Writes
``benchmarks/results/sampler_adherence_<run>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldmkit.eval.diffusion import shapes_adherence
from ldmkit.pipelines import load_pipeline
from ldmkit.samplers import SAMPLERS

BATCH = 64  # images per sampler call: the denoiser runs once per step for each batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="a shapes text-to-image run folder")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--n", type=int, default=64, help="prompts per group (1 and 2 objects)")
    p.add_argument("--samplers", nargs="+", default=sorted(SAMPLERS))
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.samplers) - set(SAMPLERS))
    if unknown:
        raise SystemExit(f"unknown samplers {unknown}; known: {', '.join(sorted(SAMPLERS))}")

    pipe = load_pipeline(args.run)
    calls = [0]
    pipe.model.denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    rows = []
    for sampler in args.samplers:
        for steps in args.steps:
            row = {"sampler": sampler, "steps": steps}
            started, calls[0] = time.perf_counter(), 0
            for k in (1, 2):
                result = shapes_adherence(
                    pipe,
                    args.n,
                    num_objects=k,
                    steps=steps,
                    sampler=sampler,
                    guidance=args.guidance,
                    batch_size=BATCH,
                )
                row[f"{k}_object"] = result["accuracy"]
            batches = 2 * -(-args.n // BATCH)  # both groups
            row["nfe"] = calls[0] / batches
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.run).resolve().name
    meta = {
        "run": str(args.run),
        "n_per_group": args.n,
        "guidance": pipe.config.guidance if args.guidance is None else args.guidance,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / f"sampler_adherence_{name}.json").write_text(
        json.dumps({**meta, "rows": rows}, indent=2)
    )
    lines = [
        f"Adherence on shapes, run `{args.run}`, {args.n} prompts per group, "
        f"CFG {meta['guidance']}, {meta['date']}.",
        "",
        "| sampler | " + " | ".join(f"{s} steps (1 obj / 2 obj, NFE)" for s in args.steps) + " |",
        "|---|" + "---|" * len(args.steps),
    ]
    for sampler in args.samplers:
        cells = [
            f"{r['1_object']:.0%} / {r['2_object']:.0%}, {r['nfe']:.0f}"
            for r in rows
            if r["sampler"] == sampler
        ]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    (out / f"sampler_adherence_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
