"""Training the first stage: the recipe (config) and the task the training loop runs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ldmkit.autoencoders.base import AutoencoderBase, AutoencoderConfig
from ldmkit.autoencoders.losses import AutoencoderLoss, AutoencoderLossConfig
from ldmkit.config import from_dict, to_dict
from ldmkit.data.build import DataConfig, random_flip
from ldmkit.eval.metrics import psnr, ssim
from ldmkit.training.config import TrainConfig
from ldmkit.training.task import Task


@dataclass
class AutoencoderRecipe:
    """A whole autoencoder training job (``configs/autoencoder/*.yaml``)."""

    run_dir: str = "runs/autoencoder"
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latent_shift: bool = False  # also centre the latents (shift = mean), as SD3/Flux VAEs do

    def validate(self) -> None:
        if self.loss.kind != self.model.kind:  # the loss follows the bottleneck
            self.loss = replace(self.loss, kind=self.model.kind)
        if self.model.in_channels != self.data.channels:
            raise ValueError(
                f"model.in_channels={self.model.in_channels} but data.channels={self.data.channels}; "
                "set both to the same value"
            )
        f = self.model.downsampling_factor
        if self.data.image_size % f:
            raise ValueError(f"data.image_size={self.data.image_size} is not a multiple of f={f}")


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderBase:
    """An untrained ``AutoencoderKL`` or ``VQAutoencoder`` for ``config``."""
    if config.kind == "kl":
        from ldmkit.autoencoders.kl import AutoencoderKL

        return AutoencoderKL(config)
    from ldmkit.autoencoders.vq import VQAutoencoder

    return VQAutoencoder(config)


class AutoencoderTask(Task):
    """Reconstruction (+ perceptual, + adversarial after warm-up) with a KL or VQ bottleneck."""

    def __init__(self, recipe: AutoencoderRecipe):
        self.recipe = recipe
        self.model = build_autoencoder(recipe.model)
        self.loss = AutoencoderLoss(recipe.loss, image_channels=recipe.model.out_channels)
        # The discriminator gets an optimizer only if it switches on within this run.
        self.use_disc = recipe.loss.disc_start < recipe.train.steps

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "loss": self.loss}

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        groups = {"model": list(self.model.parameters()) + list(self.loss.generator_parameters())}
        if self.use_disc:
            groups["disc"] = list(self.loss.disc_parameters())
        return groups

    def training_step(
        self, batch: dict[str, Any], step: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        x = batch["image"]
        if self.recipe.data.random_flip:
            x = random_flip(x, generator)
        recon, reg, logs = self.model(x, generator=generator)
        total, g_logs = self.loss.generator_loss(
            x, recon, reg_loss=reg, last_layer=self.model.last_layer, step=step
        )
        out = {"model": total, **g_logs, **logs}
        if self.use_disc and step >= self.recipe.loss.disc_start:
            d_total, d_logs = self.loss.discriminator_loss(x, recon, step=step)
            out.update(disc=d_total, **d_logs)
        return out

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        return reconstruction_metrics(self.model, batches)

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        x = batch["image"][:8]
        return torch.cat([x, self.model.reconstruct(x).clamp(-1, 1)]), len(x)

    def export_config(self) -> dict[str, Any]:
        return {"kind": "autoencoder", "config": to_dict(self.model.config)}

    def restore_export_config(self, config: dict[str, Any]) -> None:
        self.model.config = from_dict(AutoencoderConfig, config["config"])

    @torch.no_grad()
    def on_train_end(self, batches: list[dict[str, Any]]) -> None:
        """Set the latent scale (and shift) from held-out data: scale = 1 / std(z)."""
        if not batches:
            return
        z = torch.cat([self.model.encode(b["image"], scaled=False) for b in batches])
        shift = z.mean().item() if self.recipe.latent_shift else 0.0
        scale = 1.0 / (z - shift).std().item()
        self.model.config = replace(self.model.config, scaling_factor=scale, shift_factor=shift)


@torch.no_grad()
def reconstruction_metrics(model: AutoencoderBase, batches: Any) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of deterministic reconstructions, images in [-1, 1].

    For a VQ model also ``code_usage``: the fraction of codebook entries that quantize at
    least one latent vector of these images, and ``code_perplexity`` of their histogram.
    """
    p, s, n = 0.0, 0.0, 0
    vq = getattr(model, "quantize", None)
    counts = torch.zeros(vq.num_codes) if vq is not None else None
    for batch in batches:
        x = batch["image"]
        recon = model.reconstruct(x).clamp(-1, 1)
        p += psnr(recon, x).clamp(max=100.0).sum().item()
        s += ssim(recon, x).sum().item()
        n += len(x)
        if counts is not None:
            indices = vq(model.encode(x, scaled=False))[2]["indices"]
            counts += torch.bincount(indices.flatten(), minlength=vq.num_codes).float()
    metrics = {"psnr": p / n, "ssim": s / n, "n": float(n)}
    if counts is not None:
        probs = counts / counts.sum()
        metrics["code_usage"] = (counts > 0).float().mean().item()
        metrics["code_perplexity"] = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()).item()
    return metrics


def load_autoencoder(path: str | Path) -> AutoencoderBase:
    """An autoencoder from a run folder or checkpoint folder (weights never unpickled)."""
    from ldmkit.training.checkpoint import load_model_files

    weights, meta = load_model_files(path)
    if meta.get("kind") != "autoencoder":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} model, not an autoencoder")
    model = build_autoencoder(from_dict(AutoencoderConfig, meta["config"]))
    model.load_state_dict(weights)
    return model.eval()


def read_recipe(run_dir: str | Path) -> dict[str, Any]:
    """The resolved recipe saved in a run folder (as a plain dict)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an ldmkit run folder?")
    return yaml.safe_load(path.read_text()) or {}
