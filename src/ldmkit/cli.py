"""The ``ldmkit`` command line.

Each sub-command is a thin layer over the Python API; ``ldmkit COMMAND --help`` explains it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXAMPLES = {
    "train": """examples:
  ldmkit train autoencoder configs/autoencoder/kl_f4_shapes.yaml
  ldmkit train autoencoder configs/autoencoder/kl_f4_shapes.yaml train.steps=500 run_dir=runs/quick
  ldmkit train autoencoder configs/autoencoder/kl_f4_folder.yaml data.path=~/my_images
  ldmkit train diffusion configs/diffusion/t2i_shapes_unet.yaml
  ldmkit train classifier configs/classifier/fashion_mnist.yaml

Any config key can be overridden as section.key=value (values are YAML). Running the same
command again resumes from the run's latest checkpoint; Ctrl-C stops after the current step
and saves a checkpoint.""",
    "eval": """examples:
  ldmkit eval autoencoder runs/kl_f4_shapes
  ldmkit eval autoencoder runs/kl_f4_shapes --n 1024 data.path=~/other_images
  ldmkit eval diffusion runs/t2i_shapes_unet --n 256
  ldmkit eval diffusion runs/class_fashion_mnist --classifier runs/classifier_fashion_mnist

Writes RUN/eval.json and prints the metrics: PSNR in dB and SSIM on the held-out split for
autoencoders; verifier adherence of 1- and 2-object prompts (--n each) for shapes
text-to-image; recognition by the classifier and Frechet distances (--n samples per class)
for class-conditional runs.""",
    "reconstruct": """examples:
  ldmkit reconstruct runs/kl_f4_shapes photo.png --out recon/
  ldmkit reconstruct runs/kl_f4_shapes my_folder/ --out recon/ --size 0

Writes one reconstruction per image, comparison.png (originals above reconstructions) and
psnr.json into --out.""",
    "sample": """examples:
  ldmkit sample runs/demo/t2i --prompt "a red circle in the center" --n 8 --out grid.png
  ldmkit sample runs/demo/t2i --prompt "a blue square at the top left" --prompt "a green triangle on the left" \
      --sampler euler_ancestral --steps 50 --guidance 5 --out samples/
  ldmkit sample runs/class_fashion_mnist --class-label 3 --n 16 --out dresses.png

Stable Diffusion 1.x / 2.x / XL checkpoints (a .safetensors file or a diffusers folder):
  ldmkit sample --checkpoint v1-5-pruned-emaonly.safetensors --prompt "a watercolor fox" \
      --steps 25 --sampler dpmpp_2m --guidance 7.5 --out fox.png
  ldmkit sample --checkpoint sd_xl_base_1.0.safetensors --prompt "a lighthouse" --dtype bf16 \
      --height 768 --width 1024 --out lighthouse.png

Image k is drawn from its own generator seeded SEED+k: the same seed gives the same image
whatever --n or the number of prompts (and, for image 0, the same initial noise as diffusers
with torch.Generator().manual_seed(SEED)).""",
    "convert": """examples:
  ldmkit convert v1-5-pruned-emaonly.safetensors sd15-diffusers --to diffusers
  ldmkit convert sd15-diffusers sd15.safetensors --to single-file
  ldmkit convert sd15.safetensors sd15-ldmkit --to ldmkit
  ldmkit convert 768-v-ema.ckpt sd21v.safetensors --to single-file --allow-pickle --family sd2-v

