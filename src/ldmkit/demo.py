"""``make demo`` / ``ldmkit demo``: the main job on the bundled ``shapes`` data, from scratch.

Stage 1 (this release): train a KL autoencoder (f=4), then write a reconstruction grid and a
metrics JSON. Running it again resumes the finished run and only rewrites the outputs.
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


def run_demo(
    out: str | Path = "runs/demo", config: str | Path = "configs/demo/autoencoder.yaml"
) -> dict[str, Any]:
    """Train (or resume) the demo autoencoder and write ``OUT/reconstructions.png`` and ``OUT/metrics.json``."""
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
        "demo_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())
