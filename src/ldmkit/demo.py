"""``make demo`` / ``ldmkit demo``: the main job on the bundled ``shapes`` data, from scratch.

1. Train a KL autoencoder (f=4) and write a reconstruction grid (``OUT/reconstructions.png``).
2. Train a text-conditional LDM in its latent space (``OUT/t2i``, loadable with
   ``ldmkit.load_pipeline``), sample a grid for fixed prompts (``OUT/samples.png``) and measure
   the verifier's adherence on fresh 1- and 2-object prompts.

Everything lands in ``OUT/metrics.json``. Running it again resumes the finished runs and only
rewrites the outputs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ldmkit.autoencoders.task import load_autoencoder, reconstruction_metrics
from ldmkit.autoencoders.train import train_autoencoder
from ldmkit.data.shapes import ShapesDataset
from ldmkit.data.transforms import make_grid
from ldmkit.diffusion.train import train_diffusion
from ldmkit.eval.diffusion import shapes_adherence
from ldmkit.pipelines import load_pipeline
from ldmkit.utils.io import atomic_write_json

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _find_config(config: str | Path) -> Path:
    path = Path(config)
    if path.is_file():
        return path
    fallback = (
        REPO_CONFIGS / Path(config).relative_to("configs")
        if str(config).startswith("configs")
        else None
    )
    if fallback is not None and fallback.is_file():
        return fallback
    raise FileNotFoundError(f"demo recipe not found: {config} (run from the ldmkit checkout)")


DEMO_PROMPTS = [
    "a red circle in the center",
    "a blue square at the top left",
    "a green triangle on the right",
    "a yellow circle at the bottom",
    "a purple square at the top right",
    "an orange triangle on the left",
    "a red square in the center and a blue circle at the top left",
    "a green circle on the left and a yellow triangle at the bottom right",
]


def run_demo(
    out: str | Path = "runs/demo",
    config: str | Path = "configs/demo/autoencoder.yaml",
    t2i_config: str | Path = "configs/demo/t2i.yaml",
    n_eval: int = 64,
) -> dict[str, Any]:
    """Train (or resume) both demo stages and write the grids and ``OUT/metrics.json``."""
    out = Path(out)
    started = time.perf_counter()
    ae_dir = out / "autoencoder"
    train_autoencoder(_find_config(config), [f"run_dir={ae_dir}"])
    model = load_autoencoder(ae_dir)
    # 16 fixed held-out images: originals in the top rows, reconstructions below.
    test = ShapesDataset(size=16, split="test", seed=0)
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    with torch.no_grad():
        recon = model.reconstruct(x).clamp(-1, 1)
    make_grid(torch.cat([x[:8], recon[:8], x[8:], recon[8:]]), nrow=8).save(
        out / "reconstructions.png"
    )
    test_metrics = reconstruction_metrics(model, [{"image": x}])
    summary = {
        "autoencoder": {
            "run": str(ae_dir),
            **{k: v for k, v in _read_json(ae_dir / "metrics.json").items()},
            "test16_psnr": test_metrics["psnr"],
            "test16_ssim": test_metrics["ssim"],
        },
    }
    summary["t2i"] = _text_to_image(out, ae_dir, _find_config(t2i_config), n_eval)
    summary["demo_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _text_to_image(out: Path, ae_dir: Path, config: Path, n_eval: int) -> dict[str, Any]:
    """Stage 2: train (or resume) the LDM, write ``OUT/samples.png``, measure adherence."""
    t2i_dir = out / "t2i"
    train_diffusion(config, [f"run_dir={t2i_dir}", f"autoencoder={ae_dir}"])
    pipe = load_pipeline(t2i_dir)
    images = pipe(DEMO_PROMPTS, seed=0, output="tensor", progress=False)
    make_grid(images, nrow=len(DEMO_PROMPTS)).save(out / "samples.png")
    result: dict[str, Any] = {
        "run": str(t2i_dir),
        **_read_json(t2i_dir / "metrics.json"),
        "sampler": pipe.config.sampler,
        "steps": pipe.config.steps,
        "guidance": pipe.config.guidance,
        "prompts": DEMO_PROMPTS,
    }
    for k in (1, 2):
        result[f"adherence_{k}_object"] = shapes_adherence(pipe, n_eval, num_objects=k)
    return result


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())