The family (sd1, sd1-inpaint, sd2, sd2-v, sd2-inpaint, sdxl, sdxl-inpaint) is detected from the
weights' keys and shapes; SD 2.x files do not say whether they predict eps or v, so pass
--prediction (or --family) when the guess (v, 768 px) is wrong. Nothing is downloaded.""",
    "dataset": """examples:
  ldmkit dataset preview shapes --out shapes.png
  ldmkit dataset preview shapes --out shapes64.png --image-size 64 --n 16
  ldmkit dataset preview folder ~/my_images --out mine.png
  ldmkit dataset preview fashion_mnist --out fmnist.png""",
}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="ldmkit: %(message)s",
        stream=sys.stderr,
    )


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="ldmkit", description="Latent diffusion toolkit: train, evaluate and use models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model from a YAML recipe",
        epilog=EXAMPLES["train"],
        formatter_class=fmt,
    )
    t.add_argument(
        "what",
        choices=["autoencoder", "diffusion", "classifier"],
        help="which stage to train (classifier: the judge of class-conditional samples)",
    )
    t.add_argument("config", help="YAML recipe (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.add_argument(
        "--restart",
        action="store_true",
        help="start from scratch: remove run_dir's earlier checkpoints, samples and logs",
    )
    t.add_argument("--stop-at", type=int, default=None, help="pause after this step (resume later)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser(
        "eval", help="evaluate a trained run", epilog=EXAMPLES["eval"], formatter_class=fmt
    )
    e.add_argument("what", choices=["autoencoder", "diffusion"])
    e.add_argument("run", help="run folder (or a checkpoint folder inside it)")
    e.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override the run's data section, e.g. data.path=...",
    )
    e.add_argument(
        "--n", type=int, default=None, help="held-out images to use (default: data.val_size)"
    )
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument(
        "--steps", type=int, default=None, help="diffusion: sampler steps (default: the model's)"
    )
    e.add_argument("--sampler", default=None, help="diffusion: sampler name (default: the model's)")
    e.add_argument(
        "--guidance", type=float, default=None, help="diffusion: CFG scale (default: the model's)"
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--classifier",
        default=None,
        help="diffusion, class-conditional runs: a folder from `ldmkit train classifier`",
    )

    s = sub.add_parser(
        "sample",
        help="generate images with a trained diffusion run",
        epilog=EXAMPLES["sample"],
        formatter_class=fmt,
    )
    s.add_argument("run", nargs="?", default=None, help="diffusion run folder")
    s.add_argument(
        "--checkpoint",
        default=None,
        help="a Stable Diffusion checkpoint instead of a run: .safetensors file, diffusers "
        "folder or ldmkit export",
    )
    s.add_argument("--prompt", action="append", default=None, help="prompt (repeat for several)")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument(
        "--class-label",
        type=int,
        action="append",
        default=None,
        help="class index (class-conditional models)",
    )
    s.add_argument("--n", type=int, default=1, help="images per prompt")
    s.add_argument(
        "--out", required=True, help="a .png path (one grid) or a folder (one file per image)"
    )
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--sampler", default=None, help="one of ldmkit.samplers.SAMPLERS")
    s.add_argument("--schedule", default=None, help="karras, exponential, discrete or flow")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    _checkpoint_options(s)
    s.add_argument(
        "--guidance-rescale", type=float, default=0.0, help="guidance rescale phi (checkpoints)"
    )

    c = sub.add_parser(
        "convert",
        help="convert Stable Diffusion checkpoints between formats",
        epilog=EXAMPLES["convert"],
        formatter_class=fmt,
    )
    c.add_argument("input", help="a .safetensors/.ckpt file, a diffusers folder or ldmkit export")
    c.add_argument("output", help="the file (single-file) or new folder to write")
    c.add_argument("--to", required=True, choices=["diffusers", "single-file", "ldmkit"])
    _checkpoint_options(c)

    r = sub.add_parser(
        "reconstruct",
        help="encode and decode images with an autoencoder",
        epilog=EXAMPLES["reconstruct"],
        formatter_class=fmt,
    )
    r.add_argument("run", help="autoencoder run folder")
    r.add_argument("input", help="an image file or a folder of images")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize/crop to SIZE (default: the run's image size; 0 keeps the native size, cropped to a multiple of f)",
    )

    d = sub.add_parser(
        "dataset", help="look at datasets", epilog=EXAMPLES["dataset"], formatter_class=fmt
    )
    dsub = d.add_subparsers(dest="action", required=True)
    pv = dsub.add_parser(
        "preview",
        help="write a grid of dataset images",
        epilog=EXAMPLES["dataset"],
        formatter_class=fmt,
    )
    pv.add_argument("name", choices=["shapes", "folder", "fashion_mnist", "mnist"])
    pv.add_argument("path", nargs="?", default=None, help="image folder (for 'folder')")
    pv.add_argument("--out", required=True, help="PNG file to write")
    pv.add_argument("--n", type=int, default=64, help="number of images")
    pv.add_argument("--image-size", type=int, default=32)
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--captions", action="store_true", help="also print the captions / labels")

    dm = sub.add_parser("demo", help="run the demo (what `make demo` runs)")
    dm.add_argument("--out", default="runs/demo", help="output folder")
    dm.add_argument(
        "--config", default="configs/demo/autoencoder.yaml", help="stage 1 (autoencoder) recipe"
    )
    dm.add_argument(
        "--t2i-config", default="configs/demo/t2i.yaml", help="stage 2 (text-to-image) recipe"
    )
    dm.add_argument(
        "--n-eval", type=int, default=64, help="prompts per adherence group (1 and 2 objects)"
    )
    return p


def _checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--family",
        default=None,
        choices=["sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-inpaint"],
        help="checkpoints: override the detected model family",
    )
    p.add_argument("--prediction", default=None, choices=["eps", "v"], help="override eps/v")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="checkpoints: UNet/text encoder precision (sample: fp32 by default; convert: as "
        "stored); the VAE stays fp32 when sampling",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="permit .ckpt/.pt/.bin files (read with torch.load(weights_only=True))",
    )


def _dtype(name: str | None):  # noqa: ANN202 - torch imported lazily
    import torch

    return {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cmd_train(args: argparse.Namespace) -> int:
    if args.what == "classifier":
        from ldmkit.eval.class_conditional import train_judge

        metrics = train_judge(args.config, args.overrides, progress=not args.no_progress)
        print(json.dumps(metrics, indent=2))
        return 0
    if args.what == "diffusion":
        from ldmkit.diffusion.train import train_diffusion as train
    else:
        from ldmkit.autoencoders.train import train_autoencoder as train

    metrics = train(
        args.config,
        args.overrides,
        resume=not args.restart,
        stop_at=args.stop_at,
        progress=not args.no_progress,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.what == "diffusion":
        from ldmkit.eval.diffusion import evaluate_diffusion

        metrics = evaluate_diffusion(
            args.run,
            n=args.n,
            steps=args.steps,
            sampler=args.sampler,
            guidance=args.guidance,
            seed=args.seed,
            classifier=args.classifier,
        )
    else:
        from ldmkit.autoencoders.train import evaluate_autoencoder

        metrics = evaluate_autoencoder(
            args.run, args.overrides, n=args.n, batch_size=args.batch_size
        )
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from ldmkit.autoencoders.train import reconstruct_files

    results = reconstruct_files(args.run, args.input, args.out, size=args.size)
    for name, value in results.items():
        print(f"{name}\t{value:.2f} dB")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from ldmkit.data.transforms import make_grid
    from ldmkit.pipelines import load_pipeline

    if (args.run is None) == (args.checkpoint is None):
        raise ValueError("pass either a run folder or --checkpoint PATH")
    if args.checkpoint is not None:
        images = _sample_checkpoint(args)
    else:
        images = load_pipeline(args.run)(
            args.prompt,
            class_labels=args.class_label,
            negative_prompt=args.negative_prompt,
            num_images_per_prompt=args.n,
            steps=args.steps,
            sampler=args.sampler,
            schedule=args.schedule,
            guidance=args.guidance,
            seed=args.seed,
            height=args.height,
            width=args.width,
            output="tensor",
        )
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, nrow=args.n if len(images) > args.n else min(8, len(images))).save(out)
    else:
        from ldmkit.data.transforms import to_pil

        out.mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(torch.unbind(images)):
            to_pil(img).save(out / f"{k:04d}_seed{args.seed + k}.png")
    print(f"wrote {len(images)} images to {out}")
    return 0


def _sample_checkpoint(args: argparse.Namespace):  # noqa: ANN202
    import torch

    from ldmkit.interop.load import load_stable_diffusion

    if not args.prompt:
        raise ValueError("Stable Diffusion checkpoints need --prompt")
    pipe = load_stable_diffusion(
        args.checkpoint,
        family=args.family,
        prediction=args.prediction,
        dtype=_dtype(args.dtype) or torch.float32,
        allow_pickle=args.allow_pickle,
    )
    print(f"loaded {args.checkpoint}: {pipe.family.description}", file=sys.stderr)
    return pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.n,
        steps=args.steps or 30,
        sampler=args.sampler or "dpmpp_2m",
        schedule=args.schedule or "diffusers",
        guidance=7.5 if args.guidance is None else args.guidance,
        guidance_rescale=args.guidance_rescale,
        seed=args.seed,
        height=args.height,
        width=args.width,
        output="tensor",
    )


def cmd_convert(args: argparse.Namespace) -> int:
    from ldmkit.interop.convert import convert

    out = convert(
        args.input,
        args.output,
        to=args.to,
        family=args.family,
        prediction=args.prediction,
        dtype=_dtype(args.dtype),
        allow_pickle=args.allow_pickle,
    )
    print(f"wrote {out}")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    import torch

    from ldmkit.config import from_dict
    from ldmkit.data.build import DataConfig, build_dataset
    from ldmkit.data.transforms import make_grid

    channels = 1 if args.name in ("fashion_mnist", "mnist") else 3
    cfg = from_dict(
        DataConfig,
        {
            "name": args.name,
            "path": args.path,
            "image_size": args.image_size,
            "channels": channels,
            "seed": args.seed,
        },
    )
    data = build_dataset(cfg, "train")
    n = min(args.n, len(data))
    items = [data[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow=max(1, int(n**0.5))).save(out)
    if args.captions:
        for i, it in enumerate(items):
            print(f"{i}\t{it.get('text', '')}")
    print(f"wrote {out} ({n} images of {len(data)})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ldmkit.demo import run_demo

    print(json.dumps(run_demo(args.out, args.config, args.t2i_config, args.n_eval), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    from ldmkit.config import ConfigError
    from ldmkit.training.checkpoint import CheckpointError
    from ldmkit.training.loop import TrainingDiverged

    handlers = {
        "train": cmd_train,
        "eval": cmd_eval,
        "reconstruct": cmd_reconstruct,
        "sample": cmd_sample,
        "convert": cmd_convert,
        "dataset": cmd_dataset,
        "demo": cmd_demo,
    }
    try:
        return handlers[args.command](args)
    except (
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        TrainingDiverged,
    ) as err:
        if args.verbose:
            raise
        print(f"ldmkit: error: {err}", file=sys.stderr)
        return 3 if isinstance(err, TrainingDiverged) else 2


if __name__ == "__main__":
    sys.exit(main())
