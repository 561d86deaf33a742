"""Entry points behind ``ldmkit train/eval autoencoder`` and ``ldmkit reconstruct``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from ldmkit.autoencoders.task import (
    AutoencoderRecipe,
    AutoencoderTask,
    load_autoencoder,
    read_recipe,
    reconstruction_metrics,
)
from ldmkit.config import apply_overrides, from_dict, load_config
from ldmkit.data.build import DataConfig, build_dataset
from ldmkit.training.loop import Trainer, run_training
from ldmkit.utils.io import atomic_write_json

log = logging.getLogger("ldmkit")


def train_autoencoder(
    config: str | Path | AutoencoderRecipe,
    overrides: list[str] | None = None,
    *,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) an autoencoder from a recipe; returns the final metrics.

    Writes RUN/config.yaml, checkpoints, samples, logs and RUN/metrics.json.
    """
    recipe = (
        config
        if isinstance(config, AutoencoderRecipe)
        else load_config(AutoencoderRecipe, config, overrides)
    )
    # Build the data first: a bad folder fails here, before anything is written.
    train_data = build_dataset(recipe.data, "train")
    val_data = build_dataset(recipe.data, "val")
    torch.manual_seed(recipe.train.seed)  # the initial weights depend on the seed only
    task = AutoencoderTask(recipe)
    log.info(
        "training %s autoencoder (f=%d, %.2fM parameters) on %s -> %s",
        recipe.model.kind,
        recipe.model.downsampling_factor,
        sum(p.numel() for p in task.model.parameters()) / 1e6,
        recipe.data.name,
        recipe.run_dir,
    )

    def summary(trainer: Trainer) -> dict[str, Any]:
        extra = {
            "downsampling_factor": recipe.model.downsampling_factor,
            "latent_shape": _latent_shape(recipe),
            "scaling_factor": task.model.config.scaling_factor,
            "shift_factor": task.model.config.shift_factor,
        }
        if recipe.model.kind == "vq" and trainer.step == recipe.train.steps:
            usage = task.model.quantize.codebook_usage()
            extra.update({f"codebook_{k}": float(v) for k, v in usage.items()})
        return extra

    return run_training(
        task,
        recipe,
        train_data,
        val_data,
        val_batches=-(-len(val_data) // recipe.train.batch_size),
        resume=resume,
        stop_at=stop_at,
        progress=progress,
        summary=summary,
    )


def _latent_shape(recipe: AutoencoderRecipe) -> list[int]:
    side = recipe.data.image_size // recipe.model.downsampling_factor
    return [recipe.model.latent_channels, side, side]


def evaluate_autoencoder(
    run: str | Path,
    overrides: list[str] | None = None,
    *,
    n: int | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """PSNR/SSIM of a trained autoencoder on its held-out split; writes RUN/eval.json."""
    run = Path(run)
    model = load_autoencoder(run)
    recipe = read_recipe(run if (run / "config.yaml").is_file() else run.parent.parent)
    data_cfg = from_dict(
        DataConfig, apply_overrides(dict(recipe.get("data", {})), list(overrides or []))
    )
    val = build_dataset(data_cfg, "val")
    if n is not None:
        val = Subset(val, range(min(n, len(val))))
    batches = DataLoader(val, batch_size=batch_size)
    metrics = reconstruction_metrics(model, batches)
    metrics["scaling_factor"] = model.config.scaling_factor
    if (run / "config.yaml").is_file():
        atomic_write_json(run / "eval.json", metrics)
    return metrics


def reconstruct_files(
    run: str | Path, source: str | Path, out: str | Path, *, size: int | None = None
) -> dict[str, float]:
    """Reconstruct one image or every image of a folder; returns PSNR (dB) per file."""
    from ldmkit.data.folder import IMAGE_EXTENSIONS
    from ldmkit.data.transforms import load_image, make_grid, resize_and_crop, to_pil, to_tensor
    from ldmkit.eval.metrics import psnr

    model = load_autoencoder(run)
    source, out = Path(source), Path(out)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    elif source.is_file():
        files = [source]
    else:
        raise FileNotFoundError(f"no such image or folder: {source}")
    if not files:
        raise ValueError(f"{source} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    if size is None:
        size = (
            int(read_recipe(run).get("data", {}).get("image_size", 0))
            if (Path(run) / "config.yaml").is_file()
            else 0
        )
    channels, f = model.config.in_channels, model.downsampling_factor
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}
    pairs: list[torch.Tensor] = []
    for path in files:
        try:
            img = load_image(path, channels=channels)
        except Exception as err:  # unreadable file: report it, keep going
            log.warning("skipped %s: %s", path, err)
            continue
        if size:
            img = resize_and_crop(img, size)
        else:  # native size, cropped to a multiple of f
            img = img.crop((0, 0, img.width - img.width % f, img.height - img.height % f))
        x = to_tensor(img).unsqueeze(0)
        with torch.no_grad():
            recon = model.reconstruct(x).clamp(-1, 1)
        results[path.name] = float(psnr(recon, x)[0])
        to_pil(recon[0]).save(out / (path.stem + ".png"))
        if size:
            pairs += [x[0], recon[0]]
    if pairs:
        grid = torch.stack(pairs[0::2][:16] + pairs[1::2][:16])
        make_grid(grid, nrow=min(16, len(pairs) // 2)).save(out / "comparison.png")
    atomic_write_json(out / "psnr.json", results)
    return results
